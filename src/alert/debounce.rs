//! When repeated trouble becomes one alert: a monthly ceiling once per agent
//! per month, crash-looping once per agent per window once restarts reach the
//! threshold within it, a rate-limit storm at most once per agent per quiet
//! period once refusals reach the threshold within the window. Pure: the
//! caller passes every `Instant` in; nothing here reads a clock or delivers.
//!
//! Memory is bounded: per agent, at most `threshold` timestamps per kind.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::event::AlertEvent;
use crate::budget::Month;
use crate::fleet::{CrashLoopSpec, StormSpec};

/// The debouncing state of one fleet's alerts.
#[derive(Debug, Clone)]
pub struct Debouncer {
    crash_loop: CrashLoopSpec,
    storm: StormSpec,
    /// The last month each agent's ceiling alert was sent for.
    ceilings: HashMap<String, Month>,
    /// The last month each agent's soft budget (`alert_at`) alert was sent for.
    thresholds: HashMap<String, Month>,
    restarts: HashMap<String, Recent>,
    refusals: HashMap<String, Recent>,
}

/// The most recent occurrences of one thing for one agent, and its last alert.
#[derive(Debug, Clone, Default)]
struct Recent {
    /// Oldest first; never more than the threshold.
    times: VecDeque<Instant>,
    last_alert: Option<Instant>,
}

impl Recent {
    /// Records an occurrence at `now`; true when `threshold` of them fall within
    /// `window` ending at `now`. Only the last `threshold` are kept: the
    /// question is whether the threshold-th most recent is recent enough.
    fn record(&mut self, now: Instant, threshold: u32, window: Duration) -> bool {
        let keep = usize::try_from(threshold.max(1)).unwrap_or(usize::MAX);
        self.times.push_back(now);
        while self.times.len() > keep {
            self.times.pop_front();
        }
        self.times.len() == keep
            && self
                .times
                .front()
                .is_some_and(|first| now.saturating_duration_since(*first) < window)
    }

    /// Claims the right to alert at `now` unless one was sent less than `quiet` ago.
    fn claim(&mut self, now: Instant, quiet: Duration) -> bool {
        let quiet_over = self
            .last_alert
            .is_none_or(|last| now.saturating_duration_since(last) >= quiet);
        if quiet_over {
            self.last_alert = Some(now);
        }
        quiet_over
    }
}

impl Debouncer {
    pub fn new(crash_loop: CrashLoopSpec, storm: StormSpec) -> Self {
        Self {
            crash_loop,
            storm,
            ceilings: HashMap::new(),
            thresholds: HashMap::new(),
            restarts: HashMap::new(),
            refusals: HashMap::new(),
        }
    }

    /// New thresholds (a reload); what was seen and sent is kept.
    pub fn set_thresholds(&mut self, crash_loop: CrashLoopSpec, storm: StormSpec) {
        self.crash_loop = crash_loop;
        self.storm = storm;
    }

    /// The agent restarted at `now`: a crash-loop alert when this makes
    /// `crash_loop.restarts` within `crash_loop.window` and none was sent for
    /// the agent within the last window.
    pub fn restarted(&mut self, agent: &str, now: Instant) -> Option<AlertEvent> {
        let CrashLoopSpec { restarts, window } = self.crash_loop;
        let recent = self.restarts.entry(agent.to_owned()).or_default();
        (recent.record(now, restarts, window) && recent.claim(now, window)).then(|| {
            AlertEvent::CrashLooping {
                agent: agent.to_owned(),
                restarts,
                window,
            }
        })
    }

    /// One of the agent's requests was refused by its rate limit at `now`: a
    /// storm alert when this makes `storm.refusals` within `storm.window` and
    /// none was sent for the agent within the last `storm.quiet`.
    pub fn rate_limited(&mut self, agent: &str, now: Instant) -> Option<AlertEvent> {
        let StormSpec {
            refusals,
            window,
            quiet,
        } = self.storm;
        let recent = self.refusals.entry(agent.to_owned()).or_default();
        (recent.record(now, refusals, window) && recent.claim(now, quiet)).then(|| {
            AlertEvent::RateLimitStorm {
                agent: agent.to_owned(),
                refused: refusals,
                window,
            }
        })
    }

    /// Whether an event the caller composed itself should go out at `now`.
    /// Quarantines always do (each is its own incident), and spend-velocity
    /// alerts (the wire sends one per episode); a ceiling once per
    /// agent and month; crash loops and storms under the same quiet periods as
    /// the ones this debouncer detects.
    pub fn admit(&mut self, event: &AlertEvent, now: Instant) -> bool {
        match event {
            AlertEvent::Quarantined { .. }
            | AlertEvent::RunawayDetected { .. }
            | AlertEvent::SpendVelocity { .. }
            | AlertEvent::RotationFailed { .. } => true,
            AlertEvent::CeilingReached { agent, month, .. } => {
                once_a_month(&mut self.ceilings, agent, *month)
            }
            AlertEvent::BudgetThreshold { agent, month, .. } => {
                once_a_month(&mut self.thresholds, agent, *month)
            }
            AlertEvent::CrashLooping { agent, .. } => self
                .restarts
                .entry(agent.clone())
                .or_default()
                .claim(now, self.crash_loop.window),
            AlertEvent::RateLimitStorm { agent, .. } => self
                .refusals
                .entry(agent.clone())
                .or_default()
                .claim(now, self.storm.quiet),
        }
    }
}

/// True the first time `agent` reports `month` (a different month counts anew).
fn once_a_month(sent: &mut HashMap<String, Month>, agent: &str, month: Month) -> bool {
    if sent.get(agent) == Some(&month) {
        false
    } else {
        sent.insert(agent.to_owned(), month);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// `(agent, seconds after the start)`, in order.
    type Feed<'a> = &'a [(&'a str, u64)];

    fn debouncer() -> (Debouncer, Instant) {
        let d = Debouncer::new(
            CrashLoopSpec {
                restarts: 3,
                window: 60 * S,
            },
            StormSpec {
                refusals: 4,
                window: 10 * S,
                quiet: 100 * S,
            },
        );
        (d, Instant::now())
    }

    /// Feeds `(agent, seconds after t0)` and returns which produced an alert.
    fn run(
        step: fn(&mut Debouncer, &str, Instant) -> Option<AlertEvent>,
        feed: &[(&str, u64)],
    ) -> Vec<(String, u64)> {
        let (mut d, t0) = debouncer();
        feed.iter()
            .filter_map(|&(agent, secs)| {
                step(&mut d, agent, t0 + Duration::from_secs(secs))
                    .map(|e| (e.agent().to_owned(), secs))
            })
            .collect()
    }

    fn alerts(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(a, s)| ((*a).to_owned(), *s)).collect()
    }

    #[test]
    fn crash_loops() {
        let cases: &[(&str, Feed, Feed)] = &[
            ("below the threshold", &[("a", 0), ("a", 10)], &[]),
            (
                "threshold within the window",
                &[("a", 0), ("a", 10), ("a", 20)],
                &[("a", 20)],
            ),
            (
                "spread wider than the window",
                &[("a", 0), ("a", 40), ("a", 80), ("a", 120)],
                &[],
            ),
            (
                "exactly the window apart does not count",
                &[("a", 0), ("a", 30), ("a", 60)],
                &[],
            ),
            (
                "once per window while it keeps looping",
                &[
                    ("a", 0),
                    ("a", 1),
                    ("a", 2),
                    ("a", 3),
                    ("a", 30),
                    ("a", 61),
                    ("a", 62),
                    ("a", 63),
                ],
                &[("a", 2), ("a", 62)],
            ),
            (
                "agents are counted apart",
                &[("a", 0), ("b", 1), ("a", 2), ("b", 3), ("b", 4), ("a", 5)],
                &[("b", 4), ("a", 5)],
            ),
        ];
        for (what, feed, want) in cases {
            assert_eq!(run(Debouncer::restarted, feed,), alerts(want), "{what}");
        }
    }

    #[test]
    fn rate_limit_storms() {
        let cases: &[(&str, Feed, Feed)] = &[
            (
                "three refusals are no storm",
                &[("a", 0), ("a", 0), ("a", 1)],
                &[],
            ),
            (
                "four within the window",
                &[("a", 0), ("a", 1), ("a", 2), ("a", 3)],
                &[("a", 3)],
            ),
            (
                "four, but slower than the window",
                &[("a", 0), ("a", 4), ("a", 8), ("a", 12), ("a", 16)],
                &[],
            ),
            (
                "a long storm alerts once per quiet period",
                &[
                    ("a", 0),
                    ("a", 1),
                    ("a", 2),
                    ("a", 3), // alert
                    ("a", 50),
                    ("a", 51),
                    ("a", 52),
                    ("a", 53), // quiet
                    ("a", 100),
                    ("a", 101),
                    ("a", 102),
                    ("a", 103), // alert again
                ],
                &[("a", 3), ("a", 103)],
            ),
            (
                "one agent's storm is not another's",
                &[("a", 0), ("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 3)],
                &[("a", 3)],
            ),
        ];
        for (what, feed, want) in cases {
            assert_eq!(run(Debouncer::rate_limited, feed), alerts(want), "{what}");
        }
    }

    #[test]
    fn detected_events_carry_the_thresholds() {
        let (mut d, t0) = debouncer();
        for i in 0..3 {
            d.rate_limited("a", t0 + i * S);
        }
        assert_eq!(
            d.rate_limited("a", t0 + 3 * S),
            Some(AlertEvent::RateLimitStorm {
                agent: "a".into(),
                refused: 4,
                window: 10 * S
            })
        );
        d.restarted("a", t0);
        d.restarted("a", t0);
        assert_eq!(
            d.restarted("a", t0),
            Some(AlertEvent::CrashLooping {
                agent: "a".into(),
                restarts: 3,
                window: 60 * S
            })
        );
    }

    #[test]
    fn composed_events() {
        let (mut d, t0) = debouncer();
        let month = |m| Month::new(2026, m).unwrap();
        let ceiling = |agent: &str, m| AlertEvent::CeilingReached {
            agent: agent.into(),
            month: month(m),
            message: "m".into(),
        };
        let threshold = |agent: &str, m| AlertEvent::BudgetThreshold {
            agent: agent.into(),
            month: month(m),
            kind: crate::budget::CeilingKind::Tokens,
            percent: 80,
            used: 8,
            ceiling: 10,
        };
        let quarantined = AlertEvent::Quarantined {
            agent: "a".into(),
            reason: "r".into(),
            evidence_summary: String::new(),
        };
        let storm = AlertEvent::RateLimitStorm {
            agent: "a".into(),
            refused: 9,
            window: S,
        };
        let crash = AlertEvent::CrashLooping {
            agent: "a".into(),
            restarts: 9,
            window: S,
        };
        let steps: &[(&AlertEvent, u64, bool, &str)] = &[
            (&ceiling("a", 3), 0, true, "first ceiling of the month"),
            (&ceiling("a", 3), 1, false, "same agent, same month"),
            (&ceiling("b", 3), 1, true, "another agent"),
            (&ceiling("a", 4), 2, true, "a new month"),
            (
                &ceiling("a", 3),
                3,
                true,
                "back to the older month (clock set back)",
            ),
            (
                &threshold("a", 3),
                0,
                true,
                "soft alert apart from the ceiling's",
            ),
            (&threshold("a", 3), 1, false, "soft alert once a month"),
            (&threshold("b", 3), 1, true, "soft alert of another agent"),
            (&threshold("a", 4), 2, true, "soft alert in a new month"),
            (&quarantined, 0, true, "quarantine"),
            (&quarantined, 0, true, "every quarantine"),
            (&storm, 0, true, "first storm"),
            (&storm, 99, false, "within the quiet period"),
            (&storm, 100, true, "after the quiet period"),
            (&crash, 0, true, "first crash loop"),
            (&crash, 59, false, "within the window"),
            (&crash, 60, true, "after the window"),
        ];
        for (event, secs, want, what) in steps {
            assert_eq!(
                d.admit(event, t0 + Duration::from_secs(*secs)),
                *want,
                "{what}"
            );
        }
    }

    #[test]
    fn detected_and_composed_storms_share_the_quiet_period() {
        let (mut d, t0) = debouncer();
        let storm = AlertEvent::RateLimitStorm {
            agent: "a".into(),
            refused: 9,
            window: S,
        };
        assert!(d.admit(&storm, t0));
        let detected: Vec<_> = (0..4)
            .filter_map(|i| d.rate_limited("a", t0 + i * S))
            .collect();
        assert!(detected.is_empty(), "{detected:?}");
    }

    #[test]
    fn new_thresholds_apply_to_what_follows() {
        let (mut d, t0) = debouncer();
        d.set_thresholds(
            CrashLoopSpec {
                restarts: 1,
                window: S,
            },
            StormSpec {
                refusals: 1,
                window: S,
                quiet: S,
            },
        );
        assert!(d.restarted("a", t0).is_some());
        assert!(d.rate_limited("a", t0).is_some());
        assert!(d.rate_limited("a", t0 + S).is_some());
    }

    #[test]
    fn memory_stays_at_the_threshold() {
        let (mut d, t0) = debouncer();
        for i in 0..10_000 {
            d.rate_limited("a", t0 + Duration::from_millis(i));
        }
        assert_eq!(d.refusals["a"].times.len(), 4);
    }
}
