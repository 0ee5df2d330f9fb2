//! The agent actor: a cheap cloneable [`AgentHandle`] and one task that owns
//! everything mutable about one agent (its process, backoff, pending replies).
//! Verbs are control messages handled strictly in order, also while a restart
//! is pending or a grace period runs. Must not share state through locks, and
//! must not decide policy itself: restart and backoff rules live in
//! `backoff`, the next step after an exit in [`next_after_exit`].

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use super::backoff::{Backoff, Exit, should_restart};
use super::launch::{child_env, command, describe_spawn_error};
use super::output::{Stream, pump};
use super::process_group::{Liveness, ProcessGroup};
use super::reaper::{Owned, spawn_owned};
use super::status::{AgentState, AgentStatus, ExitInfo};
use crate::fleet::{AgentSpec, RestartPolicy, StopSpec};
use crate::redact::Redaction;
use crate::vault::Secret;

/// How often an emptied-leader group is checked for remaining members; there
/// is no event for "the last process of a group is gone".
const GROUP_POLL: Duration = Duration::from_millis(20);

/// How long processes the supervisor may not signal (another user's, e.g. a
/// setuid program the agent ran) may stay in the group after SIGKILL before
/// the agent counts as stopped anyway, with a warning naming them.
const UNSIGNALLABLE_WAIT: Duration = Duration::from_secs(5);

/// Everything needed to start one agent: its spec and its resolved secrets
/// (environment variable name → value).
#[derive(Debug, Clone)]
pub struct AgentLaunch {
    pub spec: AgentSpec,
    pub secret_env: Vec<(String, Secret)>,
}

type Ack = oneshot::Sender<()>;

enum Control {
    Start(Ack),
    Stop(Ack),
    Kill(Ack),
    Restart(Option<Box<AgentLaunch>>, Ack),
    Shutdown(Ack),
}

/// A handle on one agent's actor. Cloning is cheap; every clone talks to the
/// same task. When the last handle is dropped the task stops the agent
/// gracefully and ends.
#[derive(Clone)]
pub struct AgentHandle {
    name: Arc<str>,
    tx: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<AgentStatus>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("name", &self.name)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl AgentHandle {
    /// Starts the actor task and, at once, the agent. Must be called from
    /// within a tokio runtime. The agent's output is masked for its own
    /// secrets only; see [`AgentHandle::spawn_redacted`].
    pub fn spawn(launch: AgentLaunch) -> Self {
        Self::spawn_redacted(launch, Redaction::default())
    }

    /// [`AgentHandle::spawn`], masking the agent's output with the shared
    /// `redaction` (every secret of the fleet). Before each start the
    /// launch's own secrets are added to it if they are missing, so a child
    /// never prints a value of its own that would reach the log.
    pub fn spawn_redacted(launch: AgentLaunch, redaction: Redaction) -> Self {
        let name: Arc<str> = launch.spec.name.as_str().into();
        let (tx, rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(AgentStatus::new());
        let actor = Actor {
            name: name.clone(),
            backoff: Backoff::new(&launch.spec.restart),
            launch,
            redaction,
            status: status_tx,
            rx,
            rx_open: true,
            run: None,
            backoff_until: None,
            goal: Goal::Run,
            start_now: false,
            on_gone: Vec::new(),
            on_start: Vec::new(),
            restarts: 0,
            started_once: false,
            last_exit: None,
        };
        let task = tokio::spawn(actor.run());
        Self {
            name,
            tx,
            status,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts a stopped, exited or backing-off agent now, with a fresh backoff.
    /// Resolves once the start was attempted; a no-op while it runs.
    pub async fn start(&self) {
        self.call(Control::Start).await;
    }

    /// Graceful stop: `stop.signal` to the group, SIGKILL after `stop.grace`.
    /// Resolves when the whole group is gone. The agent stays down until
    /// `start` or `restart`; a pending restart is cancelled.
    pub async fn stop(&self) {
        self.call(Control::Stop).await;
    }

    /// SIGKILL to the whole group now (also cutting short a running grace
    /// period). Resolves when the group is gone; the agent stays down.
    pub async fn kill(&self) {
        self.call(Control::Kill).await;
    }

    /// Graceful stop, then a start with `launch` if given (a changed spec or
    /// secrets), else with the current one; backoff starts over. Resolves once
    /// the new start was attempted.
    pub async fn restart(&self, launch: Option<AgentLaunch>) {
        let launch = launch.map(Box::new);
        self.call(|ack| Control::Restart(launch, ack)).await;
    }

    /// Graceful stop, then the task ends; resolves when both are done.
    /// Other clones' verbs return at once afterwards.
    pub async fn shutdown(self) {
        let (ack, done) = oneshot::channel();
        // A closed channel means the task already ended: nothing to wait for.
        let _ = self.tx.send(Control::Shutdown(ack));
        let task = match self.task.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        match task {
            Some(task) => {
                if let Err(e) = task.await {
                    tracing::error!(agent = %self.name, "agent task ended abnormally: {e}");
                }
            }
            // Another clone is joining the task; the reply still says when it is done.
            None => {
                let _ = done.await;
            }
        }
    }

    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// Every status change from now on (a slow reader sees the latest only).
    pub fn subscribe(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    async fn call(&self, verb: impl FnOnce(Ack) -> Control) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(verb(ack)).is_ok() {
            // An error means the task ended, and with it the agent's group.
            let _ = done.await;
        }
    }
}

/// What the agent should be doing, as last asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Run,
    Stop,
    Shutdown,
}

/// The step after a run ended (or could not start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Stay down: it was stopped on request.
    Stopped,
    /// A `start`/`restart` is waiting for this run to end: start at once.
    StartNow,
    /// Start again after the backoff delay.
    Backoff,
    /// Stay down: the policy says this exit is final.
    Exited,
}

/// What to make of a group whose run is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupVerdict {
    /// Nothing is left: the run is over.
    Gone,
    /// Keep waiting (and polling).
    Wait,
    /// Only processes we may not signal are left, long after SIGKILL: count
    /// the run as over rather than wait forever.
    GiveUp,
}

/// Pure decision on a stopping group from what `kill(-pgid, 0)` says. A
/// group we may still signal is waited for as long as it takes (SIGKILL
/// always wins in the end); one we may not is given [`UNSIGNALLABLE_WAIT`]
/// after SIGKILL, since nothing we do will end it.
pub fn group_verdict(liveness: Liveness, killed_at: Option<Instant>, now: Instant) -> GroupVerdict {
    match (liveness, killed_at) {
        (Liveness::Gone, _) => GroupVerdict::Gone,
        (Liveness::Unsignallable, Some(at))
            if now.saturating_duration_since(at) >= UNSIGNALLABLE_WAIT =>
        {
            GroupVerdict::GiveUp
        }
        _ => GroupVerdict::Wait,
    }
}

/// Pure decision after a run ended: `start_now` is set while a requested
/// start or restart waits for the old group to empty.
pub fn next_after_exit(goal: Goal, start_now: bool, policy: RestartPolicy, exit: &Exit) -> Next {
    match goal {
        Goal::Stop | Goal::Shutdown => Next::Stopped,
        Goal::Run if start_now => Next::StartNow,
        Goal::Run if should_restart(policy, exit) => Next::Backoff,
        Goal::Run => Next::Exited,
    }
}

/// One run of the agent: from spawn until its whole group is gone.
struct Run {
    /// `None` once tokio has reaped the leader.
    child: Option<Child>,
    /// Keeps the orphan reaper off the leader until tokio has reaped it.
    owned: Option<Owned>,
    group: ProcessGroup,
    guard: GroupGuard,
    started: Instant,
    /// The stop settings the run was started with (a restart may bring new ones).
    stop: StopSpec,
    leader_exit: Option<Exit>,
    /// When tokio reaped the leader: the run's time ends there, whatever
    /// stopping its leftovers takes.
    leader_exited_at: Option<Instant>,
    stopping: Option<Stopping>,
    /// Whether the group's unsignallable members were reported already.
    warned_unsignallable: bool,
}

struct Stopping {
    since: Instant,
    /// When SIGKILL is due; `None` once it was sent (or on `kill`).
    kill_at: Option<Instant>,
    /// When SIGKILL was sent to the group.
    killed_at: Option<Instant>,
}

/// Kills the group if a run is dropped before it was seen gone (the task
/// panicked or the runtime shut down), so no agent outlives its actor.
struct GroupGuard(Option<ProcessGroup>);

impl GroupGuard {
    /// Called once the group is gone: its id may be reused from then on.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = group.signal(Signal::SIGKILL);
        }
    }
}

enum Event {
    Control(Option<Control>),
    LeaderExited(io::Result<ExitStatus>),
    GraceOver,
    PollGroup,
    BackoffOver,
}

struct Actor {
    name: Arc<str>,
    launch: AgentLaunch,
    redaction: Redaction,
    backoff: Backoff,
    status: watch::Sender<AgentStatus>,
    rx: mpsc::UnboundedReceiver<Control>,
    rx_open: bool,
    run: Option<Run>,
    backoff_until: Option<Instant>,
    goal: Goal,
    /// Set by `start`/`restart` while an old group is still being stopped.
    start_now: bool,
    /// Replies due when the current group is gone (`stop`, `kill`, `shutdown`).
    on_gone: Vec<Ack>,
    /// Replies due at the next start attempt (`start`, `restart`).
    on_start: Vec<Ack>,
    restarts: u32,
    started_once: bool,
    last_exit: Option<ExitInfo>,
}

impl Actor {
    async fn run(mut self) {
        self.spawn_agent();
        while !(self.goal == Goal::Shutdown && self.run.is_none()) {
            let event = self.next_event().await;
            match event {
                Event::Control(Some(msg)) => self.on_control(msg),
                Event::Control(None) => {
                    // Every handle is gone: nobody can stop the agent later.
                    self.rx_open = false;
                    self.request_stop(Goal::Shutdown, false);
                }
                Event::LeaderExited(status) => self.on_leader_exit(status),
                Event::GraceOver => self.escalate(),
                Event::PollGroup => {
                    self.check_gone();
                }
                Event::BackoffOver => self.spawn_agent(),
            }
        }
        self.publish(AgentState::Stopped);
        reply(&mut self.on_gone);
        reply(&mut self.on_start);
    }

    async fn next_event(&mut self) -> Event {
        let far = Instant::now() + Duration::from_secs(86_400);
        let kill_at = self
            .run
            .as_ref()
            .and_then(|r| r.stopping.as_ref())
            .and_then(|s| s.kill_at);
        // The group is polled once the leader is reaped, and after SIGKILL in
        // case the leader itself is one we may not signal.
        let poll_group = self.run.as_ref().is_some_and(|r| {
            r.child.is_none() || r.stopping.as_ref().is_some_and(|s| s.killed_at.is_some())
        });
        let backoff_until = self.backoff_until;
        let child = self.run.as_mut().and_then(|r| r.child.as_mut());
        tokio::select! {
            msg = self.rx.recv(), if self.rx_open => Event::Control(msg),
            status = wait_leader(child) => Event::LeaderExited(status),
            _ = sleep_until(kill_at.unwrap_or(far).into()), if kill_at.is_some() => Event::GraceOver,
            _ = tokio::time::sleep(GROUP_POLL), if poll_group => Event::PollGroup,
            _ = sleep_until(backoff_until.unwrap_or(far).into()), if backoff_until.is_some() => {
                Event::BackoffOver
            }
        }
    }

    fn on_control(&mut self, msg: Control) {
        match msg {
            Control::Start(ack) => self.request_start(None, ack, false),
            Control::Restart(launch, ack) => self.request_start(launch.map(|l| *l), ack, true),
            Control::Stop(ack) => {
                self.on_gone.push(ack);
                self.request_stop(Goal::Stop, false);
            }
            Control::Kill(ack) => {
                self.on_gone.push(ack);
                self.request_stop(Goal::Stop, true);
            }
            Control::Shutdown(ack) => {
                self.on_gone.push(ack);
                self.request_stop(Goal::Shutdown, false);
            }
        }
    }

    /// `start` (`restart == false`) or `restart`: a running agent is left alone
    /// by `start` and stopped first by `restart`.
    fn request_start(&mut self, launch: Option<AgentLaunch>, ack: Ack, restart: bool) {
        if self.goal == Goal::Shutdown {
            let _ = ack.send(());
            return;
        }
        if let Some(launch) = launch {
            self.backoff = Backoff::new(&launch.spec.restart);
            self.launch = launch;
        } else {
            self.backoff.reset();
        }
        self.goal = Goal::Run;
        self.backoff_until = None;
        match &self.run {
            None => {
                self.on_start.push(ack);
                self.spawn_agent();
            }
            Some(run) if run.stopping.is_none() && !restart => {
                let _ = ack.send(());
            }
            Some(_) => {
                self.on_start.push(ack);
                self.start_now = true;
                self.begin_stop();
            }
        }
    }

    /// `stop`, `kill` (`now`) and `shutdown`: cancels any pending start;
    /// replies in `on_gone` are sent once the group is gone (at once if there
    /// is none).
    fn request_stop(&mut self, goal: Goal, now: bool) {
        if self.goal != Goal::Shutdown {
            self.goal = goal;
        }
        self.start_now = false;
        self.backoff_until = None;
        // A start waiting for the old group is superseded, not failed.
        reply(&mut self.on_start);
        if self.run.is_some() {
            if now {
                self.kill_group();
            } else {
                self.begin_stop();
            }
        } else {
            self.publish(AgentState::Stopped);
            reply(&mut self.on_gone);
        }
    }

    /// Sends the stop signal to the group and arms the SIGKILL timer, unless a
    /// stop is already under way.
    fn begin_stop(&mut self) {
        let Some(run) = self.run.as_mut() else { return };
        if run.stopping.is_some() {
            return;
        }
        let now = Instant::now();
        let StopSpec { signal, grace } = run.stop;
        tracing::info!(
            agent = %self.name,
            pid = run.group.id(),
            "stopping agent: {} to its process group, SIGKILL in {}",
            signal.as_str(),
            humantime::format_duration(grace),
        );
        run.stopping = Some(Stopping {
            since: now,
            kill_at: Some(deadline(now, grace)),
            killed_at: None,
        });
        let sent = run.group.signal(signal);
        // A stopped (SIGSTOP) process would not act on the signal until continued.
        let _ = run.group.signal(Signal::SIGCONT);
        self.publish(AgentState::Stopping { since: now });
        if let Err(e) = sent {
            tracing::warn!(agent = %self.name, "cannot send {}: {e}", signal.as_str());
            self.kill_group();
        }
    }

    /// The grace period ran out.
    fn escalate(&mut self) {
        let Some(run) = self.run.as_ref() else { return };
        tracing::warn!(
            agent = %self.name,
            pid = run.group.id(),
            "agent still running {} after the stop signal",
            humantime::format_duration(run.stop.grace),
        );
        self.kill_group();
    }

    /// SIGKILL to the whole group, once per run.
    fn kill_group(&mut self) {
        let Some(run) = self.run.as_mut() else { return };
        let stopping = run.stopping.get_or_insert(Stopping {
            since: Instant::now(),
            kill_at: None,
            killed_at: None,
        });
        stopping.kill_at = None;
        if stopping.killed_at.is_some() {
            return;
        }
        stopping.killed_at = Some(Instant::now());
        let since = stopping.since;
        let group = run.group;
        tracing::info!(agent = %self.name, pid = group.id(), "sending SIGKILL to the agent's process group");
        if let Err(e) = group.signal(Signal::SIGKILL) {
            tracing::error!(agent = %self.name, pid = group.id(), "cannot SIGKILL the process group: {e}");
        }
        self.publish(AgentState::Stopping { since });
    }

    fn on_leader_exit(&mut self, status: io::Result<ExitStatus>) {
        let Some(run) = self.run.as_mut() else { return };
        run.child = None;
        run.owned = None;
        let exit = match status {
            Ok(status) => exit_of(status),
            Err(e) => {
                tracing::error!(agent = %self.name, "cannot wait for the agent process: {e}");
                Exit::Code(-1)
            }
        };
        run.leader_exit = Some(exit);
        run.leader_exited_at = Some(Instant::now());
        let lingering = run.stopping.is_none();
        // Once the run is finished, `self.run` may already hold the next one,
        // which must not be stopped.
        if self.check_gone() {
            return;
        }
        // The leader went by itself but left processes in its group: they
        // belong to the agent, so they go too before it counts as exited.
        if lingering {
            tracing::info!(agent = %self.name, "agent process exited, stopping what it left in its process group");
            self.begin_stop();
        }
    }

    /// Finishes the run if its leader was reaped and its group is empty, or
    /// if only processes we may not signal are left long after SIGKILL;
    /// returns whether it did.
    fn check_gone(&mut self) -> bool {
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        let killed_at = run.stopping.as_ref().and_then(|s| s.killed_at);
        // Reaping by group id is only safe once tokio has the leader's status.
        let liveness = match (&run.child, killed_at) {
            (None, _) => run.group.reap_and_check(),
            (Some(_), Some(_)) => run.group.liveness(),
            (Some(_), None) => return false,
        };
        match group_verdict(liveness, killed_at, Instant::now()) {
            GroupVerdict::Wait => {
                if liveness == Liveness::Unsignallable && killed_at.is_some() {
                    if !std::mem::replace(&mut run.warned_unsignallable, true) {
                        tracing::warn!(
                            agent = %self.name,
                            pid = run.group.id(),
                            "the agent's process group holds processes the supervisor may not signal \
                             (pids {:?}; e.g. a setuid program); retrying SIGKILL for up to {}",
                            run.group.members(),
                            humantime::format_duration(UNSIGNALLABLE_WAIT),
                        );
                    }
                    // They may become ours again (a setuid program dropping privileges).
                    let _ = run.group.signal(Signal::SIGKILL);
                }
                return false;
            }
            GroupVerdict::GiveUp => tracing::warn!(
                agent = %self.name,
                pid = run.group.id(),
                "processes the supervisor may not signal are still in the agent's process group {} \
                 after SIGKILL (pids {:?}); counting the agent as stopped and leaving them running",
                humantime::format_duration(UNSIGNALLABLE_WAIT),
                run.group.members(),
            ),
            GroupVerdict::Gone => {}
        }
        let Some(mut run) = self.run.take() else {
            return false;
        };
        run.guard.disarm();
        let exit = run.leader_exit.take().unwrap_or(Exit::Code(-1));
        let ended = run.leader_exited_at.unwrap_or_else(Instant::now);
        let ran_for = ended.saturating_duration_since(run.started);
        reply(&mut self.on_gone);
        self.after_exit(exit, ran_for);
        true
    }

    /// Records how a run ended and takes the next step.
    fn after_exit(&mut self, exit: Exit, ran_for: Duration) {
        self.last_exit = Some(ExitInfo {
            exit: exit.clone(),
            ran_for,
            at: SystemTime::now(),
        });
        let policy = self.launch.spec.restart.policy;
        let name = self.name.clone();
        match next_after_exit(self.goal, self.start_now, policy, &exit) {
            Next::Stopped => {
                tracing::info!(agent = %name, status = %exit, "agent stopped");
                self.publish(AgentState::Stopped);
            }
            Next::StartNow => {
                tracing::info!(agent = %name, status = %exit, "agent stopped, starting it again");
                self.spawn_agent();
            }
            Next::Backoff => {
                let delay = self.backoff.on_exit(ran_for);
                let attempt = self.backoff.attempt();
                let until = deadline(Instant::now(), delay);
                self.backoff_until = Some(until);
                let delay = humantime::format_duration(delay);
                match &exit {
                    Exit::SpawnFailed(why) => tracing::error!(
                        agent = %name,
                        "cannot start agent: {why}; retrying in {delay} (attempt {attempt})"
                    ),
                    _ if exit.is_success() => tracing::info!(
                        agent = %name,
                        status = %exit,
                        "agent exited; restarting in {delay} (attempt {attempt})"
                    ),
                    _ => tracing::warn!(
                        agent = %name,
                        status = %exit,
                        "agent exited; restarting in {delay} (attempt {attempt})"
                    ),
                }
                self.publish(AgentState::Backoff { until, attempt });
            }
            Next::Exited => {
                match &exit {
                    Exit::SpawnFailed(why) => tracing::error!(
                        agent = %name,
                        "cannot start agent: {why}; not restarting (restart policy {policy:?})"
                    ),
                    _ => tracing::info!(
                        agent = %name,
                        status = %exit,
                        "agent exited; not restarting (restart policy {policy:?})"
                    ),
                }
                self.publish(AgentState::Exited { exit });
            }
        }
    }

    /// Starts a run now. A failure to spawn is an agent failure like a crash.
    fn spawn_agent(&mut self) {
        self.backoff_until = None;
        self.start_now = false;
        if self.started_once {
            self.restarts = self.restarts.saturating_add(1);
        }
        self.started_once = true;
        self.publish(AgentState::Starting);
        reply(&mut self.on_start);

        let spec = &self.launch.spec;
        self.redaction
            .ensure(self.launch.secret_env.iter().map(|(_, secret)| secret));
        let env = child_env(spec, &self.launch.secret_env, std::env::vars_os());
        let spawned = match command(spec, env) {
            Some(mut cmd) => spawn_owned(|| cmd.spawn(), Child::id),
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command")),
        };
        let (mut child, owned) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                let why = describe_spawn_error(spec, &e, spec.cwd.is_dir());
                self.after_exit(Exit::SpawnFailed(why), Duration::ZERO);
                return;
            }
        };
        let Some(group) = child.id().and_then(ProcessGroup::from_leader) else {
            // Only if the child was reaped already; it had no chance to run.
            let _ = child.start_kill();
            self.after_exit(
                Exit::SpawnFailed("the process vanished before its pid was read".into()),
                Duration::ZERO,
            );
            return;
        };
        if let Some(out) = child.stdout.take() {
            let redaction = self.redaction.clone();
            tokio::spawn(pump(out, self.name.clone(), Stream::Stdout, redaction));
        }
        if let Some(err) = child.stderr.take() {
            let redaction = self.redaction.clone();
            tokio::spawn(pump(err, self.name.clone(), Stream::Stderr, redaction));
        }
        let started = Instant::now();
        self.run = Some(Run {
            child: Some(child),
            group,
            guard: GroupGuard(Some(group)),
            started,
            stop: spec.stop,
            owned,
            leader_exit: None,
            leader_exited_at: None,
            stopping: None,
            warned_unsignallable: false,
        });
        tracing::info!(agent = %self.name, pid = group.id(), "agent started");
        self.publish(AgentState::Running { since: started });
    }

    fn publish(&self, state: AgentState) {
        self.status.send_replace(AgentStatus {
            state,
            pid: self.run.as_ref().map(|r| r.group.id().unsigned_abs()),
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
        });
    }
}

/// `from + after`, saturating: a configured `10000y` must not panic.
fn deadline(from: Instant, after: Duration) -> Instant {
    from.checked_add(after)
        .or_else(|| from.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(from)
}

async fn wait_leader(child: Option<&mut Child>) -> io::Result<ExitStatus> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

fn exit_of(status: ExitStatus) -> Exit {
    if let Some(code) = status.code() {
        return Exit::Code(code);
    }
    match status.signal().map(Signal::try_from) {
        Some(Ok(signal)) => Exit::Signal(signal),
        // An unknown signal number still is not a clean exit.
        _ => Exit::Code(-1),
    }
}

fn reply(acks: &mut Vec<Ack>) {
    for ack in acks.drain(..) {
        let _ = ack.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_step_table() {
        use Goal::*;
        use RestartPolicy::*;
        let crash = Exit::Code(2);
        let clean = Exit::Code(0);
        let killed = Exit::Signal(Signal::SIGKILL);
        let no_binary = Exit::SpawnFailed("x".into());
        let cases = [
            // A requested stop wins over everything.
            (Stop, false, Always, &crash, Next::Stopped),
            (Stop, true, Always, &crash, Next::Stopped),
            (Shutdown, true, OnFailure, &killed, Next::Stopped),
            // A waiting start/restart starts at once, whatever the policy.
            (Run, true, Never, &killed, Next::StartNow),
            (Run, true, OnFailure, &clean, Next::StartNow),
            // Otherwise the policy decides.
            (Run, false, Never, &crash, Next::Exited),
            (Run, false, Never, &no_binary, Next::Exited),
            (Run, false, OnFailure, &clean, Next::Exited),
            (Run, false, OnFailure, &crash, Next::Backoff),
            (Run, false, OnFailure, &killed, Next::Backoff),
            (Run, false, OnFailure, &no_binary, Next::Backoff),
            (Run, false, Always, &clean, Next::Backoff),
        ];
        for (goal, start_now, policy, exit, want) in cases {
            assert_eq!(
                next_after_exit(goal, start_now, policy, exit),
                want,
                "{goal:?} start_now={start_now} {policy:?} {exit:?}"
            );
        }
    }

    #[test]
    fn group_verdict_table() {
        use GroupVerdict::{GiveUp, Wait};
        use Liveness::{Alive, Unsignallable};
        let t0 = Instant::now();
        let later = |secs| t0 + Duration::from_secs(secs);
        let cases = [
            (Liveness::Gone, None, t0, GroupVerdict::Gone),
            (Liveness::Gone, Some(t0), later(60), GroupVerdict::Gone),
            // Members we may signal are waited for, however long.
            (Alive, None, later(60), Wait),
            (Alive, Some(t0), later(3600), Wait),
            // Members we may not signal: not before SIGKILL was tried...
            (Unsignallable, None, later(3600), Wait),
            // ... and then only for a bounded time.
            (Unsignallable, Some(t0), t0, Wait),
            (Unsignallable, Some(t0), later(4), Wait),
            (Unsignallable, Some(t0), later(5), GiveUp),
            (Unsignallable, Some(later(5)), t0, Wait),
        ];
        for (liveness, killed_at, now, want) in cases {
            assert_eq!(
                group_verdict(liveness, killed_at, now),
                want,
                "{liveness:?} killed_at={killed_at:?}"
            );
        }
    }

    #[test]
    fn deadlines_saturate() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }

    #[test]
    fn exit_statuses_map_to_exits() {
        assert_eq!(exit_of(ExitStatus::from_raw(0)), Exit::Code(0));
        assert_eq!(exit_of(ExitStatus::from_raw(3 << 8)), Exit::Code(3));
        assert_eq!(
            exit_of(ExitStatus::from_raw(libc::SIGKILL)),
            Exit::Signal(Signal::SIGKILL)
        );
    }
}
