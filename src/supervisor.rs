//! `supervisor run`: the owner of the agent actors and of the proxy's
//! per-agent state. Loads the fleet, opens the ledger, starts the metering
//! proxy and every agent, applies reloads as diffs by agent name, and turns
//! SIGTERM/SIGINT into one graceful shutdown (a second signal escalates to
//! SIGKILL). New secret versions (the vault watcher, `supervisor rotate`, a
//! due rotation policy) arrive through that same reload: proxied keys swap in
//! place, agents whose environment holds a changed secret restart one at a
//! time.
//!
//! Owns the map of running agents; nothing else holds it. Must not touch
//! processes directly — every process operation goes through an
//! `AgentHandle` — and never formats a secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::agent::{AgentHandle, AgentLaunch, AgentState};
use crate::alert::{AlertEvent, Alerter};
use crate::budget::Month;
use crate::check::AgentSecrets;
use crate::cli::{LogFormat, exit};
use crate::fleet::{self, AgentSpec, ConfigErrors, Delivery, Fleet, ProviderSpec};
use crate::ledger::{self, Ledger};
use crate::proxy::meter::{AgentMeter, Route};
use crate::proxy::refusal::Api;
use crate::proxy::server::{ProxyEvent, ProxyShared, serve};
use crate::proxy::tokens::{self, Grant};
use crate::rotation::{self, VaultVersion};
use crate::runaway::RunawayAction;
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
    let (fleet, secrets) = crate::check::load_resolved(fleet_path)?;
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
pub fn run_command(fleet_path: &Path, log_format: LogFormat) -> u8 {
    crate::logging::init(log_format);
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
    proxy_tasks: JoinSet<()>,
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
}

struct Running {
    handle: AgentHandle,
    plan: LaunchPlan,
    launch: u64,
}

impl Supervisor {
    async fn start(
        fleet_path: &Path,
        resolved: ResolvedFleet,
        recorder: crate::orphans::Recorder,
    ) -> anyhow::Result<Self> {
        let fleet = resolved.fleet.clone();
        let ledger = Arc::new(Ledger::open(&fleet.state_dir)?);
        let (events_tx, events) = mpsc::unbounded_channel();
        let fleet_name = fleet
            .base_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fleet".to_owned());
        let (alerter, _delivery) = Alerter::new(fleet.alerts.clone(), fleet_name);
        let proxy = Arc::new(ProxyShared::new(fleet.proxy.clone(), ledger, events_tx)?);
        let (proxy_shutdown, _) = watch::channel(false);
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
            running_launches: launches,
            rolling,
            internal,
            internal_rx: Some(internal_rx),
            vault_versions: BTreeMap::new(),
            rotations: Default::default(),
        };
        crate::logging::set_name_width(fleet.agents.keys().map(String::as_str));
        let recorded = ledger::month_totals(&fleet.state_dir, Month::current())?;
        let providers = shared_providers(&fleet);
        for name in fleet.agents.keys() {
            supervisor.install_meter(&resolved, name, &providers, recorded.get(name));
        }
        supervisor.ensure_proxy(&fleet).await?;
        tracing::info!(
            fleet = %fleet_path.display(),
            agents = fleet.agents.len(),
            "starting fleet"
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
            let handle = AgentHandle::spawn(launch);
            supervisor.recorder.watch(&handle);
            supervisor.watch_restarts(&name, &handle);
            supervisor.agents.insert(
                name,
                Running {
                    handle,
                    plan,
                    launch: launch_id,
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

    fn install_meter(
        &self,
        resolved: &ResolvedFleet,
        name: &str,
        providers: &BTreeMap<String, Arc<ProviderSpec>>,
        recorded: Option<&ledger::AgentMonthUsage>,
    ) {
        let Some(spec) = resolved.fleet.agents.get(name) else {
            return;
        };
        let routes = resolved.routes(name, providers);
        match self.proxy.meters.get(name) {
            Some(meter) => meter.update(&spec.budget, spec.runaway, routes),
            None => self.proxy.meters.insert(Arc::new(AgentMeter::new(
                name,
                &spec.budget,
                spec.runaway,
                routes,
                Month::current(),
                recorded,
            ))),
        }
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
        tracing::info!(listen = %bound, "metering proxy listening");
        self.proxy_origin = Some(format!("http://{bound}"));
        let shared = self.proxy.clone();
        let shutdown = self.proxy_shutdown.subscribe();
        self.proxy_tasks.spawn(serve(listener, shared, shutdown));
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
        (launch_id, AgentLaunch { spec, secret_env })
    }

    async fn run(mut self) -> u8 {
        let (mut sigterm, mut sigint, mut sighup) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(t), Ok(i), Ok(h)) => (t, i, h),
            (Err(err), _, _) | (_, Err(err), _) | (_, _, Err(err)) => {
                eprintln!("error: cannot install signal handlers\ncaused by: {err}");
                return exit::FAILURE;
            }
        };

        let Some(mut events) = self.events.take() else {
            return exit::FAILURE;
        };
        let Some(mut internal) = self.internal_rx.take() else {
            return exit::FAILURE;
        };
        let mut rotation_tick = tokio::time::interval(rotation::schedule::CHECK_EVERY);
        rotation_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'serve: loop {
            let (cause, applied) = tokio::select! {
                _ = sigterm.recv() => break 'serve,
                _ = sigint.recv() => break 'serve,
                Some(event) = events.recv() => {
                    self.on_proxy_event(event).await;
                    continue 'serve;
                }
                _ = rotation_tick.tick() => {
                    self.check_rotations();
                    self.warn_stale();
                    continue 'serve;
                }
                _ = sighup.recv() => ("SIGHUP", None),
                Some(Internal::Reload { cause, applied }) = internal.recv() => (cause, applied),
            };
            tracing::info!(fleet = %self.fleet_path.display(), cause, "reloading");
            // Reading the file and the vault may block (a FIFO, a slow
            // disk): do it off the loop so a shutdown is never delayed.
            let path = self.fleet_path.clone();
            let mut job = tokio::task::spawn_blocking(move || load_and_resolve(&path));
            let loaded = tokio::select! {
                joined = &mut job => joined,
                _ = sigterm.recv() => break 'serve,
                _ = sigint.recv() => break 'serve,
            };
            let ok = match loaded {
                Ok(Ok(resolved)) => self.apply(resolved).await,
                Ok(Err(errors)) => {
                    reject_reload(&errors.to_string());
                    false
                }
                Err(err) => {
                    tracing::error!("reload failed: {err}");
                    false
                }
            };
            if let Some(applied) = applied {
                let _ = applied.send(ok);
            }
        }

        tracing::info!(
            "shutting down: stopping all agents (send the signal again to kill them at once)"
        );
        let recorder = std::mem::take(&mut self.recorder);
        self.shutdown(&mut sigterm, &mut sigint).await;
        recorder.finish().await;
        tracing::info!("all agents stopped; bye");
        exit::OK
    }

    /// Applies a validated fleet: only the difference, by agent name. On any
    /// problem the running fleet is left exactly as it is.
    async fn apply(&mut self, resolved: ResolvedFleet) -> bool {
        let refused = fleet::non_reloadable_changes(&self.current, &resolved.fleet);
        if !refused.is_empty() {
            reject_reload(&format!(
                "`{}` changes what cannot change live\n{}",
                self.fleet_path.display(),
                refused.join("\n")
            ));
            return false;
        }
        if let Err(err) = self.ensure_proxy(&resolved.fleet).await {
            reject_reload(&format!("{err:#}"));
            return false;
        }
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
        for name in self.held.keys().filter(|n| !held.contains_key(*n)) {
            if plans.contains_key(name) {
                tracing::info!(agent = %name, "released from quarantine");
            }
        }
        for name in plans.keys() {
            if let Some(meter) = self.proxy.meters.get(name) {
                meter.set_quarantine(None);
            }
        }
        self.held = held;
        let diff = fleet::diff(&running, &plans);
        crate::logging::set_name_width(plans.keys().map(String::as_str));

        // Budgets, runaway settings, prices and proxied keys apply in place.
        let providers = shared_providers(&resolved.fleet);
        for name in resolved.fleet.agents.keys() {
            self.install_meter(&resolved, name, &providers, None);
        }

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
        for name in &diff.changed {
            let Some(plan) = plans.remove(name) else {
                continue;
            };
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
                    let handle = AgentHandle::spawn(launch);
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
        self.current = resolved.fleet;
        tracing::info!(
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            unchanged = diff.unchanged.len(),
            "reload applied"
        );
        true
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
                let reason = format!("runaway: {evidence}");
                self.alerter.send(AlertEvent::Quarantined {
                    agent: agent.clone(),
                    reason: reason.clone(),
                    evidence_summary: crate::quarantine_cmd::evidence_lines(
                        &serde_json::to_value(&evidence).unwrap_or_default(),
                    )
                    .join("\n"),
                });
                tracing::error!(agent = %agent, "quarantined: {reason}; its process group is being stopped and it stays down until `supervisor release {agent}`");
                // Persist before anything else reads the records (reloads run
                // in this same loop), so a restart cannot bring it back.
                let record = ledger::QuarantineRecord {
                    agent: agent.clone(),
                    since_ms: ledger::unix_millis_now(),
                    reason,
                    evidence: serde_json::to_value(&evidence).unwrap_or_default(),
                };
                let state_dir = self.current.state_dir.clone();
                let saved = tokio::task::spawn_blocking(move || {
                    ledger::put_quarantine(&state_dir, &record)
                })
                .await;
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
            ProxyEvent::Tripped {
                agent,
                action: RunawayAction::Alert,
                evidence,
            } => {
                tracing::warn!(agent = %agent, "runaway pattern (action: alert, so it keeps running): {evidence}");
                self.alerter.send(AlertEvent::RunawayDetected {
                    agent: agent.clone(),
                    reason: format!("runaway: {evidence}"),
                    evidence_summary: crate::quarantine_cmd::evidence_lines(
                        &serde_json::to_value(&evidence).unwrap_or_default(),
                    )
                    .join("\n"),
                });
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
        }
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
        let _ = self.proxy_shutdown.send(true);
        while self.proxy_tasks.join_next().await.is_some() {}
        self.proxy.drain(Duration::from_secs(5)).await;
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

/// Logs why a reload was refused, one problem per line (the lines `check`
/// prints), and that nothing was touched.
fn reject_reload(report: &str) {
    tracing::error!("reload rejected; the running fleet is unchanged");
    for line in report.lines() {
        tracing::error!("{line}");
    }
}
