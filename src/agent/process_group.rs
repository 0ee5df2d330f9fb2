//! An agent's process group, as the unit that is signalled, reaped and
//! declared gone. Owns the rule that an agent is stopped only when no process
//! of its group exists any more, zombies included. Must not wait for the
//! group leader (tokio reaps it) and must never `waitpid(-1)`, which would
//! steal other children's exit statuses.

use std::io;

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Makes this process the reaper of its orphaned descendants, so grandchildren
/// an agent leaves behind are re-parented to the supervisor and can be reaped
/// by [`ProcessGroup::reap`]. Without it they go to pid 1, which on some hosts
/// never reaps, and their zombies keep the group alive forever. Call once at
/// start; it holds for the whole process.
pub fn become_subreaper() -> io::Result<()> {
    prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// The process group an agent's leader created with `setpgid(0, 0)`; its id
/// is the leader's pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessGroup(i32);

impl ProcessGroup {
    /// `None` for ids 0 and 1 and anything out of range: `killpg` with those
    /// would signal our own group or every process we may signal.
    pub fn from_leader(pid: u32) -> Option<Self> {
        let id = i32::try_from(pid).ok()?;
        (id > 1).then_some(Self(id))
    }

    pub fn id(self) -> i32 {
        self.0
    }

    /// Sends `signal` to every process in the group. A group that is already
    /// gone is not an error.
    pub fn signal(self, signal: Signal) -> io::Result<()> {
        match killpg(Pid::from_raw(self.0), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reaps the group's zombies that are our children (orphans re-parented to
    /// us as subreaper). Call only once tokio has reaped the leader, or this
    /// would take the leader's exit status from it. Returns how many it reaped.
    pub fn reap(self) -> usize {
        let mut reaped = 0;
        loop {
            match waitpid(Pid::from_raw(-self.0), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
                Ok(_) => reaped += 1,
            }
        }
    }

    /// Whether any process, zombies included, is still in the group. EPERM
    /// means members exist that we may not signal, so it counts as alive.
    pub fn is_alive(self) -> bool {
        !matches!(kill(Pid::from_raw(-self.0), None), Err(Errno::ESRCH))
    }

    /// Reaps what can be reaped, then reports whether the group is empty.
    pub fn is_gone(self) -> bool {
        self.reap();
        !self.is_alive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_ids_that_would_signal_everyone() {
        assert_eq!(ProcessGroup::from_leader(0), None);
        assert_eq!(ProcessGroup::from_leader(1), None);
        assert_eq!(ProcessGroup::from_leader(u32::MAX), None);
        assert_eq!(ProcessGroup::from_leader(2).map(ProcessGroup::id), Some(2));
    }

    #[test]
    fn a_group_is_alive_while_its_leader_runs_and_gone_after() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let group = ProcessGroup::from_leader(child.id()).unwrap();
        assert!(group.is_alive());
        group.signal(Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(group.is_gone());
        // Signalling a gone group is not an error.
        group.signal(Signal::SIGTERM).unwrap();
    }
}
