//! The UTC calendar month that monthly ceilings are counted in. Owns the
//! conversion from wall-clock time to a month and the `YYYY-MM` spelling used in
//! messages and on the command line. Pure: it never reads the clock itself
//! except in [`Month::current`], the one place the shell asks for "now".

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC calendar month, e.g. `2026-11`. Ordered chronologically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    // Field order matters: the derived `Ord` compares year first.
    year: i32,
    month: u8,
}

impl Month {
    /// `None` unless `month` is in `1..=12`.
    pub const fn new(year: i32, month: u8) -> Option<Self> {
        if matches!(month, 1..=12) {
            Some(Self { year, month })
        } else {
            None
        }
    }

    pub fn year(self) -> i32 {
        self.year
    }

    /// 1 = January.
    pub fn month(self) -> u8 {
        self.month
    }

    /// The month containing `secs` seconds since the Unix epoch (negative = before it).
    pub fn from_unix_secs(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let (year, month) = year_month_from_days(days);
        Self { year, month }
    }

    /// The month containing `time`, in UTC.
    pub fn containing(time: SystemTime) -> Self {
        let secs = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            // A clock before 1970 is nonsense on this host, but it must not panic.
            Err(before) => {
                let secs = before.duration().as_secs();
                // Round away from zero so 1969-12-31T23:59:59.5 stays in 1969.
                let secs = if before.duration().subsec_nanos() > 0 {
                    secs.saturating_add(1)
                } else {
                    secs
                };
                i64::try_from(secs).map(|s| -s).unwrap_or(i64::MIN)
            }
        };
        Self::from_unix_secs(secs)
    }

    /// The month the wall clock is in now.
    pub fn current() -> Self {
        Self::containing(SystemTime::now())
    }

    /// The month after this one.
    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year.saturating_add(1),
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }
}

/// (year, month) of the proleptic Gregorian date `days` after 1970-01-01.
/// Howard Hinnant's `civil_from_days`, trimmed to what we need; exact for every
/// `i64` day count we can get from seconds.
fn year_month_from_days(days: i64) -> (i32, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let year = i32::try_from(year).unwrap_or(if year < 0 { i32::MIN } else { i32::MAX });
    // `month` is in 1..=12 by construction.
    (year, month as u8)
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid month `{0}`: expected `YYYY-MM`, e.g. `2026-11`")]
pub struct InvalidMonth(pub String);

impl FromStr for Month {
    type Err = InvalidMonth;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidMonth(s.to_owned());
        let (year, month) = s.split_once('-').ok_or_else(invalid)?;
        let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(year, 4) || !digits(month, 2) {
            return Err(invalid());
        }
        let year: i32 = year.parse().map_err(|_| invalid())?;
        let month: u8 = month.parse().map_err(|_| invalid())?;
        Self::new(year, month).ok_or_else(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn m(year: i32, month: u8) -> Month {
        Month::new(year, month).expect("valid month in test")
    }

    #[test]
    fn unix_seconds_map_to_their_utc_month() {
        // Expected values from `date -u -d <instant> +%s`.
        let cases: &[(i64, Month)] = &[
            (0, m(1970, 1)),
            (-1, m(1969, 12)),
            (951_782_400, m(2000, 2)),   // 2000-02-29T00:00:00Z, a leap day
            (1_709_208_000, m(2024, 2)), // 2024-02-29T12:00:00Z
            (1_709_251_200, m(2024, 3)), // 2024-03-01T00:00:00Z
            (1_796_083_199, m(2026, 11)), // 2026-11-30T23:59:59Z
            (1_796_083_200, m(2026, 12)), // 2026-12-01T00:00:00Z
            (4_107_542_400, m(2100, 3)), // 2100-03-01, 2100 is not a leap year
            (4_107_542_399, m(2100, 2)),
        ];
        for &(secs, want) in cases {
            assert_eq!(Month::from_unix_secs(secs), want, "secs = {secs}");
        }
    }

    #[test]
    fn extreme_times_do_not_panic() {
        let _ = Month::from_unix_secs(i64::MAX);
        let _ = Month::from_unix_secs(i64::MIN);
        let _ = Month::containing(UNIX_EPOCH - Duration::from_millis(500));
    }

    #[test]
    fn system_time_before_the_epoch_rounds_down() {
        assert_eq!(
            Month::containing(UNIX_EPOCH - Duration::from_millis(500)),
            m(1969, 12)
        );
        assert_eq!(
            Month::containing(UNIX_EPOCH + Duration::from_secs(1_796_083_200)),
            m(2026, 12)
        );
    }

    #[test]
    fn next_wraps_the_year() {
        assert_eq!(m(2026, 11).next(), m(2026, 12));
        assert_eq!(m(2026, 12).next(), m(2027, 1));
    }

    #[test]
    fn months_order_chronologically() {
        assert!(m(2026, 12) < m(2027, 1));
        assert!(m(2026, 2) < m(2026, 11));
    }

    #[test]
    fn parses_and_prints_yyyy_mm() {
        assert_eq!("2026-11".parse::<Month>(), Ok(m(2026, 11)));
        assert_eq!(m(2026, 3).to_string(), "2026-03");
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "",
            "2026-11-01",
            "+026-11",
        ] {
            assert_eq!(
                bad.parse::<Month>(),
                Err(InvalidMonth(bad.to_owned())),
                "{bad}"
            );
        }
        assert_eq!(
            "2026-13".parse::<Month>().map_err(|e| e.to_string()),
            Err("invalid month `2026-13`: expected `YYYY-MM`, e.g. `2026-11`".to_owned())
        );
    }
}
