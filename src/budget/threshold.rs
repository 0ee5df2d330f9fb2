//! Soft budget alerts (`budget.alert_at`): whether an agent's settled usage
//! this month has crossed a percentage of one of its monthly ceilings. Pure
//! arithmetic over a [`CeilingSnapshot`]; must not refuse anything (that is
//! `ceiling`) nor decide how often to alert (that is `proxy::meter` and the
//! alert debouncer).

use super::ceiling::{CeilingKind, CeilingSnapshot};

/// A ceiling whose `alert_at` share is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThresholdCrossed {
    pub kind: CeilingKind,
    /// The configured `alert_at`, in percent.
    pub percent: u32,
    /// Settled usage this month: tokens, or micro-USD for [`CeilingKind::Usd`].
    pub used: u64,
    pub ceiling: u64,
}

/// The first ceiling (tokens, then USD) whose settled usage is at least
/// `percent`% of it; `None` when neither is set or reached. Reservations in
/// flight do not count: an alert is about what was spent, not what might be.
pub fn crossed(snapshot: &CeilingSnapshot, percent: u32) -> Option<ThresholdCrossed> {
    [
        (
            CeilingKind::Tokens,
            snapshot.ceilings.monthly_tokens,
            snapshot.committed.tokens,
        ),
        (
            CeilingKind::Usd,
            snapshot.ceilings.monthly_micro_usd,
            snapshot.committed.micro_usd,
        ),
    ]
    .into_iter()
    .find_map(|(kind, ceiling, used)| {
        let ceiling = ceiling?;
        (u128::from(used) * 100 >= u128::from(ceiling) * u128::from(percent)).then_some(
            ThresholdCrossed {
                kind,
                percent,
                used,
                ceiling,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Amount, Ceilings, Month};

    fn snapshot(tokens: Option<u64>, usd: Option<u64>, used: Amount) -> CeilingSnapshot {
        CeilingSnapshot {
            month: Month::new(2026, 11).unwrap(),
            ceilings: Ceilings {
                monthly_tokens: tokens,
                monthly_micro_usd: usd,
            },
            committed: used,
            reserved: Amount::new(1_000_000, 1_000_000),
            in_flight: 1,
        }
    }

    #[test]
    fn crossing_is_at_or_above_the_share() {
        let hit = |kind, used, ceiling| {
            Some(ThresholdCrossed {
                kind,
                percent: 80,
                used,
                ceiling,
            })
        };
        let cases = [
            ("no ceilings", snapshot(None, None, Amount::new(9, 9)), None),
            (
                "below",
                snapshot(Some(1_000), None, Amount::new(799, 0)),
                None,
            ),
            (
                "exactly 80%",
                snapshot(Some(1_000), None, Amount::new(800, 0)),
                hit(CeilingKind::Tokens, 800, 1_000),
            ),
            (
                "over the ceiling",
                snapshot(Some(1_000), None, Amount::new(5_000, 0)),
                hit(CeilingKind::Tokens, 5_000, 1_000),
            ),
            (
                "usd only",
                snapshot(Some(1_000), Some(100), Amount::new(10, 80)),
                hit(CeilingKind::Usd, 80, 100),
            ),
            (
                "tokens first when both",
                snapshot(Some(1_000), Some(100), Amount::new(900, 90)),
                hit(CeilingKind::Tokens, 900, 1_000),
            ),
            (
                "in-flight reservations do not count",
                snapshot(Some(1_000), Some(100), Amount::ZERO),
                None,
            ),
            (
                "no overflow",
                snapshot(Some(u64::MAX), None, Amount::new(u64::MAX, 0)),
                hit(CeilingKind::Tokens, u64::MAX, u64::MAX),
            ),
        ];
        for (what, snap, want) in cases {
            assert_eq!(crossed(&snap, 80), want, "{what}");
        }
        let full = snapshot(Some(1_000), None, Amount::new(999, 0));
        assert_eq!(crossed(&full, 100), None, "100% means the whole ceiling");
    }
}
