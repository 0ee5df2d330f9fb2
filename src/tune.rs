//! `supervisor tune`: recommends each agent's `monthly_tokens`, `monthly_usd`
//! and `tokens_per_minute` from what the ledger recorded, flags agents about
//! to hit a ceiling or far below one, and with `--apply` writes the
//! recommendations to the budget overlay beside the fleet file (never to the
//! fleet file itself) and asks a running supervisor to reload.
//!
//! The arithmetic ([`analyse`], [`overlay_yaml`]) is pure, over plain ledger
//! samples and the fleet's budgets, with the clock passed in; the shell
//! ([`tune_command`]) reads the ledger and the fleet, prints, writes and signals.
//! Must not touch SQLite (that is `ledger`) nor edit fleet.yaml.
//!
//! Definitions (README "Tuning ceilings" repeats them for users):
//! - The *window* is the 30 days ending now. Usage is `charged_tokens` and
//!   `charged_micro_usd` (what counts against ceilings); released requests are
//!   not usage, requests still in flight count at their reservation. A request
//!   counts entirely in the UTC day and minute it started in.
//! - *History*: the time since the agent's first request in the whole ledger.
//!   Under `--min-days` (default 7) a row is *low confidence*, and `--apply`
//!   refuses to write while a low-confidence row has a recommendation.
//! - *Whole days*: UTC days the history and the window cover entirely and that
//!   are over, so neither today nor the day the history (or the window) starts
//!   in, unless that starts at midnight. A partial day is never projected.
//!   *Daily p95*: the nearest-rank 95th percentile of the totals of the whole
//!   days with traffic (days without traffic are left out, which errs high).
//! - *Monthly spend*: with history covering the whole window, the window's
//!   total (*observed*); with less, daily p95 × the number of days in the
//!   current month (*projected*); with no whole day of traffic, none
//!   (*too short*: nothing monthly is recommended).
//! - *Month end*: this month's usage so far + daily p95 × the whole days left
//!   after today.
//! - *Peak tokens per minute*: the busiest minute of the window.
//! - *Recommended* = the monthly spend, or what was already used (in the
//!   window, or this month so far) if that is more, or the peak, × (1 +
//!   headroom), rounded up to two significant digits (`41,234` → `42,000`;
//!   `1,234,567` → `1,300,000`); dollars are first rounded up to whole
//!   dollars. So nothing is recommended below observed usage plus headroom,
//!   and nothing for a figure that is zero. Each value carries its reason.
//! - Flags: `near_ceiling` when month end reaches 80% of a current monthly
//!   ceiling; `underused` when the monthly spend is under 10% of one (not
//!   when the history is too short to have a monthly spend).
//! - `--apply` reports per value whether it takes effect or is shadowed by the
//!   agent's own `budget:` in fleet.yaml, which wins over the overlay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::budget::{Amount, Month, group_thousands as group};
use crate::cli::exit;
use crate::fleet::{self, BudgetSpec};
use crate::ledger::{self, UsageSample};
use crate::usage_report::CeilingsFrom;

/// Days of history `tune` looks at.
pub const WINDOW_DAYS: i64 = 30;
/// Headroom added on top of what was used, unless `--headroom` says otherwise.
pub const DEFAULT_HEADROOM_PERCENT: u32 = 25;
/// Days of history below which a row is low confidence and `--apply`
/// refuses, unless `--min-days` says otherwise.
pub const DEFAULT_MIN_DAYS: u32 = 7;
/// `near_ceiling` when the month-end projection reaches this share of a ceiling.
pub const NEAR_CEILING_PERCENT: u64 = 80;
/// `underused` when the monthly spend is below this share of a ceiling.
pub const UNDERUSED_PERCENT: u64 = 10;

const DAY_MS: i64 = 86_400_000;
const MINUTE_MS: i64 = 60_000;

/// How an agent's monthly spend was worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// History covers the whole window: the window's total.
    Observed,
    /// Less history, but at least one whole UTC day with traffic: daily p95
    /// over the whole days × days in the month.
    Projected,
    /// Traffic, but no whole UTC day of it yet: nothing to project from, so no
    /// monthly recommendation.
    TooShort,
    /// No request in the window.
    NoTraffic,
}

/// What `tune` is told besides the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Room added above what was used, in percent.
    pub headroom_percent: u32,
    /// Rows with less history than this many days are low confidence, and
    /// `--apply` refuses to write them.
    pub min_days: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            headroom_percent: DEFAULT_HEADROOM_PERCENT,
            min_days: DEFAULT_MIN_DAYS,
        }
    }
}

/// Limits as `tune` reads and recommends them; `None` = none / no recommendation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub monthly_tokens: Option<u64>,
    pub monthly_micro_usd: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

impl From<&BudgetSpec> for Limits {
    fn from(b: &BudgetSpec) -> Self {
        Self {
            monthly_tokens: b.monthly_tokens,
            monthly_micro_usd: b.monthly_micro_usd,
            tokens_per_minute: b.tokens_per_minute,
        }
    }
}

/// Something an operator should look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// Month end is projected at `percent` of the ceiling set by `field`.
    NearCeiling { field: &'static str, percent: u64 },
    /// The monthly spend is `percent` of the ceiling set by `field`.
    Underused { field: &'static str, percent: u64 },
}

impl Flag {
    pub fn describe(&self) -> String {
        match self {
            Flag::NearCeiling { field, percent } => {
                format!("projected at {percent}% of `{field}` by month end")
            }
            Flag::Underused { field, percent } => format!("uses {percent}% of `{field}`"),
        }
    }
}

/// Why each field got the recommendation it got (or none), in words an
/// operator can check against the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reasons {
    pub monthly_tokens: String,
    pub monthly_usd: String,
    pub tokens_per_minute: String,
}

/// One agent's figures and recommendations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub agent: String,
    /// Time since the agent's first request in the ledger; 0 without one.
    pub history_ms: i64,
    /// Under `min_days` of history (and some traffic): a guess, not a measure.
    pub low_confidence: bool,
    /// Distinct UTC days in the window with at least one request.
    pub days_observed: u32,
    /// The whole UTC days with traffic that the daily p95 is taken over:
    /// neither today nor the agent's (or the window's) first, partial, day.
    pub whole_days: u32,
    /// Daily p95 over those whole days.
    pub daily_p95: Amount,
    pub basis: Basis,
    /// Usage in the current month so far.
    pub month_to_date: Amount,
    /// Usage in the window (the last 30 days).
    pub window_total: Amount,
    /// Observed or projected spend for a whole month (see [`Basis`]).
    pub monthly: Amount,
    /// Projected usage of the current month at its end.
    pub month_end: Amount,
    /// The busiest minute of the window.
    pub peak_tokens_per_minute: u64,
    pub current: Limits,
    pub recommended: Limits,
    pub reasons: Reasons,
    pub flags: Vec<Flag>,
}

/// Days from 1970-01-01 to `year-month-01` (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u8) -> i64 {
    let m = i64::from(month);
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5; // day 1 of the month
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The first day of `month`, in days since the epoch.
fn month_start_day(month: Month) -> i64 {
    days_from_civil(i64::from(month.year()), month.month())
}

pub fn days_in_month(month: Month) -> u64 {
    let days = month_start_day(month.next()) - month_start_day(month);
    u64::try_from(days).unwrap_or(30)
}

/// Nearest-rank percentile of `values` (sorted here); 0 when empty.
pub fn percentile(values: &mut [u64], percent: u64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let n = values.len() as u64;
    let rank = (percent * n).div_ceil(100).clamp(1, n);
    values[usize::try_from(rank - 1).unwrap_or(0)]
}

/// `value × (100 + percent) / 100`, rounded up, saturating.
fn with_headroom(value: u64, percent: u32) -> u64 {
    let scaled = (u128::from(value) * (100 + u128::from(percent))).div_ceil(100);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// Rounds up to two significant digits: 87 → 87, 123 → 130, 41_234 → 42_000.
pub fn round_up_friendly(value: u64) -> u64 {
    if value < 100 {
        return value;
    }
    let digits = value.ilog10() + 1;
    let step = 10u64.pow(digits - 2);
    value.div_ceil(step).saturating_mul(step)
}

/// Micro-dollars rounded up to whole dollars, then to two significant digits.
pub fn round_up_friendly_usd(micro_usd: u64) -> u64 {
    round_up_friendly(micro_usd.div_ceil(1_000_000)).saturating_mul(1_000_000)
}

/// `part` as a whole percentage of `whole` (rounded down).
fn percent_of(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    u64::try_from(u128::from(part) * 100 / u128::from(whole)).unwrap_or(u64::MAX)
}

/// History as the table shows it: `40d`, `1d 5h`, `3h 12m`, `40s`, `-`.
pub fn history_text(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    let (days, hours, minutes) = (secs / 86_400, secs % 86_400 / 3_600, secs % 3_600 / 60);
    match (days, hours, minutes) {
        _ if ms <= 0 => "-".to_owned(),
        (d, _, _) if d >= 2 => format!("{d}d"),
        (1, h, _) => format!("1d {h}h"),
        (0, 0, 0) => format!("{secs}s"),
        (_, h, m) => format!("{h}h {m}m"),
    }
}

/// Dollars in a reason: cents, or tenths of a cent below one cent.
fn dollars_exact(micro: u64) -> String {
    if micro > 0 && micro < 10_000 {
        format!("${:.4}", usd(micro))
    } else {
        dollars(micro)
    }
}

/// Every agent of `budgets` (the fleet's agents and their current budgets),
/// analysed from `samples` as of `now_ms`. `first_seen` holds each agent's
/// first request in the whole ledger ([`ledger::first_request_ms`]); an agent
/// missing from it starts at its first sample. See the module doc for
/// definitions.
pub fn analyse(
    samples: &[UsageSample],
    first_seen: &BTreeMap<String, i64>,
    budgets: &BTreeMap<String, BudgetSpec>,
    now_ms: i64,
    options: Options,
) -> Vec<Analysis> {
    let headroom = options.headroom_percent;
    let month = Month::from_unix_secs(now_ms.div_euclid(1000));
    let month_start_ms = month_start_day(month) * DAY_MS;
    let window_start_ms = now_ms - WINDOW_DAYS * DAY_MS;
    let today = now_ms.div_euclid(DAY_MS);
    let days_left = u64::try_from(month_start_day(month.next()) - today - 1).unwrap_or(0);
    let month_days = days_in_month(month);

    #[derive(Default)]
    struct Acc {
        first_ms: Option<i64>,
        month_to_date: Amount,
        window: Amount,
        days: BTreeMap<i64, Amount>,
        minutes: BTreeMap<i64, u64>,
    }
    let mut by_agent: BTreeMap<&str, Acc> = BTreeMap::new();
    for s in samples {
        if s.started_at_ms > now_ms || !budgets.contains_key(&s.agent) {
            continue;
        }
        let acc = by_agent.entry(&s.agent).or_default();
        acc.first_ms = Some(
            acc.first_ms
                .map_or(s.started_at_ms, |f| f.min(s.started_at_ms)),
        );
        let amount = Amount::new(s.tokens, s.micro_usd);
        if s.started_at_ms >= month_start_ms {
            acc.month_to_date = acc.month_to_date.saturating_add(amount);
        }
        if s.started_at_ms >= window_start_ms {
            acc.window = acc.window.saturating_add(amount);
            let day = acc
                .days
                .entry(s.started_at_ms.div_euclid(DAY_MS))
                .or_default();
            *day = day.saturating_add(amount);
            let minute = acc
                .minutes
                .entry(s.started_at_ms.div_euclid(MINUTE_MS))
                .or_default();
            *minute = minute.saturating_add(s.tokens);
        }
    }

    budgets
        .iter()
        .map(|(agent, spec)| {
            let acc = by_agent.remove(agent.as_str()).unwrap_or_default();
            let first = first_seen
                .get(agent)
                .copied()
                .into_iter()
                .chain(acc.first_ms)
                .filter(|f| *f <= now_ms)
                .min();
            let history_ms = first.map_or(0, |f| now_ms - f);
            // A day is whole when the history (and the window) covers all of
            // it and it is over: not today, and not the day the history or
            // the window starts in, unless that starts at midnight.
            let covered_from = first.map_or(now_ms, |f| f.max(window_start_ms));
            let first_whole_day =
                covered_from.div_euclid(DAY_MS) + i64::from(covered_from.rem_euclid(DAY_MS) != 0);
            let whole: Vec<Amount> = if first_whole_day < today {
                acc.days
                    .range(first_whole_day..today)
                    .map(|(_, a)| *a)
                    .collect()
            } else {
                Vec::new()
            };
            let whole_days = u32::try_from(whole.len()).unwrap_or(u32::MAX);
            let mut day_tokens: Vec<u64> = whole.iter().map(|a| a.tokens).collect();
            let mut day_usd: Vec<u64> = whole.iter().map(|a| a.micro_usd).collect();
            let p95 = Amount::new(
                percentile(&mut day_tokens, 95),
                percentile(&mut day_usd, 95),
            );
            let times = |a: Amount, n: u64| {
                Amount::new(a.tokens.saturating_mul(n), a.micro_usd.saturating_mul(n))
            };
            let days_observed = u32::try_from(acc.days.len()).unwrap_or(u32::MAX);
            let basis = if days_observed == 0 {
                Basis::NoTraffic
            } else if first.is_some_and(|f| f <= window_start_ms) {
                Basis::Observed
            } else if whole_days > 0 {
                Basis::Projected
            } else {
                Basis::TooShort
            };
            let monthly = match basis {
                Basis::Observed => acc.window,
                Basis::Projected => times(p95, month_days),
                Basis::TooShort | Basis::NoTraffic => Amount::ZERO,
            };
            let month_end = acc.month_to_date.saturating_add(times(p95, days_left));
            let peak = acc.minutes.values().copied().max().unwrap_or(0);
            let low_confidence =
                basis != Basis::NoTraffic && history_ms < i64::from(options.min_days) * DAY_MS;
            let history = history_text(history_ms);

            // One monthly ceiling: the spend (or, if more, what was already
            // used, so a recommendation never sits below observed usage)
            // plus headroom, with the reason spelled out.
            let monthly_field = |spend: u64,
                                 daily: u64,
                                 window: u64,
                                 so_far: u64,
                                 show: fn(u64) -> String,
                                 round: fn(u64) -> u64|
             -> (Option<u64>, String) {
                let basis_text = match basis {
                    Basis::NoTraffic => {
                        return (None, format!("no request in the last {WINDOW_DAYS} days"));
                    }
                    Basis::TooShort => {
                        return (
                            None,
                            format!(
                                "no whole UTC day of history yet ({history}); a partial day is not projected to a month"
                            ),
                        );
                    }
                    Basis::Observed => format!("{WINDOW_DAYS}-day total {}", show(spend)),
                    Basis::Projected => format!(
                        "p95 daily {} over {whole_days} whole day{} × {month_days}",
                        show(daily),
                        if whole_days == 1 { "" } else { "s" }
                    ),
                };
                let (floor, floor_text) = if so_far > window {
                    (so_far, format!("month so far {}", show(so_far)))
                } else {
                    (window, format!("used so far {}", show(window)))
                };
                let (base, text) = if floor > spend {
                    (floor, format!("{floor_text}, above {basis_text},"))
                } else {
                    (spend, basis_text)
                };
                if base == 0 {
                    return (None, format!("nothing used ({text})"));
                }
                (
                    Some(round(with_headroom(base, headroom))),
                    format!("{text} + {headroom}%, rounded up"),
                )
            };
            let (monthly_tokens, tokens_reason) = monthly_field(
                monthly.tokens,
                p95.tokens,
                acc.window.tokens,
                acc.month_to_date.tokens,
                group,
                round_up_friendly,
            );
            let (monthly_micro_usd, usd_reason) = monthly_field(
                monthly.micro_usd,
                p95.micro_usd,
                acc.window.micro_usd,
                acc.month_to_date.micro_usd,
                dollars_exact,
                round_up_friendly_usd,
            );
            let (tokens_per_minute, tpm_reason) = if peak == 0 {
                (None, format!("no request in the last {WINDOW_DAYS} days"))
            } else {
                (
                    Some(round_up_friendly(with_headroom(peak, headroom))),
                    format!("peak minute {} + {headroom}%, rounded up", group(peak)),
                )
            };

            let current = Limits::from(spec);
            let recommended = Limits {
                monthly_tokens,
                monthly_micro_usd,
                tokens_per_minute,
            };
            let mut flags = Vec::new();
            for (field, ceiling, end, spend) in [
                (
                    "budget.monthly_tokens",
                    current.monthly_tokens,
                    month_end.tokens,
                    monthly.tokens,
                ),
                (
                    "budget.monthly_usd",
                    current.monthly_micro_usd,
                    month_end.micro_usd,
                    monthly.micro_usd,
                ),
            ] {
                let Some(ceiling) = ceiling else { continue };
                let projected = percent_of(end, ceiling);
                if u128::from(end) * 100 >= u128::from(ceiling) * u128::from(NEAR_CEILING_PERCENT) {
                    flags.push(Flag::NearCeiling {
                        field,
                        percent: projected,
                    });
                }
                // Without a whole day there is no monthly spend to call low.
                if basis != Basis::TooShort
                    && u128::from(spend) * 100 < u128::from(ceiling) * u128::from(UNDERUSED_PERCENT)
                {
                    flags.push(Flag::Underused {
                        field,
                        percent: percent_of(spend, ceiling),
                    });
                }
            }
            Analysis {
                agent: agent.clone(),
                history_ms,
                low_confidence,
                days_observed,
                whole_days,
                daily_p95: p95,
                basis,
                month_to_date: acc.month_to_date,
                window_total: acc.window,
                monthly,
                month_end,
                peak_tokens_per_minute: peak,
                current,
                recommended,
                reasons: Reasons {
                    monthly_tokens: tokens_reason,
                    monthly_usd: usd_reason,
                    tokens_per_minute: tpm_reason,
                },
                flags,
            }
        })
        .collect()
}

fn usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

/// Limits in `tune --json`: tokens as integers, dollars as numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitsJson {
    pub monthly_tokens: Option<u64>,
    pub monthly_usd: Option<f64>,
    pub tokens_per_minute: Option<u64>,
}

impl From<Limits> for LimitsJson {
    fn from(l: Limits) -> Self {
        Self {
            monthly_tokens: l.monthly_tokens,
            monthly_usd: l.monthly_micro_usd.map(usd),
            tokens_per_minute: l.tokens_per_minute,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlagJson {
    /// `near_ceiling` or `underused`.
    pub flag: &'static str,
    /// The fleet.yaml field of the ceiling, e.g. `budget.monthly_tokens`.
    pub field: &'static str,
    /// Month end (near_ceiling) or monthly spend (underused) as a percentage of the ceiling.
    pub percent: u64,
}

/// One agent in `supervisor tune --json`. Field names are a contract for scripts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TuneRow {
    pub agent: String,
    /// Time since the agent's first request in the ledger.
    pub history_seconds: i64,
    /// Under `min_days` of history: `--apply` refuses to write this row.
    pub low_confidence: bool,
    pub days_observed: u32,
    /// Whole UTC days with traffic that the daily p95 is taken over.
    pub whole_days: u32,
    pub daily_p95_tokens: u64,
    pub daily_p95_usd: f64,
    pub basis: Basis,
    pub window_tokens: u64,
    pub window_usd: f64,
    pub month_to_date_tokens: u64,
    pub month_to_date_usd: f64,
    pub monthly_tokens: u64,
    pub monthly_usd: f64,
    pub month_end_tokens: u64,
    pub month_end_usd: f64,
    pub peak_tokens_per_minute: u64,
    pub current: LimitsJson,
    pub recommended: LimitsJson,
    /// Why each field got its recommendation, or none.
    pub reasons: Reasons,
    pub flags: Vec<FlagJson>,
}

/// The whole `supervisor tune --json` document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TuneReport {
    pub month: String,
    pub window_days: i64,
    pub headroom_percent: u32,
    /// Where `current` comes from: `fleet`, or while the fleet file does not
    /// load, `running_supervisor` (its monthly ceilings; `tokens_per_minute`
    /// unknown, null) or `unavailable` (every `current` field null, unknown).
    pub current_from: CeilingsFrom,
    /// Days of history `--apply` needs per row (`--min-days`).
    pub min_days: u32,
    pub agents: Vec<TuneRow>,
}

pub fn report(month: Month, options: Options, analyses: &[Analysis]) -> TuneReport {
    TuneReport {
        month: month.to_string(),
        window_days: WINDOW_DAYS,
        headroom_percent: options.headroom_percent,
        min_days: options.min_days,
        current_from: CeilingsFrom::Fleet,
        agents: analyses
            .iter()
            .map(|a| TuneRow {
                agent: a.agent.clone(),
                history_seconds: a.history_ms / 1000,
                low_confidence: a.low_confidence,
                days_observed: a.days_observed,
                whole_days: a.whole_days,
                daily_p95_tokens: a.daily_p95.tokens,
                daily_p95_usd: usd(a.daily_p95.micro_usd),
                basis: a.basis,
                window_tokens: a.window_total.tokens,
                window_usd: usd(a.window_total.micro_usd),
                month_to_date_tokens: a.month_to_date.tokens,
                month_to_date_usd: usd(a.month_to_date.micro_usd),
                monthly_tokens: a.monthly.tokens,
                monthly_usd: usd(a.monthly.micro_usd),
                month_end_tokens: a.month_end.tokens,
                month_end_usd: usd(a.month_end.micro_usd),
                peak_tokens_per_minute: a.peak_tokens_per_minute,
                current: a.current.into(),
                recommended: a.recommended.into(),
                reasons: a.reasons.clone(),
                flags: a
                    .flags
                    .iter()
                    .map(|f| match *f {
                        Flag::NearCeiling { field, percent } => FlagJson {
                            flag: "near_ceiling",
                            field,
                            percent,
                        },
                        Flag::Underused { field, percent } => FlagJson {
                            flag: "underused",
                            field,
                            percent,
                        },
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn dollars(micro: u64) -> String {
    format!("${:.2}", usd(micro))
}

fn change(current: Option<String>, recommended: Option<String>) -> String {
    match (current, recommended) {
        (_, None) => "-".to_owned(),
        (None, Some(r)) => format!("none → {r}"),
        (Some(c), Some(r)) => format!("{c} → {r}"),
    }
}

/// The table `supervisor tune` prints; under it, what a `*` means, the reason
/// for each recommendation, then one line per flag.
pub fn table(analyses: &[Analysis], options: Options) -> String {
    let header = [
        "AGENT",
        "HISTORY",
        "DAYS",
        "MONTHLY TOKENS",
        "MONTHLY COST",
        "PEAK TPM",
        "MONTHLY_TOKENS",
        "MONTHLY_USD",
        "TOKENS_PER_MINUTE",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for a in analyses {
        let (tokens, cost) = match a.basis {
            Basis::Observed | Basis::NoTraffic => {
                (group(a.monthly.tokens), dollars(a.monthly.micro_usd))
            }
            Basis::Projected => (
                format!("{} (proj.)", group(a.monthly.tokens)),
                format!("{} (proj.)", dollars(a.monthly.micro_usd)),
            ),
            Basis::TooShort => ("-".to_owned(), "-".to_owned()),
        };
        let mark = if a.low_confidence { '*' } else { ' ' };
        lines.push(vec![
            a.agent.clone(),
            format!("{}{mark}", history_text(a.history_ms)),
            a.days_observed.to_string(),
            tokens,
            cost,
            group(a.peak_tokens_per_minute),
            change(
                a.current.monthly_tokens.map(group),
                a.recommended.monthly_tokens.map(group),
            ),
            change(
                a.current.monthly_micro_usd.map(dollars),
                a.recommended.monthly_micro_usd.map(dollars),
            ),
            change(
                a.current.tokens_per_minute.map(group),
                a.recommended.tokens_per_minute.map(group),
            ),
        ]);
    }
    let mut out = String::new();
    for line in crate::text_table::align(&lines, |i| i != 0) {
        out.push_str(&line);
        out.push('\n');
    }
    if analyses.iter().any(|a| a.low_confidence) {
        out.push_str(&format!(
            "* under {} days of history: low confidence; `--apply` refuses while a row with a recommendation is marked (`--min-days` sets the minimum)\n",
            options.min_days
        ));
    }
    for a in analyses.iter().filter(|a| a.basis != Basis::NoTraffic) {
        let r = a.recommended;
        for (field, value, reason) in [
            (
                "monthly_tokens",
                r.monthly_tokens.map(group),
                &a.reasons.monthly_tokens,
            ),
            (
                "monthly_usd",
                r.monthly_micro_usd.map(dollars),
                &a.reasons.monthly_usd,
            ),
            (
                "tokens_per_minute",
                r.tokens_per_minute.map(group),
                &a.reasons.tokens_per_minute,
            ),
        ] {
            let value = value.unwrap_or_else(|| "none".to_owned());
            out.push_str(&format!(
                "agent \"{}\": {field} {value}: {reason}\n",
                a.agent
            ));
        }
    }
    for a in analyses {
        for flag in &a.flags {
            out.push_str(&format!("agent \"{}\": {}\n", a.agent, flag.describe()));
        }
    }
    out
}

/// A count as fleet.yaml reads it back exactly: `42k`, `1.3M`, `150`.
pub fn count_text(n: u64) -> String {
    for (scale, suffix) in [(1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")] {
        if n >= scale && n.is_multiple_of(scale / 10) {
            let whole = n / scale;
            let tenth = (n % scale) / (scale / 10);
            return if tenth == 0 {
                format!("{whole}{suffix}")
            } else {
                format!("{whole}.{tenth}{suffix}")
            };
        }
    }
    n.to_string()
}

/// File name of the overlay beside `fleet_file`: `<stem>.budgets.yaml`, so
/// `fleet.yaml` gets `fleet.budgets.yaml`.
pub fn overlay_path(fleet_file: &Path) -> PathBuf {
    fleet::overlay_path(fleet_file)
}

/// The overlay's text: a header saying what it is and how to override it,
/// then each agent with a recommendation.
pub fn overlay_yaml(fleet_file_name: &str, generated_at: &str, analyses: &[Analysis]) -> String {
    let mut out = format!(
        "# Generated by `supervisor tune --apply` at {generated_at} from the ledger's usage.\n\
         # Do not edit: the next `supervisor tune --apply` replaces this file.\n\
         # To override a value, set it in the agent's `budget:` in {fleet_file_name}:\n\
         # a value written there wins over this file, field by field, and this file\n\
         # wins over `defaults.budget`. Delete this file to go back to {fleet_file_name} alone.\n"
    );
    let agents: Vec<&Analysis> = analyses
        .iter()
        .filter(|a| a.recommended != Limits::default())
        .collect();
    if agents.is_empty() {
        out.push_str("agents: {}\n");
        return out;
    }
    out.push_str("agents:\n");
    for a in agents {
        out.push_str(&format!("  {}:\n    budget:\n", a.agent));
        let r = a.recommended;
        if let Some(t) = r.monthly_tokens {
            out.push_str(&format!("      monthly_tokens: {}\n", count_text(t)));
        }
        if let Some(u) = r.monthly_micro_usd {
            out.push_str(&format!("      monthly_usd: {}\n", u / 1_000_000));
        }
        if let Some(t) = r.tokens_per_minute {
            out.push_str(&format!("      tokens_per_minute: {}\n", count_text(t)));
        }
    }
    out
}

/// Parses `--headroom`: `25%` or `25`, a whole percentage up to 1000.
pub fn parse_headroom(text: &str) -> Result<u32, String> {
    let digits = text.trim().trim_end_matches('%').trim();
    match digits.parse::<u32>() {
        Ok(n) if n <= 1000 => Ok(n),
        _ => Err(format!(
            "invalid headroom `{text}`: use a whole percentage like `25%` (0 to 1000)"
        )),
    }
}

fn print_err(what: &str, err: &anyhow::Error, hint: &str) {
    eprintln!("error: {what}");
    for cause in err.chain() {
        eprintln!("caused by: {cause}");
    }
    eprintln!("hint: {hint}");
}

/// Writes `text` to `path` atomically: a temporary file beside it, synced,
/// then renamed over it, so a reloading supervisor never reads half a file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("cannot write `{}`", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!(
            "cannot rename `{}` onto `{}`",
            tmp.display(),
            path.display()
        )
    })
}

/// The rows `--apply` must not write: low confidence, with something to write.
pub fn held_back(analyses: &[Analysis]) -> Vec<&Analysis> {
    analyses
        .iter()
        .filter(|a| a.low_confidence && a.recommended != Limits::default())
        .collect()
}

/// Whether one value written to the overlay is the one in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The fleet, loaded with the overlay, has this value.
    InForce,
    /// The agent's own `budget:` in fleet.yaml sets the field and wins.
    Shadowed { in_force: Option<u64> },
}

/// One value of the overlay and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub agent: String,
    /// The field under `budget:`, e.g. `monthly_usd`.
    pub field: &'static str,
    pub value: u64,
    pub effect: Effect,
}

/// Each value [`overlay_yaml`] writes, against the budgets the fleet has when
/// loaded with that overlay (`effective`): where they differ, fleet.yaml's own
/// value won.
pub fn effects(analyses: &[Analysis], effective: &BTreeMap<String, BudgetSpec>) -> Vec<Written> {
    let mut out = Vec::new();
    for a in analyses {
        let now = effective
            .get(&a.agent)
            .map(Limits::from)
            .unwrap_or_default();
        let r = a.recommended;
        for (field, value, in_force) in [
            ("monthly_tokens", r.monthly_tokens, now.monthly_tokens),
            ("monthly_usd", r.monthly_micro_usd, now.monthly_micro_usd),
            (
                "tokens_per_minute",
                r.tokens_per_minute,
                now.tokens_per_minute,
            ),
        ] {
            let Some(value) = value else { continue };
            let effect = if in_force == Some(value) {
                Effect::InForce
            } else {
                Effect::Shadowed { in_force }
            };
            out.push(Written {
                agent: a.agent.clone(),
                field,
                value,
                effect,
            });
        }
    }
    out
}

/// One line per written value: whether it takes effect, and if not, what wins
/// and what to remove. `agent_line` is where the agent is written in fleet.yaml.
pub fn describe_effects(
    written: &[Written],
    fleet_file_name: &str,
    agent_line: &dyn Fn(&str) -> Option<u32>,
) -> String {
    let show = |field: &str, v: u64| {
        if field == "monthly_usd" {
            dollars(v)
        } else {
            group(v)
        }
    };
    let mut out = String::new();
    for w in written {
        let value = show(w.field, w.value);
        match w.effect {
            Effect::InForce => out.push_str(&format!(
                "agent \"{}\": {} {value}: takes effect\n",
                w.agent, w.field
            )),
            Effect::Shadowed { in_force } => {
                let at = agent_line(&w.agent).map_or_else(
                    || fleet_file_name.to_owned(),
                    |l| format!("{fleet_file_name}:{l}"),
                );
                let wins = in_force.map_or_else(|| "none".to_owned(), |v| show(w.field, v));
                out.push_str(&format!(
                    "agent \"{}\": {} {value}: shadowed, `{at}` sets `budget.{}: {wins}` for this agent and wins; remove it there to let {value} apply\n",
                    w.agent, w.field, w.field
                ));
            }
        }
    }
    out
}

/// Runs `supervisor tune` and returns the exit code.
pub fn tune_command(fleet_path: &Path, json: bool, apply: bool, options: Options) -> u8 {
    let found = crate::control::discovery::find(fleet_path);
    let (budgets, current_from): (BTreeMap<String, BudgetSpec>, _) = match &found.fleet {
        Ok(fleet) => (
            fleet
                .agents
                .iter()
                .map(|(name, a)| (name.clone(), a.budget))
                .collect(),
            CeilingsFrom::Fleet,
        ),
        Err(errors) if apply => {
            eprint!("{}", errors.report());
            eprintln!(
                "error: `tune --apply` needs `{}` to load: the overlay is only written if the fleet \
                 still loads with it; nothing was written",
                fleet_path.display()
            );
            return exit::FAILURE;
        }
        Err(_) => {
            if let Some(note) = found.broken_note() {
                eprintln!("{note}");
            }
            match crate::control::client::running_rows(fleet_path, &found) {
                Some(rows) => {
                    eprintln!(
                        "note: the current ceilings shown are the running supervisor's; its token rates \
                         are not known here (shown as `-`)"
                    );
                    let ceilings = crate::usage_report::Ceilings::of_running(&rows);
                    let budgets = ceilings
                        .agents
                        .into_iter()
                        .map(|(agent, (tokens, micro_usd))| {
                            let budget = BudgetSpec {
                                monthly_tokens: tokens,
                                monthly_micro_usd: micro_usd,
                                ..BudgetSpec::default()
                            };
                            (agent, budget)
                        })
                        .collect();
                    (budgets, CeilingsFrom::RunningSupervisor)
                }
                None => {
                    eprintln!(
                        "note: current ceilings are unavailable (no supervisor answers and the file does \
                         not load); `-` in CURRENT means unknown here, not unset"
                    );
                    (BTreeMap::new(), CeilingsFrom::Unavailable)
                }
            }
        }
    };
    let state_dir = found.state_dir.clone();
    let now_ms = ledger::unix_millis_now();
    let month = Month::from_unix_secs(now_ms.div_euclid(1000));
    let since = (now_ms - WINDOW_DAYS * DAY_MS).min(month_start_day(month) * DAY_MS);
    let read = ledger::usage_samples(&state_dir, since)
        .and_then(|samples| ledger::first_request_ms(&state_dir).map(|first| (samples, first)));
    let (samples, first_seen) = match read {
        Ok(s) => s,
        Err(err) => {
            print_err(
                &format!("cannot read the ledger in `{}`", state_dir.display()),
                &err,
                &ledger::failure_hint(&err, &state_dir),
            );
            return exit::FAILURE;
        }
    };
    let analyses = analyse(&samples, &first_seen, &budgets, now_ms, options);
    if json {
        let mut report = report(month, options, &analyses);
        report.current_from = current_from;
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("error: cannot encode the recommendations as JSON: {err}");
                return exit::FAILURE;
            }
        }
    } else {
        print!("{}", table(&analyses, options));
    }
    if !apply {
        return exit::OK;
    }
    let held = held_back(&analyses);
    if let Some(shortest) = held.iter().map(|a| a.history_ms).min() {
        let names: Vec<String> = held
            .iter()
            .map(|a| format!("`{}` ({})", a.agent, history_text(a.history_ms)))
            .collect();
        eprintln!(
            "error: not applied: {} under {} days of history: {}",
            if held.len() == 1 {
                "1 agent has"
            } else {
                "agents have"
            },
            options.min_days,
            names.join(", ")
        );
        eprintln!(
            "hint: recommendations from so little traffic are guesses; wait until they have {} days, or pass `--min-days {}` to apply them anyway",
            options.min_days,
            shortest.div_euclid(DAY_MS)
        );
        return exit::FAILURE;
    }
    apply_overlay(fleet_path, &state_dir, &analyses, json)
}

/// `--apply`: writes the overlay (only if the fleet still loads with it),
/// says per value whether it takes effect or fleet.yaml shadows it, and
/// reloads a running supervisor. Messages go to stderr under `--json`.
fn apply_overlay(fleet_path: &Path, state_dir: &Path, analyses: &[Analysis], json: bool) -> u8 {
    let say = |text: &str| {
        if json {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    };
    let overlay = overlay_path(fleet_path);
    let name = fleet_path
        .file_name()
        .map_or_else(|| "fleet.yaml".into(), |n| n.to_string_lossy().into_owned());
    let generated_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let text = overlay_yaml(&name, &generated_at, analyses);
    let located = match fleet::check_overlay_text(fleet_path, &text) {
        Ok(located) => located,
        Err(errors) => {
            eprint!("{}", errors.report());
            eprintln!(
                "error: the recommendations would make the fleet invalid; `{}` was not written",
                overlay.display()
            );
            return exit::FAILURE;
        }
    };
    if let Err(err) = write_atomically(&overlay, &text) {
        print_err(
            &format!("cannot write `{}`", overlay.display()),
            &err,
            "the overlay lives beside the fleet file; check that directory's permissions",
        );
        return exit::FAILURE;
    }
    say(&format!("wrote `{}`\n", overlay.display()));
    let effective: BTreeMap<String, BudgetSpec> = located
        .fleet
        .agents
        .iter()
        .map(|(n, a)| (n.clone(), a.budget))
        .collect();
    let written = effects(analyses, &effective);
    let sources = &located.sources;
    say(&describe_effects(&written, &name, &|agent| {
        sources.agent(agent).map(|p| p.line)
    }));
    let shadowed = written
        .iter()
        .filter(|w| w.effect != Effect::InForce)
        .count();
    let in_force = written.len() - shadowed;
    let (applied, pending) = match (in_force, shadowed) {
        (0, 0) => (
            "the overlay is empty, nothing changed".to_owned(),
            "the overlay is empty, nothing changes".to_owned(),
        ),
        (n, 0) => (
            format!("{n} new value{} in force", plural(n)),
            format!(
                "the next `supervisor run` uses the {n} new value{}",
                plural(n)
            ),
        ),
        (0, m) => (
            format!("nothing changed: all {m} values are shadowed by {name}"),
            format!("nothing changes: all {m} values are shadowed by {name}"),
        ),
        (n, m) => (
            format!(
                "{n} new value{} in force, {m} shadowed by {name}",
                plural(n)
            ),
            format!(
                "the next `supervisor run` uses the {n} new value{}; {m} stay shadowed by {name}",
                plural(n)
            ),
        ),
    };
    crate::control::client::ask_reload(fleet_path, state_dir).report(&applied, &pending, json)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        let m = |y, mo| Month::new(y, mo).unwrap();
        assert_eq!(month_start_day(m(1970, 1)), 0);
        assert_eq!(month_start_day(m(2026, 11)), 20_758);
        for (month, days) in [
            (m(2026, 1), 31),
            (m(2026, 2), 28),
            (m(2028, 2), 29),
            (m(2100, 2), 28),
            (m(2000, 2), 29),
            (m(2026, 4), 30),
            (m(2026, 12), 31),
        ] {
            assert_eq!(days_in_month(month), days, "{month}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let cases: &[(&[u64], u64, u64)] = &[
            (&[], 95, 0),
            (&[7], 95, 7),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95, 10),
            (&[10, 9, 8, 7, 6, 5, 4, 3, 2, 1], 50, 5),
            (&[5; 19], 95, 5),
            // 20 values: rank ceil(0.95 × 20) = 19
            (
                &[
                    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 100,
                ],
                95,
                19,
            ),
        ];
        for (values, p, want) in cases {
            let mut v = values.to_vec();
            assert_eq!(percentile(&mut v, *p), *want, "{values:?} p{p}");
        }
    }

    #[test]
    fn friendly_rounding() {
        for (value, want) in [
            (0, 0),
            (7, 7),
            (99, 99),
            (100, 100),
            (101, 110),
            (123, 130),
            (41_234, 42_000),
            (42_000, 42_000),
            (1_234_567, 1_300_000),
            (9_999_999, 10_000_000),
        ] {
            assert_eq!(round_up_friendly(value), want, "{value}");
        }
        for (micro, want) in [
            (1, 1_000_000),
            (1_000_000, 1_000_000),
            (12_340_000, 13_000_000),
            (187_500_000, 190_000_000),
        ] {
            assert_eq!(round_up_friendly_usd(micro), want, "{micro}");
        }
        assert_eq!(with_headroom(100, 25), 125);
        assert_eq!(with_headroom(101, 25), 127, "126.25 rounds up");
        assert_eq!(with_headroom(u64::MAX, 25), u64::MAX);
    }

    #[test]
    fn counts_read_back_as_written() {
        for (n, want) in [
            (150, "150"),
            (1_500, "1.5k"),
            (42_000, "42k"),
            (61_000, "61k"),
            (1_300_000, "1.3M"),
            (40_000_000, "40M"),
            (1_250, "1250"),
            (2_000_000_000, "2G"),
        ] {
            assert_eq!(count_text(n), want);
        }
    }

    #[test]
    fn headroom_parses_as_a_percentage() {
        assert_eq!(parse_headroom("25%"), Ok(25));
        assert_eq!(parse_headroom("0"), Ok(0));
        assert_eq!(parse_headroom(" 40 % "), Ok(40));
        assert!(
            parse_headroom("0.25")
                .unwrap_err()
                .contains("invalid headroom `0.25`")
        );
        assert!(parse_headroom("2000%").is_err());
    }

    const NOV_14_NOON: i64 = (20_758 + 13) * DAY_MS + 12 * 3_600_000; // 2026-11-14T12:00Z

    fn sample(agent: &str, at_ms: i64, tokens: u64, micro_usd: u64) -> UsageSample {
        UsageSample {
            agent: agent.into(),
            started_at_ms: at_ms,
            tokens,
            micro_usd,
        }
    }

    fn budgets(list: &[(&str, BudgetSpec)]) -> BTreeMap<String, BudgetSpec> {
        list.iter().map(|(n, b)| ((*n).to_owned(), *b)).collect()
    }

    fn opts() -> Options {
        Options::default()
    }

    fn first(list: &[(&str, i64)]) -> BTreeMap<String, i64> {
        list.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect()
    }

    #[test]
    fn history_decides_the_basis_and_a_partial_day_is_never_projected() {
        let now = NOV_14_NOON;
        let midnight = now - 12 * 3_600_000;
        let mut samples = Vec::new();
        // `steady`: 40 days of history; 1,000 tokens and $0.01 on each of the last 30 days.
        for d in 0..30 {
            samples.push(sample("steady", now - d * DAY_MS - 1_000, 1_000, 10_000));
        }
        // `new`: since 2026-11-12T00:00Z; whole days of 100 and 200 tokens, then a
        // busy partial day today that must not count as a whole one.
        samples.push(sample("new", midnight - 2 * DAY_MS, 100, 0));
        samples.push(sample("new", midnight - DAY_MS, 200, 0));
        samples.push(sample("new", now - 120_000, 1_000, 0));
        samples.push(sample("new", now - 30_000, 2_000, 0));
        // `hour`: one hour of history, no whole day.
        samples.push(sample("hour", now - 3_600_000, 500, 1_000));
        samples.push(sample("hour", now - 1_800_000, 500, 1_000));
        // `spike`: 21 whole days of 1,000 tokens, one of them 100,000: the p95
        // projection (30,000) is below what was used, which wins.
        for d in 1..=21 {
            let tokens = if d == 5 { 100_000 } else { 1_000 };
            samples.push(sample("spike", now - d * DAY_MS, tokens, 0));
        }
        // Older than the window, in the future, or not in the fleet: ignored.
        samples.push(sample("idle", now - 31 * DAY_MS, 1_000_000, 0));
        samples.push(sample("new", now + 1, 1_000_000, 0));
        samples.push(sample("gone", now, 5, 5));
        let spec = BudgetSpec {
            monthly_tokens: Some(100_000),
            ..BudgetSpec::default()
        };
        let out = analyse(
            &samples,
            &first(&[
                ("steady", now - 40 * DAY_MS),
                ("new", midnight - 2 * DAY_MS),
                ("spike", now - 23 * DAY_MS),
                ("idle", now - 50 * DAY_MS),
            ]),
            &budgets(&[
                ("new", spec),
                ("steady", spec),
                ("idle", spec),
                ("hour", spec),
                ("spike", spec),
            ]),
            now,
            opts(),
        );
        let names: Vec<&str> = out.iter().map(|a| a.agent.as_str()).collect();
        assert_eq!(names, ["hour", "idle", "new", "spike", "steady"]);

        let hour = &out[0];
        assert_eq!(hour.basis, Basis::TooShort);
        assert_eq!(history_text(hour.history_ms), "1h 0m");
        assert!(hour.low_confidence);
        assert_eq!(
            hour.recommended,
            Limits {
                monthly_tokens: None,
                monthly_micro_usd: None,
                tokens_per_minute: Some(630), // 625
            }
        );
        assert_eq!(
            hour.reasons.monthly_tokens,
            "no whole UTC day of history yet (1h 0m); a partial day is not projected to a month"
        );
        assert_eq!(
            hour.reasons.tokens_per_minute,
            "peak minute 500 + 25%, rounded up"
        );
        assert_eq!(hour.flags, vec![], "no monthly spend to call underused");

        let idle = &out[1];
        assert_eq!(idle.basis, Basis::NoTraffic);
        assert!(!idle.low_confidence);
        assert_eq!(idle.recommended, Limits::default());
        assert_eq!(
            idle.reasons.monthly_tokens,
            "no request in the last 30 days"
        );
        assert_eq!(
            idle.flags,
            vec![Flag::Underused {
                field: "budget.monthly_tokens",
                percent: 0
            }]
        );

        let new = &out[2];
        assert_eq!(new.basis, Basis::Projected);
        assert_eq!(history_text(new.history_ms), "2d");
        assert!(new.low_confidence);
        assert_eq!((new.days_observed, new.whole_days), (3, 2));
        assert_eq!(
            new.daily_p95,
            Amount::new(200, 0),
            "today is not a whole day"
        );
        assert_eq!(new.monthly, Amount::new(200 * 30, 0));
        assert_eq!(new.month_to_date, Amount::new(3_300, 0));
        assert_eq!(new.month_end, Amount::new(3_300 + 200 * 16, 0));
        assert_eq!(new.recommended.monthly_tokens, Some(7_500));
        assert_eq!(
            new.reasons.monthly_tokens,
            "p95 daily 200 over 2 whole days × 30 + 25%, rounded up"
        );
        assert_eq!(new.recommended.tokens_per_minute, Some(2_500));

        let spike = &out[3];
        assert_eq!(spike.basis, Basis::Projected);
        assert!(!spike.low_confidence, "23 days");
        assert_eq!(spike.whole_days, 21);
        assert_eq!(spike.monthly, Amount::new(30_000, 0));
        assert_eq!(
            spike.recommended.monthly_tokens,
            Some(150_000),
            "120,000 used + 25%"
        );
        assert_eq!(
            spike.reasons.monthly_tokens,
            "used so far 120,000, above p95 daily 1,000 over 21 whole days × 30, + 25%, rounded up"
        );
        assert_eq!(spike.recommended.tokens_per_minute, Some(130_000));

        let steady = &out[4];
        assert_eq!(steady.basis, Basis::Observed);
        assert_eq!(history_text(steady.history_ms), "40d");
        assert!(!steady.low_confidence);
        assert_eq!(steady.monthly, Amount::new(30_000, 300_000));
        assert_eq!(steady.month_to_date, Amount::new(14_000, 140_000));
        assert_eq!(
            steady.recommended,
            Limits {
                monthly_tokens: Some(38_000),       // 37,500
                monthly_micro_usd: Some(1_000_000), // $0.375 → $1
                tokens_per_minute: Some(1_300),     // 1,250
            }
        );
        assert_eq!(
            steady.reasons.monthly_tokens,
            "30-day total 30,000 + 25%, rounded up"
        );
        assert_eq!(
            steady.reasons.monthly_usd,
            "30-day total $0.30 + 25%, rounded up"
        );
        assert_eq!(steady.flags, vec![], "30% monthly, 30% by month end");

        let held: Vec<&str> = held_back(&out).iter().map(|a| a.agent.as_str()).collect();
        assert_eq!(held, ["hour", "new"]);
        let relaxed = analyse(
            &samples,
            &first(&[("new", midnight - 2 * DAY_MS)]),
            &budgets(&[("new", spec), ("hour", spec)]),
            now,
            Options {
                min_days: 0,
                ..opts()
            },
        );
        assert!(held_back(&relaxed).is_empty(), "--min-days 0");
    }

    #[test]
    fn tokens_per_minute_is_never_below_the_busiest_minute() {
        let now = NOV_14_NOON;
        // 200 quiet minutes and one busy one: a p99 would be 1,000.
        let mut samples: Vec<UsageSample> = (1..=200)
            .map(|m| sample("a", now - m * MINUTE_MS, 1_000, 0))
            .collect();
        samples.push(sample("a", now, 10_000, 0));
        let out = analyse(
            &samples,
            &BTreeMap::new(),
            &budgets(&[("a", BudgetSpec::default())]),
            now,
            opts(),
        );
        assert_eq!(out[0].peak_tokens_per_minute, 10_000);
        assert_eq!(out[0].recommended.tokens_per_minute, Some(13_000));
    }

    #[test]
    fn history_reads_at_a_glance() {
        for (ms, want) in [
            (0, "-"),
            (40_000, "40s"),
            (3_600_000, "1h 0m"),
            (3 * 3_600_000 + 12 * 60_000, "3h 12m"),
            (DAY_MS + 5 * 3_600_000, "1d 5h"),
            (3 * DAY_MS + 7 * 3_600_000, "3d"),
            (40 * DAY_MS, "40d"),
        ] {
            assert_eq!(history_text(ms), want, "{ms}");
        }
    }

    #[test]
    fn a_value_fleet_yaml_sets_is_shadowed() {
        let a = |agent: &str, r: Limits| Analysis {
            agent: agent.into(),
            recommended: r,
            ..blank()
        };
        let analyses = [
            a(
                "soundwave",
                Limits {
                    monthly_tokens: Some(42_000),
                    monthly_micro_usd: Some(1_000_000),
                    tokens_per_minute: None,
                },
            ),
            a("idle", Limits::default()),
        ];
        // Loaded with the overlay: fleet.yaml's own `monthly_usd: 20` won.
        let effective = budgets(&[(
            "soundwave",
            BudgetSpec {
                monthly_tokens: Some(42_000),
                monthly_micro_usd: Some(20_000_000),
                ..BudgetSpec::default()
            },
        )]);
        let written = effects(&analyses, &effective);
        assert_eq!(
            written
                .iter()
                .map(|w| (w.field, w.effect))
                .collect::<Vec<_>>(),
            [
                ("monthly_tokens", Effect::InForce),
                (
                    "monthly_usd",
                    Effect::Shadowed {
                        in_force: Some(20_000_000)
                    }
                ),
            ]
        );
        assert_eq!(
            describe_effects(&written, "fleet.yaml", &|_| Some(7)),
            "agent \"soundwave\": monthly_tokens 42,000: takes effect\n\
             agent \"soundwave\": monthly_usd $1.00: shadowed, `fleet.yaml:7` sets `budget.monthly_usd: $20.00` for this agent and wins; remove it there to let $1.00 apply\n"
        );
    }

    fn blank() -> Analysis {
        Analysis {
            agent: String::new(),
            history_ms: 0,
            low_confidence: false,
            days_observed: 1,
            whole_days: 1,
            daily_p95: Amount::ZERO,
            basis: Basis::Projected,
            month_to_date: Amount::ZERO,
            window_total: Amount::ZERO,
            monthly: Amount::ZERO,
            month_end: Amount::ZERO,
            peak_tokens_per_minute: 0,
            current: Limits::default(),
            recommended: Limits::default(),
            reasons: Reasons::default(),
            flags: vec![],
        }
    }

    #[test]
    fn flags_at_their_thresholds() {
        let now = NOV_14_NOON;
        // One whole day of traffic, yesterday: p95 = its total; 16 days left.
        type Case = (&'static str, u64, Option<u64>, Option<u64>, Vec<Flag>);
        let cases: &[Case] = &[
            // month end = 1,000 × 17 = 17,000
            (
                "exactly 80%",
                1_000,
                Some(21_250),
                None,
                vec![Flag::NearCeiling {
                    field: "budget.monthly_tokens",
                    percent: 80,
                }],
            ),
            ("just under 80%", 1_000, Some(21_251), None, vec![]),
            // monthly = 1,000 × 30 = 30,000: 10% of 300,000 is not under 10%
            ("exactly 10%", 1_000, Some(300_000), None, vec![]),
            (
                "just under 10%",
                1_000,
                Some(300_001),
                None,
                vec![Flag::Underused {
                    field: "budget.monthly_tokens",
                    percent: 9,
                }],
            ),
            ("no ceiling, no flag", 1_000, None, None, vec![]),
            // USD: 1,000 micro-USD a day → month end $0.017, monthly $0.03
            (
                "usd over",
                1_000,
                None,
                Some(17_000),
                vec![Flag::NearCeiling {
                    field: "budget.monthly_usd",
                    percent: 100,
                }],
            ),
        ];
        for (what, per_day, tokens, usd, want) in cases {
            let spec = BudgetSpec {
                monthly_tokens: *tokens,
                monthly_micro_usd: *usd,
                ..BudgetSpec::default()
            };
            let out = analyse(
                &[sample("a", now - DAY_MS, *per_day, *per_day)],
                &first(&[("a", now - 3 * DAY_MS)]),
                &budgets(&[("a", spec)]),
                now,
                opts(),
            );
            assert_eq!(&out[0].flags, want, "{what}");
        }
    }

    #[test]
    fn the_overlay_names_only_agents_with_recommendations() {
        let rec = |t, u, r| Analysis {
            recommended: Limits {
                monthly_tokens: t,
                monthly_micro_usd: u,
                tokens_per_minute: r,
            },
            ..blank()
        };
        let a = Analysis {
            agent: "a".into(),
            ..rec(Some(1_300_000), Some(190_000_000), Some(2_500))
        };
        let b = Analysis {
            agent: "b".into(),
            ..rec(None, None, None)
        };
        let c = Analysis {
            agent: "c".into(),
            ..rec(Some(42_000), None, None)
        };
        let text = overlay_yaml("fleet.yaml", "2026-11-14T12:00:00Z", &[a, b, c]);
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "agents:",
                "  a:",
                "    budget:",
                "      monthly_tokens: 1.3M",
                "      monthly_usd: 190",
                "      tokens_per_minute: 2.5k",
                "  c:",
                "    budget:",
                "      monthly_tokens: 42k",
            ]
        );
        assert!(
            text.starts_with("# Generated by `supervisor tune --apply` at 2026-11-14T12:00:00Z")
        );
        assert!(text.contains("wins over this file"), "{text}");
        assert_eq!(
            overlay_yaml("fleet.yaml", "t", &[]).lines().last(),
            Some("agents: {}")
        );
    }

    #[test]
    fn table_shows_history_changes_reasons_and_flags() {
        let now = NOV_14_NOON;
        let spec = BudgetSpec {
            monthly_tokens: Some(10_000),
            tokens_per_minute: Some(60_000),
            ..BudgetSpec::default()
        };
        let out = analyse(
            &[
                sample("sparkles", now - DAY_MS, 1_000, 2_000_000),
                sample("idle", now - 40 * DAY_MS, 1, 0),
            ],
            &first(&[("sparkles", now - 3 * DAY_MS)]),
            &budgets(&[("sparkles", spec), ("idle", BudgetSpec::default())]),
            now,
            opts(),
        );
        let text = table(&out, opts());
        assert_eq!(
            text,
            "\
AGENT     HISTORY  DAYS  MONTHLY TOKENS    MONTHLY COST  PEAK TPM   MONTHLY_TOKENS    MONTHLY_USD  TOKENS_PER_MINUTE
idle         40d      0               0           $0.00         0                -              -                  -
sparkles      3d*     1  30,000 (proj.)  $60.00 (proj.)     1,000  10,000 → 38,000  none → $75.00     60,000 → 1,300
* under 7 days of history: low confidence; `--apply` refuses while a row with a recommendation is marked (`--min-days` sets the minimum)
agent \"sparkles\": monthly_tokens 38,000: p95 daily 1,000 over 1 whole day × 30 + 25%, rounded up
agent \"sparkles\": monthly_usd $75.00: p95 daily $2.00 over 1 whole day × 30 + 25%, rounded up
agent \"sparkles\": tokens_per_minute 1,300: peak minute 1,000 + 25%, rounded up
agent \"sparkles\": projected at 170% of `budget.monthly_tokens` by month end
"
        );
    }
}
