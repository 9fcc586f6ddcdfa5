//! Node-local reservations for hot keys: one conditional write takes a slice of a bucket,
//! requests are admitted from the slice in memory, and what is left goes back.
//!
//! Every admitted request otherwise costs one backend write, which caps a hot key at the
//! store's per-item write rate (about 1,000 writes a second on DynamoDB), makes every
//! request pay the SDK's CPU, and bills every request. With reservations on, a key whose
//! local request rate passes [`Reservations::hot_rate`] gets a *slice*: its tokens are
//! really taken in the table by an ordinary acquire (so no other node, and no Python
//! client, can spend them), then handed out here one request at a time. Exactness holds
//! because the slice is an ordinary consumption and its give-back an ordinary credit:
//!
//! - no request is admitted that the slice (tokens already taken) or the table does not
//!   cover, so nothing is ever admitted beyond capacity plus refill;
//! - a request the slice cannot cover goes to the table (topping the slice up, or taking
//!   only what the request needs), and a rejection, with its `Retry-After`, is the table's;
//! - unused tokens go back after [`Reservations::idle_return`], when the limit changes,
//!   when a slice grows past its bound, and on [`crate::RateLimiter::release_reservations`];
//!   once they are back, the bucket's `tc` equals what was admitted.
//!
//! The cost is held tokens: while a node holds a slice, other nodes cannot use those
//! tokens, so a slice is bounded by [`Reservations::max_fraction`] of the capacity and sized
//! to [`Reservations::demand_window`] of this node's demand. A node that dies holding
//! slices loses them (they were taken; they refill like any consumption).

mod give_back;
mod meter;
mod repository;
mod slice;

pub(crate) use repository::Reserving;

use std::time::Duration;

/// The reservation policy (off unless set on [`crate::RateLimiterBuilder::reservations`]).
///
/// ```
/// use std::time::Duration;
/// use zae_limiter::reservations::Reservations;
///
/// let policy = Reservations::adaptive()
///     .hot_rate(100.0)
///     .demand_window(Duration::from_millis(200))
///     .max_fraction(0.05);
/// # drop(policy);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reservations {
    pub(crate) hot_rate: f64,
    pub(crate) demand_window: Duration,
    pub(crate) max_fraction: f64,
    pub(crate) idle_return: Duration,
    pub(crate) strict: bool,
}

impl Default for Reservations {
    fn default() -> Self {
        Self::adaptive()
    }
}

impl Reservations {
    /// Slices for keys taking at least 50 requests a second here, each sized to 250 ms of
    /// this node's demand and at most a tenth of the capacity, returned after 1 s idle.
    pub fn adaptive() -> Self {
        Reservations {
            hot_rate: 50.0,
            demand_window: Duration::from_millis(250),
            max_fraction: 0.1,
            idle_return: Duration::from_secs(1),
            strict: true,
        }
    }

    /// The local request rate (per second, on one key) from which the key gets slices.
    /// Below it every request goes to the table, as without reservations.
    pub fn hot_rate(mut self, per_second: f64) -> Self {
        self.hot_rate = if per_second.is_finite() {
            per_second.max(0.0)
        } else {
            f64::MAX
        };
        self
    }

    /// How much of this node's demand a slice covers: the slice for a limit is this long
    /// times the rate this node consumes it at (at least two requests' worth).
    pub fn demand_window(mut self, window: Duration) -> Self {
        self.demand_window = window;
        self
    }

    /// The largest share of a limit's capacity one node's slice may hold, in `(0, 1]`, so a
    /// few nodes cannot hold everything and starve the rest. A limit whose share is smaller
    /// than a request gets no slice (its requests go to the table).
    pub fn max_fraction(mut self, fraction: f64) -> Self {
        self.max_fraction = if fraction.is_finite() {
            fraction.clamp(f64::MIN_POSITIVE, 1.0)
        } else {
            1.0
        };
        self
    }

    /// Whether every window keeps to capacity plus refill (default `true`).
    ///
    /// A slice's tokens were taken from the bucket, which then refills as if they had been
    /// spent. Strict, a node gives up held tokens as the bucket's refill makes room for
    /// them (they are counted back, never credited), so the bucket and the slices never
    /// hold more than the capacity between them and a burst after a lull gets at most the
    /// capacity. The price: when the demand on a key is far below its refill rate, the
    /// bucket stays full and slices last only until it has refilled (roughly slice / refill
    /// rate), so reservations save fewer writes. Not strict, slices last until used or idle,
    /// and a window that starts while nodes hold slices and the bucket is full can admit up
    /// to the held tokens more (at most `max_fraction` of the capacity per node); the
    /// consumed count is exact either way.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// How long a slice may go unused before its tokens go back.
    pub fn idle_return(mut self, idle: Duration) -> Self {
        self.idle_return = idle;
        self
    }
}

/// What this node holds for one entity and resource (see
/// [`crate::RateLimiter::reservation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationStatus {
    /// Whole tokens held per limit name: taken in the table (so shown there as consumed)
    /// and not yet admitted here.
    pub held: Vec<(String, i64)>,
    /// Whole tokens per limit name given up because the bucket refilled into their room
    /// (strict mode): never admitted, still counted as consumed until they are counted
    /// back (at a slice's bound, when idle, and on release).
    pub given_up: Vec<(String, i64)>,
    /// The local request rate, per second, as last measured.
    pub request_rate: u64,
    /// Whether the key is hot enough to be topped up.
    pub hot: bool,
}

/// Counters of the reservations of one limiter, since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReservationStats {
    /// Requests admitted from a slice, without a backend call.
    pub local_admits: u64,
    /// Backend acquires made for hot keys (a top-up, or a request a slice could not cover).
    pub table_acquires: u64,
    /// Acquires passed to the backend untouched (keys that are not hot).
    pub passed_through: u64,
    /// Give-back writes issued.
    pub give_backs: u64,
    /// Slices currently held.
    pub slices: u64,
    /// Keys whose demand is being measured (forgotten after 30 s unused without a slice).
    pub keys: u64,
}
