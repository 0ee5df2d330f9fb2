//! What an agent actor reports about itself: plain data published on a watch
//! channel. Owns no behaviour; the supervisor, the control socket and the
//! tests read it, only the actor writes it.

use std::time::{Duration, Instant, SystemTime};

use super::backoff::Exit;

/// A snapshot of one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentStatus {
    pub state: AgentState,
    /// The leader's pid, which is also the process group id, while any process
    /// of the agent exists (through `Stopping` too).
    pub pid: Option<u32>,
    /// Starts after the first one, automatic or requested.
    pub restarts: u32,
    /// How the previous run ended.
    pub last_exit: Option<ExitInfo>,
}

impl AgentStatus {
    pub(crate) fn new() -> Self {
        Self {
            state: AgentState::Starting,
            pid: None,
            restarts: 0,
            last_exit: None,
        }
    }
}

/// Where an agent is in its life; each variant carries what that state has.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentState {
    /// About to spawn.
    Starting,
    /// The leader runs.
    Running { since: Instant },
    /// Crashed (or spawn failed); the next start is due at `until`. `attempt`
    /// counts consecutive restarts without a healthy run, starting at 1.
    Backoff { until: Instant, attempt: u32 },
    /// The group is being signalled and has not yet emptied: after `stop`,
    /// `kill` or `restart`, or when the leader exited leaving processes behind.
    Stopping { since: Instant },
    /// Stopped on request; stays down until `start` or `restart`.
    Stopped,
    /// Ended by itself and the restart policy says not to start it again.
    Exited { exit: Exit },
}

/// How and when a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    pub exit: Exit,
    pub ran_for: Duration,
    pub at: SystemTime,
}
