//! Time sources. The limiter reads time through [`Clock`] so tests can control it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of epoch milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to; clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use zae_limiter::clock::{Clock, ManualClock};
///
/// let clock = ManualClock::new(1_000);
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now_ms(), 3_000);
/// for _ in 0..4 {
///     clock.advance(Duration::from_micros(250));
/// }
/// assert_eq!(clock.now_ms(), 3_001);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    /// Milliseconds, and the microseconds past them that `advance` has added (so many
    /// small steps add up instead of each rounding down to nothing).
    now: Arc<parking_lot::Mutex<(i64, u32)>>,
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        ManualClock {
            now: Arc::new(parking_lot::Mutex::new((start_ms, 0))),
        }
    }

    /// Moves the clock forward; steps under a millisecond add up.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock();
        let micros = u64::from(now.1) + u64::from(by.subsec_micros() % 1_000);
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        now.0 = now
            .0
            .saturating_add(ms)
            .saturating_add((micros / 1_000) as i64);
        now.1 = (micros % 1_000) as u32;
    }

    /// Sets the time.
    pub fn set(&self, now_ms: i64) {
        *self.now.lock() = (now_ms, 0);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.lock().0
    }
}
