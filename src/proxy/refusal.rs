//! Answers the proxy gives itself — refusals and its own failures — in the
//! provider's own error shape, so the official SDKs raise their usual typed
//! errors and honour `retry-after` / `x-should-retry`. Pure: builds values,
//! sends nothing. A refusal is never forwarded upstream and never costs money.

use std::time::Duration;

use serde_json::json;

/// The wire dialect an agent speaks to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// Anthropic Messages: `{"type":"error","error":{"type":...,"message":...}}`.
    Anthropic,
    /// OpenAI: `{"error":{"message":...,"type":...,"code":...}}`.
    OpenAi,
}

/// Why the proxy answered itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalKind {
    /// Unknown, stale or missing scoped token (401).
    Unauthenticated,
    /// Per-agent rate bucket empty (429 + retry-after; the SDKs retry).
    RateLimited { retry_after: Duration },
    /// The proxy as a whole is at a cap shared by every agent (503 +
    /// retry-after; the SDKs retry).
    Overloaded { retry_after: Duration },
    /// Monthly ceiling reached (429 + `x-should-retry: false`).
    CeilingReached,
    /// Agent quarantined as a runaway (403, `x-should-retry: false`).
    Quarantined,
    /// Body is not what the API takes (400).
    BadRequest,
    /// Body over `proxy.max_body` (413).
    TooLarge,
    /// Path the proxy does not meter or forward (404).
    NotFound,
    /// Upstream could not be reached (502).
    UpstreamUnreachable,
    /// Upstream did not answer in time (504).
    UpstreamTimeout,
    /// The proxy itself failed, e.g. the ledger is unwritable (500). Fails closed.
    Internal,
}

/// A ready-to-send answer: status, extra headers and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: serde_json::Value,
}

impl Refusal {
    /// Builds the refusal; `message` names the agent and why (never a secret).
    pub fn new(api: Api, kind: RefusalKind, message: impl Into<String>) -> Self {
        let message = message.into();
        let (status, anthropic_type, openai_type, openai_code) = match kind {
            RefusalKind::Unauthenticated => (
                401,
                "authentication_error",
                "invalid_request_error",
                "invalid_api_key",
            ),
            RefusalKind::RateLimited { .. } => (
                429,
                "rate_limit_error",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            RefusalKind::Overloaded { .. } => {
                (503, "overloaded_error", "server_error", "overloaded")
            }
            RefusalKind::CeilingReached => (
                429,
                "rate_limit_error",
                "insufficient_quota",
                "insufficient_quota",
            ),
            RefusalKind::Quarantined => (
                403,
                "permission_error",
                "permission_error",
                "agent_quarantined",
            ),
            RefusalKind::BadRequest => (
                400,
                "invalid_request_error",
                "invalid_request_error",
                "invalid_request",
            ),
            RefusalKind::TooLarge => (
                413,
                "request_too_large",
                "invalid_request_error",
                "request_too_large",
            ),
            RefusalKind::NotFound => (404, "not_found_error", "invalid_request_error", "not_found"),
            RefusalKind::UpstreamUnreachable => (502, "api_error", "server_error", "bad_gateway"),
            RefusalKind::UpstreamTimeout => (504, "timeout_error", "server_error", "timeout"),
            RefusalKind::Internal => (500, "api_error", "server_error", "internal_error"),
        };
        let mut headers = Vec::new();
        match &kind {
            RefusalKind::RateLimited { retry_after } | RefusalKind::Overloaded { retry_after } => {
                // Whole seconds, at least 1, at most 60: the SDKs sleep for it and retry.
                let secs = retry_after.as_secs_f64().ceil().clamp(1.0, 60.0) as u64;
                headers.push(("retry-after", secs.to_string()));
                headers.push(("retry-after-ms", (secs * 1000).to_string()));
            }
            RefusalKind::CeilingReached
            | RefusalKind::Quarantined
            | RefusalKind::Unauthenticated => {
                headers.push(("x-should-retry", "false".to_owned()));
            }
            _ => {}
        }
        let body = match api {
            Api::Anthropic => json!({
                "type": "error",
                "error": { "type": anthropic_type, "message": message },
            }),
            Api::OpenAi => json!({
                "error": {
                    "message": message,
                    "type": openai_type,
                    "param": null,
                    "code": openai_code,
                },
            }),
        };
        Self {
            status,
            headers,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_per_api() {
        let a = Refusal::new(
            Api::Anthropic,
            RefusalKind::Quarantined,
            "agent \"x\" is quarantined",
        );
        assert_eq!(a.status, 403);
        assert_eq!(a.body["type"], "error");
        assert_eq!(a.body["error"]["type"], "permission_error");
        assert_eq!(a.body["error"]["message"], "agent \"x\" is quarantined");
        assert!(a.headers.contains(&("x-should-retry", "false".into())));

        let o = Refusal::new(Api::OpenAi, RefusalKind::Unauthenticated, "unknown token");
        assert_eq!(o.status, 401);
        assert_eq!(o.body["error"]["code"], "invalid_api_key");
        assert_eq!(o.body["error"]["message"], "unknown token");
    }

    #[test]
    fn retry_after_is_whole_seconds_between_1_and_60() {
        for (given, want) in [
            (0, "1"),
            (1, "1"),
            (1500, "2"),
            (59_001, "60"),
            (600_000, "60"),
        ] {
            let r = Refusal::new(
                Api::Anthropic,
                RefusalKind::RateLimited {
                    retry_after: Duration::from_millis(given),
                },
                "slow down",
            );
            assert_eq!(r.status, 429);
            assert!(
                r.headers.contains(&("retry-after", want.to_owned())),
                "{given}: {:?}",
                r.headers
            );
        }
    }

    #[test]
    fn overloaded_is_503_and_retried() {
        let r = Refusal::new(
            Api::Anthropic,
            RefusalKind::Overloaded {
                retry_after: Duration::from_secs(1),
            },
            "busy",
        );
        assert_eq!(r.status, 503);
        assert_eq!(r.body["error"]["type"], "overloaded_error");
        assert!(r.headers.contains(&("retry-after", "1".to_owned())));
        let o = Refusal::new(
            Api::OpenAi,
            RefusalKind::Overloaded {
                retry_after: Duration::from_secs(1),
            },
            "busy",
        );
        assert_eq!(o.body["error"]["code"], "overloaded");
    }

    #[test]
    fn ceiling_is_not_retried() {
        let r = Refusal::new(Api::OpenAi, RefusalKind::CeilingReached, "ceiling");
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("x-should-retry", "false".into())));
        assert!(!r.headers.iter().any(|(k, _)| *k == "retry-after"));
    }
}
