//! Per-agent rate buckets: `requests_per_minute` and `tokens_per_minute`.
//! Pure plain data: the caller passes `now` (so tests drive time by hand) and
//! owns the synchronisation (see `budget::AgentBudget`).
//!
//! Each limit is a token bucket (the same algorithm as GCRA, written as a fill
//! level): it holds at most one minute's amount (burst = the per-minute rate) and
//! refills continuously at the per-minute rate. Levels are exact integers in
//! units of 1/60,000,000,000 of a token, so one nanosecond of refill adds exactly
//! `per_minute` of them and no rounding ever drifts.
//!
//! We do not use the `governor` crate here, although the design names it: a
//! governor limiter cannot (1) test a cell without consuming it, so one admission
//! cannot check the token and the request buckets together and take from neither
//! when one refuses; (2) give cells back, which the token true-up needs when a
//! request used less than was taken at admission; (3) go into debt: `check_n`
//! beyond the burst is `InsufficientCapacity`, yet actual usage can exceed a
//! minute's budget; (4) take `now` as an argument (its clock is inside the
//! limiter). All four are one line each on a level we own.
//!
//! Tokens are unknown at admission. Admission takes the caller's estimate (the
//! request's worst case), capped at the bucket size so that any request is
//! admissible once the bucket is full; the answer's actual tokens are then trued
//! up: a shortfall is taken from the bucket, below zero if need be — a debt the
//! next admission pays first by waiting — and unused tokens are given back, up to
//! the bucket size. Taking the estimate up front is what stops a burst of
//! concurrent requests from spending many minutes' budget at once: LiteLLM
//! charged tokens only after the answer and let 5 concurrent requests use 6.6x
//! a 100 tokens-per-minute limit (BerriAI/litellm issue #18730).

use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ceiling::group_thousands;

/// Fixed-point scale of a bucket level: one token (or request) in level units.
const SCALE: i128 = 60_000_000_000; // nanoseconds per minute

/// An agent's rate limits; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub tokens_per_minute: Option<NonZeroU64>,
    pub requests_per_minute: Option<NonZeroU64>,
}

/// Which rate refused an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    Tokens,
    Requests,
}

impl RateKind {
    /// The fleet.yaml field that sets this rate, for messages.
    pub fn field(self) -> &'static str {
        match self {
            RateKind::Tokens => "budget.tokens_per_minute",
            RateKind::Requests => "budget.requests_per_minute",
        }
    }
}

/// An admission refused by a rate bucket; `Display` is the proxy's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RateRefusal {
    pub agent: Arc<str>,
    pub which: RateKind,
    pub per_minute: u64,
    /// For the `retry-after` header: when the bucket can admit this request,
    /// rounded up, clamped to `1..=60` so the official SDKs wait and retry
    /// rather than give up. A debt larger than a minute's budget answers 60
    /// again on the next try.
    pub retry_after_secs: u64,
}

impl fmt::Display for RateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.which {
            RateKind::Tokens => "tokens",
            RateKind::Requests => "requests",
        };
        write!(
            f,
            "agent \"{}\" is over its rate of {} {unit} per minute (`{}`); retry in {}s",
            self.agent,
            group_thousands(self.per_minute),
            self.which.field(),
            self.retry_after_secs,
        )
    }
}

/// What an admission took, to be trued up by exactly one of
/// [`RateState::settle`] or [`RateState::cancel`]. Dropping it leaves the
/// estimate charged, which errs on the strict side.
#[derive(Debug, PartialEq, Eq)]
pub struct RateTicket {
    tokens: u64,
    request: bool,
}

impl RateTicket {
    /// Tokens taken from the token bucket at admission.
    pub fn tokens_taken(&self) -> u64 {
        self.tokens
    }
}

/// Whole tokens/requests available now; negative = debt. `None` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSnapshot {
    pub tokens_available: Option<i64>,
    pub requests_available: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bucket {
    per_minute: u64,
    /// Fill level in 1/`SCALE` units; may be negative (debt), never above `capacity()`.
    level: i128,
    /// When `level` was last brought up to date.
    at: Instant,
}

impl Bucket {
    fn full(per_minute: NonZeroU64, now: Instant) -> Self {
        let mut bucket = Self {
            per_minute: per_minute.get(),
            level: 0,
            at: now,
        };
        bucket.level = bucket.capacity();
        bucket
    }

    fn capacity(&self) -> i128 {
        scaled(self.per_minute)
    }

    fn refill(&mut self, now: Instant) {
        // `Instant` is monotonic, but callers may pass a slightly older `now`
        // taken before they waited for the lock: treat that as no time passed.
        if now <= self.at {
            return;
        }
        let elapsed = now.duration_since(self.at).as_nanos();
        let gained = elapsed.saturating_mul(u128::from(self.per_minute));
        let gained = i128::try_from(gained).unwrap_or(i128::MAX);
        self.level = self.level.saturating_add(gained).min(self.capacity());
        self.at = now;
    }

    /// How long until `amount` units can be taken without going below zero.
    fn wait_for(&self, amount: u64) -> Option<Duration> {
        let deficit = scaled(amount).saturating_sub(self.level);
        if deficit <= 0 {
            return None;
        }
        // Level units accrue at `per_minute` per nanosecond; round up.
        let per_ns = i128::from(self.per_minute);
        let nanos = (deficit + per_ns - 1) / per_ns;
        Some(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    fn take(&mut self, amount: u64) {
        self.level = self.level.saturating_sub(scaled(amount));
    }

    fn give(&mut self, amount: u64) {
        self.level = self
            .level
            .saturating_add(scaled(amount))
            .min(self.capacity());
    }

    fn available(&self) -> i64 {
        let whole = self.level.div_euclid(SCALE);
        i64::try_from(whole).unwrap_or(if whole < 0 { i64::MIN } else { i64::MAX })
    }
}

fn scaled(amount: u64) -> i128 {
    // u64::MAX * SCALE ≈ 1.1e30, far inside i128.
    i128::from(amount) * SCALE
}

fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.clamp(1, 60)
}

/// One agent's rate buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateState {
    agent: Arc<str>,
    tokens: Option<Bucket>,
    requests: Option<Bucket>,
}

impl RateState {
    /// Both buckets start full.
    pub fn new(agent: Arc<str>, limits: RateLimits, now: Instant) -> Self {
        Self {
            agent,
            tokens: limits.tokens_per_minute.map(|r| Bucket::full(r, now)),
            requests: limits.requests_per_minute.map(|r| Bucket::full(r, now)),
        }
    }

    /// Replaces the limits (fleet reload). A bucket that stays limited keeps
    /// its level, debt included, capped at the new size; a newly limited one starts full.
    pub fn set_limits(&mut self, limits: RateLimits, now: Instant) {
        fn resize(bucket: &mut Option<Bucket>, per_minute: Option<NonZeroU64>, now: Instant) {
            *bucket = match (bucket.take(), per_minute) {
                (_, None) => None,
                (None, Some(rate)) => Some(Bucket::full(rate, now)),
                (Some(mut old), Some(rate)) => {
                    old.refill(now);
                    old.per_minute = rate.get();
                    old.level = old.level.min(old.capacity());
                    Some(old)
                }
            };
        }
        resize(&mut self.tokens, limits.tokens_per_minute, now);
        resize(&mut self.requests, limits.requests_per_minute, now);
    }

    /// Admits one request whose token usage is estimated at `token_estimate`
    /// (its worst case), or refuses it without taking anything.
    ///
    /// The token bucket must first cover any debt, then the estimate capped to
    /// `1..=tokens_per_minute` (at least one token, so a fully spent bucket
    /// refuses; at most a full bucket, so every request is eventually admitted).
    /// When both buckets refuse, the one with the longer wait is reported.
    pub fn admit(&mut self, now: Instant, token_estimate: u64) -> Result<RateTicket, RateRefusal> {
        let mut refusal: Option<(Duration, RateKind, u64)> = None;
        let mut consider = |bucket: &mut Bucket, amount: u64, kind: RateKind| {
            bucket.refill(now);
            if let Some(wait) = bucket.wait_for(amount)
                && refusal.is_none_or(|(longest, _, _)| wait > longest)
            {
                refusal = Some((wait, kind, bucket.per_minute));
            }
        };
        let mut tokens = 0;
        if let Some(bucket) = self.tokens.as_mut() {
            tokens = token_estimate.clamp(1, bucket.per_minute);
            consider(bucket, tokens, RateKind::Tokens);
        }
        if let Some(bucket) = self.requests.as_mut() {
            consider(bucket, 1, RateKind::Requests);
        }
        if let Some((wait, which, per_minute)) = refusal {
            return Err(RateRefusal {
                agent: Arc::clone(&self.agent),
                which,
                per_minute,
                retry_after_secs: retry_after_secs(wait),
            });
        }
        if let Some(bucket) = self.tokens.as_mut() {
            bucket.take(tokens);
        }
        if let Some(bucket) = self.requests.as_mut() {
            bucket.take(1);
        }
        Ok(RateTicket {
            tokens,
            request: self.requests.is_some(),
        })
    }

    /// The answer is in and used `actual_tokens` (all kinds): true up the
    /// estimate taken at admission. More than taken goes into debt; less is
    /// given back, up to the bucket size.
    pub fn settle(&mut self, now: Instant, ticket: RateTicket, actual_tokens: u64) {
        if let Some(bucket) = self.tokens.as_mut() {
            bucket.refill(now);
            if actual_tokens > ticket.tokens {
                bucket.take(actual_tokens - ticket.tokens);
            } else {
                bucket.give(ticket.tokens - actual_tokens);
            }
        }
    }

    /// The admitted request was refused further down (e.g. by its monthly
    /// ceiling) and never forwarded: give back everything the admission took.
    pub fn cancel(&mut self, now: Instant, ticket: RateTicket) {
        if let Some(bucket) = self.tokens.as_mut() {
            bucket.refill(now);
            bucket.give(ticket.tokens);
        }
        if let Some(bucket) = self.requests.as_mut()
            && ticket.request
        {
            bucket.refill(now);
            bucket.give(1);
        }
    }

    pub fn snapshot(&mut self, now: Instant) -> RateSnapshot {
        let available = |bucket: &mut Option<Bucket>| {
            bucket.as_mut().map(|b| {
                b.refill(now);
                b.available()
            })
        };
        RateSnapshot {
            tokens_available: available(&mut self.tokens),
            requests_available: available(&mut self.requests),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tpm: u64, rpm: u64) -> RateLimits {
        RateLimits {
            tokens_per_minute: NonZeroU64::new(tpm),
            requests_per_minute: NonZeroU64::new(rpm),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn refused(r: Result<RateTicket, RateRefusal>) -> (RateKind, u64) {
        let refusal = r.expect_err("expected a refusal");
        (refusal.which, refusal.retry_after_secs)
    }

    #[test]
    fn requests_bucket_allows_a_burst_of_one_minute_then_refills_steadily() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(0, 2), t0);
        assert!(s.admit(t0, 0).is_ok());
        assert!(s.admit(t0, 0).is_ok());
        assert_eq!(refused(s.admit(t0, 0)), (RateKind::Requests, 30));
        assert_eq!(refused(s.admit(t0 + secs(29), 0)), (RateKind::Requests, 1));
        assert!(s.admit(t0 + secs(30), 0).is_ok());
        assert_eq!(refused(s.admit(t0 + secs(30), 0)), (RateKind::Requests, 30));
        // An idle agent refills to the burst, not beyond.
        let later = t0 + secs(3_600);
        assert!(s.admit(later, 0).is_ok());
        assert!(s.admit(later, 0).is_ok());
        assert!(s.admit(later, 0).is_err());
    }

    #[test]
    fn unlimited_admits_everything() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), RateLimits::default(), t0);
        for _ in 0..1_000 {
            let ticket = s.admit(t0, u64::MAX).expect("unlimited");
            assert_eq!(ticket.tokens_taken(), 0);
            s.settle(t0, ticket, u64::MAX);
        }
        assert_eq!(
            s.snapshot(t0),
            RateSnapshot {
                tokens_available: None,
                requests_available: None
            }
        );
    }

    #[test]
    fn admission_cost_is_the_estimate_clamped_to_one_and_the_bucket_size() {
        // (estimate, tokens taken) with 1,000 tokens per minute.
        let cases = [
            (0, 1),
            (1, 1),
            (999, 999),
            (1_000, 1_000),
            (1_001, 1_000),
            (u64::MAX, 1_000),
        ];
        for (estimate, taken) in cases {
            let t0 = Instant::now();
            let mut s = RateState::new("sparkles".into(), limits(1_000, 0), t0);
            let ticket = s.admit(t0, estimate).expect("full bucket admits");
            assert_eq!(ticket.tokens_taken(), taken, "estimate {estimate}");
            assert_eq!(s.snapshot(t0).tokens_available, Some(1_000 - taken as i64));
        }
    }

    #[test]
    fn retry_after_is_the_wait_rounded_up_and_clamped() {
        // (tokens per minute, level spent first, next estimate, want retry-after)
        let cases = [
            (60, 60, 1, 1), // one token per second
            (60, 60, 30, 30),
            (60, 59, 2, 1),            // one short
            (6_000, 6_000, 101, 2),    // 101 tokens at 100/s = 1.01s → 2
            (1_000, 1_000, 1_000, 60), // a full minute
        ];
        for (tpm, spend, estimate, want) in cases {
            let t0 = Instant::now();
            let mut s = RateState::new("sparkles".into(), limits(tpm, 0), t0);
            let _spent = s.admit(t0, spend).expect("full bucket");
            assert_eq!(
                refused(s.admit(t0, estimate)),
                (RateKind::Tokens, want),
                "{tpm} {spend} {estimate}"
            );
        }
        let wait = |d: Duration| retry_after_secs(d);
        assert_eq!(wait(Duration::ZERO), 1);
        assert_eq!(wait(Duration::from_nanos(1)), 1);
        assert_eq!(wait(secs(1)), 1);
        assert_eq!(wait(secs(1) + Duration::from_nanos(1)), 2);
        assert_eq!(wait(secs(60)), 60);
        assert_eq!(wait(secs(3_600)), 60);
    }

    #[test]
    fn a_shortfall_is_debt_that_the_next_admission_pays_first() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(1_000, 0), t0);
        let ticket = s.admit(t0, 100).expect("full");
        // The upstream used far more than the estimate.
        s.settle(t0, ticket, 3_000);
        assert_eq!(s.snapshot(t0).tokens_available, Some(-2_000));
        // 2,001 tokens at 1,000/min are needed: 120.06s. The header says 60, twice.
        assert_eq!(refused(s.admit(t0, 1)), (RateKind::Tokens, 60));
        assert_eq!(refused(s.admit(t0 + secs(60), 1)), (RateKind::Tokens, 60));
        assert_eq!(refused(s.admit(t0 + secs(120), 1)), (RateKind::Tokens, 1));
        assert!(s.admit(t0 + secs(120) + ms(60), 1).is_ok());
    }

    #[test]
    fn unused_estimate_is_given_back_but_never_beyond_the_bucket_size() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(1_000, 0), t0);
        let big = s.admit(t0, 800).expect("full");
        let small = s.admit(t0, 200).expect("exactly full");
        assert!(s.admit(t0, 1).is_err());
        s.settle(t0, big, 300);
        assert_eq!(s.snapshot(t0).tokens_available, Some(500));
        // A refund arriving after the bucket refilled is capped at its size.
        s.settle(t0 + secs(60), small, 0);
        assert_eq!(s.snapshot(t0 + secs(60)).tokens_available, Some(1_000));
    }

    #[test]
    fn an_estimate_beyond_a_minute_is_admitted_once_the_bucket_is_full() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(1_000, 0), t0);
        let first = s
            .admit(t0, 5_000)
            .expect("full bucket admits a capped estimate");
        s.settle(t0, first, 5_000);
        // 4,000 of debt plus a full bucket: 5 minutes, asked for 60s at a time.
        let mut now = t0;
        let mut refusals = 0;
        loop {
            match s.admit(now, 5_000) {
                Ok(_) => break,
                Err(refusal) => {
                    refusals += 1;
                    assert!(refusals < 10, "never admitted");
                    now += secs(refusal.retry_after_secs);
                }
            }
        }
        assert_eq!(now - t0, secs(300));
        assert_eq!(refusals, 5);
    }

    #[test]
    fn a_refusal_takes_nothing_from_either_bucket() {
        let t0 = Instant::now();
        // Tokens refuse, requests would admit.
        let mut s = RateState::new("sparkles".into(), limits(100, 10), t0);
        let _spent = s.admit(t0, 100).expect("full");
        let before = s.snapshot(t0);
        assert_eq!(refused(s.admit(t0, 1)), (RateKind::Tokens, 1));
        assert_eq!(s.snapshot(t0), before);
        assert_eq!(before.requests_available, Some(9));

        // Requests refuse, tokens would admit.
        let mut s = RateState::new("sparkles".into(), limits(100, 1), t0);
        let _spent = s.admit(t0, 1).expect("full");
        let before = s.snapshot(t0);
        assert_eq!(refused(s.admit(t0, 1)), (RateKind::Requests, 60));
        assert_eq!(s.snapshot(t0), before);
        assert_eq!(before.tokens_available, Some(99));
    }

    #[test]
    fn when_both_refuse_the_longer_wait_is_reported() {
        let t0 = Instant::now();
        // Requests: 1/min, next in 60s. Tokens: 60/min, 10 missing → 10s.
        let mut s = RateState::new("sparkles".into(), limits(60, 1), t0);
        let _spent = s.admit(t0, 60).expect("full");
        assert_eq!(refused(s.admit(t0, 10)), (RateKind::Requests, 60));
        // Requests: 60/min, next in 1s. Tokens: 60/min, 30 missing → 30s.
        let mut s = RateState::new("sparkles".into(), limits(60, 60), t0);
        for _ in 0..60 {
            let _spent = s.admit(t0, 1).expect("within both bursts");
        }
        assert_eq!(refused(s.admit(t0, 30)), (RateKind::Tokens, 30));
    }

    #[test]
    fn cancel_gives_back_the_request_and_the_tokens() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(100, 1), t0);
        let ticket = s.admit(t0, 100).expect("full");
        assert!(s.admit(t0, 1).is_err());
        s.cancel(t0, ticket);
        assert_eq!(
            s.snapshot(t0),
            RateSnapshot {
                tokens_available: Some(100),
                requests_available: Some(1)
            }
        );
    }

    #[test]
    fn a_concurrent_burst_cannot_spend_more_than_the_bucket() {
        // The LiteLLM case: 5 requests at once against 100 tokens per minute,
        // each of which will use 100. Only the first is admitted.
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(100, 0), t0);
        let admitted: Vec<RateTicket> = (0..5).filter_map(|_| s.admit(t0, 100).ok()).collect();
        assert_eq!(admitted.len(), 1);
        for ticket in admitted {
            s.settle(t0 + ms(500), ticket, 100);
        }
    }

    #[test]
    fn usage_in_any_minute_stays_within_two_buckets_when_estimates_are_honest() {
        // A deterministic pseudo-random stream of requests settled right away
        // (actual <= estimate <= bucket): in any 60s window the tokens admitted
        // can be at most the burst plus one minute of refill.
        let tpm: u64 = 10_000;
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(tpm, 0), t0);
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |bound: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % bound
        };
        let mut now = t0;
        let mut used: Vec<(Duration, u64)> = Vec::new();
        for _ in 0..20_000 {
            now += ms(next(2_000));
            let estimate = 1 + next(3 * tpm); // sometimes beyond the bucket
            let actual = next(estimate.min(tpm) + 1);
            if let Ok(ticket) = s.admit(now, estimate) {
                s.settle(now, ticket, actual);
                used.push((now - t0, actual));
            }
        }
        assert!(
            used.len() > 1_000,
            "the stream should mostly be admitted: {}",
            used.len()
        );
        let mut start = 0;
        let mut sum = 0;
        for end in 0..used.len() {
            sum += used[end].1;
            while used[end].0 - used[start].0 >= secs(60) {
                sum -= used[start].1;
                start += 1;
            }
            assert!(
                sum <= 2 * tpm,
                "window ending at {:?} used {sum}",
                used[end].0
            );
        }
    }

    #[test]
    fn new_limits_keep_the_level_and_the_debt() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(1_000, 0), t0);
        let ticket = s.admit(t0, 400).expect("full");
        s.set_limits(limits(500, 0), t0);
        assert_eq!(
            s.snapshot(t0).tokens_available,
            Some(500),
            "capped at the new size"
        );
        s.settle(t0, ticket, 1_400);
        assert_eq!(s.snapshot(t0).tokens_available, Some(-500));
        s.set_limits(limits(2_000, 5), t0);
        assert_eq!(
            s.snapshot(t0),
            RateSnapshot {
                tokens_available: Some(-500),
                requests_available: Some(5)
            }
        );
        s.set_limits(RateLimits::default(), t0);
        assert!(s.admit(t0, 1).is_ok());
    }

    #[test]
    fn a_stale_now_counts_as_no_time_passed() {
        let t0 = Instant::now();
        let mut s = RateState::new("sparkles".into(), limits(60, 0), t0 + secs(10));
        let _spent = s.admit(t0 + secs(10), 60).expect("full");
        assert_eq!(refused(s.admit(t0, 1)), (RateKind::Tokens, 1));
        assert!(s.admit(t0 + secs(11), 1).is_ok());
    }

    #[test]
    fn refusal_message() {
        let refusal = RateRefusal {
            agent: "sparkles".into(),
            which: RateKind::Tokens,
            per_minute: 60_000,
            retry_after_secs: 12,
        };
        assert_eq!(
            refusal.to_string(),
            "agent \"sparkles\" is over its rate of 60,000 tokens per minute \
             (`budget.tokens_per_minute`); retry in 12s"
        );
    }
}
