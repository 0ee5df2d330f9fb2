//! README "Metering proxy" and "Runaway containment", end to end with the
//! official `anthropic` and `openai` Python SDKs as the agents' clients.

mod common;

use common::fake_upstream::{ANTHROPIC_KEY, Config, FakeUpstream, OPENAI_KEY};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

#[test]
fn official_sdks_through_the_proxy_are_metered_exactly() {
    let py = python_with_sdks();
    let fake = FakeUpstream::start(Config::default());
    let fleet = FleetDir::new();
    fleet.write_secret("client", "anthropic_key", ANTHROPIC_KEY);
    fleet.write_secret("client", "openai_key", OPENAI_KEY);
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
providers:
  claude: {{ kind: anthropic, upstream: '{url}' }}
  gpt: {{ kind: openai, upstream: '{url}' }}
agents:
  client:
    command: ['{py}', '{script}']
    llm:
      - {{ provider: claude, key: anthropic_key }}
      - {{ provider: gpt, key: openai_key }}
    budget: {{ monthly_tokens: 1M }}
",
        url = fake.url(),
        py = py.display(),
        script = repo_file("tests/sdk/metered_client.py").display(),
    ));
    let mut sup = fleet.run(&[]);
    let report: Value = wait_for_within("the SDK client's report", PATIENCE_SDK, || {
        fleet
            .read("sdk-report.json")
            .and_then(|t| serde_json::from_str(&t).ok())
    });
    // What the SDKs parsed is what the fake billed, request by request.
    let billed: Vec<_> = fake.requests().iter().map(|r| r.billed).collect();
    assert_eq!(
        report["anthropic"][0][0], billed[0].input_tokens,
        "{report}"
    );
    assert_eq!(
        report["anthropic"][2][1], 529,
        "errors reach the SDK as its own typed error: {report}"
    );
    assert!(report["openai"][1].as_u64().unwrap() > 2, "{report}");

    let total = fake.billed().total;
    let rows = usage_json(&fleet);
    let row = &rows[0];
    // Every request the SDKs sent (their own retries of the 529 included) is a row.
    assert_eq!(row["requests"], fake.requests().len(), "{rows}");
    assert_eq!(row["input_tokens"], total.input_tokens);
    assert_eq!(row["output_tokens"], total.output_tokens);
    assert_eq!(
        row["cache_read_input_tokens"],
        total.cache_read_input_tokens
    );
    assert_eq!(
        row["charged_tokens"],
        total.tokens(),
        "ledger = upstream tally"
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}

fn runaway_fleet(py: &std::path::Path, webhook: &str) -> String {
    format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
alerts: {{ webhook: '{webhook}' }}
providers:
  sim: {{ kind: simulated }}
defaults:
  runaway: {{ failing_retries: 3 }}
  restart: {{ backoff_initial: 200ms }}
agents:
  looper:
    command: ['{py}', '{looping}']
    llm: [ {{ provider: sim }} ]
  steady:
    command: ['{py}', '{steady}']
    llm: [ {{ provider: sim }} ]
",
        py = py.display(),
        looping = repo_file("tests/sdk/looping_agent.py").display(),
        steady = repo_file("tests/sdk/steady_agent.py").display(),
    )
}

fn successes(fleet: &FleetDir, agent: &str) -> usize {
    fleet
        .read(&format!("{agent}.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("ok "))
        .count()
}

fn cli(fleet: &FleetDir, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap()
}

#[test]
fn a_runaway_is_quarantined_and_stays_down_until_released() {
    let py = python_with_sdks();
    let fleet = FleetDir::new();
    let hook = common::webhook::Webhook::start();
    fleet.write_fleet(&runaway_fleet(&py, &hook.url));
    let mut sup = fleet.run(&[]);
    let looper = wait_for_within("looper.pid", PATIENCE_SDK, || {
        fleet
            .read("looper.pid")
            .and_then(|s| s.trim().parse::<i32>().ok())
    });
    wait_for_within("the quarantine", PATIENCE_SDK, || {
        sup.log()
            .contains("looper: quarantined: runaway")
            .then_some(())
    });
    wait_gone(looper);
    let log = fleet.read("looper.log").unwrap();
    let looping_calls = log.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(
        looping_calls <= 4,
        "tripped within failing_retries + 1 calls: {log}"
    );
    assert!(
        log.contains("refused 403"),
        "the SDK saw the refusal: {log}"
    );
    assert!(log.contains("permission_error"), "{log}");

    // The webhook got a Slack-compatible alert with the evidence.
    let alert = wait_for_within("the quarantine alert", PATIENCE_SDK, || {
        hook.received()
            .into_iter()
            .find(|a| a["event"] == "agent_quarantined")
    });
    assert_eq!(alert["agent"], "looper");
    assert!(
        alert["text"].as_str().unwrap().contains("quarantined"),
        "{alert}"
    );
    assert!(
        alert["evidence_summary"].as_str().unwrap().contains("step"),
        "{alert}"
    );

    // The sibling keeps working.
    let before = successes(&fleet, "steady");
    wait_for_within("steady to keep working", PATIENCE_SDK, || {
        (successes(&fleet, "steady") > before + 3).then_some(())
    });

    let listed = cli(&fleet, &["quarantine", "--json"]);
    let records: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(records[0]["agent"], "looper");
    assert!(
        records[0]["reason"]
            .as_str()
            .unwrap()
            .contains("failing retries")
    );
    assert!(
        records[0]["evidence"]["steps"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );

    // Across a supervisor restart it stays down.
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    let _ = std::fs::remove_file(fleet.file("looper.pid"));
    let _ = std::fs::remove_file(fleet.file("steady.pid"));
    let mut sup = fleet.run(&[]);
    sup.wait_log("looper: stays quarantined");
    let steady = fleet.wait_pid("steady");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        fleet.read("looper.pid").is_none(),
        "a quarantined agent is not started"
    );

    // A release while fleet.yaml is broken is refused with the file's
    // errors and releases nothing: the agent stays quarantined.
    let good = fleet.read("fleet.yaml").unwrap();
    fleet.write_fleet(&format!("{good}bogus_section: 1\n"));
    let refused = cli(&fleet, &["release", "looper"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("bogus_section"), "{err}");
    assert!(err.contains("hint: nothing was released"), "{err}");

    // Fixed: the release reaches the running supervisor, which starts it again.
    fleet.write_fleet(&good);
    let listed = cli(&fleet, &["quarantine", "--json"]);
    let records: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(records[0]["agent"], "looper", "still quarantined");
    let released = cli(&fleet, &["release", "looper"]);
    let out = String::from_utf8_lossy(&released.stdout);
    assert!(
        released.status.success(),
        "{}",
        String::from_utf8_lossy(&released.stderr)
    );
    assert!(
        out.contains(
            "released agent \"looper\"\nthe running supervisor reloaded: \"looper\" starts again"
        ),
        "{out}"
    );
    wait_for_within("looper to start again", PATIENCE_SDK, || {
        fleet.read("looper.pid")
    });
    sup.wait_log("released from quarantine");
    assert!(process_alive(steady), "release touches nothing else");
    let again = cli(&fleet, &["release", "looper"]);
    assert_eq!(again.status.code(), Some(1));
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}

/// Waits until `agent` is quarantined or its script gave up (the loop was
/// missed); returns its log.
fn quarantined_or_gave_up(fleet: &FleetDir, sup: &mut Supervisor, agent: &str) -> String {
    let deadline = std::time::Instant::now() + PATIENCE_SDK;
    loop {
        let log = fleet.read(&format!("{agent}.log")).unwrap_or_default();
        if sup
            .log()
            .contains(&format!("{agent}: quarantined: runaway"))
            || log.contains("gave up")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "neither a quarantine nor the agent giving up; agent log:\n{log}\nsupervisor log:\n{}",
            sup.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = fleet.wait_pid(agent);
    if !fleet
        .read(&format!("{agent}.log"))
        .unwrap_or_default()
        .contains("gave up")
    {
        wait_gone(pid);
    }
    fleet.read(&format!("{agent}.log")).unwrap_or_default()
}

#[test]
fn a_cache_aware_anthropic_loop_is_quarantined_within_failing_retries_plus_one_calls() {
    let py = python_with_sdks();
    let fleet = FleetDir::new();
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
providers:
  sim: {{ kind: simulated }}
agents:
  cacher:
    command: ['{py}', '{script}']
    llm: [ {{ provider: sim }} ]
    runaway: {{ failing_retries: 3 }}
",
        py = py.display(),
        script = repo_file("tests/sdk/caching_agent.py").display(),
    ));
    let mut sup = fleet.run(&[]);
    let log = quarantined_or_gave_up(&fleet, &mut sup, "cacher");
    assert!(
        !log.contains("gave up"),
        "moving cache_control hid the loop: {log}"
    );
    let calls = log.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(
        calls <= 4,
        "first call + failing_retries looping calls: {log}"
    );
    assert!(log.contains("refused 403"), "{log}");
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}

#[test]
fn a_previous_response_id_loop_is_quarantined_within_failing_retries_plus_one_calls() {
    let py = python_with_sdks();
    let fake = FakeUpstream::start(Config::default());
    let fleet = FleetDir::new();
    fleet.write_secret("chainer", "openai_key", OPENAI_KEY);
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
providers:
  gpt: {{ kind: openai, upstream: '{url}' }}
agents:
  chainer:
    command: ['{py}', '{script}']
    llm: [ {{ provider: gpt, key: openai_key }} ]
    runaway: {{ failing_retries: 3 }}
",
        url = fake.url(),
        py = py.display(),
        script = repo_file("tests/sdk/responses_state_agent.py").display(),
    ));
    let mut sup = fleet.run(&[]);
    let log = quarantined_or_gave_up(&fleet, &mut sup, "chainer");
    assert!(
        !log.contains("gave up"),
        "server-side state hid the loop: {log}"
    );
    let calls: Vec<&str> = log.lines().filter(|l| l.starts_with("ok ")).collect();
    assert!(
        calls.len() <= 4,
        "first call + failing_retries looping calls: {log}"
    );
    assert!(log.contains("refused 403"), "{log}");
    // The SDK really chained: each answer continued the one before, and the
    // provider billed the growing chain although every request was small.
    let requests = fake.requests();
    assert_eq!(
        requests.len(),
        calls.len(),
        "the refused call never reached it"
    );
    for pair in requests.windows(2) {
        assert!(
            pair[1].billed.input_tokens > pair[0].billed.input_tokens,
            "{log}"
        );
    }
    for pair in calls.windows(2) {
        let id = pair[0].split(' ').nth(2).unwrap();
        assert_eq!(pair[1].split(' ').nth(3), Some(id), "{log}");
    }
    let listed = cli(&fleet, &["quarantine", "--json"]);
    let records: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(records[0]["agent"], "chainer");
    assert!(
        records[0]["reason"]
            .as_str()
            .unwrap()
            .contains("failing retries"),
        "{records}"
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}
