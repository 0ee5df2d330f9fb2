//! Prometheus metrics: the per-agent counters the proxy bumps on its request
//! path (`AgentMetrics`, lock-free atomics), fixed-bucket histograms, and the
//! pure text rendering of a snapshot (`render`, on top of the format writer in
//! `exposition`). Serving them over HTTP is `crate::admin`'s job.
//!
//! Must not do I/O or take locks on the hot path: every increment is one
//! relaxed atomic add. Counters are read without a global snapshot, so two
//! series of one scrape may disagree by the requests in flight — which
//! Prometheus tolerates; a histogram's `_count` is derived from its buckets so
//! the two always agree.

pub mod exposition;
pub mod render;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a metered request ended, as far as the agent is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    /// Answered by upstream (or the simulated provider) with exact usage.
    Ok,
    /// Upstream answered with an error, or could not be reached in time.
    UpstreamError,
    /// The answer ended before its usage arrived; charged conservatively.
    Cut,
    /// Refused by a rate bucket (429 + `retry-after`).
    Throttled,
    /// Refused at a monthly ceiling.
    RefusedCeiling,
    /// Refused because the agent is quarantined.
    RefusedQuarantine,
    /// Refused as malformed: unreadable, too large, not JSON, unpriceable.
    BadRequest,
    /// Refused because the supervisor could not record it (ledger unwritable).
    InternalError,
}

impl RequestOutcome {
    pub const ALL: [RequestOutcome; 8] = [
        Self::Ok,
        Self::UpstreamError,
        Self::Cut,
        Self::Throttled,
        Self::RefusedCeiling,
        Self::RefusedQuarantine,
        Self::BadRequest,
        Self::InternalError,
    ];

    /// The `outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::UpstreamError => "upstream_error",
            Self::Cut => "cut",
            Self::Throttled => "throttled",
            Self::RefusedCeiling => "refused_ceiling",
            Self::RefusedQuarantine => "refused_quarantine",
            Self::BadRequest => "bad_request",
            Self::InternalError => "internal_error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which tokens, as the provider bills them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Input,
    Output,
    CacheCreation,
    CacheRead,
}

impl TokenKind {
    pub const ALL: [TokenKind; 4] = [
        Self::Input,
        Self::Output,
        Self::CacheCreation,
        Self::CacheRead,
    ];

    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
            Self::CacheCreation => "cache_creation",
            Self::CacheRead => "cache_read",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds (seconds) for the time the proxy itself adds before a request
/// leaves for upstream: admission is meant to take well under a millisecond,
/// reading a large body or a slow ledger shows up in the upper buckets.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upper bounds (seconds) for a whole metered request, upstream included:
/// model calls take from a fraction of a second to many minutes.
pub const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// A histogram with fixed upper bounds; each observation is two atomic adds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

/// A histogram read at one moment: plain data for rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Finite upper bounds, ascending.
    pub bounds: &'static [f64],
    /// Per bucket, not cumulative; `bounds.len() + 1` entries, the last `+Inf`.
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// Observations counted, by definition the `+Inf` bucket.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        // `le` buckets: the first bound not below the value.
        let bucket = self.bounds.partition_point(|bound| *bound < seconds);
        if let Some(count) = self.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// One agent's counters, owned by its proxy meter and bumped by the request
/// path. They count since this supervisor started (or the agent was added):
/// Prometheus reads a restart as a counter reset.
#[derive(Debug)]
pub struct AgentMetrics {
    tokens: [AtomicU64; 4],
    cost_micro_usd: AtomicU64,
    requests: [AtomicU64; 8],
    quarantines: AtomicU64,
    velocity_trips: AtomicU64,
    overhead: Histogram,
    duration: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            tokens: Default::default(),
            cost_micro_usd: AtomicU64::new(0),
            requests: Default::default(),
            quarantines: AtomicU64::new(0),
            velocity_trips: AtomicU64::new(0),
            overhead: Histogram::new(OVERHEAD_BUCKETS),
            duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

/// `AgentMetrics` read at one moment: plain data for rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentCounters {
    /// Indexed like [`TokenKind::ALL`].
    pub tokens: [u64; 4],
    pub cost_micro_usd: u64,
    /// Indexed like [`RequestOutcome::ALL`].
    pub requests: [u64; 8],
    pub quarantines: u64,
    /// Spend-velocity trips, alerts and quarantines alike.
    pub velocity_trips: u64,
    pub overhead: HistogramSnapshot,
    pub duration: HistogramSnapshot,
}

impl AgentCounters {
    pub fn tokens(&self, kind: TokenKind) -> u64 {
        self.tokens[kind.index()]
    }

    pub fn requests(&self, outcome: RequestOutcome) -> u64 {
        self.requests[outcome.index()]
    }
}

impl Default for AgentCounters {
    fn default() -> Self {
        AgentMetrics::default().snapshot()
    }
}

impl AgentMetrics {
    pub fn count_request(&self, outcome: RequestOutcome) {
        self.requests[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_tokens(&self, kind: TokenKind, tokens: u64) {
        self.tokens[kind.index()].fetch_add(tokens, Ordering::Relaxed);
    }

    /// What a settled request was charged against the agent's ceiling.
    pub fn add_cost(&self, micro_usd: u64) {
        self.cost_micro_usd.fetch_add(micro_usd, Ordering::Relaxed);
    }

    /// The runaway detector quarantined the agent.
    pub fn count_quarantine(&self) {
        self.quarantines.fetch_add(1, Ordering::Relaxed);
    }

    /// The spend-velocity wire tripped (once per episode), whatever its action.
    pub fn count_velocity_trip(&self) {
        self.velocity_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// Time from the request's arrival until it was handed to the provider.
    pub fn observe_overhead(&self, elapsed: Duration) {
        self.overhead.observe(elapsed);
    }

    /// Time from the request's arrival until its answer was settled.
    pub fn observe_duration(&self, elapsed: Duration) {
        self.duration.observe(elapsed);
    }

    pub fn snapshot(&self) -> AgentCounters {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AgentCounters {
            tokens: self.tokens.each_ref().map(load),
            cost_micro_usd: load(&self.cost_micro_usd),
            requests: self.requests.each_ref().map(load),
            quarantines: load(&self.quarantines),
            velocity_trips: load(&self.velocity_trips),
            overhead: self.overhead.snapshot(),
            duration: self.duration.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_index_order() {
        for (i, outcome) in RequestOutcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
        for (i, kind) in TokenKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
        let labels: Vec<_> = RequestOutcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(
            labels,
            [
                "ok",
                "upstream_error",
                "cut",
                "throttled",
                "refused_ceiling",
                "refused_quarantine",
                "bad_request",
                "internal_error"
            ]
        );
    }

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        const BOUNDS: &[f64] = &[0.001, 0.01, 0.1];
        let cases: &[(Duration, usize)] = &[
            (Duration::ZERO, 0),
            (Duration::from_micros(999), 0),
            (Duration::from_millis(1), 0),
            (Duration::from_micros(1001), 1),
            (Duration::from_millis(10), 1),
            (Duration::from_millis(11), 2),
            (Duration::from_millis(100), 2),
            (Duration::from_millis(101), 3),
            (Duration::from_secs(3600), 3),
        ];
        for (value, bucket) in cases {
            let h = Histogram::new(BOUNDS);
            h.observe(*value);
            let snap = h.snapshot();
            let mut want = vec![0; 4];
            want[*bucket] = 1;
            assert_eq!(snap.counts, want, "{value:?}");
            assert_eq!(snap.count(), 1);
        }
    }

    #[test]
    fn histogram_sums_in_seconds() {
        let h = Histogram::new(OVERHEAD_BUCKETS);
        h.observe(Duration::from_millis(250));
        h.observe(Duration::from_micros(1500));
        let snap = h.snapshot();
        assert!(
            (snap.sum_seconds - 0.2515).abs() < 1e-9,
            "{}",
            snap.sum_seconds
        );
        assert_eq!(snap.count(), 2);
        assert_eq!(snap.counts.len(), OVERHEAD_BUCKETS.len() + 1);
    }

    #[test]
    fn agent_counters_accumulate() {
        let m = AgentMetrics::default();
        m.count_request(RequestOutcome::Ok);
        m.count_request(RequestOutcome::Ok);
        m.count_request(RequestOutcome::Throttled);
        m.add_tokens(TokenKind::Input, 10);
        m.add_tokens(TokenKind::Input, 5);
        m.add_tokens(TokenKind::CacheRead, 7);
        m.add_cost(1_500);
        m.count_quarantine();
        m.count_velocity_trip();
        let s = m.snapshot();
        assert_eq!(s.requests(RequestOutcome::Ok), 2);
        assert_eq!(s.requests(RequestOutcome::Throttled), 1);
        assert_eq!(s.requests(RequestOutcome::Cut), 0);
        assert_eq!(s.tokens(TokenKind::Input), 15);
        assert_eq!(s.tokens(TokenKind::Output), 0);
        assert_eq!(s.tokens(TokenKind::CacheRead), 7);
        assert_eq!(s.cost_micro_usd, 1_500);
        assert_eq!(s.quarantines, 1);
        assert_eq!(s.velocity_trips, 1);
    }

    #[test]
    fn counters_are_exact_under_contention() {
        let m = std::sync::Arc::new(AgentMetrics::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.count_request(RequestOutcome::Ok);
                        m.observe_duration(Duration::from_millis(3));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = m.snapshot();
        assert_eq!(s.requests(RequestOutcome::Ok), 40_000);
        assert_eq!(s.duration.count(), 40_000);
    }
}
