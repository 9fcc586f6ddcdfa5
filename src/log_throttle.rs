//! Log lines that would repeat per request (an outage answering every request 503, leases
//! failing to settle) are written once, then at most every 10 s with the count since.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The shortest interval between two lines of one throttle.
const INTERVAL_MS: i64 = 10_000;

/// A throttle for one kind of log line (each limiter and each layer has its own).
#[derive(Debug, Default)]
pub(crate) struct LogThrottle {
    /// When the last line was written (ms since the epoch; 0: never).
    last_ms: AtomicI64,
    /// Events since the last line.
    since: AtomicU64,
}

impl LogThrottle {
    pub(crate) const fn new() -> Self {
        LogThrottle {
            last_ms: AtomicI64::new(0),
            since: AtomicU64::new(0),
        }
    }

    /// Counts one event; calls `log(count, first)` when a line is due: `first` for the
    /// first event after a quiet interval, else with the events counted in the interval.
    pub(crate) fn note(&self, log: impl FnOnce(u64, bool)) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let count = self.since.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now - last < INTERVAL_MS {
            return;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.since.store(0, Ordering::Relaxed);
        // A quiet interval before: this is the first event of a new run.
        log(count, now - last >= 2 * INTERVAL_MS || count == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_then_a_count_per_interval() {
        let throttle = LogThrottle::new();
        let mut lines = Vec::new();
        for _ in 0..1_000 {
            throttle.note(|count, first| lines.push((count, first)));
        }
        assert_eq!(lines, [(1, true)]);
        // Ten seconds on, the next event writes one line with the count since.
        throttle.last_ms.fetch_sub(INTERVAL_MS, Ordering::Relaxed);
        throttle.note(|count, first| lines.push((count, first)));
        assert_eq!(lines[1], (1_000, false));
    }
}
