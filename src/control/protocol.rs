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
    Start {
        agent: String,
    },
    Stop {
        agent: String,
    },
    Restart {
        agent: String,
    },
    /// Commit every ledger write queued so far, so a reader of `ledger.db`
    /// (`supervisor usage`) sees each request that has already ended.
    FlushLedger,
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
    /// Which version of each secret the agent runs with (never a value).
    #[serde(default)]
    pub secrets: Vec<SecretVersion>,
}

/// The supervisor's descriptors and the proxy's caps, as `supervisor
/// status` shows them above the agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Descriptors open now and the soft `RLIMIT_NOFILE` (`None`: unknown).
    pub descriptors_open: Option<u64>,
    pub descriptor_limit: Option<u64>,
    /// Client connections to the proxy, and those not yet identified.
    pub proxy_connections: u64,
    pub proxy_unidentified: u64,
    pub proxy_max_connections: u64,
    pub proxy_max_unidentified_connections: u64,
    pub proxy_max_connections_per_agent: u64,
    /// Request-body bytes buffered now.
    pub proxy_body_in_flight: u64,
    pub proxy_max_body_in_flight: u64,
    pub proxy_max_body_in_flight_per_agent: u64,
}

/// One secret of an agent in `supervisor status`: fingerprints, never values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    /// The secret's name in the vault.
    pub name: String,
    /// Where it goes: the environment variable, or `llm[i]`.
    pub slot: String,
    /// `proxied` (swaps in place), `direct` or `env` (the process holds it).
    pub used_as: String,
    /// The version the vault holds now (first 12 hex digits of its SHA-256).
    pub fingerprint: String,
    /// Seconds since that version was first seen.
    pub age_secs: u64,
    /// The version the running process was launched with, when it holds one.
    pub running_fingerprint: Option<String>,
    /// The running process holds an older version than the vault's (its
    /// restart is queued, or failed).
    pub stale: bool,
}

/// A reload was applied. Every agent of the fleet is in exactly one of
/// `added`, `released`, `changed`, `changed_stopped`, `changed_live`,
/// `held` or counted in `unchanged`; `removed` names those it no longer
/// has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Changed in what shapes the process: restarted.
    pub changed: Vec<String>,
    pub unchanged: usize,
    /// Quarantined until this reload (`supervisor release`), started by it.
    #[serde(default)]
    pub released: Vec<String>,
    /// Budget or runaway settings changed: applied live, no restart.
    #[serde(default)]
    pub changed_live: Vec<LiveChange>,
    /// Quarantined: held down, whatever the file says.
    #[serde(default)]
    pub held: Vec<String>,
    /// Changed, but stopped by `supervisor stop`: not restarted; the new
    /// spec applies at `supervisor start`.
    #[serde(default)]
    pub changed_stopped: Vec<String>,
}

/// An agent whose settings a reload changed in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveChange {
    pub agent: String,
    /// The agent's settings that changed: `budget`, `runaway`.
    pub what: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        agents: Vec<AgentStatusRow>,
        /// The supervisor's own resources (absent from older supervisors).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<HostStatus>,
    },
    /// A reload was applied (boxed: the other answers are small).
    Reloaded(Box<ReloadReport>),
    /// A reload was refused; the running fleet is unchanged. One line per problem.
    Rejected {
        errors: Vec<String>,
    },
    Ok {
        message: String,
    },
    /// The command failed; `hint` says what to do about it.
    Error {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hint: Option<String>,
    },
}

impl Response {
    pub fn error(message: impl Into<String>, hint: Option<String>) -> Self {
        Response::Error {
            message: message.into(),
            hint,
        }
    }
}

impl Command {
    /// The agent a per-agent command names.
    pub fn agent(&self) -> Option<&str> {
        match self {
            Command::Start { agent } | Command::Stop { agent } | Command::Restart { agent } => {
                Some(agent)
            }
            Command::Status | Command::Reload | Command::FlushLedger => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload report stays a flat object tagged `reloaded`; one from an
    /// older supervisor, without the newer lists, still reads.
    #[test]
    fn a_reload_report_is_flat_and_reads_without_the_newer_lists() {
        let old = r#"{"result":"reloaded","added":["a"],"removed":[],"changed":[],"unchanged":2}"#;
        let Ok(Response::Reloaded(report)) = serde_json::from_str::<Response>(old) else {
            panic!("{old}");
        };
        assert_eq!(report.added, ["a"]);
        assert!(report.held.is_empty() && report.changed_live.is_empty());
        let json = serde_json::to_value(Response::Reloaded(report)).unwrap();
        assert_eq!(json["result"], "reloaded");
        assert_eq!(json["unchanged"], 2);
        assert_eq!(json["held"], serde_json::json!([]));
    }

    /// The wire shapes are a contract with older and newer CLIs: pin them.
    #[test]
    fn wire_shapes_are_pinned() {
        let cases: Vec<(Request, &str)> = vec![
            (
                Request {
                    version: 1,
                    command: Command::Status,
                },
                r#"{"version":1,"command":{"command":"status"}}"#,
            ),
            (
                Request {
                    version: 1,
                    command: Command::Stop { agent: "a".into() },
                },
                r#"{"version":1,"command":{"command":"stop","agent":"a"}}"#,
            ),
            (
                Request {
                    version: 1,
                    command: Command::FlushLedger,
                },
                r#"{"version":1,"command":{"command":"flush_ledger"}}"#,
            ),
        ];
        for (request, json) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request);
        }
        let error = Response::error("unknown agent `x`", None);
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"result":"error","message":"unknown agent `x`"}"#
        );
        let rejected = Response::Rejected {
            errors: vec!["f:1:2: bad".into()],
        };
        assert_eq!(
            serde_json::to_string(&rejected).unwrap(),
            r#"{"result":"rejected","errors":["f:1:2: bad"]}"#
        );
    }
}
