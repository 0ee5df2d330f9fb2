//! Budget enforcement for the metering proxy: per-agent rate buckets and
//! monthly ceilings with reservations. The arithmetic lives in pure modules
//! (`ceiling`, `rate`, `month`); this module is only the thread-safe shell the
//! proxy shares between concurrent requests. It does no I/O: the proxy records
//! reservations and settlements in the ledger, and rebuilds from it at start.
//!
//! Concurrency: one [`AgentBudget`] per agent, holding each state behind its own
//! `std::sync::Mutex`. Every critical section is a few integer operations with no
//! allocation on the success path and never spans an `.await`, so an uncontended
//! lock costs tens of nanoseconds and agents never contend with each other. A
//! mutex (rather than atomics) is what makes "check every ceiling, then add to
//! every counter" one atomic step, which is the whole zero-overshoot argument.
//!
//! The order the proxy calls it in: [`AgentBudget::admit_rate`], then
//! [`AgentBudget::reserve`] (on refusal, [`AgentBudget::cancel_rate`]), forward,
//! then [`Reservation::settle`] / [`Reservation::settle_cut`] /
//! [`Reservation::release`] and [`AgentBudget::settle_rate`].

pub mod ceiling;
pub mod month;
pub mod rate;
pub mod threshold;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

pub(crate) use ceiling::group_thousands;
pub use ceiling::{
    Amount, CeilingKind, CeilingRefusal, CeilingSnapshot, CeilingState, Ceilings, Held, Settlement,
};
pub use month::{InvalidMonth, Month};
pub use rate::{RateKind, RateLimits, RateRefusal, RateSnapshot, RateState, RateTicket};

/// Everything an agent's `budget:` block sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetLimits {
    pub ceilings: Ceilings,
    pub rates: RateLimits,
}

/// One agent's budget, shared by all of its in-flight requests (`Arc` it).
#[derive(Debug)]
pub struct AgentBudget {
    agent: Arc<str>,
    ceiling: Arc<Mutex<CeilingState>>,
    rate: Mutex<RateState>,
}

/// The state behind these locks is updated by code that cannot panic part-way
/// (plain integer arithmetic, all saturating or checked), so a poisoned lock
/// still guards consistent data; refusing every request of the agent for it
/// would turn someone else's panic into an outage.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AgentBudget {
    /// A budget with nothing used yet in `month`.
    pub fn new(agent: &str, limits: BudgetLimits, month: Month, now: Instant) -> Self {
        Self::from_totals(agent, limits, month, Amount::ZERO, Amount::ZERO, now)
    }

    /// Rebuilt from the ledger at start: `committed` is the settled usage of
    /// `month`, `unsettled_reservations` the sum of reservations recorded in it
    /// that never settled (they count as used at their reserved amount). Rate
    /// buckets start full.
    pub fn from_totals(
        agent: &str,
        limits: BudgetLimits,
        month: Month,
        committed: Amount,
        unsettled_reservations: Amount,
        now: Instant,
    ) -> Self {
        let agent: Arc<str> = agent.into();
        let ceiling = CeilingState::from_totals(
            Arc::clone(&agent),
            limits.ceilings,
            month,
            committed,
            unsettled_reservations,
        );
        Self {
            rate: Mutex::new(RateState::new(Arc::clone(&agent), limits.rates, now)),
            ceiling: Arc::new(Mutex::new(ceiling)),
            agent,
        }
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Applies new limits from a fleet reload; usage, reservations in flight and
    /// rate debt carry over.
    pub fn set_limits(&self, limits: BudgetLimits, now: Instant) {
        lock(&self.ceiling).set_ceilings(limits.ceilings);
        lock(&self.rate).set_limits(limits.rates, now);
    }

    /// Rate admission; `token_estimate` is the request's worst case in tokens.
    /// See [`RateState::admit`].
    pub fn admit_rate(&self, now: Instant, token_estimate: u64) -> Result<RateTicket, RateRefusal> {
        lock(&self.rate).admit(now, token_estimate)
    }

    /// Trues up the token bucket with the answer's actual tokens (all kinds).
    pub fn settle_rate(&self, now: Instant, ticket: RateTicket, actual_tokens: u64) {
        lock(&self.rate).settle(now, ticket, actual_tokens);
    }

    /// Gives back what a rate admission took, for a request refused later and never forwarded.
    pub fn cancel_rate(&self, now: Instant, ticket: RateTicket) {
        lock(&self.rate).cancel(now, ticket);
    }

    pub fn rate_snapshot(&self, now: Instant) -> RateSnapshot {
        lock(&self.rate).snapshot(now)
    }

    /// Reserves the request's worst case against the monthly ceilings of `month`
    /// (normally [`Month::current`]). The returned guard must be settled or released.
    pub fn reserve(&self, month: Month, worst_case: Amount) -> Result<Reservation, CeilingRefusal> {
        let held = lock(&self.ceiling).reserve(month, worst_case)?;
        Ok(Reservation {
            ceiling: Arc::clone(&self.ceiling),
            held,
            open: true,
        })
    }

    /// This month's counters, for `status`, metrics and tests.
    pub fn usage(&self, month: Month) -> CeilingSnapshot {
        lock(&self.ceiling).snapshot(month)
    }
}

/// A granted ceiling reservation. Consume it with exactly one of
/// [`settle`](Self::settle), [`settle_cut`](Self::settle_cut) or
/// [`release`](Self::release). If it is dropped instead — a request task
/// cancelled or panicking mid-flight — it is settled as a cut stream with
/// nothing known, i.e. charged its full reserved amount, and a warning is
/// logged: a forgotten reservation must neither leak (shrinking the ceiling for
/// the rest of the month) nor be forgiven (the upstream may have billed it).
/// That is also what the ledger's recovery assumes for an unsettled row.
pub struct Reservation {
    ceiling: Arc<Mutex<CeilingState>>,
    held: Held,
    /// False once settled or released; `Drop` charges an open reservation.
    open: bool,
}

impl Reservation {
    /// Unique among this agent's reservations in this process.
    pub fn id(&self) -> u64 {
        self.held.id()
    }

    /// The month the reservation will be charged to.
    pub fn month(&self) -> Month {
        self.held.month()
    }

    /// The reserved worst case.
    pub fn amount(&self) -> Amount {
        self.held.amount()
    }

    /// Charges the actual usage reported by the upstream. See [`CeilingState::settle`].
    pub fn settle(mut self, actual: Amount) -> Settlement {
        self.open = false;
        lock(&self.ceiling).charge(&self.held, actual)
    }

    /// Charges a cut answer conservatively: `max(known_so_far, reserved)` per
    /// component. See [`CeilingState::settle_cut`].
    pub fn settle_cut(mut self, known_so_far: Amount) -> Settlement {
        self.open = false;
        lock(&self.ceiling).charge_cut(&self.held, known_so_far)
    }

    /// Frees the reservation without charge: the upstream never produced usage.
    pub fn release(mut self) {
        self.open = false;
        lock(&self.ceiling).charge(&self.held, Amount::ZERO);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let mut state = lock(&self.ceiling);
        let settlement = state.charge_cut(&self.held, Amount::ZERO);
        tracing::warn!(
            agent = %state.agent(),
            reservation = self.held.id(),
            month = %settlement.month,
            charged_tokens = settlement.charged.tokens,
            charged_micro_usd = settlement.charged.micro_usd,
            "reservation dropped without settlement; charged at its reserved amount"
        );
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("held", &self.held)
            .field("open", &self.open)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU64;

    const NOV: Month = match Month::new(2026, 11) {
        Some(m) => m,
        None => panic!("bad test month"),
    };

    fn budget(tokens: u64, tpm: u64) -> AgentBudget {
        let limits = BudgetLimits {
            ceilings: Ceilings {
                monthly_tokens: Some(tokens),
                monthly_micro_usd: None,
            },
            rates: RateLimits {
                tokens_per_minute: NonZeroU64::new(tpm),
                requests_per_minute: None,
            },
        };
        AgentBudget::new("sparkles", limits, NOV, Instant::now())
    }

    #[test]
    fn a_dropped_reservation_is_charged_in_full() {
        let b = budget(1_000, 0);
        let reservation = b.reserve(NOV, Amount::new(300, 0)).expect("fits");
        drop(reservation);
        let usage = b.usage(NOV);
        assert_eq!(usage.committed, Amount::new(300, 0));
        assert_eq!((usage.reserved, usage.in_flight), (Amount::ZERO, 0));
    }

    #[test]
    fn consumed_reservations_are_charged_once() {
        let b = budget(1_000, 0);
        let a = b.reserve(NOV, Amount::new(300, 0)).expect("fits");
        let c = b.reserve(NOV, Amount::new(300, 0)).expect("fits");
        let r = b.reserve(NOV, Amount::new(300, 0)).expect("fits");
        assert_eq!((a.amount(), a.month()), (Amount::new(300, 0), NOV));
        assert_ne!(a.id(), c.id());
        assert_eq!(a.settle(Amount::new(100, 0)).charged, Amount::new(100, 0));
        assert_eq!(
            c.settle_cut(Amount::new(10, 0)).charged,
            Amount::new(300, 0)
        );
        r.release();
        let usage = b.usage(NOV);
        assert_eq!(usage.committed, Amount::new(400, 0));
        assert_eq!((usage.reserved, usage.in_flight), (Amount::ZERO, 0));
    }

    #[test]
    fn refusals_name_the_agent() {
        let b = budget(100, 50);
        let err = b.reserve(NOV, Amount::new(101, 0)).expect_err("too big");
        assert_eq!(&*err.agent, "sparkles");
        let now = Instant::now();
        let ticket = b.admit_rate(now, 50).expect("full bucket");
        let err = b.admit_rate(now, 1).expect_err("bucket spent");
        assert_eq!(&*err.agent, "sparkles");
        b.cancel_rate(now, ticket);
        assert!(b.admit_rate(now, 50).is_ok());
    }

    #[test]
    fn set_limits_applies_to_both_halves() {
        let b = budget(100, 50);
        let now = Instant::now();
        b.set_limits(BudgetLimits::default(), now);
        assert!(b.reserve(NOV, Amount::new(1_000, 0)).is_ok());
        assert_eq!(b.rate_snapshot(now).tokens_available, None);
    }
}
