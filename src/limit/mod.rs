//! [`Limit`]: one named token bucket's capacity and refill rate, and its compact text form.
//!
//! # The compact text form
//!
//! As operators type a limit (`rpm:100`, `tpm:10000:burst=15000`, `tokens:500:100/10`) and as
//! the command-line tool prints it (`Limit`'s `FromStr` and `Display`):
//!
//! - `name:rate`: `rate` tokens per period, capacity `rate`.
//! - `name:rate:burst=B`: the same with capacity `B` ([`Limit::with_burst`]).
//! - `name:capacity:amount/period`: any limit; the period is whole seconds, or a number with
//!   `s`, `m`, `h` or `d`.
//! - any of these followed by `:soft`: a soft limit ([`Limit::soft`]), charged but never
//!   refusing.
//!
//! Where the period is not written, a three-letter name of the form `?p?` says it (`rps`
//! per second, `rpm`/`tpm` per minute, `rph` per hour, `rpd` per day); any other name means
//! per minute. `Display` writes the shortest form that parses back to the same limit.

mod spec;

use serde::{Deserialize, Serialize};

pub use spec::{implied_period_seconds, parse_period_seconds};

use crate::{naming, Error};

/// The largest capacity or refill amount a limit may have, in whole tokens.
///
/// Bucket values are stored in millitokens in an `i64`; this bound leaves room for debt and
/// for the `i128` intermediates of refill without any risk of overflow.
pub const MAX_TOKENS: u64 = 1_000_000_000_000_000;

/// The longest refill period a limit may have: ten years, in seconds.
pub const MAX_REFILL_PERIOD_SECONDS: u64 = 10 * 366 * 86_400;

/// A named token-bucket limit: holds up to `capacity` tokens and regains `refill_amount`
/// tokens every `refill_period_seconds`, continuously and exactly (see [`crate::bucket`]).
///
/// Every way to make one validates it, as governor's `Quota` does: a zero rate, a number
/// out of range or a bad name is never a limit that silently admits nothing (or
/// everything).
///
/// # Panics
///
/// The constructors for literals in code ([`Limit::per_minute`], ...) panic on such values,
/// naming the field: a bug, shown at once. The `try_` constructors, [`str::parse`] and
/// deserialization return a typed [`Error`] instead, for values from configuration. The fields stay readable;
/// [`Limit::validate`] (called by every API that takes limits) checks one that was changed
/// since.
///
/// ```
/// use zae_limiter::Limit;
///
/// let rpm = Limit::per_minute("rpm", 100);
/// assert_eq!((rpm.capacity, rpm.refill_amount, rpm.refill_period_seconds), (100, 100, 60));
/// let tpm = Limit::per_minute("tpm", 10_000).with_burst(15_000);
/// assert_eq!((tpm.capacity, tpm.refill_amount), (15_000, 10_000));
///
/// // From configuration: a typed error naming the field, never a useless limit.
/// let err = Limit::try_per_minute("rpm", 0).unwrap_err();
/// assert_eq!(err.field(), Some("limits.rpm.capacity"));
/// assert!(Limit::try_per_second("bad name", 1).is_err());
/// assert!("rpm:0".parse::<Limit>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "LimitFields")]
#[non_exhaustive]
pub struct Limit {
    /// The limit's name, e.g. `rpm` or `tpm` (see [`crate::naming`] for the rules).
    pub name: String,
    /// The most tokens the bucket holds (the burst).
    pub capacity: u64,
    /// Tokens regained per refill period.
    pub refill_amount: u64,
    /// The refill period in seconds.
    pub refill_period_seconds: u64,
    /// A soft limit (the Python library's `soft`) is charged and reported but never
    /// refuses: its bucket may go into debt. For a budget to watch before it is enforced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub soft: bool,
}

/// A limit as stored or sent, checked by [`Limit::try_from`] before it becomes one.
#[derive(Deserialize)]
struct LimitFields {
    name: String,
    capacity: u64,
    refill_amount: u64,
    refill_period_seconds: u64,
    #[serde(default)]
    soft: bool,
}

impl TryFrom<LimitFields> for Limit {
    type Error = Error;

    fn try_from(f: LimitFields) -> Result<Self, Error> {
        let limit =
            Limit::try_custom(f.name, f.capacity, f.refill_amount, f.refill_period_seconds)?;
        Ok(if f.soft { limit.soft() } else { limit })
    }
}

/// Unwraps a constructor's result, panicking with the error (which names the field).
#[track_caller]
fn valid(limit: Result<Limit, Error>) -> Limit {
    limit.unwrap_or_else(|e| panic!("{e}"))
}

/// The constructors of `rate` tokens per period, capacity `rate`: one that panics on an
/// invalid limit (for literals) and its `try_` twin (for configuration).
macro_rules! per_period {
    ($($unit:literal, $seconds:expr, $name:ident, $try_name:ident;)*) => {$(
        #[doc = concat!("`rate` tokens per ", $unit, ", capacity `rate`. Panics if invalid (see [`Limit`]).")]
        #[track_caller]
        pub fn $name(name: impl Into<String>, rate: u64) -> Self {
            valid(Self::$try_name(name, rate))
        }

        #[doc = concat!("[`Limit::", stringify!($name), "`], or a typed error naming what is wrong.")]
        pub fn $try_name(name: impl Into<String>, rate: u64) -> Result<Self, Error> {
            Self::try_custom(name, rate, rate, $seconds)
        }
    )*};
}

impl Limit {
    per_period! {
        "second", 1, per_second, try_per_second;
        "minute", 60, per_minute, try_per_minute;
        "hour", 3_600, per_hour, try_per_hour;
        "day", 86_400, per_day, try_per_day;
    }

    /// Any capacity, refill amount and period. Panics if invalid (see [`Limit`]).
    #[track_caller]
    pub fn custom(name: impl Into<String>, capacity: u64, amount: u64, period_s: u64) -> Self {
        valid(Self::try_custom(name, capacity, amount, period_s))
    }

    /// The same limit with capacity `burst`; the refill rate is unchanged. Panics if
    /// `burst` is zero or above [`MAX_TOKENS`].
    #[track_caller]
    pub fn with_burst(self, burst: u64) -> Self {
        valid(self.try_with_burst(burst))
    }

    /// [`Limit::custom`], or an error naming what is wrong.
    pub fn try_custom(
        name: impl Into<String>,
        capacity: u64,
        refill_amount: u64,
        refill_period_seconds: u64,
    ) -> Result<Self, Error> {
        let limit = Limit {
            name: name.into(),
            capacity,
            refill_amount,
            refill_period_seconds,
            soft: false,
        };
        limit.validate()?;
        Ok(limit)
    }

    /// [`Limit::with_burst`], or an error naming what is wrong.
    pub fn try_with_burst(mut self, burst: u64) -> Result<Self, Error> {
        self.capacity = burst;
        self.validate()?;
        Ok(self)
    }

    /// The same limit, soft: charged and reported, never refusing (see [`Limit::soft`]
    /// the field). Tables shared with the Python library need its 0.17 readers.
    ///
    /// ```
    /// use zae_limiter::Limit;
    ///
    /// let budget = Limit::per_day("tokens", 1_000_000).soft();
    /// assert!(budget.soft);
    /// assert_eq!(budget.to_string(), "tokens:1000000:1000000/86400:soft");
    /// ```
    pub fn soft(mut self) -> Self {
        self.soft = true;
        self
    }

    /// Tokens regained per second (for display; the arithmetic never uses floats).
    pub fn refill_rate(&self) -> f64 {
        self.refill_amount as f64 / self.refill_period_seconds.max(1) as f64
    }

    /// Milliseconds an empty bucket takes to fill up to capacity.
    pub fn time_to_fill_ms(&self) -> u64 {
        if self.refill_amount == 0 {
            return u64::MAX;
        }
        let ms = u128::from(self.capacity) * u128::from(self.refill_period_seconds) * 1000;
        u64::try_from(ms.div_ceil(u128::from(self.refill_amount))).unwrap_or(u64::MAX)
    }

    /// Checks the name and that every number is positive and within bounds.
    pub fn validate(&self) -> Result<(), Error> {
        naming::validate_limit_name(&self.name)?;
        // Every acquire validates the limits it is given: the valid case in three compares.
        if (1..=MAX_TOKENS).contains(&self.capacity)
            && (1..=MAX_TOKENS).contains(&self.refill_amount)
            && (1..=MAX_REFILL_PERIOD_SECONDS).contains(&self.refill_period_seconds)
        {
            return Ok(());
        }
        let check = |field: &str, value: u64, max: u64| {
            if value == 0 {
                Err(Error::validation(
                    format!("limits.{}.{field}", self.name),
                    value.to_string(),
                    "must be positive",
                ))
            } else if value > max {
                Err(Error::validation(
                    format!("limits.{}.{field}", self.name),
                    value.to_string(),
                    format!("must be at most {max}"),
                ))
            } else {
                Ok(())
            }
        };
        check("capacity", self.capacity, MAX_TOKENS)?;
        check("refill_amount", self.refill_amount, MAX_TOKENS)?;
        check(
            "refill_period_seconds",
            self.refill_period_seconds,
            MAX_REFILL_PERIOD_SECONDS,
        )
    }
}

/// [`validate_all`] for a list shared between acquires: the list this thread validated
/// last is remembered (and held, so its address cannot be reused by another list, and
/// nobody can get it mutably), and passes again at the cost of a pointer compare.
pub(crate) fn validate_shared(limits: &std::sync::Arc<[Limit]>) -> Result<(), Error> {
    use std::cell::RefCell;
    use std::sync::Arc;
    thread_local! {
        static LAST_VALID: RefCell<Option<Arc<[Limit]>>> = const { RefCell::new(None) };
    }
    let known = LAST_VALID.with(|last| {
        last.try_borrow()
            .is_ok_and(|last| last.as_ref().is_some_and(|l| Arc::ptr_eq(l, limits)))
    });
    if known {
        return Ok(());
    }
    validate_all(limits)?;
    LAST_VALID.with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            *last = Some(Arc::clone(limits));
        }
    });
    Ok(())
}

/// Validates a set of limits: each one, and that no name appears twice.
pub(crate) fn validate_all(limits: &[Limit]) -> Result<(), Error> {
    for (i, limit) in limits.iter().enumerate() {
        limit.validate()?;
        if limits[..i].iter().any(|l| l.name == limit.name) {
            return Err(Error::validation(
                "limits",
                limit.name.clone(),
                "the same limit name appears twice",
            ));
        }
    }
    Ok(())
}
