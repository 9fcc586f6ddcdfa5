//! Usage windows and their keys: the UTC hour, day or month a moment falls in, written
//! as the Python library writes them (`2026-11-30T18:00:00Z`, `2026-11-30T00:00:00Z`,
//! `2026-11-01T00:00:00Z`).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

/// How long a usage snapshot counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Window {
    /// One UTC hour.
    Hourly,
    /// One UTC day.
    Daily,
    /// One UTC calendar month.
    Monthly,
}

impl Window {
    /// Every window, shortest first.
    pub const ALL: [Window; 3] = [Window::Hourly, Window::Daily, Window::Monthly];

    /// The name stored in a snapshot's `window` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Hourly => "hourly",
            Window::Daily => "daily",
            Window::Monthly => "monthly",
        }
    }

    /// The start of the window holding `ms` (epoch milliseconds), as stored in a
    /// snapshot's `window_start`.
    pub fn key(self, ms: i64) -> String {
        let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        // `YYYY-MM-DDTHH:MM:SSZ`: cut to the window's start.
        let iso = humantime::format_rfc3339_seconds(time).to_string();
        match self {
            Window::Hourly => format!("{}:00:00Z", &iso[..13]),
            Window::Daily => format!("{}T00:00:00Z", &iso[..10]),
            Window::Monthly => format!("{}-01T00:00:00Z", &iso[..7]),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Window {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Window::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| crate::Error::validation("window", s, "one of hourly, daily, monthly"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_utc_start_of_the_window_as_python_writes_them() {
        // 2026-11-30T18:36:38.500Z
        let ms = 1_796_063_798_500;
        assert_eq!(Window::Hourly.key(ms), "2026-11-30T18:00:00Z");
        assert_eq!(Window::Daily.key(ms), "2026-11-30T00:00:00Z");
        assert_eq!(Window::Monthly.key(ms), "2026-11-01T00:00:00Z");
        assert_eq!(Window::Hourly.key(0), "1970-01-01T00:00:00Z");
        assert_eq!("daily".parse::<Window>().unwrap(), Window::Daily);
        assert!("weekly".parse::<Window>().is_err());
    }
}
