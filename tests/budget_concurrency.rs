//! Budget under real thread concurrency: 32 threads racing reservations against
//! a small monthly ceiling never overshoot it, account every settlement exactly,
//! and still use most of it; rate buckets hold a concurrent burst to one bucket.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use agent_supervisor::budget::{
    AgentBudget, Amount, BudgetLimits, Ceilings, Month, RateLimits, Reservation,
};

const THREADS: usize = 32;
const MIN_WORST: u64 = 100;
const MAX_WORST: u64 = 2_000;
/// Safety net so a broken stopping rule fails the test instead of hanging it.
const MAX_ATTEMPTS_PER_THREAD: u64 = 2_000_000;

fn month() -> Month {
    Month::new(2026, 11).expect("valid month")
}

/// xorshift64: deterministic per thread, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Checks the invariant the proxy relies on, at one instant.
fn assert_within(usage: &agent_supervisor::budget::CeilingSnapshot, ceilings: Ceilings) {
    let held = usage.committed.saturating_add(usage.reserved);
    if let Some(max) = ceilings.monthly_tokens {
        assert!(held.tokens <= max, "tokens over the ceiling: {usage:?}");
    }
    if let Some(max) = ceilings.monthly_micro_usd {
        assert!(held.micro_usd <= max, "usd over the ceiling: {usage:?}");
    }
}

/// Races `THREADS` threads reserving worst cases priced at `micro_usd_per_token`
/// until the binding ceiling is full. Every reservation ends one of four ways:
/// settled at a random actual usage <= worst case, settled as a cut stream,
/// released, or dropped. Asserts the ceilings hold at every sample and at the
/// end, that the counters equal the sum of what each thread was charged, and that
/// the ceiling ends up nearly full.
fn race(ceilings: Ceilings, micro_usd_per_token: u64) {
    let limits = BudgetLimits {
        ceilings,
        rates: RateLimits::default(),
    };
    let budget = Arc::new(AgentBudget::new(
        "sparkles",
        limits,
        month(),
        Instant::now(),
    ));
    // "Full" = the binding ceiling has less room left than the largest worst case.
    let full = move |committed: Amount| {
        ceilings
            .monthly_tokens
            .is_some_and(|max| committed.tokens + MAX_WORST > max)
            || ceilings
                .monthly_micro_usd
                .is_some_and(|max| committed.micro_usd + MAX_WORST * micro_usd_per_token > max)
    };

    let done = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (budget, done, samples) =
            (Arc::clone(&budget), Arc::clone(&done), Arc::clone(&samples));
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                assert_within(&budget.usage(month()), ceilings);
                samples.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (budget, start) = (Arc::clone(&budget), Arc::clone(&start));
            thread::spawn(move || {
                let mut rng =
                    Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
                let mut charged = Amount::ZERO;
                let mut granted = 0u64;
                // Each thread holds up to 4 reservations at once, as a proxy with
                // slow upstream answers would, so many are in flight together.
                let mut outstanding = VecDeque::new();
                let mut finish_one = |outstanding: &mut VecDeque<Reservation>, rng: &mut Rng| {
                    let Some(reservation) = outstanding.pop_front() else {
                        return;
                    };
                    let worst = reservation.amount();
                    let actual_tokens = rng.below(worst.tokens + 1);
                    let actual = Amount::new(actual_tokens, actual_tokens * micro_usd_per_token);
                    match rng.below(10) {
                        0..=6 => {
                            let s = reservation.settle(actual);
                            assert!(!s.overrun);
                            charged = charged.saturating_add(actual);
                        }
                        7 => {
                            let s = reservation.settle_cut(actual);
                            assert_eq!(s.charged, worst, "a cut is charged its reservation");
                            charged = charged.saturating_add(worst);
                        }
                        8 => reservation.release(),
                        _ => {
                            drop(reservation);
                            charged = charged.saturating_add(worst);
                        }
                    }
                };
                start.wait();
                let mut finished = false;
                for _ in 0..MAX_ATTEMPTS_PER_THREAD {
                    let worst_tokens = MIN_WORST + rng.below(MAX_WORST - MIN_WORST + 1);
                    let worst = Amount::new(worst_tokens, worst_tokens * micro_usd_per_token);
                    match budget.reserve(month(), worst) {
                        Ok(reservation) => {
                            granted += 1;
                            outstanding.push_back(reservation);
                            if outstanding.len() as u64 > rng.below(4) {
                                thread::yield_now();
                                finish_one(&mut outstanding, &mut rng);
                            }
                        }
                        Err(_) => {
                            let usage = budget.usage(month());
                            assert_within(&usage, ceilings);
                            if full(usage.committed) {
                                finished = true;
                                break;
                            }
                            // Refused by what is in flight: let some of it finish.
                            finish_one(&mut outstanding, &mut rng);
                        }
                    }
                    assert_within(&budget.usage(month()), ceilings);
                }
                while !outstanding.is_empty() {
                    finish_one(&mut outstanding, &mut rng);
                }
                (charged, granted, finished)
            })
        })
        .collect();

    // Join everything before asserting, so a failed worker cannot leave the sampler spinning.
    let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler panicked");
    let mut total = Amount::ZERO;
    let mut granted = 0;
    for result in results {
        let (charged, g, finished) = result.expect("worker panicked");
        assert!(
            finished,
            "a worker hit the attempt cap without seeing the ceiling full"
        );
        total = total.saturating_add(charged);
        granted += g;
    }

    let usage = budget.usage(month());
    assert_within(&usage, ceilings);
    assert_eq!(
        usage.reserved,
        Amount::ZERO,
        "every reservation was consumed"
    );
    assert_eq!(usage.in_flight, 0);
    assert_eq!(
        usage.committed, total,
        "no settlement lost or double-counted"
    );
    assert!(
        full(usage.committed),
        "most of the ceiling is used: {usage:?}"
    );
    assert!(
        granted > 1_000,
        "the race should be long enough to mean something: {granted}"
    );
    assert!(samples.load(Ordering::Relaxed) > 0);
}

#[test]
fn racing_reservations_never_overshoot_a_tokens_ceiling() {
    race(
        Ceilings {
            monthly_tokens: Some(1_000_000),
            monthly_micro_usd: None,
        },
        3,
    );
}

#[test]
fn racing_reservations_never_overshoot_a_usd_ceiling() {
    // $3 at 3 micro-USD per token binds at 1M tokens, well before the tokens ceiling.
    race(
        Ceilings {
            monthly_tokens: Some(50_000_000),
            monthly_micro_usd: Some(3_000_000),
        },
        3,
    );
}

#[test]
fn racing_reservations_never_overshoot_either_of_two_close_ceilings() {
    // Tokens bind at 800k, usd at 900k tokens' worth: both are checked under contention.
    race(
        Ceilings {
            monthly_tokens: Some(800_000),
            monthly_micro_usd: Some(2_700_000),
        },
        3,
    );
}

#[test]
fn a_concurrent_burst_takes_at_most_one_bucket_of_tokens() {
    // All threads admit at the same instant, so nothing refills: the tokens taken
    // at admission can never sum past one bucket, however the threads interleave.
    const TPM: u64 = 100_000;
    let now = Instant::now();
    let limits = BudgetLimits {
        ceilings: Ceilings::default(),
        rates: RateLimits {
            tokens_per_minute: NonZeroU64::new(TPM),
            requests_per_minute: None,
        },
    };
    let budget = Arc::new(AgentBudget::new("sparkles", limits, month(), now));
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (budget, start) = (Arc::clone(&budget), Arc::clone(&start));
            thread::spawn(move || {
                let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (i as u64 + 1));
                let mut tickets = Vec::new();
                start.wait();
                for _ in 0..200 {
                    let estimate = 1 + rng.below(5_000);
                    if let Ok(ticket) = budget.admit_rate(now, estimate) {
                        tickets.push((ticket, estimate));
                    }
                }
                tickets
            })
        })
        .collect();
    let tickets: Vec<_> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker panicked"))
        .collect();
    let taken: u64 = tickets.iter().map(|(t, _)| t.tokens_taken()).sum();
    assert!(
        taken <= TPM,
        "admitted {taken} tokens against a bucket of {TPM}"
    );
    assert!(
        taken > TPM - 5_000,
        "the bucket should be nearly spent: {taken}"
    );
    assert_eq!(
        budget.rate_snapshot(now).tokens_available,
        Some((TPM - taken) as i64)
    );

    // Settling every request at no more than its estimate never creates debt.
    let mut rng = Rng(7);
    for (ticket, estimate) in tickets {
        let actual = rng.below(estimate + 1);
        budget.settle_rate(now, ticket, actual);
    }
    let available = budget.rate_snapshot(now).tokens_available.expect("limited");
    assert!((0..=TPM as i64).contains(&available), "{available}");
}

#[test]
fn a_concurrent_burst_admits_exactly_one_bucket_of_requests() {
    const RPM: u64 = 1_000;
    let now = Instant::now();
    let limits = BudgetLimits {
        ceilings: Ceilings::default(),
        rates: RateLimits {
            tokens_per_minute: None,
            requests_per_minute: NonZeroU64::new(RPM),
        },
    };
    let budget = Arc::new(AgentBudget::new("sparkles", limits, month(), now));
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (budget, start) = (Arc::clone(&budget), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                (0..100)
                    .filter(|_| budget.admit_rate(now, 1).is_ok())
                    .count() as u64
            })
        })
        .collect();
    let admitted: u64 = workers
        .into_iter()
        .map(|w| w.join().expect("worker panicked"))
        .sum();
    assert_eq!(admitted, RPM);
}
