//! README "Live control": `supervisor status|reload|start|stop|restart`
//! against a running supervisor through its control socket, real processes
//! throughout; and the message and exit code when no supervisor runs.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Output;

use agent_supervisor::ledger::{QuarantineRecord, put_quarantine};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// An agent that records its pid and sleeps.
fn sleeper(name: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    command: [sh, -c, 'echo $$ > {name}.pid; exec sleep 1000']\n    stop: {{ grace: 2s }}\n{extra}"
    )
}

fn fleet_yaml(agents: &[String]) -> String {
    format!(
        "version: 1\nvault: {{ backend: dir, path: secrets }}\nagents:\n{}",
        agents.concat()
    )
}

fn cli(fleet: &FleetDir, args: &[&str]) -> Output {
    cli_env(fleet, args, &[])
}

fn cli_env(fleet: &FleetDir, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("STATE_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the CLI")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a CLI command that must succeed and returns its stdout.
fn ok(fleet: &FleetDir, args: &[&str]) -> String {
    let out = cli(fleet, args);
    assert!(
        out.status.success(),
        "`supervisor {}` failed ({:?}):\n{}{}",
        args.join(" "),
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn status(fleet: &FleetDir) -> Vec<Value> {
    let text = ok(fleet, &["status", "--json"]);
    serde_json::from_str::<Vec<Value>>(&text).expect("status --json is a JSON array")
}

fn row(fleet: &FleetDir, agent: &str) -> Value {
    status(fleet)
        .into_iter()
        .find(|r| r["agent"] == agent)
        .unwrap_or_else(|| panic!("no status row for {agent}"))
}

fn wait_state(fleet: &FleetDir, agent: &str, state: &str) -> Value {
    wait_for(&format!("{agent} to be {state}"), || {
        let r = row(fleet, agent);
        (r["state"] == state).then_some(r)
    })
}

/// Removes a pid file so the next write by a (re)started agent can be awaited.
fn forget_pid(fleet: &FleetDir, name: &str) {
    let _ = std::fs::remove_file(fleet.file(&format!("{name}.pid")));
}

fn start(fleet: &FleetDir) -> Supervisor {
    let sup = fleet.run(&[]);
    sup.wait_log("control socket listening");
    sup
}

fn stop_supervisor(mut sup: Supervisor) {
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "log:\n{}", sup.log());
}

/// An agent that makes one request to the simulated provider through the
/// proxy, writes the HTTP status, then sleeps.
fn metered_agent() -> String {
    let script = r#"
import json, os, urllib.request
req = urllib.request.Request(
    os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages",
    data=json.dumps({"model": "sim", "max_tokens": 64,
                     "messages": [{"role": "user", "content": "hello there, model"}]}).encode(),
    headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"], "content-type": "application/json",
             "anthropic-version": "2023-06-01"})
with urllib.request.urlopen(req) as r:
    open("metered.done", "w").write(str(r.status))
import time
while True:
    time.sleep(1000)
"#;
    format!(
        "  metered:\n    command: [python3, -c, {script:?}]\n    llm: [ {{ provider: sim }} ]\n    stop: {{ grace: 2s }}\n"
    )
}

fn metered_fleet(budget: &str) -> String {
    format!(
        "version: 1\nproxy: {{ listen: '127.0.0.1:0' }}\nproviders:\n  sim: {{ kind: simulated }}\nagents:\n{}    budget: {budget}\n{}{}{}",
        metered_agent(),
        sleeper("runner", ""),
        "  quitter:\n    command: [sh, -c, 'exit 3']\n    restart: { policy: never }\n",
        "  held:\n    command: [sh, -c, 'echo $$ > held.pid; exec sleep 1000']\n",
    )
}

#[test]
fn status_shows_each_agent_its_state_usage_and_rate() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&metered_fleet(
        "{ monthly_tokens: 1M, tokens_per_minute: 100, requests_per_minute: 1 }",
    ));
    // `held` was quarantined by an earlier run: it must stay down.
    let state_dir = fleet.file(".supervisor");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    put_quarantine(
        &state_dir,
        &QuarantineRecord {
            agent: "held".into(),
            since_ms: 1,
            reason: "runaway: 4 failing retries".into(),
            evidence: serde_json::json!({}),
        },
    )
    .unwrap();
    let sup = start(&fleet);
    let runner_pid = fleet.wait_pid("runner");
    wait_for("the metered request", || fleet.read("metered.done"));
    assert_eq!(fleet.read("metered.done").as_deref(), Some("200"));

    let runner = wait_state(&fleet, "runner", "running");
    assert_eq!(runner["pid"], runner_pid);
    assert!(runner["uptime_secs"].is_u64(), "{runner}");
    assert_eq!(runner["restarts"], 0);
    assert_eq!(runner["last_exit"], Value::Null);
    assert_eq!(runner["monthly_tokens_ceiling"], Value::Null);
    assert_eq!(runner["tokens_available"], Value::Null);

    let quitter = wait_state(&fleet, "quitter", "exited");
    assert_eq!(quitter["last_exit"], "exit code 3");
    assert_eq!(quitter["pid"], Value::Null);
    assert_eq!(quitter["uptime_secs"], Value::Null);

    let metered = wait_for("metered usage to settle", || {
        let r = row(&fleet, "metered");
        (r["month_tokens"].as_u64() > Some(0)).then_some(r)
    });
    assert_eq!(metered["state"], "running");
    assert_eq!(metered["monthly_tokens_ceiling"], 1_000_000);
    assert_eq!(metered["monthly_usd_ceiling"], Value::Null);
    // One request was taken from a bucket that refills one a minute.
    assert_eq!(metered["requests_available"], 0, "{metered}");
    let tokens_left = metered["tokens_available"].as_i64().unwrap();
    assert!(tokens_left <= 100, "{metered}");
    assert_eq!(metered["month"].as_str().unwrap().len(), 7, "YYYY-MM");

    let held = row(&fleet, "held");
    assert_eq!(held["state"], "quarantined");
    assert_eq!(held["quarantine_reason"], "runaway: 4 failing retries");
    assert_eq!(held["pid"], Value::Null);
    assert!(
        fleet.read("held.pid").is_none(),
        "a quarantined agent never ran"
    );

    // The supervisor's figures, then the table: a header and a line per agent.
    let table = ok(&fleet, &["status"]);
    assert!(table.starts_with("descriptors: "), "{table}");
    assert!(table.contains("\nproxy: "), "{table}");
    let lines: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("AGENT"))
        .collect();
    assert!(
        lines[0].starts_with("AGENT") && lines[0].contains("STATE") && lines[0].contains("TOKENS"),
        "{table}"
    );
    assert_eq!(lines.len(), 5, "{table}");
    let runner_line = lines.iter().find(|l| l.starts_with("runner ")).unwrap();
    let cells: Vec<&str> = runner_line.split_whitespace().collect();
    assert_eq!(
        cells[..3],
        ["runner", "running", &runner_pid.to_string()],
        "{table}"
    );
    assert!(table.contains("/ 1,000,000"), "{table}");

    // Starting a quarantined agent is refused, pointing at `release`.
    let out = cli(&fleet, &["start", "held"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: cannot start `held`: it is quarantined (runaway: 4 failing retries)\n\
         hint: inspect it with `supervisor quarantine`, then `supervisor release held` lets it run again\n"
    );
    assert!(fleet.read("held.pid").is_none());

    // An unknown agent is named, with the ones that exist.
    let out = cli(&fleet, &["stop", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: unknown agent `nope` in `"), "{err}");
    assert!(
        err.contains("hint: the fleet's agents are `held`, `metered`, `quitter`, `runner`"),
        "{err}"
    );

    // A ceiling lowered below this month's usage locks the agent out.
    fleet.write_fleet(&metered_fleet("{ monthly_tokens: 1 }"));
    ok(&fleet, &["reload"]);
    let metered = wait_state(&fleet, "metered", "locked_out");
    assert_eq!(metered["monthly_tokens_ceiling"], 1);
    assert!(
        metered["pid"].is_u64(),
        "still running, just refused: {metered}"
    );

    stop_supervisor(sup);
}

#[test]
fn stop_start_restart_and_a_stopped_agent_stays_stopped_across_reloads() {
    let fleet = FleetDir::new();
    let yaml = |mode: &str| {
        fleet_yaml(&[
            sleeper("a", &format!("    env: {{ MODE: {mode} }}\n")),
            sleeper("b", ""),
        ])
    };
    fleet.write_fleet(&yaml("one"));
    let sup = start(&fleet);
    let a1 = fleet.wait_pid("a");
    let b1 = fleet.wait_pid("b");

    let said = ok(&fleet, &["stop", "a"]);
    assert_eq!(
        said,
        "stopped `a`; it stays stopped until `supervisor start a`\n"
    );
    // The answer comes once the whole group is gone.
    assert!(!group_alive(a1), "stop answers after the group is gone");
    let a = row(&fleet, "a");
    assert_eq!(a["state"], "stopped");
    assert_eq!(a["pid"], Value::Null);
    assert_eq!(a["last_exit"], "killed by SIGTERM");
    assert!(process_alive(b1), "other agents are untouched");
    assert_eq!(ok(&fleet, &["stop", "a"]), "`a` is already stopped\n");

    // A reload that finds it unchanged, and one that changes it: it stays down.
    forget_pid(&fleet, "a");
    let out = ok(&fleet, &["reload"]);
    assert_eq!(
        out,
        format!(
            "reloaded `{}`\nunchanged: 2 agents\n",
            fleet.file("fleet.yaml").display()
        )
    );
    fleet.write_fleet(&yaml("two"));
    let out = ok(&fleet, &["reload"]);
    assert!(out.contains("changed (stays stopped): a\n"), "{out}");
    sup.wait_log("it stays stopped until `supervisor start a`");
    sup.signal(Signal::SIGHUP);
    sup.wait_log("unchanged=2");
    assert_eq!(row(&fleet, "a")["state"], "stopped");
    assert!(
        fleet.read("a.pid").is_none(),
        "a stopped agent was started by a reload"
    );

    // `start` brings it back, with the changed spec.
    let said = ok(&fleet, &["start", "a"]);
    let a2 = fleet.wait_pid("a");
    assert_ne!(a2, a1);
    assert_eq!(said, format!("started `a` (pid {a2})\n"));
    assert_eq!(wait_state(&fleet, "a", "running")["pid"], a2);
    let env = std::fs::read(format!("/proc/{a2}/environ")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&env).contains("MODE=two"),
        "started with what the reload changed"
    );
    assert_eq!(
        ok(&fleet, &["start", "a"]),
        format!("`a` is already running (pid {a2})\n")
    );

    // `restart`: a new process; the other agent keeps its pid.
    forget_pid(&fleet, "b");
    let said = ok(&fleet, &["restart", "b"]);
    let b2 = fleet.wait_pid("b");
    assert_ne!(b2, b1);
    assert_eq!(said, format!("restarted `b` (pid {b2})\n"));
    wait_gone(b1);
    assert!(process_alive(a2));
    let b = row(&fleet, "b");
    assert_eq!(b["restarts"], 1);
    assert_eq!(b["pid"], b2);

    stop_supervisor(sup);
}

#[test]
fn reload_prints_the_diff_or_the_errors_and_keeps_the_fleet() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&fleet_yaml(&[
        sleeper("keeper", ""),
        sleeper("leaver", ""),
        sleeper("changer", "    env: { MODE: one }\n"),
    ]));
    let sup = start(&fleet);
    let keeper = fleet.wait_pid("keeper");
    let leaver = fleet.wait_pid("leaver");
    let changer = fleet.wait_pid("changer");

    forget_pid(&fleet, "changer");
    fleet.write_fleet(&fleet_yaml(&[
        sleeper("keeper", ""),
        sleeper("changer", "    env: { MODE: two }\n"),
        sleeper("joiner", ""),
    ]));
    let out = ok(&fleet, &["reload"]);
    assert_eq!(
        out,
        format!(
            "reloaded `{}`\nadded (started): joiner\nremoved (stopped): leaver\nchanged (restarted): changer\nunchanged: 1 agent\n",
            fleet.file("fleet.yaml").display()
        )
    );
    let joiner = fleet.wait_pid("joiner");
    let changer2 = fleet.wait_pid("changer");
    assert_ne!(changer2, changer);
    wait_gone(leaver);
    assert!(process_alive(keeper));

    // A broken file: the errors with line:col, exit 1, nothing touched.
    fleet.write_fleet("version: 1\nagents:\n  keeper:\n    comand: [true]\n");
    let out = cli(&fleet, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let err = stderr(&out);
    let file = fleet.file("fleet.yaml");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0],
        "error: reload rejected; the running fleet is unchanged"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{}:4:5: ", file.display()))),
        "names file:line:col:\n{err}"
    );
    assert!(lines.last().unwrap().starts_with("hint: "), "{err}");
    // A syntax error too (the CLI must still find the supervisor).
    fleet.write_fleet("version: 1\nagents: [\n");
    let out = cli(&fleet, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("reload rejected"), "{}", stderr(&out));
    for pid in [keeper, joiner, changer2] {
        assert!(
            process_alive(pid),
            "pid {pid} must survive a rejected reload"
        );
    }
    assert_eq!(status(&fleet).len(), 3, "the fleet is as it was");

    stop_supervisor(sup);
}

#[test]
fn no_supervisor_running_is_one_clear_line_and_exit_3() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&fleet_yaml(&[sleeper("a", "")]));
    let socket = fleet.file(".supervisor/control.sock");
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["reload"],
        &["start", "a"],
        &["stop", "a"],
        &["restart", "a"],
    ] {
        let out = cli(&fleet, args);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert_eq!(stdout(&out), "");
        assert_eq!(
            stderr(&out),
            format!(
                "error: no supervisor is running for `{}` (no control socket at `{}`)\n\
                 hint: start one with `supervisor run`\n",
                fleet.file("fleet.yaml").display(),
                socket.display()
            ),
            "{args:?}"
        );
    }

    // After a supervisor stops, its socket is gone and the answer is the same.
    let sup = start(&fleet);
    assert_eq!(status(&fleet).len(), 1);
    stop_supervisor(sup);
    assert!(!socket.exists(), "the socket is removed at shutdown");
    assert_eq!(cli(&fleet, &["status"]).status.code(), Some(3));
}

#[test]
fn the_socket_is_private_and_follows_the_runtime_directory() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&fleet_yaml(&[sleeper("a", "")]));
    let sup = start(&fleet);
    let socket = fleet.file(".supervisor/control.sock");
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    stop_supervisor(sup);

    // Under systemd: in `$RUNTIME_DIRECTORY`, linked from `state_dir`.
    let runtime = tempfile::tempdir().unwrap();
    let runtime_dir = runtime.path().to_str().unwrap();
    let sup = fleet.run(&[("RUNTIME_DIRECTORY", runtime_dir)]);
    sup.wait_log("control socket listening");
    let socket = runtime.path().join("control.sock");
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let link = fleet.file(".supervisor/control.sock");
    assert_eq!(std::fs::read_link(&link).unwrap(), socket);
    // Found with `$RUNTIME_DIRECTORY` (as `ExecReload=` runs) and without it.
    let with_env = cli_env(
        &fleet,
        &["status", "--json"],
        &[("RUNTIME_DIRECTORY", runtime_dir)],
    );
    assert!(with_env.status.success(), "{}", stderr(&with_env));
    let rows: Vec<Value> = serde_json::from_slice(&with_env.stdout).unwrap();
    let pid = fleet.wait_pid("a");
    assert_eq!(rows[0]["pid"], pid);
    assert_eq!(row(&fleet, "a")["pid"], pid);
    stop_supervisor(sup);
    assert!(!socket.exists() && std::fs::symlink_metadata(&link).is_err());
}

#[test]
fn a_budget_only_reload_with_a_quarantined_agent_names_every_agent_once() {
    let fleet = FleetDir::new();
    let yaml = |budget: &str| {
        format!(
            "version: 1
agents:
  alpha:
    command: [sleep, '1000']
  beta:
    command: [sleep, '1000']
    budget: {{ monthly_tokens: {budget} }}
  gamma:
    command: [sleep, '1000']
"
        )
    };
    fleet.write_fleet(&yaml("1M"));
    // `gamma` was quarantined by an earlier run.
    let state = fleet.file(".supervisor");
    std::fs::create_dir_all(&state).unwrap();
    agent_supervisor::ledger::put_quarantine(
        &state,
        &agent_supervisor::ledger::QuarantineRecord {
            agent: "gamma".into(),
            since_ms: 1,
            reason: "runaway: 4 failing retries in a row".into(),
            evidence: serde_json::json!({}),
        },
    )
    .unwrap();
    let sup = start(&fleet);
    let path = fleet.file("fleet.yaml");

    fleet.write_fleet(&yaml("2M"));
    assert_eq!(
        ok(&fleet, &["reload"]),
        format!(
            "reloaded `{}`\nchanged live (budget): beta\nheld (quarantined): gamma\nunchanged: 1 agent\n",
            path.display()
        )
    );
    // `release` names the agent it let go as released and started, not added.
    assert_eq!(
        ok(&fleet, &["release", "gamma"]),
        format!(
            "released agent \"gamma\"\nthe running supervisor reloaded: \"gamma\" starts again\nreloaded `{}`\nreleased (started): gamma\nunchanged: 2 agents\n",
            path.display()
        )
    );
    stop_supervisor(sup);
}
