//! `supervisor run`: the owner of the agent actors. Loads the fleet, starts
//! every agent, applies reloads as diffs by agent name, and turns SIGTERM/SIGINT
//! into one graceful shutdown (a second signal escalates to SIGKILL).
//!
//! Owns the map of running agents; nothing else holds it. Must not touch
//! processes directly — every process operation goes through an `AgentHandle`.

use std::collections::BTreeMap;
use std::path::Path;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;

use crate::agent::{AgentHandle, AgentLaunch};
use crate::cli::{LogFormat, exit};
use crate::fleet::{self, AgentSpec, ConfigErrors, Fleet};
use crate::vault::Secret;

/// What an agent is launched with; two equal values mean "nothing to restart".
/// Comparing resolved secret values (not only names) makes a rotated secret a change.
#[derive(Debug, Clone, PartialEq)]
struct LaunchPlan {
    spec: AgentSpec,
    secret_env: Vec<(String, Secret)>,
}

impl LaunchPlan {
    fn launch(&self) -> AgentLaunch {
        AgentLaunch {
            spec: self.spec.clone(),
            secret_env: self.secret_env.clone(),
        }
    }
}

/// A fleet that passed validation and whose every secret resolved.
struct ResolvedFleet {
    fleet: Fleet,
    plans: BTreeMap<String, LaunchPlan>,
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
    runtime.block_on(Supervisor::new(fleet_path, recorder).run(resolved))
}

/// Reads, validates and resolves secrets for a fleet file (exactly what
/// `check` verifies); every problem is collected into one report.
fn load_and_resolve(fleet_path: &Path) -> Result<ResolvedFleet, ConfigErrors> {
    let (fleet, mut secrets) = crate::check::load_resolved(fleet_path)?;
    let plans = fleet
        .agents
        .iter()
        .map(|(name, spec)| {
            let plan = LaunchPlan {
                spec: spec.clone(),
                secret_env: secrets.remove(name).unwrap_or_default(),
            };
            (name.clone(), plan)
        })
        .collect();
    Ok(ResolvedFleet { fleet, plans })
}

struct Supervisor {
    fleet_path: std::path::PathBuf,
    agents: BTreeMap<String, Running>,
    /// Stops of removed agents still in their grace period; shutdown waits for them.
    retiring: JoinSet<()>,
    /// Keeps each agent's pid on disk so a successor can reap what we leave if killed.
    recorder: crate::orphans::Recorder,
}

struct Running {
    handle: AgentHandle,
    plan: LaunchPlan,
}

impl Supervisor {
    fn new(fleet_path: &Path, recorder: crate::orphans::Recorder) -> Self {
        Self {
            fleet_path: fleet_path.to_owned(),
            agents: BTreeMap::new(),
            retiring: JoinSet::new(),
            recorder,
        }
    }

    async fn run(mut self, resolved: ResolvedFleet) -> u8 {
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
        let mut current = resolved.fleet;
        crate::logging::set_name_width(current.agents.keys().map(String::as_str));
        tracing::info!(
            fleet = %self.fleet_path.display(),
            agents = resolved.plans.len(),
            "starting fleet"
        );
        for (name, plan) in resolved.plans {
            self.start_agent(name, plan);
        }

        loop {
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = sighup.recv() => {
                    if let Some(next) = self.reload(&current) {
                        current = next;
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

    fn start_agent(&mut self, name: String, plan: LaunchPlan) {
        let handle = AgentHandle::spawn(plan.launch());
        self.recorder.watch(&handle);
        self.agents.insert(name, Running { handle, plan });
    }

    /// Validates the file again and applies only the difference. On any problem
    /// the running fleet is left exactly as it is and `None` is returned.
    fn reload(&mut self, current: &Fleet) -> Option<Fleet> {
        tracing::info!(fleet = %self.fleet_path.display(), "reloading");
        let resolved = match load_and_resolve(&self.fleet_path) {
            Ok(resolved) => resolved,
            Err(errors) => {
                reject_reload(&errors.to_string());
                return None;
            }
        };
        let refused = fleet::non_reloadable_changes(current, &resolved.fleet);
        if !refused.is_empty() {
            reject_reload(&format!(
                "`{}` changes what cannot change live\n{}",
                self.fleet_path.display(),
                refused.join("\n")
            ));
            return None;
        }

        let running: BTreeMap<String, LaunchPlan> = self
            .agents
            .iter()
            .map(|(name, r)| (name.clone(), r.plan.clone()))
            .collect();
        let diff = fleet::diff(&running, &resolved.plans);
        crate::logging::set_name_width(resolved.plans.keys().map(String::as_str));
        let mut plans = resolved.plans;

        for name in &diff.removed {
            if let Some(running) = self.agents.remove(name) {
                tracing::info!(agent = %name, "reload: agent removed, stopping it");
                self.retiring.spawn(running.handle.shutdown());
            }
        }
        for name in &diff.changed {
            if let (Some(running), Some(plan)) = (self.agents.get_mut(name), plans.remove(name)) {
                tracing::info!(agent = %name, "reload: agent changed, restarting it");
                let handle = running.handle.clone();
                let launch = plan.launch();
                running.plan = plan;
                self.retiring
                    .spawn(async move { handle.restart(Some(launch)).await });
            }
        }
        for name in &diff.added {
            if let Some(plan) = plans.remove(name) {
                tracing::info!(agent = %name, "reload: agent added, starting it");
                self.start_agent(name.clone(), plan);
            }
        }
        tracing::info!(
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            unchanged = diff.unchanged.len(),
            "reload applied"
        );
        Some(resolved.fleet)
    }

    /// Stops every agent in parallel; a second SIGTERM/SIGINT kills them all at once.
    async fn shutdown(
        mut self,
        sigterm: &mut tokio::signal::unix::Signal,
        sigint: &mut tokio::signal::unix::Signal,
    ) {
        let handles: Vec<AgentHandle> = self.agents.values().map(|r| r.handle.clone()).collect();
        let mut stopping = JoinSet::new();
        for running in std::mem::take(&mut self.agents).into_values() {
            stopping.spawn(running.handle.shutdown());
        }
        let drain = async {
            while stopping.join_next().await.is_some() {}
            while self.retiring.join_next().await.is_some() {}
        };
        tokio::pin!(drain);
        tokio::select! {
            _ = &mut drain => return,
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        tracing::warn!("second signal: killing all agents now");
        let mut killing = JoinSet::new();
        for handle in handles {
            killing.spawn(async move { handle.kill().await });
        }
        while killing.join_next().await.is_some() {}
        drain.await;
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
