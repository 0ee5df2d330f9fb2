//! What crosses the control socket between the CLI and a running supervisor:
//! versioned transfer types, one JSON document per line each way. They are
//! separate from the supervisor's own types so either side can change its
//! internals without breaking the other. Must not carry secrets.

use serde::{Deserialize, Serialize};

/// Bumped when a change would break an older CLI or supervisor.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Status,
    Reload,
    Start { agent: String },
    Stop { agent: String },
    Restart { agent: String },
}

/// One agent as `supervisor status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatusRow {
    pub agent: String,
    /// `starting | running | backoff | stopping | stopped | exited | quarantined | locked_out`
    pub state: String,
    pub pid: Option<u32>,
    pub uptime_secs: Option<u64>,
    pub restarts: u32,
    /// e.g. `exit code 3`, `killed by SIGKILL`, `spawn failed: ...`
    pub last_exit: Option<String>,
    pub month: String,
    pub month_tokens: u64,
    pub month_usd: f64,
    pub monthly_tokens_ceiling: Option<u64>,
    pub monthly_usd_ceiling: Option<f64>,
    /// Whole tokens / requests left in the rate buckets now (negative = debt);
    /// `None` when the agent has no such limit.
    pub tokens_available: Option<i64>,
    pub requests_available: Option<i64>,
    pub quarantine_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status { agents: Vec<AgentStatusRow> },
    /// A reload was applied (counts by agent name).
    Reloaded {
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        unchanged: usize,
    },
    /// A reload was refused; the running fleet is unchanged. One line per problem.
    Rejected { errors: Vec<String> },
    Ok { message: String },
    Error { message: String },
}
