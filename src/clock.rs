//! Time sources. The limiter reads time through [`Clock`] so tests can control it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of epoch milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
///
/// Read on every acquire, so it is read cheaply: each thread reads the system clock at
/// most once a millisecond and counts the time since on the CPU's cycle counter
/// (through `quanta`, calibrated once per process; the system's monotonic clock where
/// there is no usable counter). The result follows the system clock to well under a
/// millisecond, and a change to the system clock shows within a millisecond.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        anchored_epoch_ns() / 1_000_000
    }
}

/// How long a thread counts on the cycle counter before reading the system clock again.
const REANCHOR_NS: u64 = 1_000_000;

/// The widest bracket of counter readings around a system clock read that is kept as an
/// anchor (the read itself takes well under a microsecond).
const MAX_ANCHOR_GAP_NS: u64 = 20_000;

/// A system clock reading and the cycle counter at that moment.
#[derive(Clone, Copy)]
struct Anchor {
    counter: u64,
    epoch_ns: i64,
}

thread_local! {
    /// This thread's last system clock reading (`None` until its first).
    static ANCHOR: std::cell::Cell<Option<Anchor>> = const { std::cell::Cell::new(None) };
}

/// The process's calibrated cycle counter.
fn counter() -> &'static quanta::Clock {
    static COUNTER: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    COUNTER.get_or_init(quanta::Clock::new)
}

/// Nanoseconds since the Unix epoch (0 before it): the thread's anchor plus the counter's
/// time since, or a fresh system clock reading once the anchor is older than
/// [`REANCHOR_NS`] (or the counter went backwards, as on a move to a core whose counter
/// differs).
fn anchored_epoch_ns() -> i64 {
    let counter = counter();
    let now = counter.raw();
    if let Some(anchor) = ANCHOR.with(std::cell::Cell::get) {
        if now >= anchor.counter {
            let since = counter.delta_as_nanos(anchor.counter, now);
            if since < REANCHOR_NS {
                // Below a millisecond: fits in i64.
                return anchor.epoch_ns.saturating_add(since as i64);
            }
        }
    }
    // The counter on both sides of the system clock read: the reading is taken as at
    // their midpoint, and kept only if the two are close (a thread preempted between them
    // would otherwise run behind by as long as it waited).
    let before = counter.raw();
    let epoch_ns = system_epoch_ns();
    let after = counter.raw();
    if after >= before && counter.delta_as_nanos(before, after) < MAX_ANCHOR_GAP_NS {
        let anchor = Anchor {
            counter: before + (after - before) / 2,
            epoch_ns,
        };
        ANCHOR.with(|a| a.set(Some(anchor)));
    }
    epoch_ns
}

/// The system clock, nanoseconds since the Unix epoch (0 before it).
fn system_epoch_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn system_ms() -> i64 {
        system_epoch_ns() / 1_000_000
    }

    /// The counted time stays with the system clock: on a busy thread (reading from the
    /// anchor), across anchors, after idle gaps, and on many threads at once.
    #[test]
    fn system_clock_follows_the_system_clock() {
        let check = || {
            for round in 0..2_000u32 {
                let before = system_ms();
                let read = SystemClock.now_ms();
                let after = system_ms();
                assert!(
                    (before - 1..=after + 1).contains(&read),
                    "read {read} outside [{before}, {after}] ± 1 ms"
                );
                if round % 500 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
            }
        };
        let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(check)).collect();
        check();
        for t in threads {
            t.join().expect("thread");
        }
    }

    /// Successive reads on one thread never go back by more than the system clock does.
    #[test]
    fn system_clock_does_not_run_backwards_on_a_thread() {
        let mut last = SystemClock.now_ms();
        let end = last + 30;
        while last < end {
            let now = SystemClock.now_ms();
            assert!(now >= last - 1, "{now} after {last}");
            last = last.max(now);
        }
    }
}
