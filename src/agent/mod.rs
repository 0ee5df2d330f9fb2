//! One actor per agent: spawn (cleared environment, own process group),
//! watch, stop, restart with backoff. Owns the agents' child processes and
//! nothing else: it never reads fleet.yaml or the vault (callers hand it an
//! [`AgentLaunch`]) and never decides about quarantine.

mod actor;
pub mod backoff;
pub mod launch;
pub mod output;
pub mod process_group;
pub mod reaper;
mod status;

pub use actor::{AgentHandle, AgentLaunch};
pub use backoff::{Backoff, Exit, should_restart};
pub use launch::child_env;
pub use process_group::{ProcessGroup, become_subreaper};
pub use reaper::spawn_orphan_reaper;
pub use status::{AgentState, AgentStatus, ExitInfo};
