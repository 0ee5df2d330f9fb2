//! README "Orphaned agents": a supervisor killed with SIGKILL leaves its agents
//! running; the next supervisor on the same state dir kills those groups
//! before it starts the fleet, never kills a process that merely reused a
//! recorded pid, and refuses to start while another supervisor holds the
//! state dir.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

use common::*;
use nix::sys::signal::Signal;

/// `alpha` stops on SIGTERM; `beta` and its grandchild ignore it (the ignored
/// disposition survives exec), so reaping must escalate to SIGKILL.
const FLEET: &str = "version: 1\nagents:\n  \
    alpha:\n    command: [sh, -c, 'sleep 1000 & echo $! > alpha-grandchild.pid; echo $$ > alpha.pid; wait']\n  \
    beta:\n    command: [sh, -c, 'trap \"\" TERM; sleep 1000 & echo $! > beta-grandchild.pid; echo $$ > beta.pid; wait']\n    \
    stop: { grace: 1s }\n";

fn state_dir(fleet: &FleetDir) -> PathBuf {
    fleet.file(".supervisor")
}

fn record_path(fleet: &FleetDir, agent: &str) -> PathBuf {
    state_dir(fleet)
        .join("agents")
        .join(format!("{agent}.json"))
}

/// The pid in an agent's record, once the record is there.
fn wait_record(fleet: &FleetDir, agent: &str, pid: i32) {
    wait_for(&format!("record of {agent} with pid {pid}"), || {
        let text = fs::read_to_string(record_path(fleet, agent)).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        (json["pid"] == pid).then_some(())
    });
}

/// When the test ends, however it ends, kills every process group still
/// working in this fleet's directory: agents a SIGKILLed supervisor left (or
/// a failed test's) must not outlive the test. Declare it right after the
/// fleet so it runs after the supervisors are dropped.
struct Leftovers<'a>(&'a FleetDir);

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let ours = nix::unistd::getpgrp().as_raw();
        let Ok(entries) = fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let inside = fs::read_link(entry.path().join("cwd"))
                .is_ok_and(|cwd| cwd.starts_with(self.0.path()));
            let pgid = fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(2)?
                        .parse()
                        .ok()
                });
            if let (true, Some(pgid)) = (inside, pgid)
                && pgid > 1
                && pgid != ours
            {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

/// An unrelated process leading its own group; killed when dropped.
struct Stranger(std::process::Child);

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn line_index(log: &str, needle: &str) -> usize {
    log.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line containing {needle:?}; log:\n{log}"))
}

#[test]
fn a_new_supervisor_reaps_the_groups_a_killed_one_left_behind() {
    let fleet = FleetDir::new();
    let _leftovers = Leftovers(&fleet);
    fleet.write_fleet(FLEET);
    let mut first = fleet.run(&[]);
    let names = ["alpha", "alpha-grandchild", "beta", "beta-grandchild"];
    let old: Vec<i32> = names.iter().map(|n| fleet.wait_pid(n)).collect();
    wait_record(&fleet, "alpha", old[0]);
    wait_record(&fleet, "beta", old[2]);

    first.signal(Signal::SIGKILL);
    first.wait_exit();
    for (name, pid) in names.iter().zip(&old) {
        assert!(
            process_alive(*pid),
            "{name} (pid {pid}) should outlive a SIGKILLed supervisor"
        );
    }

    for name in names {
        fs::remove_file(fleet.file(&format!("{name}.pid"))).expect("remove pid file");
    }
    let mut second = fleet.run(&[]);
    let new: Vec<i32> = names.iter().map(|n| fleet.wait_pid(n)).collect();
    for (name, pid) in names.iter().zip(&old) {
        assert!(
            !process_alive(*pid),
            "orphaned {name} (pid {pid}) still runs"
        );
    }
    for (name, pid) in names.iter().zip(&new) {
        assert!(!old.contains(pid), "{name} is a new process");
        assert!(process_alive(*pid), "new {name} (pid {pid}) runs");
    }
    let log = second.log();
    let starting = line_index(&log, "starting fleet");
    for (agent, pid) in [("alpha", old[0]), ("beta", old[2])] {
        let reaped = line_index(
            &log,
            &format!("reaped orphaned agent \"{agent}\" (pid {pid}) left by a previous supervisor"),
        );
        assert!(
            reaped < starting,
            "reaped before the fleet starts; log:\n{log}"
        );
    }
    wait_record(&fleet, "alpha", new[0]);
    wait_record(&fleet, "beta", new[2]);

    // A clean stop leaves no record for a third supervisor to chase.
    second.signal(Signal::SIGTERM);
    assert!(second.wait_exit().success(), "log:\n{}", second.log());
    for agent in ["alpha", "beta"] {
        assert!(
            !record_path(&fleet, agent).exists(),
            "{agent}'s record removed on shutdown"
        );
    }
    let mut third = fleet.run(&[]);
    fleet.wait_pid("alpha");
    third.wait_log("starting fleet");
    assert!(
        !third.log().contains("record of agent"),
        "log:\n{}",
        third.log()
    );
    third.signal(Signal::SIGTERM);
    assert!(third.wait_exit().success(), "log:\n{}", third.log());
}

#[test]
fn a_second_supervisor_on_the_same_state_dir_is_refused() {
    let fleet = FleetDir::new();
    let _leftovers = Leftovers(&fleet);
    fleet.write_fleet(
        "version: 1\nagents:\n  solo:\n    command: [sh, -c, 'echo $$ > solo.pid; exec sleep 1000']\n",
    );
    let mut first = fleet.run(&[]);
    let solo = fleet.wait_pid("solo");
    wait_record(&fleet, "solo", solo);

    let mut second = fleet.run(&[]);
    let status = second.wait_exit();
    assert_eq!(status.code(), Some(1), "log:\n{}", second.log());
    let state = fs::canonicalize(state_dir(&fleet)).expect("state dir");
    let expected = format!(
        "error: another supervisor (pid {}) is already running on state dir `{}`: it holds `{}`\nhint: stop that supervisor first, or give this fleet its own `state_dir`\n",
        first.pid(),
        state.display(),
        state.join("supervisor.lock").display()
    );
    assert!(
        second.log().contains(&expected),
        "got:\n{}\nwanted:\n{expected}",
        second.log()
    );
    assert!(!second.log().contains("starting fleet"));

    // The refused one touched nothing of the running one.
    assert!(process_alive(solo));
    wait_record(&fleet, "solo", solo);
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit().success(), "log:\n{}", first.log());
    assert!(!process_alive(solo));
}

#[test]
fn a_record_whose_pid_now_belongs_to_an_unrelated_process_is_dropped_not_killed() {
    let fleet = FleetDir::new();
    let _leftovers = Leftovers(&fleet);
    fleet.write_fleet(
        "version: 1\nagents:\n  solo:\n    command: [sh, -c, 'echo $$ > solo.pid; exec sleep 1000']\n",
    );
    // An unrelated process leading its own group, as a recorded agent did.
    let stranger = Stranger(
        std::process::Command::new("sleep")
            .arg("1000")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep"),
    );
    let pid = stranger.0.id() as i32;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let (sid, start_time): (i32, u64) = (fields[3].parse().unwrap(), fields[19].parse().unwrap());
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    let record = serde_json::json!({
        "version": 1,
        "agent": "ghost",
        "pid": pid,
        "pgid": pid,
        "sid": sid,
        // Everything matches but the start time: the pid was reused.
        "start_time": start_time - 1,
        "boot_id": boot_id.trim(),
        // This test process, with a start time it never had: a dead supervisor.
        "supervisor_pid": std::process::id(),
        "supervisor_start_time": 1,
    });
    fs::create_dir_all(state_dir(&fleet).join("agents")).expect("records dir");
    let ghost = record_path(&fleet, "ghost");
    fs::write(&ghost, record.to_string()).expect("write record");

    let mut sup = fleet.run(&[]);
    fleet.wait_pid("solo");
    let log = sup.log();
    let warning = format!(
        "dropped the record of agent \"ghost\" (pid {pid}) without killing anything: that pid now belongs to another process (started at tick {start_time}, the agent at tick {})",
        start_time - 1
    );
    assert!(log.contains(&warning), "log:\n{log}");
    assert!(log.contains("WARN"), "logged as a warning; log:\n{log}");
    assert!(!ghost.exists(), "the stale record is dropped");
    assert!(!log.contains("reaped orphaned agent"));
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "log:\n{}", sup.log());
    // Checked once the supervisor is gone: it had its whole life to do harm.
    let mut stranger = stranger;
    assert_eq!(
        stranger.0.try_wait().expect("try_wait"),
        None,
        "the unrelated process lives"
    );
}
