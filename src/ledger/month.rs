//! UTC calendar months, the period monthly ceilings count over. Pure.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC calendar month, e.g. `2026-11`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    year: i32,
    month: u8,
}

impl Month {
    pub fn new(year: i32, month: u8) -> Option<Self> {
        ((1..=12).contains(&month) && (1970..=9999).contains(&year)).then_some(Self { year, month })
    }

    /// The month containing `unix_ms` (milliseconds since the epoch, UTC).
    pub fn of_unix_millis(unix_ms: i64) -> Self {
        let days = unix_ms.div_euclid(86_400_000);
        let (year, month, _) = civil_from_days(days);
        Self { year, month }
    }

    pub fn current() -> Self {
        Self::of_unix_millis(unix_millis_now())
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u8 {
        self.month
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub fn unix_millis_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Howard Hinnant's days → (year, month, day) for the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (y as i32, m as u8, d as u8)
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid month `{0}`: expected YYYY-MM, e.g. 2026-11")]
pub struct InvalidMonth(String);

impl FromStr for Month {
    type Err = InvalidMonth;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMonth(s.to_owned());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year = y.parse().map_err(|_| bad())?;
        let month = m.parse().map_err(|_| bad())?;
        Month::new(year, month).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_of_instants() {
        let cases = [
            (0, "1970-01"),
            (951_782_400_000, "2000-02"), // 2000-02-29T00:00:00Z (leap day)
            (1_798_761_599_999, "2026-12"), // 2026-12-31T23:59:59.999Z
            (1_798_761_600_000, "2027-01"), // 2027-01-01T00:00:00Z
            (1_796_083_200_000, "2026-12"), // 2026-12-01T00:00:00Z
            (1_796_083_199_999, "2026-11"),
        ];
        for (ms, want) in cases {
            assert_eq!(Month::of_unix_millis(ms).to_string(), want, "{ms}");
        }
    }

    #[test]
    fn parse_months() {
        assert_eq!(
            "2026-11".parse::<Month>(),
            Ok(Month::new(2026, 11).unwrap())
        );
        for bad in [
            "2026-13", "2026-00", "26-11", "2026-1", "2026/11", "", "abcd-ef",
        ] {
            assert!(bad.parse::<Month>().is_err(), "{bad}");
        }
        assert_eq!(
            "2026-13".parse::<Month>().unwrap_err().to_string(),
            "invalid month `2026-13`: expected YYYY-MM, e.g. 2026-11"
        );
    }
}
