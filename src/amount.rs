//! Whole-token amounts given by callers, and their checks.

use crate::{limit, naming, Error};

/// A whole-token amount for `consume`, `adjust` and `time_until_available`: any primitive
/// integer. Range and sign are checked where it is used, with a typed error.
pub trait Amount: Copy {
    /// The amount, widened.
    fn to_i128(self) -> i128;
}

macro_rules! amount {
    ($($t:ty),*) => {$(impl Amount for $t { fn to_i128(self) -> i128 { self as i128 } })*};
}
amount!(i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, usize);

pub(crate) fn named_amounts<K: Into<String>, N: Amount>(
    pairs: impl IntoIterator<Item = (K, N)>,
) -> Vec<(String, i128)> {
    pairs
        .into_iter()
        .map(|(k, n)| (k.into(), n.to_i128()))
        .collect()
}

/// Checks names and that amounts are within `0..=MAX_TOKENS` (or `-MAX..=MAX` if signed),
/// each alone and summed per name (a name given twice counts twice), so an over-large
/// request is a [`Error::Validation`] before any write, never a rejection after one.
pub(crate) fn checked_amounts(
    field: &str,
    pairs: &[(String, i128)],
    signed: bool,
) -> Result<Vec<(String, i64)>, Error> {
    let max = limit::MAX_TOKENS;
    let too_big = |name: &str, n: i128, reason: String| {
        Error::validation(format!("{field}.{name}"), n.to_string(), reason)
    };
    let mut checked = Vec::with_capacity(pairs.len());
    for (name, n) in pairs {
        naming::validate_limit_name(name)?;
        if !signed && *n < 0 {
            return Err(too_big(name, *n, "must not be negative".into()));
        }
        if n.unsigned_abs() > u128::from(max) {
            return Err(too_big(
                name,
                *n,
                format!("must be at most {max} in magnitude"),
            ));
        }
        // Every amount so far is within `MAX_TOKENS`, so the sum cannot overflow.
        let total: i128 = pairs
            .iter()
            .filter(|(other, _)| other == name)
            .map(|(_, a)| (*a).clamp(-i128::from(max) - 1, i128::from(max) + 1))
            .sum();
        if total.unsigned_abs() > u128::from(max) {
            return Err(too_big(
                name,
                total,
                format!("the amounts given for {name:?} add up to more than {max}"),
            ));
        }
        checked.push((name.clone(), *n as i64));
    }
    Ok(checked)
}
