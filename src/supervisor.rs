//! `supervisor run`: the owner of the agent actors and of the proxy's
//! per-agent state. Loads the fleet, opens the ledger, starts the metering
//! proxy, the control socket and every agent, applies reloads as diffs by
//! agent name (SIGHUP or `supervisor reload`), answers control commands
//! (`status`, `start`, `stop`, `restart`), and turns SIGTERM/SIGINT into one
//! graceful shutdown (a second signal escalates to SIGKILL).
//!
//! Owns the map of running agents; nothing else holds it. Must not touch
//! processes directly — every process operation goes through an
//! `AgentHandle` — and never formats a secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::admin;
use crate::agent::{AgentHandle, AgentLaunch, AgentState};
use crate::alert::{AlertEvent, Alerter};
use crate::budget::Month;
use crate::check::AgentSecrets;
use crate::cli::{LogFormat, exit};
use crate::control::protocol::{AgentStatusRow, Command, LiveChange, ReloadReport, Response};
use crate::control::server::SocketFiles;
use crate::control::{ControlHandle, ControlRequest};
use crate::fleet::{self, AgentSpec, ConfigErrors, Delivery, Fleet, ProviderSpec};
use crate::ledger::{self, Ledger};
use crate::proxy::meter::{AgentMeter, Route};
use crate::proxy::refusal::Api;
use crate::proxy::server::{ProxyEvent, ProxyShared, serve_on_own_thread};
use crate::proxy::tokens::{self, Grant};
use crate::redact::Redactor;
use crate::rotation::{self, VaultVersion};
use crate::runaway::RunawayAction;
use crate::sd_notify;
use crate::vault::Secret;

/// What an agent's process is launched with; two equal plans mean "nothing to
/// restart". Comparing resolved values (not only names) makes a rotated
/// secret a change. Budget, runaway settings and proxied LLM keys are not
/// part of it: they apply live, without a restart.
#[derive(Debug, Clone, PartialEq)]
struct LaunchPlan {
    spec: AgentSpec,
    secret_env: Vec<(String, Secret)>,
    /// Real keys handed to the agent (`delivery: direct`), by `llm:` index.
    direct_keys: Vec<Option<Secret>>,
}

impl LaunchPlan {
    /// Fingerprints of the secrets the process holds, by slot (variable or
    /// `llm[i]`), as `rotation::secret_versions` compares them.
    fn fingerprints(&self) -> BTreeMap<String, String> {
        let env = self
            .secret_env
            .iter()
            .map(|(var, value)| (var.clone(), value.fingerprint()));
        let direct = self
            .direct_keys
            .iter()
            .enumerate()
            .filter_map(|(i, key)| Some((format!("llm[{i}]"), key.as_ref()?.fingerprint())));
        env.chain(direct).collect()
    }
}

/// Launches as the rolling restarter and the supervisor share them: which
/// launch runs, which one is wanted, and what each process was given.
#[derive(Debug, Default)]
struct Launches {
    /// The launch whose process runs (its tokens are live).
    live: BTreeMap<String, u64>,
    /// The latest launch planned; a queued restart for an older one is skipped.
    wanted: BTreeMap<String, u64>,
    /// Secret fingerprints the running process was launched with.
    given: BTreeMap<String, BTreeMap<String, String>>,
}

type SharedLaunches = Arc<std::sync::Mutex<Launches>>;

fn lock(launches: &SharedLaunches) -> std::sync::MutexGuard<'_, Launches> {
    launches
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A restart caused only by new secret values, run after the ones before it.
struct RollingRestart {
    name: String,
    handle: AgentHandle,
    launch: AgentLaunch,
    launch_id: u64,
    given: BTreeMap<String, String>,
}

/// Longest wait for a restarted agent to run again before the next one restarts.
const ROLLING_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Restarts agents whose secrets changed one at a time: each waits until the
/// one before runs again, so a bad new version stops one agent, not all.
async fn rolling_restarts(
    mut queue: mpsc::UnboundedReceiver<RollingRestart>,
    launches: SharedLaunches,
    proxy: Arc<ProxyShared>,
) {
    while let Some(item) = queue.recv().await {
        let live = {
            let l = lock(&launches);
            if l.wanted.get(&item.name) != Some(&item.launch_id) {
                // Superseded by a later change, removed or quarantined.
                continue;
            }
            l.live.get(&item.name).copied()
        };
        tracing::info!(agent = %item.name, "a secret it holds has a new version: restarting it (one agent at a time)");
        let mut status = item.handle.subscribe();
        item.handle.restart(Some(item.launch)).await;
        if let Some(live) = live {
            proxy.tokens.revoke_launch(&item.name, live);
        }
        let ready = tokio::time::timeout(
            ROLLING_READY_TIMEOUT,
            status.wait_for(|s| matches!(s.state, AgentState::Running { .. })),
        )
        .await;
        let mut l = lock(&launches);
        l.live.insert(item.name.clone(), item.launch_id);
        match ready {
            Ok(Ok(_)) => {
                l.given.insert(item.name.clone(), item.given);
            }
            _ => tracing::warn!(
                agent = %item.name,
                "did not run again within {}s after restarting with a new secret version; moving on to the next agent",
                ROLLING_READY_TIMEOUT.as_secs()
            ),
        }
    }
}

/// What wakes the supervisor's loop besides signals and proxy events.
enum Internal {
    /// Reload as on SIGHUP: the vault changed, or a rotation wrote a new
    /// version (and wants to know whether it was applied).
    Reload {
        cause: &'static str,
        applied: Option<oneshot::Sender<bool>>,
    },
}

/// A fleet that passed validation and whose every secret resolved.
struct ResolvedFleet {
    fleet: Fleet,
    secrets: BTreeMap<String, AgentSecrets>,
    /// Agents quarantined in the ledger: they are held, not run.
    quarantined: BTreeMap<String, ledger::QuarantineRecord>,
}

impl ResolvedFleet {
    fn plan(&self, name: &str) -> Option<LaunchPlan> {
        let spec = self.fleet.agents.get(name)?;
        let secrets = self.secrets.get(name).cloned().unwrap_or_default();
        let direct_keys = spec
            .llm
            .iter()
            .zip(secrets.llm_keys.iter().chain(std::iter::repeat(&None)))
            .map(|(llm, key)| {
                (llm.delivery == Delivery::Direct)
                    .then(|| key.clone())
                    .flatten()
            })
            .collect();
        Some(LaunchPlan {
            spec: spec.launch_view(),
            secret_env: secrets.env,
            direct_keys,
        })
    }

    /// Every secret value the fleet resolved: raw secrets and real keys.
    fn secret_values(&self) -> Vec<Secret> {
        self.secrets
            .values()
            .flat_map(|s| {
                let env = s.env.iter().map(|(_, v)| v.clone());
                env.chain(s.llm_keys.iter().flatten().cloned())
            })
            .collect()
    }

    fn plans(&self) -> BTreeMap<String, LaunchPlan> {
        self.fleet
            .agents
            .keys()
            .filter_map(|name| Some((name.clone(), self.plan(name)?)))
            .collect()
    }

    /// The proxy routes of an agent's `llm:` entries.
    fn routes(&self, name: &str, providers: &BTreeMap<String, Arc<ProviderSpec>>) -> Vec<Route> {
        let Some(spec) = self.fleet.agents.get(name) else {
            return Vec::new();
        };
        let keys = self
            .secrets
            .get(name)
            .map(|s| s.llm_keys.clone())
            .unwrap_or_default();
        spec.llm
            .iter()
            .enumerate()
            .filter_map(|(i, llm)| {
                Some(Route {
                    provider: providers.get(&llm.provider)?.clone(),
                    key: keys.get(i).cloned().flatten(),
                })
            })
            .collect()
    }
}

/// Descriptors and the proxy's use of its caps, as `status` shows them.
fn host_status(proxy: &ProxyShared) -> crate::control::protocol::HostStatus {
    let snapshot = proxy.gate.snapshot();
    let limits = snapshot.limits;
    crate::control::protocol::HostStatus {
        descriptors_open: crate::fdlimit::open_descriptors().ok(),
        descriptor_limit: crate::fdlimit::soft_limit(),
        proxy_connections: snapshot.connections as u64,
        proxy_unidentified: snapshot.unidentified as u64,
        proxy_max_connections: limits.max_connections as u64,
        proxy_max_unidentified_connections: limits.max_unidentified_connections as u64,
        proxy_max_connections_per_agent: limits.max_connections_per_agent as u64,
        proxy_body_in_flight: snapshot.body_in_flight,
        proxy_max_body_in_flight: limits.max_body_in_flight,
        proxy_max_body_in_flight_per_agent: limits.max_body_in_flight_per_agent,
    }
}

/// How often descriptor use is checked against the limit.
const DESCRIPTOR_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Logs a WARN when open descriptors pass 80% of the limit (and once when
/// they fall back under 70%), with the proxy's figures, so an operator sees
/// the pressure before anything fails with EMFILE.
async fn watch_descriptors(proxy: Arc<ProxyShared>) {
    let mut warned = false;
    let mut every = tokio::time::interval(DESCRIPTOR_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (Ok(open), Some(limit)) = (
            crate::fdlimit::open_descriptors(),
            crate::fdlimit::soft_limit(),
        ) else {
            continue;
        };
        match crate::fdlimit::pressure_change(open, limit, warned) {
            Some(true) => {
                let snapshot = proxy.gate.snapshot();
                tracing::warn!(
                    "{open} of {limit} open-file descriptors in use (over {}%); proxy connections: {} of {} ({} unidentified); raise `LimitNOFILE=` or lower `proxy.max_connections`",
                    crate::fdlimit::WARN_PERCENT,
                    snapshot.connections,
                    snapshot.limits.max_connections,
                    snapshot.unidentified
                );
                warned = true;
            }
            Some(false) => {
                tracing::info!(
                    "{open} of {limit} open-file descriptors in use, below {}% again",
                    crate::fdlimit::CLEAR_PERCENT
                );
                warned = false;
            }
            None => {}
        }
    }
}

fn shared_providers(fleet: &Fleet) -> BTreeMap<String, Arc<ProviderSpec>> {
    fleet
        .providers
        .iter()
        .map(|(name, p)| (name.clone(), Arc::new(p.clone())))
        .collect()
}

/// Reads, validates and resolves secrets for a fleet file (exactly what
/// `check` verifies); every problem is collected into one report.
fn load_and_resolve(fleet_path: &Path) -> Result<ResolvedFleet, ConfigErrors> {
    let (fleet, secrets) = crate::check::load_resolved_to_run(fleet_path)?;
    for warning in crate::redact::short_secret_warnings(&fleet, &secrets) {
        tracing::warn!("{warning}");
    }
    // A ledger that cannot be read holds no quarantine we could honour; say so.
    let quarantined = ledger::quarantined(&fleet.state_dir)
        .unwrap_or_else(|err| {
            tracing::error!("cannot read quarantine records: {err:#}");
            Vec::new()
        })
        .into_iter()
        .map(|r| (r.agent.clone(), r))
        .collect();
    Ok(ResolvedFleet {
        fleet,
        secrets,
        quarantined,
    })
}

/// Runs the fleet in the foreground and returns the process exit code.
pub fn run_command(fleet_path: &Path, log_format: LogFormat, timestamps: bool) -> u8 {
    crate::logging::init(log_format, timestamps);
    // Before any secret is read: a non-dumpable process's memory and
    // /proc/PID/{environ,mem,...} are closed to other processes of its uid,
    // and it leaves no core dump. Children are dumpable again after exec.
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(
            "cannot mark the supervisor non-dumpable ({err}); processes of the same user may read its memory"
        );
    }
    // Before anything opens a descriptor in bulk: the proxy's connections and
    // each agent's pipes need far more than systemd's default soft 1024.
    match crate::fdlimit::raise_to_hard() {
        Ok(limits) if limits.soft > limits.original_soft => tracing::info!(
            "raised the open-file limit from {} to {} (the hard limit); agents start with {}",
            limits.original_soft,
            limits.soft,
            limits.original_soft
        ),
        Ok(_) => {}
        Err(err) => tracing::warn!(
            "cannot raise the open-file limit (RLIMIT_NOFILE) to its hard limit: {err}"
        ),
    }
    let resolved = match load_and_resolve(fleet_path) {
        Ok(resolved) => resolved,
        Err(errors) => {
            eprint!("{}", errors.report());
            return exit::CONFIG;
        }
    };
    // Held until we exit: one supervisor per state dir. Taken before any
    // agent record is read, so we never reap a live supervisor's agents.
    let _state_lock = match crate::orphans::lock_state_dir(&resolved.fleet.state_dir) {
        Ok(lock) => lock,
        Err(err) => {
            eprintln!("error: {err}");
            return exit::FAILURE;
        }
    };
    crate::orphans::reap_orphans(&resolved.fleet.state_dir);
    let fleet_state_dir = resolved.fleet.state_dir.clone();
    let recorder = crate::orphans::Recorder::new(&resolved.fleet.state_dir);
    // Orphaned grandchildren must be re-parented to us, not to a pid 1 that may
    // never reap them: otherwise their zombies keep a process group "alive".
    if let Err(err) = crate::agent::become_subreaper() {
        tracing::warn!(
            "cannot become a child subreaper ({err}); orphaned agent processes will be re-parented to pid 1"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime\ncaused by: {err}");
            return exit::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Reaps children that left their agent's process group (setsid), which
        // re-parent to us as the subreaper; agent leaders stay tokio's to reap.
        let _reaper = match crate::agent::spawn_orphan_reaper() {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::warn!("cannot start the orphan reaper ({err}); processes that leave their agent's group may linger as zombies");
                None
            }
        };
        match Supervisor::start(fleet_path, resolved, recorder).await {
            Ok(supervisor) => supervisor.run().await,
            Err(err) => {
                eprintln!("error: cannot start the fleet");
                for cause in err.chain() {
                    eprintln!("caused by: {cause}");
                }
                // Restarting cannot mend a corrupt ledger: a distinct code
                // that the unit's `RestartPreventExitStatus=` lists.
                if crate::ledger::is_corrupt(&err) {
                    eprintln!(
                        "hint: {}",
                        crate::ledger::failure_hint(&err, &fleet_state_dir)
                    );
                    return exit::DATA;
                }
                exit::FAILURE
            }
        }
    });
    // A reload stuck on a blocking read (e.g. a FIFO in the vault) must not
    // keep the process alive after the fleet has stopped.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

struct Supervisor {
    fleet_path: PathBuf,
    current: Fleet,
    agents: BTreeMap<String, Running>,
    /// Removed agents, stopping or stopped; kept so a second signal can kill
    /// them and a re-added name restarts the same actor after its stop.
    retired: BTreeMap<String, AgentHandle>,
    /// Quarantined agents: their plan is kept, their process is not run.
    held: BTreeMap<String, LaunchPlan>,
    proxy: Arc<ProxyShared>,
    events: Option<mpsc::UnboundedReceiver<ProxyEvent>>,
    /// `http://HOST:PORT` of the bound proxy, once bound.
    proxy_origin: Option<String>,
    proxy_shutdown: watch::Sender<bool>,
    /// The proxy's tasks, and the admin listener's, which stops with it.
    proxy_tasks: JoinSet<()>,
    /// The admin listener's requests for agent rows, answered by the loop.
    launches: u64,
    /// Keeps each agent's pid on disk so a successor can reap what we leave if killed.
    recorder: crate::orphans::Recorder,
    alerter: Alerter,
    running_launches: SharedLaunches,
    rolling: mpsc::UnboundedSender<RollingRestart>,
    internal: mpsc::UnboundedSender<Internal>,
    internal_rx: Option<mpsc::UnboundedReceiver<Internal>>,
    /// Each agent's secrets as the vault holds them now, with first-seen times.
    vault_versions: BTreeMap<String, Vec<VaultVersion>>,
    /// Rotations in progress and retry times after failures.
    rotations: Arc<std::sync::Mutex<rotation::schedule::Rotations>>,
    /// Secret values of the fleet in force, and of the one before the last
    /// reload (its processes may still be stopping): both are masked in logs.
    secrets: Vec<Secret>,
    previous_secrets: Vec<Secret>,
    /// Asks this task to run a control command; the socket server (and any
    /// in-process user, such as a metrics endpoint) holds clones.
    control: ControlHandle,
    control_rx: Option<mpsc::Receiver<ControlRequest>>,
    control_shutdown: watch::Sender<bool>,
    /// The socket file, removed when the supervisor ends.
    control_socket: Option<SocketFiles>,
    /// Installed first thing in `start`: a SIGTERM while agents are being
    /// started must stop them, not kill the supervisor by default action.
    signals: Option<Signals>,
}

struct Signals {
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        let install =
            |kind| signal(kind).map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"));
        Ok(Self {
            sigterm: install(SignalKind::terminate())?,
            sigint: install(SignalKind::interrupt())?,
            sighup: install(SignalKind::hangup())?,
        })
    }
}

struct Running {
    handle: AgentHandle,
    plan: LaunchPlan,
    launch: u64,
    /// Stopped on request (`supervisor stop`): it stays down, also when a
    /// reload changes it, until `supervisor start` or `restart`.
    stopped: bool,
}

impl Supervisor {
    async fn start(
        fleet_path: &Path,
        resolved: ResolvedFleet,
        recorder: crate::orphans::Recorder,
    ) -> anyhow::Result<Self> {
        let signals = Signals::install()?;
        let fleet = resolved.fleet.clone();
        let ledger = Arc::new(Ledger::open(&fleet.state_dir)?);
        let (events_tx, events) = mpsc::unbounded_channel();
        let fleet_name = fleet
            .base_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fleet".to_owned());
        let proxy = Arc::new(ProxyShared::new(fleet.proxy.clone(), ledger, events_tx)?);
        proxy.gate.fit_to_fleet(fleet.agents.len());
        tokio::spawn(watch_descriptors(proxy.clone()));
        let (alerter, _delivery) =
            Alerter::with_redaction(fleet.alerts.clone(), fleet_name, proxy.redaction.clone());
        let (proxy_shutdown, _) = watch::channel(false);
        let (control, control_rx) = ControlHandle::channel();
        let (control_shutdown, _) = watch::channel(false);
        let launches = SharedLaunches::default();
        let (rolling, rolling_rx) = mpsc::unbounded_channel();
        tokio::spawn(rolling_restarts(
            rolling_rx,
            launches.clone(),
            proxy.clone(),
        ));
        let (internal, internal_rx) = mpsc::unbounded_channel();
        if let fleet::VaultConfig::Dir { path } = &fleet.vault {
            let (changed, mut changes) = mpsc::unbounded_channel();
            match rotation::watch::spawn(path.clone(), changed) {
                Ok(()) => {
                    let internal = internal.clone();
                    tokio::spawn(async move {
                        while changes.recv().await.is_some() {
                            let reload = Internal::Reload {
                                cause: "the vault changed",
                                applied: None,
                            };
                            if internal.send(reload).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(err) => tracing::warn!(
                    "cannot watch the vault for new secret versions ({err}); use `supervisor rotate` or SIGHUP"
                ),
            }
        }
        let mut supervisor = Self {
            fleet_path: fleet_path.to_owned(),
            current: fleet.clone(),
            agents: BTreeMap::new(),
            retired: BTreeMap::new(),
            held: BTreeMap::new(),
            proxy,
            events: Some(events),
            proxy_origin: None,
            proxy_shutdown,
            proxy_tasks: JoinSet::new(),
            launches: 0,
            recorder,
            alerter,
            secrets: resolved.secret_values(),
            previous_secrets: Vec::new(),
            control,
            control_rx: Some(control_rx),
            control_shutdown,
            control_socket: None,
            signals: Some(signals),
            running_launches: launches,
            rolling,
            internal,
            internal_rx: Some(internal_rx),
            vault_versions: BTreeMap::new(),
            rotations: Default::default(),
        };
        supervisor.refresh_redaction();
        crate::logging::set_name_width(fleet.agents.keys().map(String::as_str));
        let recorded = ledger::month_totals(&fleet.state_dir, Month::current())?;
        let providers = shared_providers(&fleet);
        let need_history: Vec<_> = fleet
            .agents
            .keys()
            .filter_map(|name| {
                supervisor.install_meter(&resolved, name, &providers, recorded.get(name))
            })
            .collect();
        load_velocity_histories(fleet.state_dir.clone(), need_history);
        supervisor.ensure_proxy(&fleet).await?;
        supervisor.start_control();
        supervisor.start_admin(&fleet).await?;
        // The README tells users to `kill -HUP` it: say which pid that is.
        let pid = std::process::id();
        tracing::info!(
            fleet = %fleet_path.display(),
            agents = fleet.agents.len(),
            "starting fleet; supervisor pid {pid} (`kill -HUP {pid}` or `supervisor reload` reloads)"
        );
        for (name, plan) in resolved.plans() {
            if let Some(record) = resolved.quarantined.get(&name) {
                tracing::warn!(
                    agent = %name,
                    "stays quarantined ({}); release it with `supervisor release {name}`",
                    record.reason
                );
                if let Some(meter) = supervisor.proxy.meters.get(&name) {
                    meter.set_quarantine(Some(record.reason.clone()));
                }
                supervisor.held.insert(name, plan);
                continue;
            }
            let (launch_id, launch) = supervisor.launch(&name, &plan);
            supervisor.launched(&name, launch_id, &plan);
            let handle = AgentHandle::spawn_redacted(launch, supervisor.proxy.redaction.clone());
            supervisor.recorder.watch(&handle);
            supervisor.watch_restarts(&name, &handle);
            supervisor.agents.insert(
                name,
                Running {
                    handle,
                    plan,
                    launch: launch_id,
                    stopped: false,
                },
            );
        }
        supervisor.observe_versions(&resolved).await;
        Ok(supervisor)
    }

    /// Notes that `launch_id` of `name` now runs with `plan`'s secrets.
    fn launched(&self, name: &str, launch_id: u64, plan: &LaunchPlan) {
        let mut l = lock(&self.running_launches);
        l.live.insert(name.to_owned(), launch_id);
        l.wanted.insert(name.to_owned(), launch_id);
        l.given.insert(name.to_owned(), plan.fingerprints());
    }

    fn forget_launches(&self, name: &str) {
        let mut l = lock(&self.running_launches);
        l.live.remove(name);
        l.wanted.remove(name);
        l.given.remove(name);
    }

    /// Records the vault's current version of every secret in the ledger and
    /// keeps them (with first-seen times) for `status`.
    async fn observe_versions(&mut self, resolved: &ResolvedFleet) {
        let found: Vec<(String, Vec<rotation::cmd::CurrentVersion>)> = resolved
            .fleet
            .agents
            .iter()
            .map(|(name, spec)| {
                let secrets = resolved.secrets.get(name).cloned().unwrap_or_default();
                (
                    name.clone(),
                    rotation::cmd::current_versions(spec, &secrets),
                )
            })
            .collect();
        let rows: Vec<(String, String, String)> = found
            .iter()
            .flat_map(|(agent, vs)| {
                vs.iter()
                    .map(move |v| (agent.clone(), v.secret.clone(), v.fingerprint.clone()))
            })
            .collect();
        let state_dir = resolved.fleet.state_dir.clone();
        let now = ledger::unix_millis_now();
        let seen = tokio::task::spawn_blocking(move || {
            ledger::rotation::observe_versions(&state_dir, &rows, now)
        })
        .await;
        let seen = match seen {
            Ok(Ok(seen)) => seen,
            Ok(Err(err)) => {
                tracing::warn!("cannot record secret versions in the ledger: {err:#}");
                Vec::new()
            }
            Err(err) => {
                tracing::warn!("cannot record secret versions in the ledger: {err}");
                Vec::new()
            }
        };
        let mut first_seen = seen.into_iter();
        self.vault_versions = found
            .into_iter()
            .map(|(agent, vs)| {
                let vs = vs
                    .into_iter()
                    .map(|v| VaultVersion {
                        secret: v.secret,
                        slot: v.slot,
                        used_as: v.used_as,
                        fingerprint: v.fingerprint,
                        first_seen_ms: first_seen.next().unwrap_or(now),
                    })
                    .collect();
                (agent, vs)
            })
            .collect();
    }

    /// Which version of each secret `agent` runs with, for `supervisor status`.
    pub(crate) fn secret_versions(&self, agent: &str) -> Vec<rotation::SecretVersion> {
        let vault = self
            .vault_versions
            .get(agent)
            .map_or(&[][..], Vec::as_slice);
        let l = lock(&self.running_launches);
        let given = self
            .agents
            .contains_key(agent)
            .then(|| l.given.get(agent))
            .flatten();
        rotation::secret_versions(vault, given, ledger::unix_millis_now())
    }

    /// Warns about agents still running with an older version of a secret
    /// they hold (their restart failed or is still queued).
    fn warn_stale(&self) {
        for agent in self.agents.keys() {
            for v in self.secret_versions(agent).iter().filter(|v| v.stale) {
                tracing::warn!(
                    agent = %agent,
                    "still runs with version {} of secret `{}` (`{}`); the vault has {}: check why its restart did not happen, or `supervisor restart {agent}`",
                    v.running_fingerprint.as_deref().unwrap_or("?"),
                    v.name,
                    v.slot,
                    v.fingerprint
                );
            }
        }
    }

    /// Starts a rotation for every policy that is due (each checks the ledger).
    fn check_rotations(&self) {
        let fleet::VaultConfig::Dir { path } = &self.current.vault else {
            return;
        };
        for (agent, policies) in &self.current.rotation {
            for (secret, policy) in policies {
                let job = rotation::schedule::Job {
                    agent: agent.clone(),
                    secret: secret.clone(),
                    policy: policy.clone(),
                    vault_root: path.clone(),
                    fleet_dir: self.current.base_dir.clone(),
                    state_dir: self.current.state_dir.clone(),
                };
                if !rotation::schedule::claim(&self.rotations, &job) {
                    continue;
                }
                let reload = self.internal.clone();
                let swap = move || {
                    let reload = reload.clone();
                    async move {
                        let (applied, answer) = oneshot::channel();
                        let sent = reload.send(Internal::Reload {
                            cause: "a secret was rotated",
                            applied: Some(applied),
                        });
                        sent.is_ok() && answer.await.unwrap_or(false)
                    }
                };
                tokio::spawn(rotation::schedule::run(
                    job,
                    self.rotations.clone(),
                    self.alerter.clone(),
                    swap,
                ));
            }
        }
    }

    /// Installs or updates the agent's meter; the meter to load velocity
    /// history for when its wire starts afresh (new, or a new window or
    /// baseline period), to pass to [`load_velocity_histories`].
    fn install_meter(
        &self,
        resolved: &ResolvedFleet,
        name: &str,
        providers: &BTreeMap<String, Arc<ProviderSpec>>,
        recorded: Option<&ledger::AgentMonthUsage>,
    ) -> Option<HistoryLoad> {
        let spec = resolved.fleet.agents.get(name)?;
        let routes = resolved.routes(name, providers);
        let velocity = spec.runaway.velocity;
        let meter = match self.proxy.meters.get(name) {
            Some(meter) => {
                let same = meter
                    .velocity_config()
                    .is_some_and(|old| old.same_history(&velocity));
                meter.update(&spec.budget, spec.runaway, routes);
                if same {
                    return None;
                }
                meter
            }
            None => {
                let meter = Arc::new(AgentMeter::new(
                    name,
                    &spec.budget,
                    spec.runaway,
                    routes,
                    Month::current(),
                    recorded,
                ));
                self.proxy.meters.insert(meter.clone());
                meter
            }
        };
        Some(HistoryLoad {
            meter,
            velocity,
            since_ms: ledger::unix_millis_now(),
        })
    }

    /// Binds the proxy listener the first time an agent needs it.
    async fn ensure_proxy(&mut self, fleet: &Fleet) -> anyhow::Result<()> {
        let needed = fleet.agents.values().any(|a| !a.llm.is_empty());
        if !needed || self.proxy_origin.is_some() {
            return Ok(());
        }
        let listen = fleet.proxy.listen;
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on `{listen}` for the metering proxy (`proxy.listen`): {e}"
            )
        })?;
        let bound = listener.local_addr()?;
        if !bound.ip().is_loopback() {
            tracing::warn!(
                "the metering proxy listens on {bound}, which is not loopback: any host that can reach it and holds a token can spend through it"
            );
        }
        let shared = self.proxy.clone();
        let shutdown = self.proxy_shutdown.subscribe();
        let finished = serve_on_own_thread(listener, shared, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the metering proxy's thread: {e}"))?;
        self.proxy_tasks.spawn(async move {
            let _ = finished.await;
        });
        tracing::info!(listen = %bound, "metering proxy listening");
        self.proxy_origin = Some(format!("http://{bound}"));
        Ok(())
    }

    /// Binds the admin listener (`/metrics`, `/healthz`) when `admin:` is set.
    /// It asks this loop for agent rows, so `/healthz` fails when the loop stalls.
    async fn start_admin(&mut self, fleet: &Fleet) -> anyhow::Result<()> {
        let Some(spec) = fleet.admin else {
            return Ok(());
        };
        let listen = spec.listen;
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on `{listen}` for the admin listener (`admin.listen`): {e}"
            )
        })?;
        let bound = listener.local_addr()?;
        if !bound.ip().is_loopback() {
            tracing::warn!(
                "the admin listener listens on {bound}, which is not loopback: any host that can reach it can read agent names, usage and states"
            );
        }
        tracing::info!("admin listener serving /metrics and /healthz on http://{bound}");
        let admin = Arc::new(admin::Admin::for_meters(
            self.proxy.clone(),
            admin::ask_control(self.control.clone()),
        ));
        let shutdown = self.proxy_shutdown.subscribe();
        self.proxy_tasks
            .spawn(admin::serve(listener, admin, shutdown));
        Ok(())
    }

    /// Builds an agent's launch: its plan plus, per `llm:` entry, a fresh
    /// scoped token (or its real key for `delivery: direct`) registered with
    /// the proxy, and the proxy's URL.
    fn launch(&mut self, name: &str, plan: &LaunchPlan) -> (u64, AgentLaunch) {
        self.launches += 1;
        let launch_id = self.launches;
        let mut spec = plan.spec.clone();
        let mut secret_env = plan.secret_env.clone();
        let origin = self.proxy_origin.clone().unwrap_or_default();
        for (i, llm) in plan.spec.llm.iter().enumerate() {
            let token = match (llm.delivery, plan.direct_keys.get(i).cloned().flatten()) {
                (Delivery::Direct, Some(real)) => Some(real),
                _ => match tokens::mint() {
                    Ok(t) => Some(t),
                    Err(err) => {
                        tracing::error!(agent = %name, "cannot mint a scoped token: {err}; the agent gets no LLM credential");
                        None
                    }
                },
            };
            if let Some(token) = token {
                self.proxy.tokens.insert(
                    token.clone(),
                    Grant {
                        agent: name.to_owned(),
                        entry: i,
                        launch: launch_id,
                    },
                );
                secret_env.push((llm.key_env.clone(), token));
            }
            let url = match llm.api {
                Api::Anthropic => origin.clone(),
                Api::OpenAi => format!("{origin}/v1"),
            };
            spec.env.insert(llm.base_url_env.clone(), url);
        }
        // Before the child exists, so its first line is already masked.
        self.refresh_redaction();
        (launch_id, AgentLaunch { spec, secret_env })
    }

    /// Puts in force a redactor for every secret value held: the fleet's
    /// (current and previous) and every live scoped token.
    fn refresh_redaction(&self) {
        let tokens = self.proxy.tokens.secrets();
        let values = self
            .secrets
            .iter()
            .chain(&self.previous_secrets)
            .chain(&tokens);
        self.proxy.redaction.replace(Redactor::new(values));
    }

    async fn run(mut self) -> u8 {
        let (Some(mut events), Some(mut control), Some(signals)) = (
            self.events.take(),
            self.control_rx.take(),
            self.signals.take(),
        ) else {
            return exit::FAILURE;
        };
        let Signals {
            mut sigterm,
            mut sigint,
            mut sighup,
        } = signals;
        // The signal handlers are in place: a reload systemd sends right
        // after READY=1 cannot kill us with SIGHUP's default action.
        let notifier = Arc::new(sd_notify::Notifier::from_env());
        notifier.ready(self.status_counts());
        let mut heartbeats =
            sd_notify::start_reporter(notifier.clone(), sd_notify::watchdog_from_env());
        // A reload or a control command is raced with the stop signals so a
        // shutdown is never delayed by it; both are cancel-safe (see `reload`).
        let Some(mut internal) = self.internal_rx.take() else {
            return exit::FAILURE;
        };
        let mut rotation_tick = tokio::time::interval(rotation::schedule::CHECK_EVERY);
        rotation_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'serve: loop {
            tokio::select! {
                _ = sigterm.recv() => break 'serve,
                _ = sigint.recv() => break 'serve,
                Some(event) = events.recv() => self.on_proxy_event(event).await,
                Some(beat) = heartbeats.recv() => beat.answer(self.status_counts()),
                _ = rotation_tick.tick() => {
                    self.check_rotations();
                    self.warn_stale();
                }
                _ = sighup.recv() => {
                    notifier.reloading();
                    tokio::select! {
                        _ = self.reload() => {}
                        _ = sigterm.recv() => break 'serve,
                        _ = sigint.recv() => break 'serve,
                    }
                    notifier.ready(self.status_counts());
                }
                // The vault changed, or a rotation wrote a new version (and
                // wants to know whether the reload took it).
                Some(Internal::Reload { cause, applied }) = internal.recv() => {
                    tracing::info!(cause, "new secret versions");
                    notifier.reloading();
                    let answer = tokio::select! {
                        answer = self.reload() => answer,
                        _ = sigterm.recv() => break 'serve,
                        _ = sigint.recv() => break 'serve,
                    };
                    notifier.ready(self.status_counts());
                    if let Some(applied) = applied {
                        let _ = applied.send(matches!(answer, Response::Reloaded(_)));
                    }
                }
                Some((command, reply)) = control.recv() => {
                    let reloading = matches!(command, Command::Reload);
                    if reloading {
                        notifier.reloading();
                    }
                    tokio::select! {
                        () = self.on_control(command, reply) => {}
                        _ = sigterm.recv() => break 'serve,
                        _ = sigint.recv() => break 'serve,
                    }
                    if reloading {
                        notifier.ready(self.status_counts());
                    }
                }
            }
        }
        // Commands still queued are answered "shutting down" as they drop;
        // from here on `/healthz` says the loop is gone.
        let _ = self.control_shutdown.send(true);
        drop(control);

        tracing::info!(
            "shutting down: stopping all agents (send the signal again to kill them at once)"
        );
        // The watchdog stops with the loop: a long graceful stop is not a hang.
        drop(heartbeats);
        notifier.stopping();
        let recorder = std::mem::take(&mut self.recorder);
        self.shutdown(&mut sigterm, &mut sigint).await;
        recorder.finish().await;
        tracing::info!("all agents stopped; bye");
        exit::OK
    }

    /// Re-reads fleet.yaml and applies it: what SIGHUP and `supervisor
    /// reload` do. Cancel-safe: every `.await` comes before the first change,
    /// so a shutdown that drops it leaves the fleet as it was.
    async fn reload(&mut self) -> Response {
        tracing::info!(fleet = %self.fleet_path.display(), "reloading");
        // Reading the file and the vault may block (a FIFO, a slow disk): do
        // it off the loop so a shutdown is never delayed.
        let path = self.fleet_path.clone();
        match tokio::task::spawn_blocking(move || load_and_resolve(&path)).await {
            Ok(Ok(resolved)) => self.apply(resolved).await,
            Ok(Err(errors)) => reject_reload(&errors.to_string()),
            Err(err) => reject_reload(&format!("reload failed: {err}")),
        }
    }

    /// Applies a validated fleet: only the difference, by agent name. On any
    /// problem the running fleet is left exactly as it is.
    async fn apply(&mut self, resolved: ResolvedFleet) -> Response {
        let refused = fleet::non_reloadable_changes(&self.current, &resolved.fleet);
        if !refused.is_empty() {
            return reject_reload(&format!(
                "`{}` changes what cannot change live\n{}",
                self.fleet_path.display(),
                refused.join("\n")
            ));
        }
        if let Err(err) = self.ensure_proxy(&resolved.fleet).await {
            return reject_reload(&format!("{err:#}"));
        }
        self.proxy.gate.fit_to_fleet(resolved.fleet.agents.len());
        let running: BTreeMap<String, LaunchPlan> = self
            .agents
            .iter()
            .map(|(name, r)| (name.clone(), r.plan.clone()))
            .collect();
        let mut plans = resolved.plans();
        // Quarantined agents are held, whatever the file says; one whose
        // record was cleared (`supervisor release`) is started like a new one.
        let mut held = BTreeMap::new();
        for (name, record) in &resolved.quarantined {
            if let Some(plan) = plans.remove(name) {
                if let Some(meter) = self.proxy.meters.get(name) {
                    meter.set_quarantine(Some(record.reason.clone()));
                }
                held.insert(name.clone(), plan);
            }
        }
        let mut released = Vec::new();
        for name in self.held.keys().filter(|n| !held.contains_key(*n)) {
            if plans.contains_key(name) {
                tracing::info!(agent = %name, "released from quarantine");
                released.push(name.clone());
            }
        }
        for name in plans.keys() {
            if let Some(meter) = self.proxy.meters.get(name) {
                meter.set_quarantine(None);
            }
        }
        let held_names: Vec<String> = held.keys().cloned().collect();
        self.held = held;
        self.previous_secrets = std::mem::replace(&mut self.secrets, resolved.secret_values());
        self.refresh_redaction();
        let diff = fleet::diff(&running, &plans);
        crate::logging::set_name_width(plans.keys().map(String::as_str));

        // Budgets, runaway settings, prices and proxied keys apply in place.
        let providers = shared_providers(&resolved.fleet);
        let need_history: Vec<_> = resolved
            .fleet
            .agents
            .keys()
            .filter_map(|name| self.install_meter(&resolved, name, &providers, None))
            .collect();
        load_velocity_histories(resolved.fleet.state_dir.clone(), need_history);

        for name in &diff.removed {
            if let Some(running) = self.agents.remove(name) {
                tracing::info!(agent = %name, "reload: agent removed, stopping it");
                self.forget_launches(name);
                self.proxy.tokens.revoke_agent(name);
                self.proxy.meters.remove(name);
                let handle = running.handle.clone();
                tokio::spawn(async move { handle.stop().await });
                self.retired.insert(name.clone(), running.handle);
            }
        }
        let mut changed_stopped = Vec::new();
        for name in &diff.changed {
            let Some(plan) = plans.remove(name) else {
                continue;
            };
            if let Some(running) = self.agents.get_mut(name)
                && running.stopped
            {
                tracing::info!(agent = %name, "reload: agent changed; it stays stopped until `supervisor start {name}`");
                running.plan = plan;
                changed_stopped.push(name.clone());
                continue;
            }
            // Only secret values changed: a rotation. Those restarts queue
            // up and run one at a time.
            let rotated = running.get(name).is_some_and(|old| old.spec == plan.spec);
            let (launch_id, launch) = self.launch(name, &plan);
            let given = plan.fingerprints();
            if let Some(running) = self.agents.get_mut(name) {
                running.plan = plan;
                running.launch = launch_id;
                let handle = running.handle.clone();
                if rotated {
                    lock(&self.running_launches)
                        .wanted
                        .insert(name.clone(), launch_id);
                    let _ = self.rolling.send(RollingRestart {
                        name: name.clone(),
                        handle,
                        launch,
                        launch_id,
                        given,
                    });
                } else {
                    tracing::info!(agent = %name, "reload: agent changed, restarting it");
                    let live = {
                        let mut l = lock(&self.running_launches);
                        l.wanted.insert(name.clone(), launch_id);
                        l.given.insert(name.clone(), given);
                        l.live.insert(name.clone(), launch_id)
                    };
                    if let Some(live) = live {
                        self.proxy.tokens.revoke_launch(name, live);
                    }
                    tokio::spawn(async move { handle.restart(Some(launch)).await });
                }
            }
        }
        for name in &diff.added {
            let Some(plan) = plans.remove(name) else {
                continue;
            };
            tracing::info!(agent = %name, "reload: agent added, starting it");
            let (launch_id, launch) = self.launch(name, &plan);
            self.launched(name, launch_id, &plan);
            // A name removed earlier may still be in its grace period: reuse
            // its actor, whose verbs run in order, so the old process is gone
            // before the new one starts.
            let handle = match self.retired.remove(name) {
                Some(handle) => {
                    let h = handle.clone();
                    tokio::spawn(async move { h.restart(Some(launch)).await });
                    handle
                }
                None => {
                    let handle = AgentHandle::spawn_redacted(launch, self.proxy.redaction.clone());
                    self.recorder.watch(&handle);
                    self.watch_restarts(name, &handle);
                    handle
                }
            };
            self.agents.insert(
                name.clone(),
                Running {
                    handle,
                    plan,
                    launch: launch_id,
                    stopped: false,
                },
            );
        }
        // Retired actors whose stop has finished are let go.
        let done: Vec<String> = self
            .retired
            .iter()
            .filter(|(_, h)| {
                matches!(
                    h.status().state,
                    AgentState::Stopped | AgentState::Exited { .. }
                )
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            if let Some(handle) = self.retired.remove(&name) {
                tokio::spawn(handle.shutdown());
            }
        }
        self.alerter.reconfigure(resolved.fleet.alerts.clone());
        self.observe_versions(&resolved).await;
        let report = reload_report(
            diff,
            released,
            changed_stopped,
            held_names,
            &self.current.agents,
            &resolved.fleet.agents,
        );
        self.current = resolved.fleet;
        if let Response::Reloaded(report) = &report {
            let ReloadReport {
                added,
                removed,
                changed,
                unchanged,
                released,
                changed_live,
                held,
                changed_stopped,
            } = report.as_ref();
            tracing::info!(
                added = added.len(),
                released = released.len(),
                removed = removed.len(),
                changed = changed.len() + changed_stopped.len(),
                changed_live = changed_live.len(),
                held = held.len(),
                unchanged,
                "reload applied"
            );
        }
        report
    }

    /// Opens the control socket. A supervisor without one still runs its
    /// fleet (SIGHUP still reloads), so a failure here is logged, not fatal.
    fn start_control(&mut self) {
        let runtime_dir = crate::control::runtime_directory();
        match crate::control::server::bind(&self.current.state_dir, runtime_dir.as_deref()) {
            Ok((listener, mut files)) => {
                tracing::info!(socket = %files.socket.display(), "control socket listening");
                // Lets the CLI find this socket while fleet.yaml is broken or gone.
                let (record, failures) = crate::control::discovery::register(
                    &self.fleet_path,
                    &self.current.state_dir,
                    &files.socket,
                );
                let file = self.fleet_path.display();
                for err in failures {
                    if record.is_empty() {
                        tracing::warn!(
                            "{err}; while `{file}` does not load, the CLI finds this supervisor only through the file's `state_dir:` line"
                        );
                    } else {
                        tracing::warn!(
                            "{err}; a CLI looking only there will not find this supervisor while `{file}` does not load"
                        );
                    }
                }
                files.discovery = Some(record);
                tokio::spawn(crate::control::server::serve(
                    listener,
                    self.control.clone(),
                    self.control_shutdown.subscribe(),
                ));
                self.control_socket = Some(files);
            }
            Err(err) => tracing::error!(
                "cannot create the control socket: {err}; `supervisor status`, `reload`, `start`, `stop` and `restart` cannot reach this supervisor (hint: {})",
                err.hint()
            ),
        }
    }

    /// Runs one control command. Per-agent verbs update the supervisor's own
    /// state here, in order, and then wait for the agent in a task of their
    /// own, so a long stop grace never holds up this loop.
    async fn on_control(&mut self, command: Command, reply: oneshot::Sender<Response>) {
        let answer = match command {
            Command::Status => Deferred::Now(
                Response::Status {
                    agents: self.status_rows(),
                    host: Some(self.host_status()),
                },
                reply,
            ),
            Command::Reload => Deferred::Now(self.reload().await, reply),
            Command::Start { agent } => self.start_agent(&agent, reply),
            Command::Stop { agent } => self.stop_agent(&agent, reply),
            Command::Restart { agent } => self.restart_agent(&agent, reply),
            Command::FlushLedger => {
                // The writer commits within milliseconds; waiting here would
                // still hold up signals and proxy events, so wait aside.
                let ledger = self.proxy.ledger.clone();
                tokio::spawn(async move {
                    ledger.flush().await;
                    let _ = reply.send(Response::Ok {
                        message: "ledger flushed".to_owned(),
                    });
                });
                Deferred::Later
            }
        };
        if let Deferred::Now(answer, reply) = answer {
            let _ = reply.send(answer);
        }
    }

    /// The agent a per-agent command may act on, or the answer refusing it.
    fn controllable(&self, name: &str, verb: &str) -> Result<(), Response> {
        if !self.current.agents.contains_key(name) {
            let known: Vec<String> = self
                .current
                .agents
                .keys()
                .map(|n| format!("`{n}`"))
                .collect();
            let hint = if known.is_empty() {
                "the fleet has no agents".to_owned()
            } else {
                format!("the fleet's agents are {}", known.join(", "))
            };
            return Err(Response::error(
                format!("unknown agent `{name}` in `{}`", self.fleet_path.display()),
                Some(hint),
            ));
        }
        if self.held.contains_key(name) {
            let reason = self
                .proxy
                .meters
                .get(name)
                .and_then(|m| m.quarantine_reason())
                .unwrap_or_else(|| "see `supervisor quarantine`".to_owned());
            return Err(Response::error(
                format!("cannot {verb} `{name}`: it is quarantined ({reason})"),
                Some(format!(
                    "inspect it with `supervisor quarantine`, then `supervisor release {name}` lets it run again"
                )),
            ));
        }
        Ok(())
    }

    fn start_agent(&mut self, name: &str, reply: oneshot::Sender<Response>) -> Deferred {
        if let Err(refusal) = self.controllable(name, "start") {
            return Deferred::Now(refusal, reply);
        }
        let Some(running) = self.agents.get(name) else {
            return Deferred::Now(not_running(name), reply);
        };
        let handle = running.handle.clone();
        let name = name.to_owned();
        if running.stopped {
            // Its tokens were revoked at the stop; it starts with new ones,
            // and with whatever a reload changed meanwhile.
            let plan = running.plan.clone();
            let (launch_id, launch) = self.launch(&name, &plan);
            if let Some(running) = self.agents.get_mut(&name) {
                running.stopped = false;
                running.launch = launch_id;
            }
            tokio::spawn(async move {
                handle.restart(Some(launch)).await;
                let _ = reply.send(started(&handle, "started", &name).await);
            });
            return Deferred::Later;
        }
        let before = handle.status();
        if let (AgentState::Running { .. }, Some(pid)) = (&before.state, before.pid) {
            return Deferred::Now(
                Response::Ok {
                    message: format!("`{name}` is already running (pid {pid})"),
                },
                reply,
            );
        }
        tokio::spawn(async move {
            handle.start().await;
            let _ = reply.send(started(&handle, "started", &name).await);
        });
        Deferred::Later
    }

    fn stop_agent(&mut self, name: &str, reply: oneshot::Sender<Response>) -> Deferred {
        if let Err(refusal) = self.controllable(name, "stop") {
            // A quarantined agent is already down: say so rather than fail.
            if self.held.contains_key(name) {
                return Deferred::Now(
                    Response::Ok {
                        message: format!("`{name}` is quarantined and not running"),
                    },
                    reply,
                );
            }
            return Deferred::Now(refusal, reply);
        }
        let Some(running) = self.agents.get_mut(name) else {
            return Deferred::Now(not_running(name), reply);
        };
        let already = running.stopped;
        running.stopped = true;
        // A process that escaped the group keeps no way to spend.
        self.proxy.tokens.revoke_launch(name, running.launch);
        let handle = running.handle.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            handle.stop().await;
            let message = if already {
                format!("`{name}` is already stopped")
            } else {
                format!("stopped `{name}`; it stays stopped until `supervisor start {name}`")
            };
            let _ = reply.send(Response::Ok { message });
        });
        Deferred::Later
    }

    fn restart_agent(&mut self, name: &str, reply: oneshot::Sender<Response>) -> Deferred {
        if let Err(refusal) = self.controllable(name, "restart") {
            return Deferred::Now(refusal, reply);
        }
        let Some(running) = self.agents.get(name) else {
            return Deferred::Now(not_running(name), reply);
        };
        let (plan, old_launch, handle) =
            (running.plan.clone(), running.launch, running.handle.clone());
        let (launch_id, launch) = self.launch(name, &plan);
        self.proxy.tokens.revoke_launch(name, old_launch);
        if let Some(running) = self.agents.get_mut(name) {
            running.stopped = false;
            running.launch = launch_id;
        }
        let name = name.to_owned();
        tokio::spawn(async move {
            handle.restart(Some(launch)).await;
            let _ = reply.send(started(&handle, "restarted", &name).await);
        });
        Deferred::Later
    }

    /// A row per agent of the fleet (quarantined ones included), then removed
    /// agents whose processes are still stopping.
    /// Descriptors and the proxy's use of its caps, for `status`.
    fn host_status(&self) -> crate::control::protocol::HostStatus {
        host_status(&self.proxy)
    }

    fn status_rows(&self) -> Vec<AgentStatusRow> {
        use crate::control::status::{RowInput, row};
        let now = Instant::now();
        let month = Month::current();
        let mut rows = Vec::new();
        for name in self.current.agents.keys() {
            let status = self
                .agents
                .get(name)
                .map(|r| r.handle.status())
                .or_else(|| self.retired.get(name).map(AgentHandle::status));
            let meter = self.proxy.meters.get(name);
            let quarantine = meter
                .as_ref()
                .and_then(|m| m.quarantine_reason())
                .or_else(|| {
                    self.held
                        .contains_key(name)
                        .then(|| "see `supervisor quarantine`".to_owned())
                });
            rows.push(row(RowInput {
                agent: name,
                status: status.as_ref(),
                quarantine: quarantine.as_deref(),
                usage: meter.as_ref().map(|m| m.budget.usage(month)),
                rate: meter.as_ref().map(|m| m.budget.rate_snapshot(now)),
                month,
                now,
                secrets: self.secret_versions(name),
            }));
        }
        for (name, handle) in &self.retired {
            let status = handle.status();
            if self.current.agents.contains_key(name)
                || !matches!(status.state, AgentState::Stopping { .. })
            {
                continue;
            }
            rows.push(row(RowInput {
                agent: name,
                status: Some(&status),
                quarantine: None,
                usage: None,
                rate: None,
                month,
                now,
                secrets: self.secret_versions(name),
            }));
        }
        rows
    }

    /// What systemd's `STATUS=` shows: agents by state, quarantined ones included.
    fn status_counts(&self) -> sd_notify::StatusCounts {
        let states: Vec<AgentState> = self
            .agents
            .values()
            .map(|r| r.handle.status().state)
            .collect();
        sd_notify::StatusCounts::tally(&states, self.held.len())
    }

    /// Tells the alerter about each restart, so a crash loop raises one alert.
    fn watch_restarts(&self, name: &str, handle: &AgentHandle) {
        let mut status = handle.subscribe();
        let alerter = self.alerter.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut seen = status.borrow().restarts;
            while status.changed().await.is_ok() {
                let restarts = status.borrow().restarts;
                if restarts > seen {
                    alerter.agent_restarted(&name);
                }
                seen = restarts;
            }
        });
    }

    /// Containment and bookkeeping for what the proxy saw.
    async fn on_proxy_event(&mut self, event: ProxyEvent) {
        match event {
            ProxyEvent::Tripped {
                agent,
                action: RunawayAction::Quarantine,
                evidence,
            } => {
                // Evidence quotes what the agent sent and what upstream
                // answered: masked before it is logged, persisted or sent.
                let (reason, evidence) = self.masked_evidence(&evidence);
                self.contain(agent, reason, evidence).await;
            }
            ProxyEvent::Tripped {
                agent,
                action: RunawayAction::Alert,
                evidence,
            } => {
                let (reason, evidence) = self.masked_evidence(&evidence);
                tracing::warn!(agent = %agent, "runaway pattern (action: alert, so it keeps running): {reason}");
                self.alerter.send(AlertEvent::RunawayDetected {
                    agent: agent.clone(),
                    reason,
                    evidence_summary: crate::quarantine_cmd::evidence_lines(&evidence).join("\n"),
                });
            }
            ProxyEvent::SpendVelocity {
                agent,
                action,
                evidence,
            } => {
                let redactor = self.proxy.redaction.current();
                let reason = redactor
                    .redact(&format!("spend velocity: {evidence}"))
                    .into_owned();
                match action {
                    RunawayAction::Quarantine => {
                        let json = serde_json::to_value(&evidence).unwrap_or_default();
                        drop(redactor);
                        self.contain(agent, reason, json).await;
                    }
                    RunawayAction::Alert => {
                        tracing::warn!(agent = %agent, "{reason} (`runaway.velocity.action: alert`, so it keeps running)");
                        self.alerter.send(AlertEvent::SpendVelocity {
                            agent,
                            reason,
                            window_secs: evidence.window_secs,
                            spend_tokens: evidence.spend_tokens,
                            baseline_tokens: evidence.baseline_tokens,
                            threshold_tokens: evidence.threshold_tokens,
                        });
                    }
                }
            }
            ProxyEvent::CeilingReached { agent, message } => {
                // The alerter sends one per agent and month; this is every refusal.
                self.alerter.send(AlertEvent::CeilingReached {
                    agent,
                    month: Month::current(),
                    message,
                });
            }
            ProxyEvent::RateLimited { agent } => self.alerter.rate_limited(&agent),
            ProxyEvent::BudgetThreshold {
                agent,
                month,
                crossed,
            } => self.alerter.send(AlertEvent::BudgetThreshold {
                agent,
                month,
                kind: crossed.kind,
                percent: crossed.percent,
                used: crossed.used,
                ceiling: crossed.ceiling,
            }),
        }
    }

    /// Quarantines `agent` for `reason` (both already masked): alert,
    /// persist the record, stop its process group and hold it.
    async fn contain(&mut self, agent: String, reason: String, evidence: serde_json::Value) {
        self.alerter.send(AlertEvent::Quarantined {
            agent: agent.clone(),
            reason: reason.clone(),
            evidence_summary: crate::quarantine_cmd::evidence_lines(&evidence).join("\n"),
        });
        tracing::error!(agent = %agent, "quarantined: {reason}; its process group is being stopped and it stays down until `supervisor release {agent}`");
        // Persist before anything else reads the records (reloads run
        // in this same loop), so a restart cannot bring it back.
        let record = ledger::QuarantineRecord {
            agent: agent.clone(),
            since_ms: ledger::unix_millis_now(),
            reason,
            evidence,
        };
        let state_dir = self.current.state_dir.clone();
        let saved =
            tokio::task::spawn_blocking(move || ledger::put_quarantine(&state_dir, &record)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::error!(agent = %agent, "cannot persist the quarantine (it holds until this supervisor stops): {err:#}")
            }
            Err(err) => {
                tracing::error!(agent = %agent, "cannot persist the quarantine: {err}")
            }
        }
        if let Some(running) = self.agents.remove(&agent) {
            self.forget_launches(&agent);
            self.proxy.tokens.revoke_agent(&agent);
            let handle = running.handle.clone();
            tokio::spawn(async move { handle.stop().await });
            self.retired.insert(agent.clone(), running.handle);
            self.held.insert(agent, running.plan);
        }
    }

    /// A trip's reason (`runaway: ...`) and its evidence as JSON, both with
    /// every secret value masked.
    fn masked_evidence(&self, evidence: &crate::runaway::Evidence) -> (String, serde_json::Value) {
        let redactor = self.proxy.redaction.current();
        let reason = redactor
            .redact(&format!("runaway: {evidence}"))
            .into_owned();
        let mut json = serde_json::to_value(evidence).unwrap_or_default();
        redactor.redact_json(&mut json);
        (reason, json)
    }

    /// Stops every agent in parallel; a second SIGTERM/SIGINT kills them all at once.
    async fn shutdown(mut self, sigterm: &mut Signal, sigint: &mut Signal) {
        let handles: Vec<AgentHandle> = self
            .agents
            .values()
            .map(|r| r.handle.clone())
            .chain(self.retired.values().cloned())
            .collect();
        let mut stopping = JoinSet::new();
        for running in std::mem::take(&mut self.agents).into_values() {
            stopping.spawn(running.handle.shutdown());
        }
        for handle in std::mem::take(&mut self.retired).into_values() {
            stopping.spawn(handle.shutdown());
        }
        let drain = async { while stopping.join_next().await.is_some() {} };
        tokio::pin!(drain);
        let escalated = tokio::select! {
            _ = &mut drain => false,
            _ = sigterm.recv() => true,
            _ = sigint.recv() => true,
        };
        if escalated {
            tracing::warn!("second signal: killing all agents now");
            let mut killing = JoinSet::new();
            for handle in handles {
                killing.spawn(async move { handle.kill().await });
            }
            while killing.join_next().await.is_some() {}
            drain.await;
        }
        // The agents are gone; stop the proxy and make the ledger durable.
        // The proxy's thread ends only once every request has settled (or
        // was cut after its drain, which settles it too).
        let _ = self.proxy_shutdown.send(true);
        while self.proxy_tasks.join_next().await.is_some() {}
        self.proxy.ledger.flush().await;
        // Alerts still queued get a bounded chance to go out.
        if tokio::time::timeout(Duration::from_secs(10), self.alerter.flush())
            .await
            .is_err()
        {
            tracing::warn!("some alerts were not delivered before shutdown");
        }
    }
}

/// A control answer given at once, or by a task once the agent has acted.
enum Deferred {
    Now(Response, oneshot::Sender<Response>),
    Later,
}

/// Only if the fleet and the map of agents disagree, which `controllable` rules out.
fn not_running(name: &str) -> Response {
    Response::error(format!("`{name}` is not run by this supervisor"), None)
}

/// What a start or restart led to, once the spawn has been attempted (the
/// actor acknowledges just before it spawns, so wait a moment for the pid).
async fn started(handle: &AgentHandle, verb: &str, name: &str) -> Response {
    let mut status = handle.subscribe();
    let settled = tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| !matches!(s.state, AgentState::Starting)),
    )
    .await;
    let now = match settled {
        Ok(Ok(s)) => s.clone(),
        _ => handle.status(),
    };
    let message = match (&now.state, now.pid, &now.last_exit) {
        (AgentState::Running { .. }, Some(pid), _) => format!("{verb} `{name}` (pid {pid})"),
        (_, _, Some(exit)) => format!("{verb} `{name}`, but it is not running: {}", exit.exit),
        _ => format!("{verb} `{name}`"),
    };
    Response::Ok { message }
}

/// What a reload did, every agent in exactly one category: `released`
/// (quarantined before, started now) is taken out of the diff's `added`,
/// `changed_stopped` (changed, but stopped by the operator) out of its
/// `changed`; `held` agents (quarantined) are in no diff; an unchanged agent
/// whose budget or runaway settings differ between `old` and `new` changed
/// live.
fn reload_report(
    diff: fleet::FleetDiff,
    released: Vec<String>,
    changed_stopped: Vec<String>,
    held: Vec<String>,
    old: &BTreeMap<String, AgentSpec>,
    new: &BTreeMap<String, AgentSpec>,
) -> Response {
    let mut changed_live = Vec::new();
    let mut unchanged = 0;
    for name in &diff.unchanged {
        let what = match (old.get(name), new.get(name)) {
            (Some(before), Some(after)) => before.live_changes(after),
            _ => Vec::new(),
        };
        if what.is_empty() {
            unchanged += 1;
        } else {
            changed_live.push(LiveChange {
                agent: name.clone(),
                what: what.into_iter().map(str::to_owned).collect(),
            });
        }
    }
    Response::Reloaded(Box::new(ReloadReport {
        added: diff
            .added
            .into_iter()
            .filter(|n| !released.contains(n))
            .collect(),
        removed: diff.removed,
        changed: diff
            .changed
            .into_iter()
            .filter(|n| !changed_stopped.contains(n))
            .collect(),
        unchanged,
        released,
        changed_live,
        held,
        changed_stopped,
    }))
}

/// Logs why a reload was refused, one problem per line (the lines `check`
/// prints), and that nothing was touched; the same lines go to the CLI.
fn reject_reload(report: &str) -> Response {
    tracing::error!("reload rejected; the running fleet is unchanged");
    for line in report.lines() {
        tracing::error!("{line}");
    }
    Response::Rejected {
        errors: report.lines().map(str::to_owned).collect(),
    }
}

/// A meter whose velocity wire waits for its history, from when it began
/// observing live spend.
pub(crate) struct HistoryLoad {
    meter: Arc<AgentMeter>,
    velocity: crate::runaway::VelocityConfig,
    /// Live spend is observed from here on; the ledger supplies what came before.
    since_ms: i64,
}

/// The ledger reads of one set of velocity settings: spend per window over
/// the baseline period (the baseline) and per minute over the last window
/// (so a restart is not blind to what the agent just spent), both up to
/// `before_ms`.
fn history_queries(
    velocity: &crate::runaway::VelocityConfig,
    before_ms: i64,
) -> [ledger::SpendQuery; 2] {
    let window = velocity.window_ms();
    [
        ledger::SpendQuery {
            since_ms: before_ms
                .saturating_sub(window.saturating_mul(velocity.baseline_windows() + 1)),
            before_ms,
            window_ms: window,
        },
        ledger::SpendQuery {
            since_ms: before_ms.saturating_sub(window),
            before_ms,
            window_ms: 60_000,
        },
    ]
}

/// Loads the velocity history of `loads` from the ledger off the main loop:
/// one blocking task, one connection, one grouped scan per distinct window
/// and baseline period (usually two scans for the whole fleet), applied to
/// each meter as it returns. Meanwhile the wires run without history (the
/// no-baseline rule). A meter whose settings changed again meanwhile is
/// left to its own, newer load; a ledger that cannot be read leaves the
/// wires without history, and says so.
fn load_velocity_histories(state_dir: PathBuf, loads: Vec<HistoryLoad>) {
    if loads.is_empty() {
        return;
    }
    tokio::task::spawn_blocking(move || {
        let Some(before_ms) = loads.iter().map(|l| l.since_ms).min() else {
            return;
        };
        let mut queries: Vec<ledger::SpendQuery> = loads
            .iter()
            .flat_map(|l| history_queries(&l.velocity, before_ms))
            .collect();
        queries.sort_unstable();
        queries.dedup();
        let read = match ledger::spend_by_agent(&state_dir, &queries) {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!(
                    agents = loads.len(),
                    "cannot read spend history for `runaway.velocity` (no baselines until agents build their own): {err:#}"
                );
                return;
            }
        };
        let of = |q: &ledger::SpendQuery, agent: &str| -> &[ledger::WindowSpend] {
            queries
                .binary_search(q)
                .ok()
                .and_then(|i| read.get(i))
                .and_then(|m| m.get(agent))
                .map_or(&[], Vec::as_slice)
        };
        for load in &loads {
            if !load
                .meter
                .velocity_config()
                .is_some_and(|now| now.same_history(&load.velocity))
            {
                continue;
            }
            let [windows, minutes] = history_queries(&load.velocity, before_ms);
            let name = load.meter.name();
            load.meter
                .load_velocity_history(of(&windows, name), of(&minutes, name), before_ms);
        }
    });
}
