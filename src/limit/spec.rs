//! The compact text form of a [`Limit`] (see the [module docs](super#the-compact-text-form)):
//! `FromStr`, `Display` and the period helpers.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Limit};

/// The refill period, in seconds, implied by a limit's name when the text does not give one:
/// `?ps` 1, `?pm` 60, `?ph` 3600, `?pd` 86400 for three-letter names such as `rpm` or `tpd`;
/// 60 for every other name.
pub fn implied_period_seconds(name: &str) -> u64 {
    let bytes = name.as_bytes();
    if bytes.len() == 3 && bytes[1].eq_ignore_ascii_case(&b'p') {
        match bytes[2].to_ascii_lowercase() {
            b's' => return 1,
            b'm' => return 60,
            b'h' => return 3_600,
            b'd' => return 86_400,
            _ => {}
        }
    }
    60
}

const FORMS: &str =
    "expected NAME:RATE, NAME:RATE:burst=CAPACITY or NAME:CAPACITY:AMOUNT/PERIOD, optionally followed by :soft (e.g. rpm:100, tpm:10000:burst=15000, tokens:500:100/10s, tpd:1000000:soft)";

fn bad(text: &str, reason: impl Into<String>) -> Error {
    Error::validation("limit", text, reason)
}

fn number(text: &str, field: &str, value: &str) -> Result<u64, Error> {
    value.trim().replace('_', "").parse::<u64>().map_err(|_| {
        bad(
            text,
            format!("{field} {value:?} is not a whole number; {FORMS}"),
        )
    })
}

/// Parses a refill period: whole seconds (`90`), or a number followed by `s`, `m`, `h` or
/// `d` (`90s`, `15m`, `1h`, `1d`).
pub fn parse_period_seconds(value: &str) -> Result<u64, Error> {
    period(value, value)
}

fn period(text: &str, value: &str) -> Result<u64, Error> {
    let value = value.trim();
    let (digits, unit) = match value.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&value[..i], c.to_ascii_lowercase()),
        _ => (value, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => {
            return Err(bad(
                text,
                format!("period {value:?} has an unknown unit; use seconds or s, m, h, d"),
            ))
        }
    };
    let n = number(text, "period", digits)?;
    n.checked_mul(scale)
        .ok_or_else(|| bad(text, format!("period {value:?} is too long")))
}

impl FromStr for Limit {
    type Err = Error;

    /// Parses the compact form (see the [module docs](crate::limit#the-compact-text-form)) and validates the
    /// result, so a parsed limit is always usable.
    fn from_str(text: &str) -> Result<Self, Error> {
        let mut parts: Vec<&str> = text.trim().split(':').collect();
        let soft = parts.len() > 2 && parts.last().map(|p| p.trim()) == Some("soft");
        if soft {
            parts.pop();
        }
        let limit = match parts.as_slice() {
            [name, rate] => {
                let rate = number(text, "rate", rate)?;
                Limit::try_custom(*name, rate, rate, implied_period_seconds(name))?
            }
            [name, rate, third] => {
                if let Some(burst) = third.trim().strip_prefix("burst=") {
                    let rate = number(text, "rate", rate)?;
                    Limit::try_custom(*name, rate, rate, implied_period_seconds(name))?
                        .try_with_burst(number(text, "burst", burst)?)?
                } else if let Some((amount, per)) = third.split_once('/') {
                    Limit::try_custom(
                        *name,
                        number(text, "capacity", rate)?,
                        number(text, "refill amount", amount)?,
                        period(text, per)?,
                    )?
                } else {
                    return Err(bad(text, format!("cannot read {third:?}; {FORMS}")));
                }
            }
            _ => return Err(bad(text, FORMS)),
        };
        Ok(if soft { limit.soft() } else { limit })
    }
}

impl fmt::Display for Limit {
    /// The shortest compact form that parses back to this limit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_hard(f)?;
        if self.soft {
            write!(f, ":soft")?;
        }
        Ok(())
    }
}

impl Limit {
    /// The compact form without the `:soft` suffix.
    fn fmt_hard(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let implied = implied_period_seconds(&self.name);
        if self.refill_period_seconds != implied {
            write!(
                f,
                "{}:{}:{}/{}",
                self.name, self.capacity, self.refill_amount, self.refill_period_seconds
            )
        } else if self.capacity == self.refill_amount {
            write!(f, "{}:{}", self.name, self.refill_amount)
        } else {
            write!(
                f,
                "{}:{}:burst={}",
                self.name, self.refill_amount, self.capacity
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Limit {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn the_three_forms() {
        assert_eq!(parse("rpm:100"), Limit::per_minute("rpm", 100));
        assert_eq!(
            parse("tpm:10000:burst=15000"),
            Limit::per_minute("tpm", 10_000).with_burst(15_000)
        );
        assert_eq!(
            parse("tokens:500:100/10"),
            Limit::custom("tokens", 500, 100, 10)
        );
        assert_eq!(
            parse("tokens:500:100/10s"),
            Limit::custom("tokens", 500, 100, 10)
        );
        assert_eq!(parse("x:5:5/2h"), Limit::custom("x", 5, 5, 7_200));
        assert_eq!(parse("rps:10"), Limit::per_second("rps", 10));
        assert_eq!(parse("rph:10"), Limit::per_hour("rph", 10));
        assert_eq!(parse("tpd:1_000_000"), Limit::per_day("tpd", 1_000_000));
        assert_eq!(parse("requests:100"), Limit::per_minute("requests", 100));
        assert_eq!(parse("steps:3"), Limit::per_minute("steps", 3));
    }

    #[test]
    fn display_parses_back() {
        for limit in [
            Limit::per_minute("rpm", 100),
            Limit::per_minute("tpm", 10_000).with_burst(15_000),
            Limit::custom("tokens", 500, 100, 10),
            Limit::per_hour("rpm", 5),
            Limit::per_day("tpd", 9),
        ] {
            let text = limit.to_string();
            assert_eq!(parse(&text), limit, "{text}");
        }
        assert_eq!(Limit::per_minute("rpm", 100).to_string(), "rpm:100");
        assert_eq!(
            Limit::per_minute("tpm", 10).with_burst(15).to_string(),
            "tpm:10:burst=15"
        );
        assert_eq!(Limit::per_hour("rpm", 5).to_string(), "rpm:5:5/3600");
    }

    #[test]
    fn bad_text_names_what_is_wrong() {
        for (text, needle) in [
            ("rpm", "expected NAME:RATE"),
            ("rpm:", "rate \"\" is not a whole number"),
            ("rpm:-1", "is not a whole number"),
            ("rpm:0", "must be positive"),
            ("rpm:10:burst=x", "burst \"x\" is not a whole number"),
            ("rpm:10:fast", "cannot read \"fast\""),
            ("t:1:1/5w", "unknown unit"),
            ("t:1:1/0", "must be positive"),
            ("bad name:1", "invalid limit_name \"bad name\""),
            ("a:1:2:3", "expected NAME:RATE"),
            ("t:1:1/99999999999999999d", "too long"),
        ] {
            let err = text.parse::<Limit>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
