//! `supervisor run`: the owner of the agent actors and of the proxy's
//! per-agent state. Loads the fleet, opens the ledger, starts the metering
//! proxy and every agent, applies reloads as diffs by agent name, and turns
//! SIGTERM/SIGINT into one graceful shutdown (a second signal escalates to
//! SIGKILL).
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
use tokio::sync::{mpsc, watch};
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
        Ok(supervisor)
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
        'serve: loop {
            tokio::select! {
                _ = sigterm.recv() => break 'serve,
                _ = sigint.recv() => break 'serve,
                Some(event) = events.recv() => self.on_proxy_event(event).await,
                _ = sighup.recv() => {
                    tracing::info!(fleet = %self.fleet_path.display(), "reloading");
                    // Reading the file and the vault may block (a FIFO, a slow
                    // disk): do it off the loop so a shutdown is never delayed.
                    let path = self.fleet_path.clone();
                    let mut job = tokio::task::spawn_blocking(move || load_and_resolve(&path));
                    let loaded = tokio::select! {
                        joined = &mut job => joined,
                        _ = sigterm.recv() => break 'serve,
                        _ = sigint.recv() => break 'serve,
                    };
                    match loaded {
                        Ok(Ok(resolved)) => self.apply(resolved).await,
                        Ok(Err(errors)) => reject_reload(&errors.to_string()),
                        Err(err) => tracing::error!("reload failed: {err}"),
                    }
                }
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
    async fn apply(&mut self, resolved: ResolvedFleet) {
        let refused = fleet::non_reloadable_changes(&self.current, &resolved.fleet);
        if !refused.is_empty() {
            reject_reload(&format!(
                "`{}` changes what cannot change live\n{}",
                self.fleet_path.display(),
                refused.join("\n")
            ));
            return;
        }
        if let Err(err) = self.ensure_proxy(&resolved.fleet).await {
            reject_reload(&format!("{err:#}"));
            return;
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
            let (launch_id, launch) = self.launch(name, &plan);
            if let Some(running) = self.agents.get_mut(name) {
                tracing::info!(agent = %name, "reload: agent changed, restarting it");
                self.proxy.tokens.revoke_launch(name, running.launch);
                running.plan = plan;
                running.launch = launch_id;
                let handle = running.handle.clone();
                tokio::spawn(async move { handle.restart(Some(launch)).await });
            }
        }
        for name in &diff.added {
            let Some(plan) = plans.remove(name) else {
                continue;
            };
            tracing::info!(agent = %name, "reload: agent added, starting it");
            let (launch_id, launch) = self.launch(name, &plan);
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
        self.current = resolved.fleet;
        tracing::info!(
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            unchanged = diff.unchanged.len(),
            "reload applied"
        );
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
