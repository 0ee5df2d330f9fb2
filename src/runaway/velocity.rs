//! The spend-velocity backstop: a trip wire on how fast an agent spends,
//! whatever the shape of its requests. It catches the loops no structural
//! rule knows — the agent's spend over a short sliding window (10 minutes by
//! default) against its own recent baseline (the p95 of its per-window spend
//! over the last 7 days, from the ledger at start and kept rolling here
//! afterwards), with an absolute floor so a quiet agent's normal burst never
//! trips, and an optional hard `max_tokens_per_window`.
//!
//! Spend is counted in *weighted tokens* ([`weighted_tokens`]): what the
//! provider saw, each cache token weighted by its list price against a fresh
//! input token (reads 0.1, writes 1.25), so a healthy agent re-reading a
//! large cached context is not "spending" ten times what it pays for. A cut
//! answer counts the usage actually seen, not the reservation it is charged
//! at: a provider outage that resets connections is not the agent's spend.
//! Until an agent has a baseline only `no_baseline_tokens` (much higher than
//! the floor) and `max_tokens_per_window` apply, so a fleet going live with
//! no history raises no storm.
//!
//! Pure: settled spend with its wall-clock time in, a verdict out. Memory is
//! bounded: one bucket per minute of the window and one number per active
//! window of the baseline period. Must not do I/O, read the clock, or keep
//! anything but token counts.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::RunawayAction;

/// The live window's granularity.
const BUCKET_MS: i64 = 60_000;
/// Fewer active windows of history than this, and the floor stands in for
/// the baseline: a new agent has no "usual" yet.
pub const MIN_BASELINE_WINDOWS: usize = 6;
/// The percentile of active windows taken as the baseline: an agent's own
/// busiest normal windows, not its average, so its usual bursts never trip.
pub const BASELINE_PERCENTILE: usize = 95;
/// Most windows a baseline may span (`baseline / window`); bounds memory.
pub const MAX_BASELINE_WINDOWS: u64 = 50_000;

/// Weight of a cache read against a fresh input token, in hundredths
/// (Anthropic lists reads at 0.1 × input, OpenAI at 0.1–0.5 ×).
pub const CACHE_READ_WEIGHT_PCT: u64 = 10;
/// Weight of a cache write against a fresh input token, in hundredths
/// (Anthropic's 5-minute cache write is 1.25 × input).
pub const CACHE_WRITE_WEIGHT_PCT: u64 = 125;

/// The velocity figure of one answer's usage: fresh input and output at
/// full weight, cache writes at 1.25, cache reads at 0.1, rounded up. The
/// ledger computes the same figure for the baseline
/// (`ledger::spend_per_window`).
pub fn weighted_tokens(input: u64, output: u64, cache_write: u64, cache_read: u64) -> u64 {
    let cached = u128::from(cache_write) * u128::from(CACHE_WRITE_WEIGHT_PCT)
        + u128::from(cache_read) * u128::from(CACHE_READ_WEIGHT_PCT);
    let cached = u64::try_from(cached.div_ceil(100)).unwrap_or(u64::MAX);
    input.saturating_add(output).saturating_add(cached)
}

/// `runaway: { velocity: { window, multiple, floor_tokens, no_baseline_tokens, max_tokens_per_window, baseline, action } }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VelocityConfig {
    /// The sliding window spend is measured over (whole minutes).
    pub window: Duration,
    /// Trip above this many times the baseline; `None` turns the relative
    /// rule off.
    pub multiple: Option<u32>,
    /// The relative rule never trips at or below this many tokens per window.
    pub floor_tokens: u64,
    /// Until the agent has a baseline (fewer than [`MIN_BASELINE_WINDOWS`]
    /// active windows of history), the relative rule trips only above this;
    /// `None` leaves a new agent to `max_tokens_per_window` alone.
    pub no_baseline_tokens: Option<u64>,
    /// Trip above this many tokens per window, whatever the baseline.
    pub max_tokens_per_window: Option<u64>,
    /// How far back the baseline looks.
    pub baseline: Duration,
    /// Alert by default: spend alone is not proof of a loop.
    pub action: RunawayAction,
}

impl Default for VelocityConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
            multiple: Some(5),
            floor_tokens: 1_000_000,
            no_baseline_tokens: Some(10_000_000),
            max_tokens_per_window: None,
            baseline: Duration::from_secs(7 * 86_400),
            action: RunawayAction::Alert,
        }
    }
}

impl VelocityConfig {
    pub fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis())
            .unwrap_or(i64::MAX)
            .max(BUCKET_MS)
    }

    /// Whole windows in the baseline period.
    pub fn baseline_windows(&self) -> i64 {
        let baseline = i64::try_from(self.baseline.as_millis()).unwrap_or(i64::MAX);
        (baseline / self.window_ms()).max(1)
    }

    /// Whether the wire can trip at all.
    pub fn enabled(&self) -> bool {
        self.multiple.is_some() || self.max_tokens_per_window.is_some()
    }

    /// The history a baseline is drawn from changes with these two; a change
    /// of anything else applies to the running wire as it is.
    pub fn same_history(&self, other: &Self) -> bool {
        self.window == other.window && self.baseline == other.baseline
    }

    /// Problems as `(field, message)`, for fleet validation to locate.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let secs = self.window.as_secs();
        if self.window.subsec_nanos() != 0
            || !secs.is_multiple_of(60)
            || !(60..=86_400).contains(&secs)
        {
            out.push((
                "window",
                "must be whole minutes from `1m` to `24h`, like `10m`".to_owned(),
            ));
        }
        if let Some(m) = self.multiple
            && !(2..=1_000).contains(&m)
        {
            out.push((
                "multiple",
                format!("is {m}: it must be from 2 to 1000 (or `off`); hint: the default is 5"),
            ));
        }
        if self.no_baseline_tokens == Some(0) {
            out.push((
                "no_baseline_tokens",
                "must be larger than zero (or `off`)".to_owned(),
            ));
        }
        if self.max_tokens_per_window == Some(0) {
            out.push((
                "max_tokens_per_window",
                "must be larger than zero (or `off`)".to_owned(),
            ));
        }
        let window = self.window.as_secs().max(1);
        let baseline = self.baseline.as_secs();
        if baseline < window.saturating_mul(MIN_BASELINE_WINDOWS as u64) {
            out.push((
                "baseline",
                format!(
                    "must span at least {MIN_BASELINE_WINDOWS} windows (`window` is {}); hint: the default is `7d`",
                    short_duration(self.window.as_secs())
                ),
            ));
        } else if baseline / window > MAX_BASELINE_WINDOWS {
            out.push((
                "baseline",
                format!(
                    "spans {} windows, more than the {MAX_BASELINE_WINDOWS} this supervisor keeps; use a shorter `baseline` or a longer `window`",
                    baseline / window
                ),
            ));
        }
        out
    }
}

/// Which limit a trip exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum Exceeded {
    /// More than `multiple` × the baseline, and more than the floor.
    Multiple { multiple: u32, floor_tokens: u64 },
    /// No baseline yet (too little history), and more than `no_baseline_tokens`.
    NoBaseline { no_baseline_tokens: u64 },
    /// More than `max_tokens_per_window`.
    Limit { max_tokens_per_window: u64 },
}

/// What a velocity trip reports: window, spend, baseline and the limit
/// exceeded. Token counts only — never a prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VelocityEvidence {
    /// Always `spend_velocity`, so a stored record says which wire tripped.
    pub wire: &'static str,
    pub window_secs: u64,
    /// Always `weighted_tokens` (see [`weighted_tokens`]): the unit of every
    /// `*_tokens` figure here.
    pub unit: &'static str,
    /// Weighted tokens settled within the window, the request that tripped included.
    pub spend_tokens: u64,
    /// Requests settled within the window.
    pub requests: u64,
    /// The agent's p95 spend per window; `None` with too little history.
    pub baseline_tokens: Option<u64>,
    /// Active windows the baseline is drawn from.
    pub baseline_windows: u64,
    pub baseline_secs: u64,
    /// The spend this trip exceeded.
    pub threshold_tokens: u64,
    pub exceeded: Exceeded,
}

impl fmt::Display for VelocityEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = short_duration(self.window_secs);
        let period = short_duration(self.baseline_secs);
        write!(
            f,
            "{} weighted tokens in the last {window} ({} requests)",
            thousands(self.spend_tokens),
            self.requests
        )?;
        match (self.exceeded, self.baseline_tokens) {
            (Exceeded::Limit { .. }, _) => write!(
                f,
                ", over `max_tokens_per_window` {}",
                thousands(self.threshold_tokens)
            )?,
            (Exceeded::Multiple { multiple, .. }, Some(baseline)) => write!(
                f,
                ", over {multiple} × its baseline of {} per {window} (p{BASELINE_PERCENTILE} of {} active windows in the last {period})",
                thousands(baseline),
                self.baseline_windows
            )?,
            (Exceeded::Multiple { multiple, .. }, None) => {
                write!(f, ", over {multiple} × its baseline")?
            }
            (Exceeded::NoBaseline { .. }, _) => write!(
                f,
                ", over `no_baseline_tokens` {} ({} active windows in the last {period} are too few for a baseline)",
                thousands(self.threshold_tokens),
                self.baseline_windows
            )?,
        }
        match self.exceeded {
            Exceeded::Multiple { floor_tokens, .. } => write!(
                f,
                "; limit {}, floor {}",
                thousands(self.threshold_tokens),
                thousands(floor_tokens)
            ),
            Exceeded::Limit { .. } | Exceeded::NoBaseline { .. } => Ok(()),
        }
    }
}

/// `600` → `10m`, `604800` → `7d`, `5400` → `1h30m`.
pub fn short_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    crate::budget::group_thousands(n)
}

/// One minute of the live window.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    minute: i64,
    tokens: u64,
    requests: u64,
}

/// The window-aligned period being filled, folded into the history when it ends.
#[derive(Debug, Clone, Copy)]
struct OpenWindow {
    index: i64,
    tokens: u64,
    /// Spent while tripped: kept out of the baseline, so a long runaway never
    /// becomes the agent's normal.
    alarmed: bool,
}

/// The wire of one agent.
#[derive(Debug, Clone)]
pub struct VelocityWire {
    config: VelocityConfig,
    /// Newest last; only minutes inside the window.
    buckets: VecDeque<Bucket>,
    spend: u64,
    requests: u64,
    /// Active (non-zero) windows of the baseline period: `(index, tokens)`,
    /// oldest first, where `index = time_ms / window_ms`.
    history: VecDeque<(i64, u64)>,
    baseline: Option<u64>,
    open: OpenWindow,
    /// Tripped and not re-armed: trips once per episode. It re-arms when the
    /// window's spend falls to half the threshold.
    tripped: bool,
    /// The latest time seen: a clock stepping back never un-counts spend.
    last_ms: i64,
}

impl VelocityWire {
    /// A wire with no history: until the history is loaded, or grows, the
    /// floor stands in for the baseline.
    pub fn new(config: VelocityConfig) -> Self {
        Self {
            config,
            buckets: VecDeque::new(),
            spend: 0,
            requests: 0,
            history: VecDeque::new(),
            baseline: None,
            open: OpenWindow {
                index: i64::MIN,
                tokens: 0,
                alarmed: false,
            },
            tripped: false,
            last_ms: i64::MIN,
        }
    }

    pub fn config(&self) -> &VelocityConfig {
        &self.config
    }

    /// Applies new settings. When the window or the baseline period changed
    /// the history no longer fits and is dropped: load it again.
    pub fn set_config(&mut self, config: VelocityConfig) {
        if !self.config.same_history(&config) {
            *self = Self::new(config);
        } else {
            self.config = config;
        }
    }

    /// The agent's spend per window from the ledger, `(index, tokens)` with
    /// `index = started_at_ms / window_ms`. Windows outside the baseline
    /// period before `now_ms`, and the window `now_ms` is in (partly spent,
    /// and filled live from now on), are ignored. Replaces the history.
    pub fn load_history(&mut self, windows: impl IntoIterator<Item = (i64, u64)>, now_ms: i64) {
        let now = now_ms.div_euclid(self.config.window_ms());
        let oldest = now.saturating_sub(self.config.baseline_windows());
        let mut history: Vec<(i64, u64)> = windows
            .into_iter()
            .filter(|&(i, t)| t > 0 && i >= oldest && i < now)
            .collect();
        history.sort_unstable();
        history.dedup_by_key(|w| w.0);
        self.history = history.into();
        self.baseline = baseline_of(&self.history);
    }

    /// The agent's spend per minute just before `now_ms` from the ledger,
    /// `(minute, tokens, requests)` with `minute = started_at_ms / 60_000`:
    /// added to the live window (and to what the current window holds so
    /// far), so a restarted supervisor is not blind to what the agent just
    /// spent. Added, not replacing: the ledger is read off the main loop and
    /// the agent may have spent live meanwhile; the caller reads only rows
    /// started before the wire began observing.
    pub fn seed_window(&mut self, minutes: impl IntoIterator<Item = (i64, u64, u64)>, now_ms: i64) {
        self.last_ms = self.last_ms.max(now_ms);
        self.roll(self.last_ms);
        let now_minute = self.last_ms.div_euclid(BUCKET_MS);
        let window_minutes = self.config.window_ms() / BUCKET_MS;
        let mut merged: std::collections::BTreeMap<i64, (u64, u64)> = self
            .buckets
            .drain(..)
            .map(|b| (b.minute, (b.tokens, b.requests)))
            .collect();
        for (minute, tokens, requests) in minutes {
            if tokens == 0 || minute <= now_minute - window_minutes || minute > now_minute {
                continue;
            }
            let slot = merged.entry(minute).or_default();
            slot.0 = slot.0.saturating_add(tokens);
            slot.1 += requests;
            self.spend = self.spend.saturating_add(tokens);
            self.requests += requests;
            if (minute * BUCKET_MS).div_euclid(self.config.window_ms()) == self.open.index {
                self.open.tokens = self.open.tokens.saturating_add(tokens);
            }
        }
        self.buckets = merged
            .into_iter()
            .map(|(minute, (tokens, requests))| Bucket {
                minute,
                tokens,
                requests,
            })
            .collect();
    }

    /// Forgets the live window and re-arms: after a release from
    /// quarantine the agent starts afresh (its history stays).
    pub fn reset_window(&mut self) {
        self.buckets.clear();
        self.spend = 0;
        self.requests = 0;
        self.tripped = false;
        self.open.alarmed = false;
    }

    /// The baseline in use: p95 of active windows, `None` below
    /// [`MIN_BASELINE_WINDOWS`].
    pub fn baseline(&self) -> Option<u64> {
        self.baseline
    }

    /// Spend within the window as of the last observation.
    pub fn spend(&self) -> u64 {
        self.spend
    }

    /// One settled request of `tokens` at `now_ms`; a trip the first time
    /// the window's spend exceeds a limit (once per episode).
    pub fn observe(&mut self, now_ms: i64, tokens: u64) -> Option<VelocityEvidence> {
        let now_ms = now_ms.max(self.last_ms);
        self.last_ms = now_ms;
        self.roll(now_ms);
        let threshold = self.threshold();
        if self.tripped && threshold.is_none_or(|(t, _)| self.spend <= t / 2) {
            self.tripped = false;
        }
        let minute = now_ms.div_euclid(BUCKET_MS);
        match self.buckets.back_mut() {
            Some(b) if b.minute == minute => {
                b.tokens = b.tokens.saturating_add(tokens);
                b.requests += 1;
            }
            _ => self.buckets.push_back(Bucket {
                minute,
                tokens,
                requests: 1,
            }),
        }
        self.spend = self.spend.saturating_add(tokens);
        self.requests += 1;
        self.open.tokens = self.open.tokens.saturating_add(tokens);
        if self.tripped {
            self.open.alarmed = true;
            return None;
        }
        let (limit, exceeded) = threshold?;
        if self.spend <= limit {
            return None;
        }
        self.tripped = true;
        self.open.alarmed = true;
        Some(VelocityEvidence {
            wire: "spend_velocity",
            unit: "weighted_tokens",
            window_secs: self.config.window.as_secs(),
            spend_tokens: self.spend,
            requests: self.requests,
            baseline_tokens: self.baseline,
            baseline_windows: self.history.len() as u64,
            baseline_secs: self.config.baseline.as_secs(),
            threshold_tokens: limit,
            exceeded,
        })
    }

    /// The lowest limit in force and which rule it is.
    fn threshold(&self) -> Option<(u64, Exceeded)> {
        let c = &self.config;
        // A new agent has no "usual" yet: one floor for a whole fleet going
        // live would trip its every busy agent, so only a far higher one.
        let relative = c.multiple.and_then(|multiple| match self.baseline {
            Some(base) => Some((
                base.saturating_mul(u64::from(multiple)).max(c.floor_tokens),
                Exceeded::Multiple {
                    multiple,
                    floor_tokens: c.floor_tokens,
                },
            )),
            None => c.no_baseline_tokens.map(|limit| {
                (
                    limit,
                    Exceeded::NoBaseline {
                        no_baseline_tokens: limit,
                    },
                )
            }),
        });
        let absolute = c.max_tokens_per_window.map(|max| {
            (
                max,
                Exceeded::Limit {
                    max_tokens_per_window: max,
                },
            )
        });
        match (relative, absolute) {
            (Some(r), Some(a)) => Some(if a.0 <= r.0 { a } else { r }),
            (r, a) => r.or(a),
        }
    }

    /// Moves the live window and the baseline period up to `now_ms`.
    fn roll(&mut self, now_ms: i64) {
        let minute = now_ms.div_euclid(BUCKET_MS);
        let window_minutes = self.config.window_ms() / BUCKET_MS;
        while let Some(b) = self.buckets.front()
            && b.minute <= minute - window_minutes
        {
            self.spend = self.spend.saturating_sub(b.tokens);
            self.requests = self.requests.saturating_sub(b.requests);
            self.buckets.pop_front();
        }
        let index = now_ms.div_euclid(self.config.window_ms());
        if index <= self.open.index {
            return;
        }
        let closed = self.open;
        self.open = OpenWindow {
            index,
            tokens: 0,
            alarmed: false,
        };
        let mut changed = false;
        if closed.index != i64::MIN && closed.tokens > 0 && !closed.alarmed {
            self.history.push_back((closed.index, closed.tokens));
            changed = true;
        }
        let oldest = index.saturating_sub(self.config.baseline_windows());
        while self.history.front().is_some_and(|w| w.0 < oldest) {
            self.history.pop_front();
            changed = true;
        }
        if changed {
            self.baseline = baseline_of(&self.history);
        }
    }
}

/// p95 (nearest rank) of the active windows' spend; `None` with too few.
fn baseline_of(history: &VecDeque<(i64, u64)>) -> Option<u64> {
    if history.len() < MIN_BASELINE_WINDOWS {
        return None;
    }
    let mut spends: Vec<u64> = history.iter().map(|w| w.1).collect();
    let rank = (spends.len() * BASELINE_PERCENTILE).div_ceil(100).max(1) - 1;
    let (_, p, _) = spends.select_nth_unstable(rank);
    Some(*p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    /// A Monday, on a window boundary.
    const T0: i64 = 1_795_000_200_000;

    fn config() -> VelocityConfig {
        VelocityConfig::default()
    }

    /// A wire whose history is `n` windows of `tokens` each, ending before `T0`.
    fn with_history(config: VelocityConfig, n: i64, tokens: u64) -> VelocityWire {
        let mut w = VelocityWire::new(config);
        let now = T0 / config.window_ms();
        w.load_history((1..=n).map(|k| (now - k * 3, tokens)), T0);
        w
    }

    #[test]
    fn the_baseline_is_the_p95_of_active_windows_and_needs_six() {
        let mut w = VelocityWire::new(config());
        let now = T0 / config().window_ms();
        w.load_history((1..=5).map(|k| (now - k, 10_000)), T0);
        assert_eq!(w.baseline(), None, "five windows are too few");
        // 100 windows: 1..=100 thousand tokens; p95 is the 95th.
        w.load_history((1..=100).map(|k| (now - k, k as u64 * 1_000)), T0);
        assert_eq!(w.baseline(), Some(95_000));
        // Outside the 7-day period, zero, and the current window do not count.
        let week = config().baseline_windows();
        w.load_history(
            (1..=6)
                .map(|k| (now - week - k, 1_000_000))
                .chain([(now, 1_000_000), (now - 1, 0)])
                .chain((1..=6).map(|k| (now - 1 - k, 7_000))),
            T0,
        );
        assert_eq!(w.baseline(), Some(7_000));
    }

    /// `(history windows of tokens, spends as (minute offset, tokens), config) → trips at`.
    #[test]
    fn table_of_trips() {
        struct Case {
            name: &'static str,
            history: (i64, u64),
            config: VelocityConfig,
            spends: Vec<(i64, u64)>,
            /// Index into `spends` of the (one) trip, if any.
            trips_at: Option<usize>,
        }
        let c = config();
        let burst = |n: usize, tokens: u64| (0..n).map(|i| (i as i64 / 4, tokens)).collect();
        let cases = vec![
            Case {
                name: "a quiet agent's normal burst under the floor",
                history: (200, 20_000),
                config: c,
                spends: burst(40, 20_000), // 800k in 10 minutes: 40x its baseline
                trips_at: None,
            },
            Case {
                name: "a busy agent at its usual pace",
                history: (500, 1_500_000),
                config: c,
                spends: burst(40, 150_000), // 6M in 10 minutes, 4x
                trips_at: None,
            },
            Case {
                name: "above the floor and 5x a busy baseline",
                history: (500, 600_000),
                config: c,
                spends: burst(40, 100_000), // trips past 3M
                trips_at: Some(30),
            },
            Case {
                name: "too little history: a loop 80x its five windows trips by the baseline's rule only once it has one",
                history: (5, 100_000),
                config: c,
                spends: burst(40, 200_000), // 8M: under `no_baseline_tokens`
                trips_at: None,
            },
            Case {
                name: "no history: only `no_baseline_tokens`",
                history: (0, 0),
                config: c,
                spends: burst(40, 300_000), // tripped past 10M
                trips_at: Some(33),
            },
            Case {
                name: "no history, `no_baseline_tokens: off`: only a hard limit would trip",
                history: (0, 0),
                config: VelocityConfig {
                    no_baseline_tokens: None,
                    ..c
                },
                spends: burst(40, 1_000_000),
                trips_at: None,
            },
            Case {
                name: "a new coding agent re-reading a 150k cached context every 10s for an hour",
                history: (0, 0),
                config: c,
                // 60 calls per window of 20k weighted (9.3M raw tokens per window).
                spends: (0..360)
                    .map(|i| (i / 6, weighted_tokens(2_000, 500, 2_000, 150_000)))
                    .collect(),
                trips_at: None,
            },
            Case {
                name: "the same agent, once it has a baseline, looping at 8x its pace",
                history: (500, 1_200_000),
                config: c,
                spends: (0..480)
                    .map(|i| (i / 48, weighted_tokens(2_000, 500, 2_000, 150_000)))
                    .collect(),
                // 48 calls a minute of 20k: past 6M at the 301st.
                trips_at: Some(300),
            },
            Case {
                name: "spread over more than the window never adds up",
                history: (200, 300_000),
                config: c,
                spends: (0..60).map(|i| (i * 2, 300_000)).collect(), // 1.5M per 10 minutes
                trips_at: None,
            },
            Case {
                name: "max_tokens_per_window trips even a steady agent",
                history: (500, 300_000),
                config: VelocityConfig {
                    max_tokens_per_window: Some(250_000),
                    ..c
                },
                spends: burst(12, 25_000),
                trips_at: Some(10),
            },
            Case {
                name: "multiple off: only the hard limit",
                history: (0, 0),
                config: VelocityConfig {
                    multiple: None,
                    ..c
                },
                spends: burst(40, 1_000_000),
                trips_at: None,
            },
        ];
        for case in cases {
            let mut w = with_history(case.config, case.history.0, case.history.1);
            let trips: Vec<usize> = case
                .spends
                .iter()
                .enumerate()
                .filter_map(|(i, &(minute, tokens))| {
                    w.observe(T0 + minute * MIN + 1_000, tokens).map(|_| i)
                })
                .collect();
            assert_eq!(
                trips,
                case.trips_at.into_iter().collect::<Vec<_>>(),
                "{}",
                case.name
            );
        }
    }

    /// `(input, output, cache_write, cache_read) → weighted tokens`.
    #[test]
    fn cache_tokens_weigh_by_their_price() {
        for (usage, want) in [
            ((0, 0, 0, 0), 0),
            ((1_000, 200, 0, 0), 1_200),
            ((0, 0, 0, 150_000), 15_000),
            ((0, 0, 1_000, 0), 1_250),
            ((2_000, 500, 2_000, 150_000), 20_000),
            // Rounded up once over the cache terms: 0.1 + 1.25 → 2.
            ((0, 0, 1, 1), 2),
            ((0, 0, 0, 1), 1),
            ((u64::MAX, 1, 0, 0), u64::MAX),
            ((0, 0, u64::MAX, u64::MAX), u64::MAX),
        ] {
            let (i, o, w, r) = usage;
            assert_eq!(weighted_tokens(i, o, w, r), want, "{usage:?}");
        }
    }

    #[test]
    fn evidence_names_window_spend_baseline_and_rule() {
        let mut w = with_history(config(), 100, 500_000);
        let mut trip = None;
        for i in 0..30 {
            trip = trip.or(w.observe(T0 + i * 10_000, 200_000));
        }
        let e = trip.expect("trips past 2.5M");
        assert_eq!(e.spend_tokens, 2_600_000);
        assert_eq!(e.requests, 13);
        assert_eq!(e.baseline_tokens, Some(500_000));
        assert_eq!(e.threshold_tokens, 2_500_000);
        assert_eq!(
            e.to_string(),
            "2,600,000 weighted tokens in the last 10m (13 requests), over 5 × its baseline of 500,000 per 10m (p95 of 100 active windows in the last 7d); limit 2,500,000, floor 1,000,000"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["wire"], "spend_velocity");
        assert_eq!(json["unit"], "weighted_tokens");
        assert_eq!(json["exceeded"]["rule"], "multiple");
        assert_eq!(json["window_secs"], 600);

        let mut w = VelocityWire::new(VelocityConfig {
            max_tokens_per_window: Some(1_000),
            ..config()
        });
        let e = w.observe(T0, 1_500).expect("over the limit");
        assert_eq!(
            e.to_string(),
            "1,500 weighted tokens in the last 10m (1 requests), over `max_tokens_per_window` 1,000"
        );
        let mut w = with_history(config(), 3, 500_000);
        let e = w.observe(T0, 10_000_001).expect("over no_baseline_tokens");
        assert_eq!(
            e.to_string(),
            "10,000,001 weighted tokens in the last 10m (1 requests), over `no_baseline_tokens` 10,000,000 (3 active windows in the last 7d are too few for a baseline)"
        );
        assert_eq!(
            serde_json::to_value(&e).unwrap()["exceeded"],
            serde_json::json!({"rule": "no_baseline", "no_baseline_tokens": 10_000_000})
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(short_duration(5_400), "1h30m");
        assert_eq!(short_duration(604_800), "7d");
    }

    #[test]
    fn trips_once_per_episode_and_rearms_after_calming_down() {
        let mut w = VelocityWire::new(VelocityConfig {
            max_tokens_per_window: Some(100_000),
            ..config()
        });
        let at = |m: i64| T0 + m * MIN;
        assert!(w.observe(at(0), 60_000).is_none());
        assert!(w.observe(at(1), 60_000).is_some(), "120k > 100k");
        for m in 2..10 {
            assert!(w.observe(at(m), 60_000).is_none(), "still the same episode");
        }
        // A sustained runaway stays one alert, window after window.
        for m in 10..40 {
            assert!(w.observe(at(m), 60_000).is_none(), "minute {m}");
        }
        // Quiet for a whole window: re-armed, and a new excess alerts again.
        assert!(w.observe(at(60), 10_000).is_none());
        assert!(w.observe(at(60), 95_000).is_some(), "a new episode");
    }

    #[test]
    fn tripped_windows_stay_out_of_the_baseline_and_the_history_rolls() {
        let c = VelocityConfig {
            baseline: Duration::from_secs(2 * 3_600),
            ..config()
        };
        let mut w = with_history(c, 0, 0);
        let window = |k: i64| T0 + k * c.window_ms();
        // Six active windows of 10k: a baseline.
        for k in 0..6 {
            assert!(w.observe(window(k), 10_000).is_none());
        }
        assert!(w.observe(window(6), 1).is_none());
        assert_eq!(w.baseline(), Some(10_000));
        // A runaway window: tripped, and not folded in when it closes.
        assert!(w.observe(window(7), 1_100_000).is_some());
        assert!(w.observe(window(8), 1).is_none());
        assert_eq!(w.baseline(), Some(10_000), "the tripped window is left out");
        assert_eq!(w.history.len(), 7);
        // Two hours later the old windows have left the period.
        assert!(w.observe(window(19), 1).is_none());
        assert_eq!(w.baseline(), None, "one window in the last two hours");
    }

    #[test]
    fn a_seeded_window_counts_what_was_spent_before_a_restart() {
        let c = VelocityConfig {
            max_tokens_per_window: Some(100_000),
            ..config()
        };
        let mut w = VelocityWire::new(c);
        let now = T0 + 3 * MIN + 5_000; // 3 minutes into a window
        let minute = now / MIN;
        w.seed_window(
            [
                (minute - 12, 500_000, 9), // before the window
                (minute - 5, 40_000, 2),   // the previous fixed window
                (minute - 1, 30_000, 1),
                (minute, 20_000, 1),
                (minute + 1, 1, 1), // in the future
            ],
            now,
        );
        assert_eq!(w.spend(), 90_000);
        let e = w.observe(now + 1_000, 20_000).expect("110k > 100k");
        assert_eq!((e.spend_tokens, e.requests), (110_000, 5));
        // The open window holds 70k (its part of the seed and the new
        // spend): it would enter the history as that, but it tripped.
        assert_eq!(w.open.tokens, 70_000);
    }

    /// The ledger is read off the main loop: spend observed live before its
    /// answer arrives stays, and the ledger's minutes add to it.
    #[test]
    fn a_late_seed_adds_to_what_was_observed_meanwhile() {
        let mut w = VelocityWire::new(VelocityConfig {
            max_tokens_per_window: Some(100_000),
            ..config()
        });
        let now = T0 + 3 * MIN;
        assert!(w.observe(now + 2 * MIN, 40_000).is_none());
        w.seed_window([(now / MIN - 1, 30_000, 1), (now / MIN, 20_000, 2)], now);
        assert_eq!(w.spend(), 90_000);
        assert_eq!(w.buckets.len(), 3, "kept in minute order");
        assert_eq!(w.open.tokens, 90_000);
        let e = w.observe(now + 2 * MIN + 1, 20_000).expect("110k > 100k");
        assert_eq!((e.spend_tokens, e.requests), (110_000, 5));
    }

    #[test]
    fn a_clock_stepping_back_counts_in_the_newest_minute() {
        let mut w = VelocityWire::new(VelocityConfig {
            max_tokens_per_window: Some(100_000),
            ..config()
        });
        assert!(w.observe(T0 + 5 * MIN, 60_000).is_none());
        assert!(w.observe(T0, 60_000).is_some());
        assert_eq!(w.spend(), 120_000);
    }

    #[test]
    fn reset_and_reconfigure() {
        let mut w = with_history(config(), 100, 50_000);
        assert!(w.observe(T0, 1_100_000).is_some());
        w.reset_window();
        assert_eq!(w.spend(), 0);
        assert!(
            w.observe(T0 + 1, 1_100_000).is_some(),
            "re-armed by the reset"
        );
        w.set_config(VelocityConfig {
            multiple: Some(10),
            ..config()
        });
        assert_eq!(w.baseline(), Some(50_000), "same history");
        w.set_config(VelocityConfig {
            window: Duration::from_secs(300),
            ..config()
        });
        assert_eq!(
            w.baseline(),
            None,
            "another window size needs another history"
        );
    }

    #[test]
    fn problems_name_the_field() {
        let fields =
            |c: VelocityConfig| -> Vec<&str> { c.problems().iter().map(|p| p.0).collect() };
        assert!(config().problems().is_empty());
        let c = config();
        for (bad, field) in [
            (
                VelocityConfig {
                    window: Duration::from_secs(90),
                    ..c
                },
                "window",
            ),
            (
                VelocityConfig {
                    window: Duration::from_secs(25 * 3_600),
                    ..c
                },
                "window",
            ),
            (
                VelocityConfig {
                    multiple: Some(1),
                    ..c
                },
                "multiple",
            ),
            (
                VelocityConfig {
                    max_tokens_per_window: Some(0),
                    ..c
                },
                "max_tokens_per_window",
            ),
            (
                VelocityConfig {
                    no_baseline_tokens: Some(0),
                    ..c
                },
                "no_baseline_tokens",
            ),
            (
                VelocityConfig {
                    baseline: Duration::from_secs(1_800),
                    ..c
                },
                "baseline",
            ),
            (
                VelocityConfig {
                    window: Duration::from_secs(60),
                    baseline: Duration::from_secs(90 * 86_400),
                    ..c
                },
                "baseline",
            ),
        ] {
            assert_eq!(fields(bad), vec![field], "{bad:?}");
        }
    }
}
