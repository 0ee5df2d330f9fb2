//! The validated, defaults-merged fleet: plain data that the rest of the
//! supervisor consumes. Owns no I/O; `fleet::load` is the only producer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::alert::WebhookUrl;
use crate::pricing::Prices;
use crate::proxy::refusal::Api;
use crate::runaway::RunawayConfig;
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
    pub proxy: ProxySpec,
    /// The admin listener (`/metrics`, `/healthz`); `None` when not configured.
    pub admin: Option<AdminSpec>,
    pub providers: BTreeMap<String, ProviderSpec>,
    pub alerts: AlertsSpec,
    pub agents: BTreeMap<String, AgentSpec>,
    /// Rotation policies, by agent and secret name (only secrets written in
    /// the object form with `rotate_every`).
    pub rotation: BTreeMap<String, BTreeMap<SecretName, RotationPolicy>>,
}

/// When and how the supervisor renews one secret by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Age after which a new version is issued (`rotate_every`).
    pub every: Duration,
    /// Prints the new value on stdout; run in the fleet directory.
    pub issuer: Vec<String>,
    /// Gets `{"secret", "agent", "fingerprint"}` of the old version on stdin
    /// once `grace` has passed since the swap.
    pub revoke: Option<Vec<String>>,
    /// How long the old version stays valid after the new one is live (default 1h).
    pub grace: Duration,
}

/// The metering proxy's listener and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySpec {
    /// Default `127.0.0.1:7878`: loopback, so only this host's agents reach it.
    pub listen: SocketAddr,
    /// Largest request body accepted (default 32 MiB).
    pub max_body: u64,
    /// Longest wait for an upstream answer to start, and between its chunks (default 10m).
    pub upstream_timeout: Duration,
    /// Client connections open at once, in total (default: what the
    /// descriptor limit affords, see `proxy::capacity`).
    pub max_connections: Option<usize>,
    /// Connections whose first request's headers have not arrived yet
    /// (default a quarter of `max_connections`); the oldest is evicted.
    pub max_unidentified_connections: Option<usize>,
    /// Connections one agent may hold, in flight or idle (default a quarter
    /// of `max_connections`, within 4..=256).
    pub max_connections_per_agent: Option<usize>,
    /// Request-body bytes buffered at once, in total (default a sixteenth of
    /// memory up to 1GiB, but at least 2×`max_body`; at most 64GiB).
    pub max_body_in_flight: Option<u64>,
    /// Request-body bytes one agent may have buffered at once (default an
    /// eighth of the total, at least `max_body`, at most the total).
    pub max_body_in_flight_per_agent: Option<u64>,
    /// How long a request's headers may take, and a keep-alive connection
    /// may idle (default 10s).
    pub header_timeout: Duration,
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            max_body: 32 << 20,
            upstream_timeout: Duration::from_secs(600),
            max_connections: None,
            max_unidentified_connections: None,
            max_connections_per_agent: None,
            max_body_in_flight: None,
            max_body_in_flight_per_agent: None,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// `admin:`: where `/metrics` and `/healthz` are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminSpec {
    /// Default `127.0.0.1:7879`: loopback, so only this host can scrape it.
    pub listen: SocketAddr,
}

impl Default for AdminSpec {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7879)),
        }
    }
}

/// `alerts:`: where alerts are delivered, and when repeated trouble becomes
/// one alert. With no sink, alerts are only logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertsSpec {
    /// POSTed a JSON payload (Slack-compatible `text` plus structured fields).
    pub webhook: Option<WebhookUrl>,
    /// Run with the JSON payload on stdin.
    pub command: Option<AlertCommand>,
    pub crash_loop: CrashLoopSpec,
    pub rate_limit_storm: StormSpec,
}

/// The `alerts.command` program, run in the fleet directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertCommand {
    /// Never empty; a relative program path with a `/` is already resolved
    /// against `cwd`, a bare name is looked up on `PATH`.
    pub argv: Vec<String>,
    /// The fleet directory, so `[python3, alerts/notify.py]` works as written.
    pub cwd: PathBuf,
}

/// An agent is crash-looping when it restarts `restarts` times within `window`;
/// it is alerted at most once per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashLoopSpec {
    pub restarts: u32,
    pub window: Duration,
}

impl Default for CrashLoopSpec {
    fn default() -> Self {
        Self {
            restarts: 5,
            window: Duration::from_secs(600),
        }
    }
}

/// A rate-limit storm is `refusals` rate-limit refusals of one agent within
/// `window`; it is alerted at most once per `quiet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StormSpec {
    pub refusals: u32,
    pub window: Duration,
    pub quiet: Duration,
}

impl Default for StormSpec {
    fn default() -> Self {
        Self {
            refusals: 20,
            window: Duration::from_secs(60),
            quiet: Duration::from_secs(900),
        }
    }
}

/// One entry of `providers:`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    pub name: String,
    pub kind: ProviderKind,
    /// Per model, in micro-USD per million tokens.
    pub prices: BTreeMap<String, Prices>,
}

impl ProviderSpec {
    /// The API its agents speak (and get environment variables for).
    pub fn api(&self) -> Api {
        match &self.kind {
            ProviderKind::Anthropic { .. } => Api::Anthropic,
            ProviderKind::OpenAi { .. } => Api::OpenAi,
            ProviderKind::Simulated { api, .. } => *api,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    /// `upstream` is an origin like `https://api.anthropic.com`; the request path passes through.
    Anthropic {
        upstream: String,
    },
    OpenAi {
        upstream: String,
    },
    /// Answered inside the supervisor (offline development and the demo).
    Simulated {
        api: Api,
        latency: Duration,
    },
}

/// How an agent receives its LLM credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The agent gets a per-launch scoped token; the proxy holds the real key.
    Proxy,
    /// The agent gets the real key (the proxy still meters it by that key).
    Direct,
}

/// One entry of an agent's `llm:` list, resolved against `providers:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmSpec {
    pub provider: String,
    pub api: Api,
    /// The real key's secret name; `None` only for a simulated provider.
    pub key: Option<SecretName>,
    pub delivery: Delivery,
    /// Variable that receives the token or key (default `ANTHROPIC_API_KEY` / `OPENAI_API_KEY`).
    pub key_env: String,
    /// Variable that receives the proxy's URL (default `ANTHROPIC_BASE_URL` / `OPENAI_BASE_URL`).
    pub base_url_env: String,
}

/// Per-agent limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetSpec {
    pub monthly_micro_usd: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_minute: Option<u64>,
    /// `alert_at`: a soft alert, once per month, when usage crosses this
    /// percentage (1..=100) of a monthly ceiling.
    pub alert_at_percent: Option<u32>,
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
    /// LLM credentials, each metered through the proxy.
    pub llm: Vec<LlmSpec>,
    pub budget: BudgetSpec,
    pub runaway: RunawayConfig,
    /// `user:`/`group:`: the account the agent runs as; `None` runs it as the
    /// supervisor's own.
    pub run_as: Option<RunAs>,
}

/// The account an agent runs as, resolved when the fleet is loaded. Only a
/// supervisor running as root can use it (`run` refuses it otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name (a numeric `user:` is resolved to it): `USER` in the child.
    pub user: String,
    pub uid: u32,
    /// `group:` if given, else the user's primary group.
    pub gid: u32,
    /// Supplementary groups as `initgroups` sets them: `gid` and every group
    /// listing the user; sorted.
    pub groups: Vec<u32>,
    /// The user's home directory: `HOME` in the child.
    pub home: PathBuf,
}

impl AgentSpec {
    /// The settings that apply live (no restart) and differ from `new`'s, by
    /// their fleet.yaml name: `budget`, `runaway`.
    pub fn live_changes(&self, new: &AgentSpec) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.budget != new.budget {
            out.push("budget");
        }
        if self.runaway != new.runaway {
            out.push("runaway");
        }
        out
    }

    /// The parts that shape the agent's process; a change here needs a
    /// restart. Budget and runaway settings apply live, without one.
    pub fn launch_view(&self) -> AgentSpec {
        AgentSpec {
            budget: BudgetSpec::default(),
            runaway: RunawayConfig::default(),
            ..self.clone()
        }
    }
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
