//! README "Logs": `auto`/`plain` lines carry a timestamp unless
//! `--no-timestamps` (or journald, `JOURNAL_STREAM`) says otherwise; the start
//! names the supervisor's pid and control socket; `status` calls are not news.

mod common;

use std::process::{Command, Stdio};

use common::*;
use nix::sys::signal::Signal;

const FLEET: &str =
    "version: 1\nagents:\n  alpha:\n    command: [sh, -c, 'echo hello; sleep 1000']\n";

/// `supervisor run --log-format plain EXTRA...` with `env`, its log once
/// `alpha` said hello and two `status` calls were answered.
fn run_and_log(extra: &[&str], env: &[(&str, &str)]) -> (String, i32) {
    let fleet = FleetDir::new();
    fleet.write_fleet(FLEET);
    let log_path = fleet.file("supervisor.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--log-format", "plain"])
        .args(extra)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .current_dir(fleet.path())
        .env_remove("JOURNAL_STREAM")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    wait_for("alpha's hello", || {
        std::fs::read_to_string(&log_path)
            .ok()
            .filter(|l| l.contains("alpha | hello"))
    });
    for _ in 0..2 {
        let out = Command::new(bin())
            .args(["status", "-f"])
            .arg(fleet.file("fleet.yaml"))
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    (std::fs::read_to_string(&log_path).unwrap(), pid)
}

/// `2026-11-14T12:00:07.250Z ` at the start of `line`.
fn starts_with_timestamp(line: &str) -> bool {
    let Some((stamp, _)) = line.split_once(' ') else {
        return false;
    };
    stamp.len() == 24 && stamp.ends_with('Z') && humantime::parse_rfc3339(stamp).is_ok()
}

#[test]
fn plain_lines_carry_timestamps_and_the_start_names_pid_and_socket() {
    let (log, pid) = run_and_log(&[], &[]);
    for line in log.lines() {
        assert!(starts_with_timestamp(line), "no timestamp: {line:?}\n{log}");
    }
    let hello = log.lines().find(|l| l.contains("alpha | hello")).unwrap();
    assert!(hello.ends_with("     alpha | hello"), "{hello}");
    assert!(
        log.contains(&format!(
            "supervisor | INFO starting fleet; supervisor pid {pid} (`kill -HUP {pid}` or `supervisor reload` reloads)"
        )),
        "{log}"
    );
    assert!(log.contains("control socket listening socket="), "{log}");
    assert!(
        !log.contains("control request"),
        "`status` is read-only: debug, not INFO\n{log}"
    );
}

#[test]
fn no_timestamps_for_journald_by_flag_or_by_itself() {
    for (extra, env) in [
        (&["--no-timestamps"][..], &[][..]),
        (&[][..], &[("JOURNAL_STREAM", "8:12345")][..]),
    ] {
        let (log, _) = run_and_log(extra, env);
        for line in log.lines() {
            assert!(
                !starts_with_timestamp(line),
                "{extra:?} {env:?}: timestamp in {line:?}"
            );
        }
        assert!(
            log.contains("\n     alpha | hello\n") || log.starts_with("     alpha | hello\n"),
            "{log}"
        );
    }
}
