//! README "Running under systemd": the notify protocol as systemd sees it (a
//! unix datagram socket standing in for `NOTIFY_SOCKET`), and the shipped unit
//! passing `systemd-analyze verify` with its commands pointed at the built binary,
//! and `systemctl reload`'s command answering with the reload's outcome.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Stands in for systemd's notify socket. A thread drains it at once: the
/// kernel queues only `net.unix.max_dgram_qlen` datagrams (often 10).
struct NotifySocket {
    path: PathBuf,
    incoming: mpsc::Receiver<String>,
    /// Every datagram received so far, in order.
    seen: Vec<String>,
    /// How far `expect` has read `seen`.
    cursor: usize,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let (tx, incoming) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Self {
            path,
            incoming,
            seen: Vec::new(),
            cursor: 0,
        }
    }

    fn receive(&mut self, deadline: Instant, what: &str) {
        let left = deadline.saturating_duration_since(Instant::now());
        match self
            .incoming
            .recv_timeout(left.min(Duration::from_millis(200)))
        {
            Ok(msg) => self.seen.push(msg),
            Err(_) if Instant::now() >= deadline => {
                panic!(
                    "timed out waiting for {what}; received so far: {:#?}",
                    self.seen
                )
            }
            Err(_) => {}
        }
    }

    /// The next datagram (after the last one `expect` returned) that matches.
    fn expect(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            while self.cursor < self.seen.len() {
                self.cursor += 1;
                let msg = &self.seen[self.cursor - 1];
                if matches(msg) {
                    return msg.clone();
                }
            }
            self.receive(deadline, what);
        }
    }

    /// Waits until at least `n` datagrams in all matched.
    fn expect_count(&mut self, what: &str, n: usize, matches: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while self.seen.iter().filter(|m| matches(m)).count() < n {
            self.receive(deadline, what);
        }
    }
}

/// Whether a datagram sets `STATUS=` to `text`.
fn has_status(datagram: &str, text: &str) -> bool {
    datagram
        .lines()
        .any(|l| l.strip_prefix("STATUS=") == Some(text))
}

fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

fn fleet_yaml() -> String {
    // `crasher` fails at once and then waits out a long backoff, so the
    // counts show one agent in each state for the whole test.
    "version: 1\nagents:\n  \
       steady:\n    \
         command: [sh, -c, 'echo \"notify=${NOTIFY_SOCKET:-unset} watchdog=${WATCHDOG_USEC:-unset}/${WATCHDOG_PID:-unset}\"; exec sleep 1000']\n    \
         stop: { grace: 2s }\n  \
       crasher:\n    \
         command: [sh, -c, 'exit 3']\n    \
         restart: { policy: on-failure, backoff_initial: 1h, backoff_max: 1h }\n"
        .to_owned()
}

#[test]
fn notify_protocol_through_start_reload_and_stop() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&fleet_yaml());
    let mut notify = NotifySocket::bind(fleet.path());
    let socket = notify.path.to_str().expect("utf-8 path").to_owned();
    let mut sup = fleet.run(&[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "200000")]);

    let ready = notify.expect("READY=1 after start", |m| m.starts_with("READY=1\n"));
    assert!(
        ready.contains("\nSTATUS=2 agents: "),
        "READY=1 carries the counts: {ready:?}"
    );
    sup.wait_log("notify=");
    // The agents may have settled before READY=1 (then it says so) or after
    // (then a STATUS= update follows within a second).
    if !has_status(&ready, "2 agents: 1 running, 1 in backoff, 0 quarantined") {
        notify.expect("STATUS= with one agent running and one in backoff", |m| {
            has_status(m, "2 agents: 1 running, 1 in backoff, 0 quarantined")
        });
    }
    // 200ms watchdog: a ping every 100ms while the loop answers.
    notify.expect_count("two WATCHDOG=1 pings", 2, |m| m == "WATCHDOG=1");

    // A reload that applies (an agent joins): RELOADING=1 stamped with
    // CLOCK_MONOTONIC, then READY=1, and the counts follow.
    fleet.write_fleet(&format!(
        "{}  joiner:\n    command: [sleep, '1000']\n    stop: {{ grace: 2s }}\n",
        fleet_yaml()
    ));
    let before = monotonic_usec();
    sup.signal(Signal::SIGHUP);
    let reloading = notify.expect("RELOADING=1", |m| m.starts_with("RELOADING=1\n"));
    let after = monotonic_usec();
    let stamp: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        (before..=after).contains(&stamp),
        "MONOTONIC_USEC={stamp} lies between {before} and {after} (CLOCK_MONOTONIC around the SIGHUP)"
    );
    let ready = notify.expect("READY=1 after the reload", |m| m.starts_with("READY=1\n"));
    sup.wait_log("reload applied");
    if !has_status(&ready, "3 agents: 2 running, 1 in backoff, 0 quarantined") {
        notify.expect("STATUS= counting the agent that joined", |m| {
            has_status(m, "3 agents: 2 running, 1 in backoff, 0 quarantined")
        });
    }

    // A reload that is rejected also ends in READY=1: the old fleet runs on.
    fleet.write_fleet("version: 1\nagents:\n  steady:\n    comand: [true]\n");
    sup.signal(Signal::SIGHUP);
    notify.expect("RELOADING=1 (broken file)", |m| {
        m.starts_with("RELOADING=1\n")
    });
    notify.expect("READY=1 after the rejected reload", |m| {
        m.starts_with("READY=1\n")
    });
    sup.wait_log("reload rejected");

    notify.expect("a WATCHDOG=1 after the reloads", |m| m == "WATCHDOG=1");

    sup.signal(Signal::SIGTERM);
    notify.expect("STOPPING=1", |m| m.starts_with("STOPPING=1"));
    assert!(sup.wait_exit().success(), "log:\n{}", sup.log());

    // Agents never see the notify protocol's variables: their env is cleared.
    let log = sup.log();
    assert!(
        log.contains("notify=unset watchdog=unset/unset"),
        "the agent saw systemd's variables:\n{log}"
    );
    assert!(
        !log.contains(&socket),
        "the socket path reached an agent:\n{log}"
    );
}

/// `systemctl reload` runs the unit's `ExecReload=` as systemd would: with the
/// service's `$RUNTIME_DIRECTORY`, from `/`. It must wait for the reload and
/// answer with its outcome, so a broken edit fails `systemctl reload`.
#[test]
fn the_units_reload_command_waits_for_the_outcome() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&fleet_yaml());
    let unit = std::fs::read_to_string(unit_under_test(fleet.path())).expect("read the unit");
    let reload: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .expect("the unit has an ExecReload=")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let runtime = tempfile::tempdir().expect("tempdir");
    let runtime_dir = runtime.path().to_str().expect("utf-8 path");
    let mut notify = NotifySocket::bind(fleet.path());
    let socket = notify.path.to_str().expect("utf-8 path").to_owned();
    let mut sup = fleet.run(&[
        ("NOTIFY_SOCKET", &socket),
        ("RUNTIME_DIRECTORY", runtime_dir),
    ]);
    notify.expect("READY=1 after start", |m| m.starts_with("READY=1\n"));
    sup.wait_log("notify=unset");
    let steady_pid = || {
        let out = Command::new(bin())
            .args(["status", "--json"])
            .env("RUNTIME_DIRECTORY", runtime_dir)
            .output()
            .expect("run supervisor status");
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let steady = rows
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["agent"] == "steady"))
            .cloned()
            .expect("steady in status");
        assert_eq!(steady["state"], "running", "{steady}");
        steady["pid"].as_u64().expect("steady has a pid")
    };
    let before = steady_pid();
    let systemctl_reload = || {
        Command::new(&reload[0])
            .args(&reload[1..])
            .env_clear()
            .env("RUNTIME_DIRECTORY", runtime_dir)
            .current_dir("/")
            .output()
            .expect("run the unit's ExecReload= command")
    };

    // A broken edit: the command fails with the file's errors, the fleet runs on.
    fleet.write_fleet("version: 1\nagents:\n  steady:\n    comand: [true]\n");
    let out = systemctl_reload();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: reload rejected; the running fleet is unchanged\n"),
        "{err}"
    );
    let located = format!("{}:4:5:", fleet.file("fleet.yaml").display());
    assert!(err.contains(&located) && err.contains("comand"), "{err}");
    notify.expect("RELOADING=1 (broken file)", |m| {
        m.starts_with("RELOADING=1\n")
    });
    notify.expect("READY=1 after the rejected reload", |m| {
        m.starts_with("READY=1\n")
    });
    assert_eq!(steady_pid(), before, "the running fleet is untouched");

    // A good edit: the command returns once it is applied, and says what changed.
    fleet.write_fleet(&format!(
        "{}  joiner:\n    command: [sh, -c, 'echo joined; exec sleep 1000']\n    stop: {{ grace: 2s }}\n",
        fleet_yaml()
    ));
    let out = systemctl_reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("added (started): joiner\n"), "{said}");
    notify.expect("READY=1 after the applied reload", |m| {
        m.starts_with("READY=1\n")
    });
    sup.wait_log("joined");
    assert_eq!(steady_pid(), before, "an unchanged agent keeps running");
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "log:\n{}", sup.log());
}

#[test]
fn without_notify_socket_nothing_is_sent_and_run_works() {
    // The foreground run: no NOTIFY_SOCKET, WATCHDOG_USEC alone is harmless.
    let fleet = FleetDir::new();
    fleet.write_fleet(&fleet_yaml());
    let mut sup = fleet.run(&[("WATCHDOG_USEC", "200000")]);
    sup.wait_log("notify=unset");
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "log:\n{}", sup.log());
    let log = sup.log();
    assert!(
        !log.contains("systemd"),
        "no notify or watchdog complaints without NOTIFY_SOCKET:\n{log}"
    );
}

fn systemd_analyze() -> &'static str {
    let found = Command::new("systemd-analyze").arg("--version").output();
    match found {
        Ok(out) if out.status.success() => "systemd-analyze",
        _ => panic!(
            "`systemd-analyze` is required to verify `systemd/agent-supervisor.service` but is not installed\n\
             hint: `apt-get install -y --no-install-recommends systemd` (`.ci/run` does this)"
        ),
    }
}

/// The shipped unit with its commands pointed at the binary under test and
/// the fleet file in `dir`.
fn unit_under_test(dir: &Path) -> PathBuf {
    let shipped = std::fs::read_to_string(repo_file("systemd/agent-supervisor.service"))
        .expect("read the unit");
    let exec_lines: Vec<&str> = shipped
        .lines()
        .filter(|l| l.starts_with("ExecStart=") || l.starts_with("ExecReload="))
        .collect();
    assert_eq!(
        exec_lines,
        [
            "ExecStart=/usr/local/bin/supervisor run --log-format plain -f /etc/agent-supervisor/fleet.yaml",
            "ExecReload=/usr/local/bin/supervisor reload -f /etc/agent-supervisor/fleet.yaml",
        ],
        "the unit starts and reloads with the installed binary and fleet file"
    );
    let fleet = dir.join("fleet.yaml");
    let rewritten = shipped.replace("/usr/local/bin/supervisor", bin()).replace(
        "/etc/agent-supervisor/fleet.yaml",
        &fleet.display().to_string(),
    );
    let unit = dir.join("agent-supervisor.service");
    std::fs::write(&unit, rewritten).expect("write the unit");
    unit
}

/// Whether a line of `systemd-analyze verify` is about another unit file of
/// this host rather than ours: such lines start with that unit's own path or
/// name (`/lib/systemd/system/foo.service:12: ...`, `foo.target: ...`), and in
/// a container the host's units are not ours to fix. Every other line —
/// anything naming our unit, and anything unattributed — counts against it.
fn about_another_unit(line: &str) -> bool {
    let Some((subject, _)) = line.split_once(": ") else {
        return false;
    };
    let subject = subject.split(':').next().unwrap_or(subject);
    let unit_name = subject.rsplit('/').next().unwrap_or(subject);
    let looks_like_unit = [
        ".service",
        ".target",
        ".socket",
        ".mount",
        ".slice",
        ".timer",
        ".path",
        ".device",
        ".swap",
        ".scope",
        ".automount",
    ]
    .iter()
    .any(|suffix| unit_name.ends_with(suffix));
    looks_like_unit && unit_name != "agent-supervisor.service"
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_under_test(dir.path());
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !about_another_unit(l))
        .collect();
    assert!(
        ours.is_empty(),
        "`systemd-analyze verify` complains about the unit:\n{}",
        ours.join("\n")
    );
    let others_only = text.lines().any(about_another_unit);
    assert!(
        out.status.success() || others_only,
        "`systemd-analyze verify` failed ({}) without saying why:\n{text}",
        out.status
    );
}

#[test]
fn the_unit_is_hardened() {
    // The exposure score is systemd's own summary of the sandboxing: a
    // dropped hardening line shows up here before it shows up in production.
    // `--threshold` counts tenths of the printed 0-10 score: 50 means the
    // unit must stay at or below 5.0 (it scores 3.8 with systemd 252).
    let analyze = systemd_analyze();
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_under_test(dir.path());
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=50", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("(no overall exposure line)");
    assert!(
        out.status.success(),
        "the unit's exposure is above 5.0 ({overall}):\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn only_other_units_are_filtered() {
    let cases = [
        ("/lib/systemd/system/foo.service:12: Unknown key", true),
        ("multi-user.target: Wants dependency dropin not found", true),
        (
            "agent-supervisor.service: Command x is not executable",
            false,
        ),
        (
            "/tmp/x/agent-supervisor.service:30: Failed to parse kill mode",
            false,
        ),
        ("Failed to load something", false),
        ("some words: with a colon", false),
    ];
    for (line, other) in cases {
        assert_eq!(about_another_unit(line), other, "{line:?}");
    }
}
