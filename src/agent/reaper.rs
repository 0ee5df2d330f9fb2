//! Reaping orphans that left their agent's process group. The supervisor is a
//! child subreaper, so a process an agent detached with `setsid`/`setpgid`
//! (a double-forked daemon) is re-parented to it when its parent dies; it is
//! outside every agent's group, so no actor reaps it, and each would stay a
//! zombie for good. Owns the registry of children that have an owner who
//! waits for them (agent leaders, which tokio reaps) and the task that reaps
//! every other exited child. Must never reap a registered child: its owner
//! needs its exit status.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

/// Children whose exit status someone else collects.
static OWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// A safety net for a missed SIGCHLD (signals of one kind coalesce).
const TICK: Duration = Duration::from_secs(1);

/// Bounds one pass, so a flood of exits cannot keep the task busy.
const MAX_PER_PASS: usize = 10_000;

fn owned() -> MutexGuard<'static, BTreeSet<i32>> {
    // The set stays consistent whatever panicked while holding it.
    OWNED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a child registered as owned until dropped; drop it once the owner
/// has collected the child's exit status (or gave the child up).
#[derive(Debug)]
pub struct Owned(i32);

impl Drop for Owned {
    fn drop(&mut self) {
        owned().remove(&self.0);
    }
}

/// Runs `spawn` and registers the child it returns as owned, both under the
/// registry's lock: a reaper pass cannot slip in between and take the exit
/// status of a child that ends at once. `None` when the child has no pid.
pub fn spawn_owned<C>(
    spawn: impl FnOnce() -> io::Result<C>,
    pid_of: impl FnOnce(&C) -> Option<u32>,
) -> io::Result<(C, Option<Owned>)> {
    let mut set = owned();
    let child = spawn()?;
    let registration = pid_of(&child)
        .and_then(|pid| i32::try_from(pid).ok())
        .map(|pid| {
            set.insert(pid);
            Owned(pid)
        });
    Ok((child, registration))
}

/// One pass: reaps every exited child that is not owned, and returns their
/// pids. Peeks first (`WNOWAIT`), so an owned child's status is left in
/// place; the pass stops at one, since `waitid` would keep showing it until
/// its owner collects it (a SIGCHLD or the next tick brings another pass).
pub fn reap_orphans() -> Vec<i32> {
    let set = owned();
    let mut reaped = Vec::new();
    while reaped.len() < MAX_PER_PASS {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let Some(pid) = waitid(Id::All, flags).ok().and_then(|s| s.pid()) else {
            break;
        };
        if set.contains(&pid.as_raw()) {
            break;
        }
        match waitpid(Pid::from_raw(pid.as_raw()), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => reaped.push(pid.as_raw()),
        }
    }
    reaped
}

/// Starts the task that reaps orphans on every SIGCHLD and once a second.
/// Call once, from within the tokio runtime, after [`super::become_subreaper`];
/// every other child the process spawns must go through [`spawn_owned`].
/// Processes that left an agent's group are only reaped, never stopped with
/// the agent: tracking them would take cgroups.
pub fn spawn_orphan_reaper() -> io::Result<JoinHandle<()>> {
    let mut sigchld = signal(SignalKind::child())?;
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            for pid in reap_orphans() {
                tracing::debug!(
                    pid,
                    "reaped an orphan that had left its agent's process group"
                );
            }
        }
    }))
}
