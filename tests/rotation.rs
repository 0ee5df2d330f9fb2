//! README "Key rotation": a new version of a proxied key swaps in place under
//! live SDK traffic (picked up from the vault by the watcher, no SIGHUP); a
//! new env secret restarts only its agent, with the new value; rotation
//! policies run their `issuer` and `revoke` hooks, and a failing issuer
//! alerts and keeps the old key.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use agent_supervisor::ledger::rotation::observe_version;
use agent_supervisor::vault::Secret;
use common::fake_upstream::{ANTHROPIC_KEY, Config, FakeUpstream};
use common::webhook::Webhook;
use common::*;
use serde_json::Value;

/// Replaces a secret the way an operator's tooling should: temp file + rename.
fn replace_secret(fleet: &FleetDir, agent: &str, name: &str, value: &str) {
    let dir = fleet.file("secrets").join(agent);
    let tmp = dir.join(format!(".{name}.new"));
    fs::write(&tmp, format!("{value}\n")).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

fn cli(fleet: &FleetDir, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_proxied_key_swaps_in_place_under_live_sdk_traffic() {
    const NEW_KEY: &str = "sk-ant-rotated-0002";
    let py = python_with_sdks();
    let fake = FakeUpstream::start(Config {
        anthropic_keys: vec![ANTHROPIC_KEY.to_owned(), NEW_KEY.to_owned()],
        ..Config::default()
    });
    let fleet = FleetDir::new();
    fleet.write_secret("steady", "anthropic_key", ANTHROPIC_KEY);
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
providers:
  claude: {{ kind: anthropic, upstream: '{url}' }}
agents:
  steady:
    command: ['{py}', '{script}']
    llm: [ {{ provider: claude, key: anthropic_key }} ]
",
        url = fake.url(),
        py = py.display(),
        script = repo_file("tests/sdk/steady_agent.py").display(),
    ));
    let sup = fleet.run(&[]);
    let pid = fleet.wait_pid("steady");
    let ok_lines = || {
        fleet
            .read("steady.log")
            .map_or(0, |l| l.lines().filter(|l| l.starts_with("ok")).count())
    };
    wait_for("traffic before the swap", || {
        (ok_lines() >= 3).then_some(())
    });

    // No SIGHUP: the vault watcher picks the new version up by itself.
    replace_secret(&fleet, "steady", "anthropic_key", NEW_KEY);
    sup.wait_log("cause=\"the vault changed\"");
    sup.wait_log("reload applied");
    let after_swap = fake.requests().len();
    wait_for("traffic after the swap", || {
        (fake.requests().len() >= after_swap + 6).then_some(())
    });

    // The agent sends one request at a time: at most one was in flight
    // across the swap; every later one carries the new key.
    let keys: Vec<Option<String>> = fake.requests().iter().map(|r| r.key.clone()).collect();
    assert!(
        keys[after_swap + 1..]
            .iter()
            .all(|k| k.as_deref() == Some(NEW_KEY)),
        "keys after the swap: {:?}",
        &keys[after_swap..]
    );
    assert!(
        keys[..after_swap]
            .iter()
            .any(|k| k.as_deref() == Some(ANTHROPIC_KEY))
    );
    assert!(fake.requests().iter().all(|r| r.status == 200));
    let log = fleet.read("steady.log").unwrap_or_default();
    assert!(!log.contains("error"), "failed requests:\n{log}");
    // Same process: no restart.
    assert_eq!(fleet.wait_pid("steady"), pid);
    assert!(process_alive(pid));
    assert!(!sup.log().contains(NEW_KEY) && !sup.log().contains(ANTHROPIC_KEY));
}

fn token_agent(name: &str) -> String {
    format!(
        "  {name}:\n    command: [sh, -c, 'echo \"$TOKEN\" > {name}.token; echo $$ > {name}.pid; exec sleep 1000']\n    secrets: {{ TOKEN: token }}\n"
    )
}

#[test]
fn a_new_env_secret_restarts_only_its_agent_with_the_new_value() {
    let fleet = FleetDir::new();
    fleet.write_secret("a", "token", "tok-a-1");
    fleet.write_secret("b", "token", "tok-b-1");
    fleet.write_fleet(&format!(
        "version: 1\nagents:\n{}{}",
        token_agent("a"),
        token_agent("b")
    ));
    let sup = fleet.run(&[]);
    let (pid_a, pid_b) = (fleet.wait_pid("a"), fleet.wait_pid("b"));
    wait_for("a's token", || {
        (fleet.read("a.token").as_deref() == Some("tok-a-1\n")).then_some(())
    });

    replace_secret(&fleet, "a", "token", "tok-a-2");
    let (ok, stdout, stderr) = cli(&fleet, &["rotate", "a", "token"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("`token` (TOKEN, env)"), "{stdout}");
    assert!(
        stdout.contains("the running supervisor reloaded: new versions are picked up"),
        "{stdout}"
    );
    assert!(!stdout.contains("tok-a"), "{stdout}");

    wait_for("a restarted with the new value", || {
        (fleet.read("a.token").as_deref() == Some("tok-a-2\n")).then_some(())
    });
    // The agent writes its token before its pid: wait for the new pid too.
    wait_for("a's new pid", || {
        (fleet.wait_pid("a") != pid_a).then_some(())
    });
    wait_gone(pid_a);
    assert!(process_alive(pid_b), "b must not restart");
    assert_eq!(fleet.read("b.pid").unwrap().trim(), pid_b.to_string());
    assert!(!sup.log().contains("tok-a-2"));

    let (ok, stdout, _) = cli(&fleet, &["rotate", "a", "nope"]);
    assert!(!ok, "{stdout}");
    let (_, _, stderr) = cli(&fleet, &["rotate", "a", "nope"]);
    assert_eq!(
        stderr,
        "error: agent `a` has no secret `nope`\nhint: its secrets are `token`\n"
    );
}

#[test]
fn rotation_policies_issue_swap_revoke_and_alert_on_failure() {
    let hook = Webhook::start();
    let fleet = FleetDir::new();
    fleet.write_secret("a", "token", "tok-a-1");
    fleet.write_secret("b", "token", "tok-b-1");
    fs::write(fleet.file("issue.sh"), "echo \"tok-$SUPERVISOR_AGENT-2\"\n").unwrap();
    fs::write(
        fleet.file("revoke.sh"),
        "cat > revoked-$SUPERVISOR_AGENT.json\n",
    )
    .unwrap();
    let agent = |name: &str, issuer: &str| {
        format!(
            "  {name}:\n    command: [sh, -c, 'echo \"$TOKEN\" > {name}.token; echo $$ > {name}.pid; exec sleep 1000']\n    secrets:\n      TOKEN: {{ name: token, rotate_every: 90d, issuer: {issuer}, revoke: [sh, revoke.sh], grace: 1s }}\n"
        )
    };
    fleet.write_fleet(&format!(
        "version: 1\nstate_dir: state\nalerts: {{ webhook: '{}' }}\nagents:\n{}{}",
        hook.url,
        agent("a", "[sh, issue.sh]"),
        agent("b", "[sh, -c, 'echo tok-leaked; exit 3']"),
    ));
    let (ok, stdout, stderr) = cli(&fleet, &["check"]);
    assert!(ok, "{stdout}{stderr}");

    // Both tokens were first seen 100 days ago: due at start.
    let state = fleet.file("state");
    fs::create_dir_all(&state).unwrap();
    let long_ago = agent_supervisor::ledger::unix_millis_now() - 100 * 86_400_000;
    let old_a = Secret::new("tok-a-1".into()).fingerprint();
    let old_b = Secret::new("tok-b-1".into()).fingerprint();
    observe_version(&state, "a", "token", &old_a, long_ago).unwrap();
    observe_version(&state, "b", "token", &old_b, long_ago).unwrap();

    let sup = fleet.run(&[]);
    let pid_b = fleet.wait_pid("b");
    let restarted = std::panic::catch_unwind(|| {
        wait_for("a restarted with the issued value", || {
            (fleet.read("a.token").as_deref() == Some("tok-a-2\n")).then_some(())
        })
    });
    assert!(restarted.is_ok(), "supervisor log:\n{}", sup.log());
    let revoked: Value = wait_for("a's old version revoked", || {
        fleet
            .read("revoked-a.json")
            .and_then(|t| serde_json::from_str(&t).ok())
    });
    assert_eq!(
        revoked,
        serde_json::json!({"secret": "token", "agent": "a", "fingerprint": old_a})
    );

    // b's issuer failed: alert, old key kept, no restart, no revoke.
    let alert = wait_for("the rotation_failed alert", || {
        hook.received()
            .into_iter()
            .find(|b| b["event"] == "rotation_failed")
    });
    assert_eq!(alert["agent"], "b");
    assert_eq!(alert["secret"], "token");
    assert_eq!(alert["message"], "the issuer `sh` exited with code 3");
    assert_eq!(fleet.read("b.token").as_deref(), Some("tok-b-1\n"));
    assert_eq!(
        fs::read_to_string(fleet.file("secrets/b/token")).unwrap(),
        "tok-b-1\n"
    );
    assert!(process_alive(pid_b));
    assert!(fleet.read("revoked-b.json").is_none());
    assert!(!sup.log().contains("tok-leaked") && !sup.log().contains("tok-a-2"));
    let mode = fs::metadata(fleet.file("secrets/a/token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (ok, stdout, stderr) = cli(&fleet, &["rotate", "--history", "--json"]);
    assert!(ok, "{stderr}");
    let rows: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    let new_a = Secret::new("tok-a-2".into()).fingerprint();
    let mut summary: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                r["agent"], r["outcome"], r["old_fingerprint"], r["new_fingerprint"]
            )
        })
        .collect();
    summary.sort();
    assert_eq!(
        summary,
        [
            format!("\"a\" \"revoked\" \"{old_a}\" \"{new_a}\""),
            format!("\"a\" \"rotated\" \"{old_a}\" \"{new_a}\""),
            format!("\"b\" \"failed\" \"{old_b}\" null"),
        ]
    );
    let (_, text, _) = cli(&fleet, &["rotate", "--history", "b"]);
    assert!(text.contains("b/token  failed"), "{text}");
}

#[test]
fn agents_restarted_for_new_secrets_go_one_at_a_time() {
    let fleet = FleetDir::new();
    let agent = |name: &str| {
        format!(
            "  {name}:\n    command: [sh, -c, 'trap \"echo stop {name} >> events; sleep 0.5; exit 0\" TERM; echo start {name} $TOKEN >> events; echo $$ > {name}.pid; while true; do sleep 0.1; done']\n    secrets: {{ TOKEN: token }}\n"
        )
    };
    fleet.write_secret("a", "token", "a1");
    fleet.write_secret("b", "token", "b1");
    fleet.write_fleet(&format!(
        "version: 1\nagents:\n{}{}",
        agent("a"),
        agent("b")
    ));
    let sup = fleet.run(&[]);
    let events = || {
        fleet
            .read("events")
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    wait_for("both agents up", || (events().len() == 2).then_some(()));

    // One write of the vault changes both agents' secrets.
    replace_secret(&fleet, "a", "token", "a2");
    replace_secret(&fleet, "b", "token", "b2");
    sup.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("both agents restarted", || {
        (events().len() == 6).then_some(())
    });

    let mut after: Vec<String> = events()[2..].to_vec();
    after.sort();
    assert_eq!(after, ["start a a2", "start b b2", "stop a", "stop b"]);

    // Each agent is stopped and started again before the next one is stopped
    // (the supervisor's own account: an agent's first output may come later).
    let log = sup.log();
    let since_reload = &log[log.find("INFO reloading").unwrap()..];
    let steps: Vec<String> = since_reload
        .lines()
        .filter_map(|line| {
            let (_, event) = line.split_once("supervisor | INFO ")?;
            let (name, rest) = event.split_once(": ")?;
            if rest.starts_with("stopping agent") {
                Some(format!("stop {name}"))
            } else if rest.starts_with("agent started") {
                Some(format!("start {name}"))
            } else {
                None
            }
        })
        .collect();
    let first = steps[0].strip_prefix("stop ").unwrap_or("?").to_owned();
    let second = if first == "a" { "b" } else { "a" };
    assert_eq!(
        steps,
        [
            format!("stop {first}"),
            format!("start {first}"),
            format!("stop {second}"),
            format!("start {second}"),
        ],
        "{log}"
    );
}

/// The `env` backend's secrets are the supervisor's own environment, fixed
/// at its start: `rotate` says it cannot rotate them instead of
/// fingerprinting this shell's variables (or failing to find them).
#[test]
fn rotate_refuses_the_env_backend_and_says_what_to_do() {
    let fleet = FleetDir::new();
    fleet.write_fleet(
        "version: 1\nvault: { backend: env }\nagents:\n  a:\n    command: [sleep, '1000']\n    secrets: { TOKEN: token }\n",
    );
    for env in [vec![], vec![("SUPERVISOR_SECRET_a__token", "tok-a-1")]] {
        let out = Command::new(bin())
            .args(["rotate", "a", "token", "-f"])
            .arg(fleet.file("fleet.yaml"))
            .envs(env)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr,
            "error: cannot rotate secrets with the `env` vault backend: they are the supervisor's own \
             `SUPERVISOR_SECRET_*` environment variables, fixed when it started\n\
             hint: restart the supervisor with the new values, or use the `dir` or `systemd-creds` \
             backend, whose new versions are picked up while it runs\n"
        );
        assert!(out.stdout.is_empty());
    }
}
