//! The validated, defaults-merged fleet: plain data that the rest of the
//! supervisor consumes. Owns no I/O; `fleet::load` is the only producer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::vault::SecretName;

/// A fleet.yaml after parsing, validation and merging `defaults` into each agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    /// The file this fleet was read from, as given on the command line.
    pub file: PathBuf,
    /// Directory holding the file; relative paths in it resolve against this.
    pub base_dir: PathBuf,
    pub version: u32,
    /// Where ledger.db and control.sock live. Resolved: `state_dir` from the file,
    /// else `$STATE_DIRECTORY`, else `<base_dir>/.supervisor`.
    pub state_dir: PathBuf,
    pub vault: VaultConfig,
    pub agents: BTreeMap<String, AgentSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultConfig {
    /// `<path>/<agent>/<name>`; `path` resolved against the fleet directory.
    Dir { path: PathBuf },
    /// `$CREDENTIALS_DIRECTORY/<agent>.<name>`.
    SystemdCreds,
    /// `SUPERVISOR_SECRET_<AGENT>_<NAME>` from the supervisor's environment (development only).
    Env,
}

/// One agent with `defaults` already merged in.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec {
    pub name: String,
    /// argv; never empty after validation.
    pub command: Vec<String>,
    /// Working directory, resolved against the fleet directory (default: the fleet directory).
    pub cwd: PathBuf,
    /// `defaults.env` overlaid by the agent's own `env`.
    pub env: BTreeMap<String, String>,
    /// Environment variable name → secret name in the vault.
    pub secrets: BTreeMap<String, SecretName>,
    pub restart: RestartSpec,
    pub stop: StopSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Never,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    /// Delay before the first restart (default 1s).
    pub backoff_initial: Duration,
    /// Cap on the doubling delay (default 5m).
    pub backoff_max: Duration,
    /// Healthy running time after which the backoff resets (default 10m).
    pub reset_after: Duration,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::OnFailure,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSpec {
    /// Sent to the agent's whole process group first (default SIGTERM).
    pub signal: Signal,
    /// Time allowed between `signal` and SIGKILL to the group (default 10s).
    pub grace: Duration,
}

impl Default for StopSpec {
    fn default() -> Self {
        Self {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(10),
        }
    }
}
