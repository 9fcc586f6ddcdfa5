//! [`Limit`]: one named token bucket's capacity and refill rate.

use serde::{Deserialize, Serialize};

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
/// Constructors never panic; [`Limit::validate`] (called by every API that takes limits)
/// rejects a bad one with a typed error naming the field.
///
/// ```
/// use zae_limiter::Limit;
///
/// let rpm = Limit::per_minute("rpm", 100);
/// assert_eq!((rpm.capacity, rpm.refill_amount, rpm.refill_period_seconds), (100, 100, 60));
/// let tpm = Limit::per_minute("tpm", 10_000).with_burst(15_000);
/// assert_eq!((tpm.capacity, tpm.refill_amount), (15_000, 10_000));
/// assert!(Limit::per_second("bad name", 1).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limit {
    /// The limit's name, e.g. `rpm` or `tpm` (see [`crate::naming`] for the rules).
    pub name: String,
    /// The most tokens the bucket holds (the burst).
    pub capacity: u64,
    /// Tokens regained per refill period.
    pub refill_amount: u64,
    /// The refill period in seconds.
    pub refill_period_seconds: u64,
}

impl Limit {
    /// `rate` tokens per second, capacity `rate`.
    pub fn per_second(name: impl Into<String>, rate: u64) -> Self {
        Self::custom(name, rate, rate, 1)
    }

    /// `rate` tokens per minute, capacity `rate`.
    pub fn per_minute(name: impl Into<String>, rate: u64) -> Self {
        Self::custom(name, rate, rate, 60)
    }

    /// `rate` tokens per hour, capacity `rate`.
    pub fn per_hour(name: impl Into<String>, rate: u64) -> Self {
        Self::custom(name, rate, rate, 3_600)
    }

    /// `rate` tokens per day, capacity `rate`.
    pub fn per_day(name: impl Into<String>, rate: u64) -> Self {
        Self::custom(name, rate, rate, 86_400)
    }

    /// Any capacity, refill amount and period.
    pub fn custom(
        name: impl Into<String>,
        capacity: u64,
        refill_amount: u64,
        refill_period_seconds: u64,
    ) -> Self {
        Limit {
            name: name.into(),
            capacity,
            refill_amount,
            refill_period_seconds,
        }
    }

    /// The same limit with capacity `burst`; the refill rate is unchanged.
    pub fn with_burst(mut self, burst: u64) -> Self {
        self.capacity = burst;
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
