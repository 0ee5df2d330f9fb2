//! Monthly ceiling arithmetic for one agent: reserve a request's worst case
//! before it is forwarded, settle it to the real usage afterwards. Pure plain
//! data: no locks, no clock, no I/O — the caller passes the month and owns the
//! synchronisation (see `budget::AgentBudget`).
//!
//! The invariant that gives zero overshoot under any concurrency: a reservation
//! is granted only if `committed + reserved + worst_case <= ceiling` for every
//! ceiling that is set, and a request can never use more than its worst case. So
//! `committed + reserved` never passes the ceiling, whatever the interleaving of
//! reserve and settle. Only a misbehaving upstream (billing beyond its
//! `max_tokens`) can push `committed` past it, and settlement flags that.

use std::fmt;
use std::sync::Arc;

use super::month::Month;

/// Usage or a bound on usage: tokens (all kinds summed) and cost in micro-USD
/// (1 USD = 1,000,000), integers so that sums are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Amount {
    pub tokens: u64,
    pub micro_usd: u64,
}

impl Amount {
    pub const ZERO: Amount = Amount {
        tokens: 0,
        micro_usd: 0,
    };

    pub const fn new(tokens: u64, micro_usd: u64) -> Self {
        Self { tokens, micro_usd }
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        Some(Amount {
            tokens: self.tokens.checked_add(other.tokens)?,
            micro_usd: self.micro_usd.checked_add(other.micro_usd)?,
        })
    }

    pub fn saturating_add(self, other: Amount) -> Amount {
        Amount {
            tokens: self.tokens.saturating_add(other.tokens),
            micro_usd: self.micro_usd.saturating_add(other.micro_usd),
        }
    }

    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount {
            tokens: self.tokens.saturating_sub(other.tokens),
            micro_usd: self.micro_usd.saturating_sub(other.micro_usd),
        }
    }

    /// Component-wise maximum.
    pub fn max(self, other: Amount) -> Amount {
        Amount {
            tokens: self.tokens.max(other.tokens),
            micro_usd: self.micro_usd.max(other.micro_usd),
        }
    }

    /// True if either component of `self` is larger than in `bound`.
    pub fn exceeds(self, bound: Amount) -> bool {
        self.tokens > bound.tokens || self.micro_usd > bound.micro_usd
    }
}

/// An agent's monthly ceilings; `None` = no ceiling of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ceilings {
    pub monthly_tokens: Option<u64>,
    pub monthly_micro_usd: Option<u64>,
}

/// Which ceiling refused a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CeilingKind {
    Tokens,
    Usd,
}

impl CeilingKind {
    /// The fleet.yaml field that sets this ceiling, for hints.
    pub fn field(self) -> &'static str {
        match self {
            CeilingKind::Tokens => "budget.monthly_tokens",
            CeilingKind::Usd => "budget.monthly_usd",
        }
    }
}

/// A reservation refused because the worst case does not fit under a ceiling.
/// Carries everything the proxy's refusal message needs; `Display` is that message.
/// Amounts are in tokens for [`CeilingKind::Tokens`] and micro-USD for [`CeilingKind::Usd`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CeilingRefusal {
    pub agent: Arc<str>,
    pub kind: CeilingKind,
    pub month: Month,
    pub ceiling: u64,
    /// Settled usage this month.
    pub used: u64,
    /// Held by requests still in flight.
    pub reserved: u64,
    /// The worst case of the refused request.
    pub requested: u64,
}

impl fmt::Display for CeilingRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let amount = |n: u64| match self.kind {
            CeilingKind::Tokens => group_thousands(n),
            CeilingKind::Usd => format_usd(n),
        };
        let unit = match self.kind {
            CeilingKind::Tokens => " tokens",
            CeilingKind::Usd => "",
        };
        write!(
            f,
            "agent \"{}\" reached its monthly ceiling: {} of {}{unit} used this month ({})",
            self.agent,
            amount(self.used),
            amount(self.ceiling),
            self.month,
        )?;
        if self.reserved > 0 {
            write!(
                f,
                ", {} more held by requests in flight",
                amount(self.reserved)
            )?;
        }
        write!(
            f,
            "; this request may need up to {}; raise `{}` in fleet.yaml or wait for {}",
            amount(self.requested),
            self.kind.field(),
            self.month.next(),
        )
    }
}

/// Proof of a granted reservation, consumed by exactly one of
/// [`CeilingState::settle`], [`CeilingState::settle_cut`] or [`CeilingState::release`].
/// Neither `Clone` nor constructible outside this module, so it cannot be settled twice.
#[derive(Debug, PartialEq, Eq)]
pub struct Held {
    id: u64,
    month: Month,
    amount: Amount,
}

impl Held {
    /// Unique among the reservations of one `CeilingState`; for logs and ledger rows.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The month the reservation was made in, and will be charged to.
    pub fn month(&self) -> Month {
        self.month
    }

    /// The worst case that was reserved.
    pub fn amount(&self) -> Amount {
        self.amount
    }
}

/// What a settlement charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// The month charged: always the month the reservation was made in.
    pub month: Month,
    pub reserved: Amount,
    pub charged: Amount,
    /// The upstream reported more than the worst case in some component. Cannot
    /// happen with an honest upstream; the proxy should log it. The ceiling may
    /// now be exceeded by the excess.
    pub overrun: bool,
}

/// Counters of one agent for the current month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CeilingSnapshot {
    pub month: Month,
    pub ceilings: Ceilings,
    /// Settled usage this month.
    pub committed: Amount,
    /// Outstanding reservations made this month.
    pub reserved: Amount,
    /// Number of outstanding reservations made this month.
    pub in_flight: u64,
}

/// One agent's ceiling state. Only the current month is tracked: a new month
/// starts from zero, and reservations from an earlier month settle into that
/// month (reported in [`Settlement::month`]) without touching the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CeilingState {
    agent: Arc<str>,
    ceilings: Ceilings,
    month: Month,
    committed: Amount,
    reserved: Amount,
    in_flight: u64,
    next_id: u64,
}

impl CeilingState {
    /// A fresh month with nothing used.
    pub fn new(agent: Arc<str>, ceilings: Ceilings, month: Month) -> Self {
        Self::from_totals(agent, ceilings, month, Amount::ZERO, Amount::ZERO)
    }

    /// Rebuilt from the ledger at start. `unsettled_reservations` are
    /// reservations recorded in `month` that were never settled: the process that
    /// held them is gone, so they will never settle, and their upstream requests
    /// may have been billed. They count as used at their reserved amount.
    pub fn from_totals(
        agent: Arc<str>,
        ceilings: Ceilings,
        month: Month,
        committed: Amount,
        unsettled_reservations: Amount,
    ) -> Self {
        Self {
            agent,
            ceilings,
            month,
            committed: committed.saturating_add(unsettled_reservations),
            reserved: Amount::ZERO,
            in_flight: 0,
            next_id: 0,
        }
    }

    pub fn agent(&self) -> &Arc<str> {
        &self.agent
    }

    /// Replaces the ceilings (fleet reload). Usage and outstanding reservations
    /// are kept; lowering a ceiling below current usage refuses every further
    /// reservation this month, it never cancels the ones in flight.
    pub fn set_ceilings(&mut self, ceilings: Ceilings) {
        self.ceilings = ceilings;
    }

    /// The counters as of `now` (a later month than the state has seen starts from zero).
    pub fn snapshot(&mut self, now: Month) -> CeilingSnapshot {
        self.roll_to(now);
        CeilingSnapshot {
            month: self.month,
            ceilings: self.ceilings,
            committed: self.committed,
            reserved: self.reserved,
            in_flight: self.in_flight,
        }
    }

    /// Reserves `worst_case` in month `now`, if it fits under every set ceiling.
    /// When several ceilings refuse, the tokens ceiling is reported.
    pub fn reserve(&mut self, now: Month, worst_case: Amount) -> Result<Held, CeilingRefusal> {
        self.roll_to(now);
        let checks = [
            (
                CeilingKind::Tokens,
                self.ceilings.monthly_tokens,
                self.committed.tokens,
                self.reserved.tokens,
                worst_case.tokens,
            ),
            (
                CeilingKind::Usd,
                self.ceilings.monthly_micro_usd,
                self.committed.micro_usd,
                self.reserved.micro_usd,
                worst_case.micro_usd,
            ),
        ];
        for (kind, ceiling, used, reserved, requested) in checks {
            let Some(ceiling) = ceiling else { continue };
            let fits = used
                .checked_add(reserved)
                .and_then(|held| held.checked_add(requested))
                .is_some_and(|total| total <= ceiling);
            if !fits {
                return Err(CeilingRefusal {
                    agent: Arc::clone(&self.agent),
                    kind,
                    month: self.month,
                    ceiling,
                    used,
                    reserved,
                    requested,
                });
            }
        }
        // Without a ceiling the sums are bookkeeping only; saturate rather than fail.
        self.reserved = self.reserved.saturating_add(worst_case);
        self.in_flight += 1;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        Ok(Held {
            id,
            month: self.month,
            amount: worst_case,
        })
    }

    /// The request completed and the upstream reported `actual` usage: charge
    /// exactly that. If it exceeds the reservation (the upstream misbehaved), the
    /// actual amount is still charged — the ledger must match the bill — and
    /// [`Settlement::overrun`] is set.
    pub fn settle(&mut self, held: Held, actual: Amount) -> Settlement {
        self.charge(&held, actual)
    }

    /// The answer was cut (client gone, stream broken, timeout) before the final
    /// usage arrived; `known_so_far` is whatever usage was seen. The upstream may
    /// have finished generating and billed for it, and we can no longer observe
    /// how much, so we charge the only bound we have: component-wise
    /// `max(known_so_far, reserved)`. That keeps the ledger at or above the
    /// upstream's bill. Knowing more than was reserved is an overrun, as in `settle`.
    pub fn settle_cut(&mut self, held: Held, known_so_far: Amount) -> Settlement {
        self.charge_cut(&held, known_so_far)
    }

    /// The request never reached the upstream, or the upstream refused it
    /// without usage (connection failed, 5xx before any output): nothing is charged.
    pub fn release(&mut self, held: Held) {
        self.charge(&held, Amount::ZERO);
    }

    /// `settle_cut` for a caller that guarantees single use itself (the
    /// `Reservation` guard, which cannot move out of itself because it has a `Drop`).
    pub(super) fn charge_cut(&mut self, held: &Held, known_so_far: Amount) -> Settlement {
        self.charge(held, known_so_far.max(held.amount))
    }

    /// See `charge_cut` for why this is visible to the parent module.
    pub(super) fn charge(&mut self, held: &Held, charged: Amount) -> Settlement {
        // Only reservations of the current month are in the counters; an older
        // one belongs to a month whose counters were already dropped at rollover.
        if held.month == self.month {
            self.reserved = self.reserved.saturating_sub(held.amount);
            self.in_flight = self.in_flight.saturating_sub(1);
            self.committed = self.committed.saturating_add(charged);
        }
        Settlement {
            month: held.month,
            reserved: held.amount,
            charged,
            overrun: charged.exceeds(held.amount),
        }
    }

    /// Months only move forward: a wall clock stepped back across a month
    /// boundary keeps counting in the later month rather than reopening the
    /// earlier one (whose outstanding reservations are no longer tracked).
    fn roll_to(&mut self, now: Month) {
        if now > self.month {
            self.month = now;
            self.committed = Amount::ZERO;
            self.reserved = Amount::ZERO;
            self.in_flight = 0;
        }
    }
}

/// `39990000` → `39,990,000`.
pub(crate) fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Micro-USD as dollars with at least cents and no trailing zeros beyond:
/// `149_990_000` → `$149.99`, `1_200` → `$0.0012`.
pub(crate) fn format_usd(micro_usd: u64) -> String {
    let dollars = micro_usd / 1_000_000;
    let fraction = format!("{:06}", micro_usd % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    let fraction = format!("{fraction:0<2}");
    format!("${}.{fraction}", group_thousands(dollars))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV: Month = match Month::new(2026, 11) {
        Some(m) => m,
        None => panic!("bad test month"),
    };
    const DEC: Month = match Month::new(2026, 12) {
        Some(m) => m,
        None => panic!("bad test month"),
    };

    fn amount(tokens: u64, micro_usd: u64) -> Amount {
        Amount::new(tokens, micro_usd)
    }

    fn ceilings(tokens: Option<u64>, micro_usd: Option<u64>) -> Ceilings {
        Ceilings {
            monthly_tokens: tokens,
            monthly_micro_usd: micro_usd,
        }
    }

    fn state(c: Ceilings, committed: Amount) -> CeilingState {
        CeilingState::from_totals("sparkles".into(), c, NOV, committed, Amount::ZERO)
    }

    /// What a reserve call should do: fit, or be refused by which ceiling.
    #[derive(Debug, PartialEq)]
    enum Want {
        Fits,
        Refused(CeilingKind),
    }

    #[test]
    fn reserve_fits_only_when_every_set_ceiling_holds_the_worst_case() {
        use CeilingKind::*;
        use Want::*;
        // (name, ceilings, committed, already reserved, worst case, want)
        #[rustfmt::skip]
        let cases: &[(&str, Ceilings, Amount, Amount, Amount, Want)] = &[
            ("no ceilings", ceilings(None, None), amount(u64::MAX, u64::MAX), amount(5, 5), amount(u64::MAX, 1), Fits),
            ("tokens: fits exactly", ceilings(Some(100), None), amount(60, 0), amount(30, 0), amount(10, 0), Fits),
            ("tokens: one over", ceilings(Some(100), None), amount(60, 0), amount(30, 0), amount(11, 0), Refused(Tokens)),
            ("tokens: reserved alone blocks", ceilings(Some(100), None), amount(0, 0), amount(95, 0), amount(6, 0), Refused(Tokens)),
            ("tokens only: usd unbounded", ceilings(Some(100), None), amount(0, u64::MAX), amount(0, 0), amount(100, u64::MAX), Fits),
            ("usd: fits exactly", ceilings(None, Some(1_000)), amount(0, 400), amount(0, 500), amount(9_999, 100), Fits),
            ("usd: one over", ceilings(None, Some(1_000)), amount(0, 400), amount(0, 500), amount(0, 101), Refused(Usd)),
            ("usd only: tokens unbounded", ceilings(None, Some(1_000)), amount(u64::MAX, 0), amount(0, 0), amount(u64::MAX, 1_000), Fits),
            ("both: both fit exactly", ceilings(Some(100), Some(1_000)), amount(50, 500), amount(0, 0), amount(50, 500), Fits),
            ("both: tokens over, usd fine", ceilings(Some(100), Some(1_000)), amount(50, 0), amount(0, 0), amount(51, 1), Refused(Tokens)),
            ("both: usd over, tokens fine", ceilings(Some(100), Some(1_000)), amount(0, 500), amount(0, 0), amount(1, 501), Refused(Usd)),
            ("both over: tokens reported", ceilings(Some(100), Some(1_000)), amount(100, 1_000), amount(0, 0), amount(1, 1), Refused(Tokens)),
            ("zero worst case at the ceiling", ceilings(Some(100), None), amount(100, 0), amount(0, 0), amount(0, 0), Fits),
            ("zero worst case past the ceiling", ceilings(Some(100), None), amount(101, 0), amount(0, 0), amount(0, 0), Refused(Tokens)),
            ("zero ceiling", ceilings(Some(0), None), amount(0, 0), amount(0, 0), amount(1, 0), Refused(Tokens)),
            ("overflowing sum is refused", ceilings(Some(u64::MAX), None), amount(u64::MAX, 0), amount(0, 0), amount(1, 0), Refused(Tokens)),
            ("overflow in reserved is refused", ceilings(None, Some(u64::MAX)), amount(0, 1), amount(0, u64::MAX), amount(0, 0), Refused(Usd)),
        ];
        for (name, c, committed, reserved, worst, want) in cases {
            let mut s = state(*c, *committed);
            // Reach the "already reserved" state through the API, bypassing ceilings.
            s.set_ceilings(ceilings(None, None));
            let _outstanding = s.reserve(NOV, *reserved).expect("no ceiling");
            s.set_ceilings(*c);
            let before = s.snapshot(NOV);
            let got = match s.reserve(NOV, *worst) {
                Ok(held) => {
                    assert_eq!(held.amount(), *worst, "{name}");
                    let after = s.snapshot(NOV);
                    assert_eq!(
                        after.reserved,
                        before.reserved.saturating_add(*worst),
                        "{name}"
                    );
                    assert_eq!(after.in_flight, 2, "{name}");
                    Fits
                }
                Err(refusal) => {
                    assert_eq!(s.snapshot(NOV), before, "{name}: a refusal changes nothing");
                    Refused(refusal.kind)
                }
            };
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn refusal_reports_the_numbers_of_the_refusing_ceiling() {
        let mut s = state(ceilings(Some(100), Some(1_000)), amount(40, 900));
        let _a = s.reserve(NOV, amount(10, 50)).expect("fits");
        let refusal = s.reserve(NOV, amount(5, 60)).expect_err("usd over");
        assert_eq!(
            refusal,
            CeilingRefusal {
                agent: "sparkles".into(),
                kind: CeilingKind::Usd,
                month: NOV,
                ceiling: 1_000,
                used: 900,
                reserved: 50,
                requested: 60,
            }
        );
    }

    #[test]
    fn settlement_table() {
        // (name, reserved, how, expected charge, expected overrun)
        enum How {
            Settle(Amount),
            Cut(Amount),
            Release,
        }
        use How::*;
        #[rustfmt::skip]
        let cases: &[(&str, Amount, How, Amount, bool)] = &[
            ("settle below reservation", amount(1_000, 50), Settle(amount(300, 12)), amount(300, 12), false),
            ("settle exactly the reservation", amount(1_000, 50), Settle(amount(1_000, 50)), amount(1_000, 50), false),
            ("settle zero usage", amount(1_000, 50), Settle(amount(0, 0)), amount(0, 0), false),
            ("settle above reservation: tokens", amount(1_000, 50), Settle(amount(1_001, 50)), amount(1_001, 50), true),
            ("settle above reservation: usd", amount(1_000, 50), Settle(amount(10, 51)), amount(10, 51), true),
            ("cut with nothing known", amount(1_000, 50), Cut(amount(0, 0)), amount(1_000, 50), false),
            ("cut with partial usage known", amount(1_000, 50), Cut(amount(400, 20)), amount(1_000, 50), false),
            ("cut knowing more tokens than reserved", amount(1_000, 50), Cut(amount(1_200, 20)), amount(1_200, 50), true),
            ("cut knowing more usd than reserved", amount(1_000, 50), Cut(amount(10, 70)), amount(1_000, 70), true),
            ("release", amount(1_000, 50), Release, amount(0, 0), false),
        ];
        for (name, reserved, how, want_charge, want_overrun) in cases {
            let committed = amount(7, 3);
            let mut s = state(ceilings(Some(10_000), Some(10_000)), committed);
            let held = s.reserve(NOV, *reserved).expect("fits");
            let settlement = match how {
                Settle(actual) => Some(s.settle(held, *actual)),
                Cut(known) => Some(s.settle_cut(held, *known)),
                Release => {
                    s.release(held);
                    None
                }
            };
            if let Some(settlement) = settlement {
                assert_eq!(
                    settlement,
                    Settlement {
                        month: NOV,
                        reserved: *reserved,
                        charged: *want_charge,
                        overrun: *want_overrun,
                    },
                    "{name}"
                );
            }
            let snap = s.snapshot(NOV);
            assert_eq!(
                snap.committed,
                committed.saturating_add(*want_charge),
                "{name}"
            );
            assert_eq!(snap.reserved, Amount::ZERO, "{name}");
            assert_eq!(snap.in_flight, 0, "{name}");
        }
    }

    #[test]
    fn settling_frees_exactly_the_unused_part_of_the_worst_case() {
        let mut s = state(ceilings(Some(100), None), Amount::ZERO);
        let a = s.reserve(NOV, amount(60, 0)).expect("fits");
        assert!(s.reserve(NOV, amount(41, 0)).is_err());
        s.settle(a, amount(20, 0));
        // 20 used, so 80 left: exactly 80 fits, 81 does not.
        assert!(s.reserve(NOV, amount(81, 0)).is_err());
        let b = s.reserve(NOV, amount(80, 0)).expect("fits exactly");
        assert!(s.reserve(NOV, amount(0, 0)).is_ok());
        assert!(s.reserve(NOV, amount(1, 0)).is_err());
        s.release(b);
        assert!(s.reserve(NOV, amount(80, 0)).is_ok());
    }

    #[test]
    fn overrun_may_pass_the_ceiling_and_then_refuses_everything() {
        let mut s = state(ceilings(Some(100), None), Amount::ZERO);
        let a = s.reserve(NOV, amount(100, 0)).expect("fits");
        let settlement = s.settle(a, amount(130, 0));
        assert!(settlement.overrun);
        assert_eq!(s.snapshot(NOV).committed, amount(130, 0));
        assert!(s.reserve(NOV, Amount::ZERO).is_err());
    }

    #[test]
    fn a_new_month_starts_from_zero_and_old_reservations_settle_into_their_month() {
        let mut s = state(ceilings(Some(100), None), amount(50, 0));
        let old = s.reserve(NOV, amount(50, 0)).expect("fits");
        assert!(s.reserve(NOV, amount(1, 0)).is_err(), "november is full");

        // First request of December: fresh month, the November reservation does not count.
        let new = s.reserve(DEC, amount(100, 0)).expect("december is empty");
        assert_eq!(new.month(), DEC);
        let snap = s.snapshot(DEC);
        assert_eq!(
            (snap.committed, snap.reserved, snap.in_flight),
            (Amount::ZERO, amount(100, 0), 1)
        );

        let settlement = s.settle(old, amount(30, 0));
        assert_eq!(
            settlement.month, NOV,
            "charged to the month it was reserved in"
        );
        let snap = s.snapshot(DEC);
        assert_eq!(
            (snap.committed, snap.reserved, snap.in_flight),
            (Amount::ZERO, amount(100, 0), 1)
        );

        s.settle(new, amount(70, 0));
        assert_eq!(s.snapshot(DEC).committed, amount(70, 0));
    }

    #[test]
    fn a_settle_after_month_end_but_before_any_december_call_lands_in_november() {
        let mut s = state(ceilings(Some(100), None), Amount::ZERO);
        let held = s.reserve(NOV, amount(10, 0)).expect("fits");
        assert_eq!(s.settle(held, amount(5, 0)).month, NOV);
        assert_eq!(s.snapshot(DEC).committed, Amount::ZERO);
    }

    #[test]
    fn the_month_never_moves_backwards() {
        let mut s = state(ceilings(Some(100), None), Amount::ZERO);
        let held = s.reserve(DEC, amount(60, 0)).expect("fits");
        // A clock stepped back into November still counts against December.
        let refused = s
            .reserve(NOV, amount(41, 0))
            .expect_err("december has 40 left");
        assert_eq!(refused.month, DEC);
        s.settle(held, amount(60, 0));
        assert_eq!(s.snapshot(NOV).month, DEC);
        assert_eq!(s.snapshot(NOV).committed, amount(60, 0));
    }

    #[test]
    fn rebuilt_state_counts_unsettled_reservations_as_used() {
        let c = ceilings(Some(1_000), Some(500));
        let mut s =
            CeilingState::from_totals("sparkles".into(), c, NOV, amount(600, 100), amount(300, 50));
        let snap = s.snapshot(NOV);
        assert_eq!(snap.committed, amount(900, 150));
        assert_eq!(snap.reserved, Amount::ZERO);
        assert!(s.reserve(NOV, amount(101, 0)).is_err());
        assert!(s.reserve(NOV, amount(100, 350)).is_ok());
        // The rebuilt totals are for their month only.
        assert_eq!(s.snapshot(DEC).committed, Amount::ZERO);
    }

    #[test]
    fn lowering_a_ceiling_keeps_in_flight_reservations_but_refuses_new_ones() {
        let mut s = state(ceilings(Some(1_000), None), Amount::ZERO);
        let held = s.reserve(NOV, amount(800, 0)).expect("fits");
        s.set_ceilings(ceilings(Some(500), None));
        assert!(s.reserve(NOV, Amount::ZERO).is_err());
        s.settle(held, amount(300, 0));
        assert!(s.reserve(NOV, amount(200, 0)).is_ok());
        assert!(s.reserve(NOV, amount(1, 0)).is_err());
    }

    #[test]
    fn reservation_ids_are_distinct() {
        let mut s = state(Ceilings::default(), Amount::ZERO);
        let a = s.reserve(NOV, Amount::ZERO).expect("fits");
        let b = s.reserve(NOV, Amount::ZERO).expect("fits");
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn refusal_messages() {
        let tokens = CeilingRefusal {
            agent: "sparkles".into(),
            kind: CeilingKind::Tokens,
            month: NOV,
            ceiling: 40_000_000,
            used: 39_990_000,
            reserved: 0,
            requested: 16_384,
        };
        assert_eq!(
            tokens.to_string(),
            "agent \"sparkles\" reached its monthly ceiling: 39,990,000 of 40,000,000 tokens used \
             this month (2026-11); this request may need up to 16,384; raise `budget.monthly_tokens` \
             in fleet.yaml or wait for 2026-12"
        );
        let usd = CeilingRefusal {
            agent: "sparkles".into(),
            kind: CeilingKind::Usd,
            month: DEC,
            ceiling: 150_000_000,
            used: 149_990_000,
            reserved: 5_000,
            requested: 61_440,
        };
        assert_eq!(
            usd.to_string(),
            "agent \"sparkles\" reached its monthly ceiling: $149.99 of $150.00 used this month \
             (2026-12), $0.005 more held by requests in flight; this request may need up to \
             $0.06144; raise `budget.monthly_usd` in fleet.yaml or wait for 2027-01"
        );
    }

    #[test]
    fn number_formatting() {
        let groups = [
            (0, "0"),
            (999, "999"),
            (1_000, "1,000"),
            (40_000_000, "40,000,000"),
            (u64::MAX, "18,446,744,073,709,551,615"),
        ];
        for (n, want) in groups {
            assert_eq!(group_thousands(n), want);
        }
        let usd = [
            (0, "$0.00"),
            (1, "$0.000001"),
            (1_200, "$0.0012"),
            (10_000, "$0.01"),
            (150_000_000, "$150.00"),
            (1_234_567_890, "$1,234.56789"),
        ];
        for (micro, want) in usd {
            assert_eq!(format_usd(micro), want);
        }
    }
}
