//! The local demand on one key: requests a second, and tokens a second per limit.

use smallvec::SmallVec;

/// How often the rates are brought up to date.
const TICK_MS: i64 = 100;

/// Requests and per-limit consumption counted over ticks of [`TICK_MS`]; each finished tick
/// is averaged into the rates (half old, half new), and a gap of several idle ticks starts
/// the rates afresh.
#[derive(Debug, Clone, Default)]
pub(super) struct Meter {
    started: bool,
    measured: bool,
    tick_start_ms: i64,
    requests: u64,
    /// Per limit of the key's request, in its order.
    consumed: SmallVec<[u64; 2]>,
    request_rate: f64,
    limit_rates: SmallVec<[f64; 2]>,
}

impl Meter {
    /// Counts one request taking `amounts` (one per limit) at `now_ms`.
    pub fn record(&mut self, now_ms: i64, amounts: &[u64]) {
        if self.consumed.len() != amounts.len() {
            // The key's limits changed shape: their rates start again.
            self.consumed = smallvec::smallvec![0; amounts.len()];
            self.limit_rates = smallvec::smallvec![0.0; amounts.len()];
        }
        self.roll(now_ms);
        self.requests += 1;
        for (c, a) in self.consumed.iter_mut().zip(amounts) {
            *c = c.saturating_add(*a);
        }
    }

    /// Closes the current tick if it is over.
    fn roll(&mut self, now_ms: i64) {
        if !self.started {
            self.started = true;
            self.tick_start_ms = now_ms;
            return;
        }
        let elapsed = now_ms - self.tick_start_ms;
        if elapsed < TICK_MS {
            return;
        }
        let seconds = elapsed as f64 / 1000.0;
        // The first tick, or one after an idle gap, stands alone.
        let fresh = elapsed > 5 * TICK_MS || !self.measured;
        self.measured = true;
        let blend = |old: f64, count: u64| {
            let now = count as f64 / seconds;
            if fresh {
                now
            } else {
                (old + now) / 2.0
            }
        };
        self.request_rate = blend(self.request_rate, self.requests);
        for (rate, c) in self.limit_rates.iter_mut().zip(&self.consumed) {
            *rate = blend(*rate, *c);
        }
        self.tick_start_ms = now_ms;
        self.requests = 0;
        self.consumed.iter_mut().for_each(|c| *c = 0);
    }

    /// Requests a second.
    pub fn request_rate(&self) -> f64 {
        self.request_rate
    }

    /// Tokens a second taken from limit `k`.
    pub fn limit_rate(&self, k: usize) -> f64 {
        self.limit_rates.get(k).copied().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_the_demand_and_restart_after_a_gap() {
        let mut m = Meter::default();
        let start = 1_000_000;
        m.record(start, &[1, 10]);
        // 100 requests over one tick: 1,000 a second, 10,000 tokens a second.
        for i in 0..100 {
            m.record(start + i, &[1, 100]);
        }
        m.record(start + TICK_MS, &[1, 100]);
        assert!(
            (m.request_rate() - 1010.0).abs() < 1.0,
            "{}",
            m.request_rate()
        );
        assert!(m.limit_rate(1) > 9_000.0, "{}", m.limit_rate(1));
        // A long idle gap: the next tick's rate stands alone.
        m.record(start + 10_000, &[1, 1]);
        assert!(m.request_rate() < 1.0, "{}", m.request_rate());
        // A change of shape (another limit list) starts the limit rates again.
        m.record(start + 10_050, &[1]);
        assert_eq!(m.limit_rate(1), 0.0);
    }
}
