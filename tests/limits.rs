//! README "Metering proxy" (caps) and "Running under systemd" (descriptor
//! limits): a supervisor started under a low soft `RLIMIT_NOFILE` raises it,
//! starts a large fleet, and keeps serving every agent while one floods the
//! proxy with half-open connections or slow bodies.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Starts `supervisor run` with its soft open-file limit lowered to `soft`
/// (the hard one untouched), as systemd's default 1024 would.
fn run_with_soft_nofile(fleet: &FleetDir, soft: u64) -> Supervisor {
    let log = fleet.file("supervisor.log");
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("clone log");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--log-format", "plain", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .current_dir(fleet.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: one system call on a value prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = soft;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn supervisor");
    Supervisor { child, log }
}

fn hard_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max
}

fn status(fleet: &FleetDir) -> Option<Vec<Value>> {
    let out = Command::new(bin())
        .args(["status", "--json", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .expect("run supervisor status");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// 600 agents under a soft limit of 1024: each costs the supervisor three
/// descriptors (stdout, stderr, pidfd), so only ~330 started before the
/// supervisor raised its soft limit to the hard one. Agents still get the
/// original soft limit back.
#[test]
fn six_hundred_agents_start_under_a_soft_limit_of_1024() {
    let agents = 600;
    assert!(
        hard_nofile() >= 4096,
        "this test needs a hard open-file limit of at least 4096 (have {})",
        hard_nofile()
    );
    let fleet = FleetDir::new();
    let mut yaml = String::from("version: 1\nagents:\n");
    yaml.push_str("  probe:\n    command: [sh, -c, 'ulimit -Sn > nofile.txt; exec sleep 3600']\n");
    for i in 1..agents {
        yaml.push_str(&format!("  a{i}:\n    command: [sleep, '3600']\n"));
    }
    fleet.write_fleet(&yaml);
    let supervisor = run_with_soft_nofile(&fleet, 1024);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        if let Some(rows) = status(&fleet) {
            let running = rows.iter().filter(|r| r["state"] == "running").count();
            if running == agents {
                break;
            }
            last = format!(
                "{running} of {} running; others: {:?}",
                rows.len(),
                rows.iter()
                    .filter(|r| r["state"] != "running")
                    .take(3)
                    .map(|r| (
                        r["agent"].clone(),
                        r["state"].clone(),
                        r["last_exit"].clone()
                    ))
                    .collect::<Vec<_>>()
            );
        }
        assert!(
            Instant::now() < deadline,
            "not every agent reached running: {last}\nlog tail:\n{}",
            tail(&supervisor.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let probe = wait_for("probe's nofile.txt", || fleet.read("nofile.txt"));
    assert_eq!(
        probe.trim(),
        "1024",
        "agents get the original soft limit back"
    );
    assert!(
        supervisor
            .log()
            .contains("raised the open-file limit from 1024"),
        "{}",
        tail(&supervisor.log(), 20)
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
