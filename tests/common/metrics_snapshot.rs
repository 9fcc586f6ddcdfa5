//! Reading metrics back through the `metrics-util` debugging recorder.

#![allow(dead_code)]

use std::future::Future;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// Runs `body` on a runtime of its own with a fresh recorder installed for this thread;
/// returns the body's output and what its work recorded.
pub fn recording<F: Future>(body: impl FnOnce() -> F) -> (F::Output, Recorded) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let output = metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body())
    });
    (output, Recorded::take(&snapshotter))
}

/// One metric: its kind, name, labels and value.
type Metric = (MetricKind, String, Vec<(String, String)>, DebugValue);

/// What a recorder holds.
pub struct Recorded(Vec<Metric>);

impl Recorded {
    pub fn take(snapshotter: &Snapshotter) -> Self {
        Recorded(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| {
                    let kind = key.kind();
                    let key = key.key();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_string(), l.value().to_string()))
                        .collect();
                    (kind, key.name().to_string(), labels, value)
                })
                .collect(),
        )
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a DebugValue> {
        self.0
            .iter()
            .filter(move |(_, n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, _, v)| v)
    }

    /// The sum of the counters named `name` carrying every label in `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|v| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    }

    /// How many samples the histograms named `name` with `labels` hold.
    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.matching(name, labels)
            .map(|v| match v {
                DebugValue::Histogram(h) => h.len(),
                _ => 0,
            })
            .sum()
    }
}
