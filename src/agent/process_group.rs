//! An agent's process group, as the unit that is signalled, reaped and
//! declared gone. Owns the facts the actor decides on: whether any process
//! of the group exists, zombies included, and whether we may signal it. Must
//! not wait for the group leader (tokio reaps it) and must never
//! `waitpid(-1)`, which would steal other children's exit statuses.

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

    /// Whether any process, zombies included, is still in the group, and
    /// whether we may signal it: `EPERM` means every remaining member belongs
    /// to another user (e.g. a setuid program the agent ran).
    pub fn liveness(self) -> Liveness {
        match kill(Pid::from_raw(-self.0), None) {
            Err(Errno::ESRCH) => Liveness::Gone,
            Err(Errno::EPERM) => Liveness::Unsignallable,
            _ => Liveness::Alive,
        }
    }

    /// Reaps what can be reaped, then reports what is left of the group.
    pub fn reap_and_check(self) -> Liveness {
        self.reap();
        self.liveness()
    }

    /// The pids in the group, read from `/proc`, for naming leftovers in a
    /// warning. Best effort: processes come and go while it reads.
    pub fn members(self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = dir
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                (pgrp_of(&stat)? == self.0).then_some(pid)
            })
            .collect();
        pids.sort_unstable();
        pids
    }
}

/// What `kill(-pgid, 0)` says about a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// No process is left, zombies included.
    Gone,
    /// Some process is left that we may signal.
    Alive,
    /// Processes are left, none of which we may signal.
    Unsignallable,
}

/// The process group id from the text of `/proc/<pid>/stat`: the fifth field,
/// counted after the command name, which is in parentheses and may itself
/// hold spaces and parentheses.
fn pgrp_of(stat: &str) -> Option<i32> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp
    after_comm.split_whitespace().nth(2)?.parse().ok()
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
    fn pgrp_from_proc_stat() {
        let cases = [
            ("123 (sleep) S 1 456 456 0 -1", Some(456)),
            ("123 (my prog) S 1 77 77 0", Some(77)),
            ("123 (a) b) (c) R 9 -3 1", Some(-3)),
            ("123 (x) S 1", None),
            ("garbage", None),
            ("", None),
        ];
        for (stat, want) in cases {
            assert_eq!(pgrp_of(stat), want, "{stat}");
        }
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
        assert_eq!(group.liveness(), Liveness::Alive);
        assert_eq!(group.members(), [child.id()]);
        group.signal(Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert_eq!(group.reap_and_check(), Liveness::Gone);
        assert!(group.members().is_empty());
        // Signalling a gone group is not an error.
        group.signal(Signal::SIGTERM).unwrap();
    }
}
