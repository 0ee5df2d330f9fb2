//! What an alert says: the events, and the JSON payload both sinks receive
//! (a Slack-compatible `text` plus structured fields). Pure: the time and the
//! fleet name come in as arguments. Must not decide whether an event is worth
//! sending (that is `debounce`) nor deliver it (that is `sink`).

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::budget::{CeilingKind, Month, group_thousands};
use crate::redact::Redactor;

/// Version of the payload's shape, for receivers that parse it.
pub const PAYLOAD_VERSION: u32 = 1;

/// Longest `text`, in characters: evidence can be long, chat messages should not be.
const MAX_TEXT_CHARS: usize = 3000;

/// Something an operator should hear about. Texts in it must hold no secret:
/// they are sent to the sinks as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertEvent {
    /// The agent was stopped and will not run again until released.
    Quarantined {
        agent: String,
        reason: String,
        evidence_summary: String,
    },
    /// The agent shows the runaway pattern but its `runaway.action` is
    /// `alert`, so it keeps running.
    RunawayDetected {
        agent: String,
        reason: String,
        evidence_summary: String,
    },
    /// The agent spent faster than `runaway.velocity` allows and its
    /// `velocity.action` is `alert`, so it keeps running. One per episode
    /// (the wire re-arms once the agent calms down).
    SpendVelocity {
        agent: String,
        reason: String,
        window_secs: u64,
        spend_tokens: u64,
        /// `None` while the agent has too little history for a baseline.
        baseline_tokens: Option<u64>,
        threshold_tokens: u64,
    },
    /// The agent's monthly ceiling refused a request.
    CeilingReached {
        agent: String,
        month: Month,
        message: String,
    },
    /// The agent's settled usage this month reached `percent`% (its
    /// `budget.alert_at`) of a monthly ceiling: a warning before refusals start.
    /// `used` and `ceiling` are tokens, or micro-USD for [`CeilingKind::Usd`].
    BudgetThreshold {
        agent: String,
        month: Month,
        kind: CeilingKind,
        percent: u32,
        used: u64,
        ceiling: u64,
    },
    /// The agent restarted `restarts` times within `window`.
    CrashLooping {
        agent: String,
        restarts: u32,
        window: Duration,
    },
    /// `refused` of the agent's requests were rate-limited within `window`.
    RateLimitStorm {
        agent: String,
        refused: u32,
        window: Duration,
    },
    /// Rotating one of the agent's secrets failed; the old version keeps working.
    RotationFailed {
        agent: String,
        secret: String,
        message: String,
    },
}

impl AlertEvent {
    /// The payload's `event` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Quarantined { .. } => "agent_quarantined",
            Self::RunawayDetected { .. } => "runaway_detected",
            Self::SpendVelocity { .. } => "spend_velocity",
            Self::CeilingReached { .. } => "ceiling_reached",
            Self::BudgetThreshold { .. } => "budget_threshold",
            Self::CrashLooping { .. } => "crash_looping",
            Self::RateLimitStorm { .. } => "rate_limit_storm",
            Self::RotationFailed { .. } => "rotation_failed",
        }
    }

    pub fn agent(&self) -> &str {
        match self {
            Self::Quarantined { agent, .. }
            | Self::RunawayDetected { agent, .. }
            | Self::SpendVelocity { agent, .. }
            | Self::CeilingReached { agent, .. }
            | Self::BudgetThreshold { agent, .. }
            | Self::CrashLooping { agent, .. }
            | Self::RateLimitStorm { agent, .. }
            | Self::RotationFailed { agent, .. } => agent,
        }
    }

    /// The event with every value of `redactor` masked in its texts.
    pub fn redacted(self, redactor: &Redactor) -> Self {
        let mask = |text: String| match redactor.redact(&text) {
            std::borrow::Cow::Borrowed(_) => text,
            std::borrow::Cow::Owned(masked) => masked,
        };
        match self {
            Self::Quarantined {
                agent,
                reason,
                evidence_summary,
            } => Self::Quarantined {
                agent,
                reason: mask(reason),
                evidence_summary: mask(evidence_summary),
            },
            Self::RunawayDetected {
                agent,
                reason,
                evidence_summary,
            } => Self::RunawayDetected {
                agent,
                reason: mask(reason),
                evidence_summary: mask(evidence_summary),
            },
            Self::CeilingReached {
                agent,
                month,
                message,
            } => Self::CeilingReached {
                agent,
                month,
                message: mask(message),
            },
            Self::RotationFailed {
                agent,
                secret,
                message,
            } => Self::RotationFailed {
                agent,
                secret,
                message: mask(message),
            },
            Self::SpendVelocity {
                agent,
                reason,
                window_secs,
                spend_tokens,
                baseline_tokens,
                threshold_tokens,
            } => Self::SpendVelocity {
                agent,
                reason: mask(reason),
                window_secs,
                spend_tokens,
                baseline_tokens,
                threshold_tokens,
            },
            other @ (Self::BudgetThreshold { .. }
            | Self::CrashLooping { .. }
            | Self::RateLimitStorm { .. }) => other,
        }
    }

    /// One line for people, without the fleet name or the evidence.
    pub fn headline(&self) -> String {
        match self {
            Self::Quarantined { agent, reason, .. } => {
                format!("agent `{agent}` quarantined: {reason}")
            }
            Self::RunawayDetected { agent, reason, .. } => format!(
                "agent `{agent}` shows the runaway pattern and keeps running (`runaway.action: alert`): {reason}"
            ),
            Self::SpendVelocity { agent, reason, .. } => format!(
                "agent `{agent}` is spending unusually fast and keeps running (`runaway.velocity.action: alert`): {reason}"
            ),
            Self::CeilingReached { agent, month, .. } => format!(
                "agent `{agent}` reached its monthly ceiling for {month}; its LLM requests are refused until {} or a higher ceiling",
                month.next()
            ),
            Self::BudgetThreshold {
                agent,
                month,
                kind,
                percent,
                used,
                ceiling,
            } => {
                let (used, ceiling, field) = match kind {
                    CeilingKind::Tokens => (
                        format!("{} tokens", group_thousands(*used)),
                        format!("{} tokens", group_thousands(*ceiling)),
                        "monthly_tokens",
                    ),
                    CeilingKind::Usd => (
                        format!("${:.2}", *used as f64 / 1e6),
                        format!("${:.2}", *ceiling as f64 / 1e6),
                        "monthly_usd",
                    ),
                };
                format!(
                    "agent `{agent}` used {used} of its `budget.{field}` of {ceiling} for {month}, past its `alert_at` of {percent}%; requests are refused once the ceiling is reached"
                )
            }
            Self::CrashLooping {
                agent,
                restarts,
                window,
            } => format!(
                "agent `{agent}` is crash-looping: {restarts} restarts within {}",
                humantime::format_duration(*window)
            ),
            Self::RateLimitStorm {
                agent,
                refused,
                window,
            } => format!(
                "agent `{agent}` is in a rate-limit storm: {refused} requests refused within {}; it may be retrying in a tight loop, or its rate limits are too low",
                humantime::format_duration(*window)
            ),
            Self::RotationFailed { agent, secret, .. } => format!(
                "rotating secret `{secret}` of agent `{agent}` failed; its current version keeps working"
            ),
        }
    }

    /// The text under the headline, if the event carries one.
    fn detail(&self) -> Option<&str> {
        let text = match self {
            Self::Quarantined {
                evidence_summary, ..
            }
            | Self::RunawayDetected {
                evidence_summary, ..
            } => evidence_summary,
            Self::CeilingReached { message, .. } | Self::RotationFailed { message, .. } => message,
            _ => return None,
        };
        (!text.trim().is_empty()).then_some(text.as_str())
    }
}

/// The JSON both sinks receive: `text` for Slack-compatible webhooks, then
/// `version`, `event`, `agent`, `fleet`, `time` (RFC 3339, UTC) and the
/// event's own fields.
pub fn payload(event: &AlertEvent, fleet: &str, time: SystemTime) -> Value {
    let mut text = format!("[{fleet}] {}", event.headline());
    if let Some(detail) = event.detail() {
        text.push('\n');
        text.push_str(detail);
    }
    let mut body = json!({
        "text": slack_escape(&truncate(&text, MAX_TEXT_CHARS)),
        "version": PAYLOAD_VERSION,
        "event": event.kind(),
        "agent": event.agent(),
        "fleet": fleet,
        "time": humantime::format_rfc3339_seconds(time).to_string(),
    });
    let fields = match event {
        AlertEvent::Quarantined {
            reason,
            evidence_summary,
            ..
        }
        | AlertEvent::RunawayDetected {
            reason,
            evidence_summary,
            ..
        } => json!({ "reason": reason, "evidence_summary": evidence_summary }),
        AlertEvent::SpendVelocity {
            reason,
            window_secs,
            spend_tokens,
            baseline_tokens,
            threshold_tokens,
            ..
        } => json!({
            "reason": reason, "window_secs": window_secs, "spend_tokens": spend_tokens,
            "baseline_tokens": baseline_tokens, "threshold_tokens": threshold_tokens,
        }),
        AlertEvent::CeilingReached { month, message, .. } => {
            json!({ "month": month.to_string(), "message": message })
        }
        AlertEvent::BudgetThreshold {
            month,
            kind,
            percent,
            used,
            ceiling,
            ..
        } => match kind {
            CeilingKind::Tokens => json!({
                "month": month.to_string(), "ceiling_field": "budget.monthly_tokens",
                "percent": percent, "used_tokens": used, "ceiling_tokens": ceiling,
            }),
            CeilingKind::Usd => json!({
                "month": month.to_string(), "ceiling_field": "budget.monthly_usd",
                "percent": percent, "used_usd": *used as f64 / 1e6, "ceiling_usd": *ceiling as f64 / 1e6,
            }),
        },
        AlertEvent::CrashLooping {
            restarts, window, ..
        } => json!({ "restarts": restarts, "window_secs": window.as_secs() }),
        AlertEvent::RateLimitStorm {
            refused, window, ..
        } => json!({ "refused": refused, "window_secs": window.as_secs() }),
        AlertEvent::RotationFailed {
            secret, message, ..
        } => json!({ "secret": secret, "message": message }),
    };
    if let (Some(body), Value::Object(fields)) = (body.as_object_mut(), fields) {
        body.extend(fields);
    }
    body
}

/// Slack reads `&`, `<` and `>` in `text` as markup (links, mentions); an
/// HTML error page in the evidence must show as text, not ping anyone.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn month(y: i32, m: u8) -> Month {
        Month::new(y, m).unwrap()
    }

    #[test]
    fn redacted_masks_every_text() {
        let secrets = [crate::vault::Secret::new("hunter22-key".into())];
        let r = Redactor::new(&secrets);
        let events = [
            AlertEvent::Quarantined {
                agent: "a".into(),
                reason: "runaway: hunter22-key".into(),
                evidence_summary: "step 1: hunter22-key rejected".into(),
            },
            AlertEvent::RunawayDetected {
                agent: "a".into(),
                reason: "x hunter22-key".into(),
                evidence_summary: "hunter22-key".into(),
            },
            AlertEvent::SpendVelocity {
                agent: "a".into(),
                reason: "spend velocity: hunter22-key".into(),
                window_secs: 600,
                spend_tokens: 1,
                baseline_tokens: Some(1),
                threshold_tokens: 1,
            },
            AlertEvent::CeilingReached {
                agent: "a".into(),
                month: month(2025, 3),
                message: "over hunter22-key".into(),
            },
        ];
        for event in events {
            let masked = event.clone().redacted(&r);
            let text = format!("{masked:?}");
            assert!(!text.contains("hunter22"), "{text}");
            assert!(text.contains("[REDACTED]"), "{text}");
            assert_eq!(masked.kind(), event.kind());
        }
        let storm = AlertEvent::RateLimitStorm {
            agent: "a".into(),
            refused: 3,
            window: Duration::from_secs(60),
        };
        assert_eq!(storm.clone().redacted(&r), storm);
    }

    #[test]
    fn payloads_for_every_event() {
        // 2026-03-14T15:09:26Z
        let time = at(1_773_500_966);
        let cases: Vec<(AlertEvent, Value)> = vec![
            (
                AlertEvent::Quarantined {
                    agent: "notes".into(),
                    reason: "failing retries with growing context (4 in a row)".into(),
                    evidence_summary: "#1 12k tokens <html>502</html>\n#2 14k tokens".into(),
                },
                json!({
                    "text": "[demo] agent `notes` quarantined: failing retries with growing context (4 in a row)\n#1 12k tokens &lt;html&gt;502&lt;/html&gt;\n#2 14k tokens",
                    "version": 1,
                    "event": "agent_quarantined",
                    "agent": "notes",
                    "fleet": "demo",
                    "time": "2026-03-14T15:09:26Z",
                    "reason": "failing retries with growing context (4 in a row)",
                    "evidence_summary": "#1 12k tokens <html>502</html>\n#2 14k tokens",
                }),
            ),
            (
                AlertEvent::SpendVelocity {
                    agent: "crawler".into(),
                    reason: "spend velocity: 55,106 tokens in the last 10m (10 requests)".into(),
                    window_secs: 600,
                    spend_tokens: 55_106,
                    baseline_tokens: None,
                    threshold_tokens: 50_000,
                },
                json!({
                    "text": "[demo] agent `crawler` is spending unusually fast and keeps running (`runaway.velocity.action: alert`): spend velocity: 55,106 tokens in the last 10m (10 requests)",
                    "version": 1,
                    "event": "spend_velocity",
                    "agent": "crawler",
                    "fleet": "demo",
                    "time": "2026-03-14T15:09:26Z",
                    "reason": "spend velocity: 55,106 tokens in the last 10m (10 requests)",
                    "window_secs": 600,
                    "spend_tokens": 55_106,
                    "baseline_tokens": null,
                    "threshold_tokens": 50_000,
                }),
            ),
            (
                AlertEvent::CeilingReached {
                    agent: "sparkles".into(),
                    month: month(2026, 12),
                    message:
                        "agent \"sparkles\" reached its monthly ceiling: $150.00 of $150.00 used"
                            .into(),
                },
                json!({
                    "text": "[demo] agent `sparkles` reached its monthly ceiling for 2026-12; its LLM requests are refused until 2027-01 or a higher ceiling\nagent \"sparkles\" reached its monthly ceiling: $150.00 of $150.00 used",
                    "version": 1,
                    "event": "ceiling_reached",
                    "agent": "sparkles",
                    "fleet": "demo",
                    "time": "2026-03-14T15:09:26Z",
                    "month": "2026-12",
                    "message": "agent \"sparkles\" reached its monthly ceiling: $150.00 of $150.00 used",
                }),
            ),
            (
                AlertEvent::BudgetThreshold {
                    agent: "sparkles".into(),
                    month: month(2026, 12),
                    kind: CeilingKind::Tokens,
                    percent: 80,
                    used: 32_000_000,
                    ceiling: 40_000_000,
                },
                json!({
                    "text": "[demo] agent `sparkles` used 32,000,000 tokens of its `budget.monthly_tokens` of 40,000,000 tokens for 2026-12, past its `alert_at` of 80%; requests are refused once the ceiling is reached",
                    "version": 1,
                    "event": "budget_threshold",
                    "agent": "sparkles",
                    "fleet": "demo",
                    "time": "2026-03-14T15:09:26Z",
                    "month": "2026-12",
                    "ceiling_field": "budget.monthly_tokens",
                    "percent": 80,
                    "used_tokens": 32_000_000,
                    "ceiling_tokens": 40_000_000,
                }),
            ),
            (
                AlertEvent::BudgetThreshold {
                    agent: "s".into(),
                    month: month(2026, 12),
                    kind: CeilingKind::Usd,
                    percent: 50,
                    used: 75_500_000,
                    ceiling: 150_000_000,
                },
                json!({
                    "text": "[demo] agent `s` used $75.50 of its `budget.monthly_usd` of $150.00 for 2026-12, past its `alert_at` of 50%; requests are refused once the ceiling is reached",
                    "version": 1,
                    "event": "budget_threshold",
                    "agent": "s",
                    "fleet": "demo",
                    "time": "2026-03-14T15:09:26Z",
                    "month": "2026-12",
                    "ceiling_field": "budget.monthly_usd",
                    "percent": 50,
                    "used_usd": 75.5,
                    "ceiling_usd": 150.0,
                }),
            ),
            (
                AlertEvent::CrashLooping {
                    agent: "a".into(),
                    restarts: 5,
                    window: Duration::from_secs(600),
                },
                json!({
                    "text": "[demo] agent `a` is crash-looping: 5 restarts within 10m",
                    "version": 1,
                    "event": "crash_looping",
                    "agent": "a",
                    "fleet": "demo",
                    "time": "2026-03-14T15:09:26Z",
                    "restarts": 5,
                    "window_secs": 600,
                }),
            ),
            (
                AlertEvent::RateLimitStorm {
                    agent: "b".into(),
                    refused: 20,
                    window: Duration::from_secs(60),
                },
                json!({
                    "text": "[demo] agent `b` is in a rate-limit storm: 20 requests refused within 1m; it may be retrying in a tight loop, or its rate limits are too low",
                    "version": 1,
                    "event": "rate_limit_storm",
                    "agent": "b",
                    "fleet": "demo",
                    "time": "2026-03-14T15:09:26Z",
                    "refused": 20,
                    "window_secs": 60,
                }),
            ),
        ];
        for (event, want) in cases {
            assert_eq!(payload(&event, "demo", time), want, "{}", event.kind());
        }
    }

    #[test]
    fn empty_evidence_adds_no_line_and_long_text_is_cut() {
        let event = AlertEvent::Quarantined {
            agent: "a".into(),
            reason: "r".into(),
            evidence_summary: "  ".into(),
        };
        assert_eq!(
            payload(&event, "f", at(0))["text"],
            "[f] agent `a` quarantined: r"
        );

        let event = AlertEvent::Quarantined {
            agent: "a".into(),
            reason: "r".into(),
            evidence_summary: "é".repeat(10_000),
        };
        let body = payload(&event, "f", at(0));
        let text = body["text"].as_str().unwrap();
        assert_eq!(text.chars().count(), MAX_TEXT_CHARS + 1);
        assert!(text.ends_with("é…"));
        assert_eq!(
            body["evidence_summary"].as_str().unwrap().chars().count(),
            10_000,
            "structured fields stay whole"
        );
    }

    #[test]
    fn escaping_and_truncation() {
        assert_eq!(slack_escape("a & <b> c"), "a &amp; &lt;b&gt; c");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "abc…");
        assert_eq!(truncate("", 0), "");
    }
}
