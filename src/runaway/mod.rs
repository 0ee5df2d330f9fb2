//! Runaway detection: recognises an agent stuck retrying a failure with an
//! ever-growing context (and, more slowly, a tool loop making no progress)
//! from summaries of its LLM calls. Pure: the proxy parses bodies and calls
//! in; containment (refuse, kill, quarantine, alert) lives elsewhere. Must not
//! do I/O or keep prompts, ids or secrets — evidence holds sizes, tool names
//! and normalised, truncated failure excerpts only.
//!
//! Per request: `RequestSummary::from_json` → `Detector::observe_request`
//! (before forwarding); per answer: `ResponseSummary::from_json` (or built
//! from the SSE tap) → `Detector::observe_response`.

mod config;
mod detector;
pub mod normalize;
pub mod summary;
pub mod velocity;

pub use config::{RunawayAction, RunawayConfig, RunawayConfigError};
pub use detector::{DEFAULT_CONVERSATIONS, Detector, Evidence, StepEvidence, TripReason, Verdict};
pub use normalize::Fingerprint;
pub use summary::{
    Api, ConversationKey, FailureId, InputUsage, RequestSummary, ResponseSummary, ServerState,
    SummaryError, ToolCall, parse_retry_count,
};
pub use velocity::{VelocityConfig, VelocityEvidence, VelocityWire};
