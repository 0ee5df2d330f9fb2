//! README "Runaway containment", the spend-velocity backstop: a real
//! supervisor over a ledger holding three weeks of synthetic history, a fake
//! provider with its own bill, and agents whose requests look healthy to every
//! structural rule (each a new conversation, no errors, no tool calls). One
//! suddenly spends far above its own baseline and trips — an alert by
//! default, a quarantine when configured; another bursts far above its own
//! (tiny) baseline but under the floor, and does not.

mod common;

use agent_supervisor::budget::Month;
use agent_supervisor::ledger::{Ledger, unix_millis_now};
use common::fake_upstream::{ANTHROPIC_KEY, Config, FakeUpstream};
use common::webhook::Webhook;
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const MINUTE: i64 = 60_000;

/// `NAME N CACHE0 STEP KIND`: `N` Anthropic calls with plain urllib, each a
/// new conversation about a new, longer document, billed `CACHE0 + STEP * i`
/// cache tokens on top, `KIND` `read` or `write` (velocity weighs a cache
/// write at 1.25, a read at 0.1 of a fresh input token). Writes the statuses
/// so far to `NAME.statuses` after each call, then idles. Its pid is in `NAME.pid`.
const AGENT: &str = r#"
import json, os, sys, time, urllib.error, urllib.request
name, n, cache0, step, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
base, key = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
with open(name + ".pid", "w") as f:
    f.write(str(os.getpid()))
statuses = []
for i in range(n):
    doc = " ".join(f"section {i}.{j} of the {name} corpus" for j in range(8 + 4 * i))
    body = json.dumps({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": "You summarise documents in one paragraph.",
        "messages": [{"role": "user", "content": f"Summarise document {i}: {doc}"}],
    }).encode()
    req = urllib.request.Request(base + "/v1/messages", data=body, headers={
        "x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01",
        "x-fake-cache-" + kind: str(cache0 + step * i)})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            statuses.append(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        statuses.append(e.code)
    with open(name + ".statuses.tmp", "w") as f:
        json.dump(statuses, f)
    os.rename(name + ".statuses.tmp", name + ".statuses")
time.sleep(3600)
"#;

/// Three weeks of one request every 30 minutes per agent, `tokens` fresh
/// input tokens each (charged at twice that, which velocity ignores),
/// written with the real schema: each agent's every active 10-minute window
/// holds exactly `tokens`, so its baseline (p95) is `tokens`.
fn write_history(state_dir: &std::path::Path, agents: &[(&str, u64)]) {
    std::fs::create_dir_all(state_dir).unwrap();
    drop(Ledger::open(state_dir).unwrap());
    let mut conn = rusqlite::Connection::open(state_dir.join("ledger.db")).unwrap();
    let tx = conn.transaction().unwrap();
    let now = unix_millis_now();
    for &(agent, tokens) in agents {
        for k in 1..=(21 * 48) {
            let at = now - k * 30 * MINUTE;
            let month = Month::from_unix_secs(at / 1000).to_string();
            tx.execute(
                "INSERT INTO requests (agent, provider, model, month, started_at_ms, reserved_tokens,
                                       reserved_micro_usd, settled, outcome, status, input_tokens,
                                       charged_tokens, charged_micro_usd)
                 VALUES (?1, 'claude', 'claude-sonnet-4-5', ?2, ?3, ?4, 0, 1, 'ok', 200, ?4, ?4 * 2, 0)",
                rusqlite::params![agent, month, at, tokens as i64],
            )
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn fleet_yaml(upstream: &str, hook: &str, crawler_runaway: &str) -> String {
    format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
alerts: {{ webhook: '{hook}' }}
providers:
  claude: {{ kind: anthropic, upstream: '{upstream}' }}
defaults:
  restart: {{ policy: never }}
  runaway:
    velocity: {{ floor_tokens: 30k }}
agents:
  crawler:
    command: [python3, agent.py, crawler, '20', '2400', '400', write]
    llm: [ {{ provider: claude, key: anthropic_key }} ]
{crawler_runaway}  poller:
    command: [python3, agent.py, poller, '10', '1600', '0', write]
    llm: [ {{ provider: claude, key: anthropic_key }} ]
"
    )
}

struct Setup {
    fake: FakeUpstream,
    hook: Webhook,
    fleet: FleetDir,
    sup: Supervisor,
}

/// The crawler's usual window is 10k tokens (its limit then 5 × 10k = 50k);
/// the poller's is 1k (5k, so the 30k floor is its limit).
fn start(crawler_runaway: &str) -> Setup {
    let fake = FakeUpstream::start(Config::default());
    let hook = Webhook::start();
    let fleet = FleetDir::new();
    for agent in ["crawler", "poller"] {
        fleet.write_secret(agent, "anthropic_key", ANTHROPIC_KEY);
    }
    std::fs::write(fleet.file("agent.py"), AGENT).unwrap();
    write_history(
        &fleet.file(".supervisor"),
        &[("crawler", 10_000), ("poller", 1_000)],
    );
    fleet.write_fleet(&fleet_yaml(&fake.url(), &hook.url, crawler_runaway));
    let sup = fleet.run(&[]);
    Setup {
        fake,
        hook,
        fleet,
        sup,
    }
}

fn statuses(fleet: &FleetDir, agent: &str, n: usize) -> Vec<Value> {
    wait_for(&format!("{agent}'s {n} calls"), || {
        let text = fleet.read(&format!("{agent}.statuses"))?;
        let v: Vec<Value> = serde_json::from_str(&text).ok()?;
        (v.len() == n).then_some(v)
    })
}

fn alerts(hook: &Webhook, event: &str, agent: &str) -> Vec<Value> {
    hook.received()
        .into_iter()
        .filter(|a| a["event"] == event && a["agent"] == agent)
        .collect()
}

#[test]
fn a_sudden_spend_far_above_the_agents_baseline_alerts_once_and_it_keeps_running() {
    let Setup {
        fake,
        hook,
        fleet,
        mut sup,
    } = start("");
    let alert = wait_for("the crawler's spend-velocity alert", || {
        alerts(&hook, "spend_velocity", "crawler")
            .into_iter()
            .next()
    });
    assert_eq!(alert["window_secs"], 600, "{alert}");
    assert_eq!(alert["baseline_tokens"], 10_000, "p95 of its history");
    assert_eq!(alert["threshold_tokens"], 50_000, "5 × its baseline");
    let spend = alert["spend_tokens"].as_u64().unwrap();
    assert!((50_001..70_000).contains(&spend), "{alert}");
    let text = alert["text"].as_str().unwrap();
    // The figures README "Runaway containment" quotes.
    eprintln!("{text}");
    for needle in [
        "agent `crawler` is spending unusually fast and keeps running (`runaway.velocity.action: alert`)",
        "tokens in the last 10m",
        "over 5 × its baseline of 10,000 per 10m (p95 of 336 active windows in the last 7d)",
        "limit 50,000, floor 30,000",
    ] {
        assert!(text.contains(needle), "{needle:?} in {text}");
    }

    // It keeps running: every call answered, the pattern reported once.
    assert!(
        statuses(&fleet, "crawler", 20).iter().all(|s| s == 200),
        "{}",
        sup.log()
    );
    let poller = statuses(&fleet, "poller", 10);
    assert!(poller.iter().all(|s| s == 200), "{poller:?}");
    assert_eq!(
        fake.billed().total.requests,
        30,
        "every call reached the provider"
    );
    // Let anything queued behind the last settlement reach the webhook.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        alerts(&hook, "spend_velocity", "crawler").len(),
        1,
        "one alert per episode: {:#?}",
        hook.received()
    );
    // The poller spent ~21k tokens in a burst, 21 × its baseline, but under
    // the floor; no structural rule saw a loop in either.
    assert!(
        alerts(&hook, "spend_velocity", "poller").is_empty(),
        "{:#?}",
        hook.received()
    );
    let others: Vec<Value> = hook
        .received()
        .into_iter()
        .filter(|a| a["event"] != "spend_velocity")
        .collect();
    assert!(others.is_empty(), "{others:#?}");
    assert!(
        sup.log().contains("crawler: spend velocity: "),
        "{}",
        sup.log()
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}

#[test]
fn with_action_quarantine_the_spender_is_refused_stopped_and_its_evidence_recorded() {
    let Setup {
        fake,
        hook,
        fleet,
        mut sup,
    } = start("    runaway: { velocity: { action: quarantine } }\n");
    let alert = wait_for("the crawler's quarantine alert", || {
        alerts(&hook, "agent_quarantined", "crawler")
            .into_iter()
            .next()
    });
    let reason = alert["reason"].as_str().unwrap();
    assert!(reason.starts_with("spend velocity: "), "{alert}");
    assert!(
        alert["evidence_summary"]
            .as_str()
            .unwrap()
            .contains("baseline: 10,000 tokens per window (p95 of 336 active windows over 7d)"),
        "{alert}"
    );
    sup.wait_log("crawler: quarantined: spend velocity");

    // The proxy refuses the crawler from the tripping settlement on and the
    // supervisor stops it (often before it can note the 403); the poller goes on.
    let pid = fleet.wait_pid("crawler");
    wait_gone(pid);
    assert!(statuses(&fleet, "poller", 10).iter().all(|s| s == 200));
    let reached = || {
        fake.requests()
            .iter()
            .filter(|r| r.body_text.contains("of the crawler corpus"))
            .count()
    };
    let calls = reached();
    eprintln!("crawler quarantined after {calls} calls reached the provider");
    assert!(
        (9..=11).contains(&calls),
        "tripped as its spend passed 50k tokens, at about the 10th call: {calls}"
    );
    let noted: Vec<Value> = fleet
        .read("crawler.statuses")
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    assert!(
        noted.iter().all(|s| s == 200 || s == 403)
            && noted.iter().filter(|s| *s == 200).count() <= calls,
        "{noted:?}"
    );
    assert!(
        fake.billed().total.requests == calls as u64 + 10,
        "only the crawler's first {calls} calls and the poller's 10 were billed"
    );

    // `supervisor quarantine` shows the window, the spend and the baseline.
    let out = std::process::Command::new(bin())
        .args(["quarantine", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "crawler  since ",
        "reason: spend velocity: ",
        "window 10m: ",
        "baseline: 10,000 tokens per window (p95 of 336 active windows over 7d)",
        "exceeded: 5 × baseline, limit 50,000 (floor 30,000)",
        "release with: supervisor release crawler",
    ] {
        assert!(text.contains(needle), "{needle:?} in {text}");
    }
    assert!(!text.contains("poller"), "{text}");
    let out = std::process::Command::new(bin())
        .args(["quarantine", "--json", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let evidence = &rows[0]["evidence"];
    assert_eq!(evidence["wire"], "spend_velocity");
    assert_eq!(evidence["baseline_tokens"], 10_000);
    assert_eq!(evidence["exceeded"]["rule"], "multiple");
    assert!(
        evidence["spend_tokens"].as_u64().unwrap() > 50_000,
        "{evidence}"
    );
    assert!(
        alerts(&hook, "agent_quarantined", "poller").is_empty(),
        "{:#?}",
        hook.received()
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}

/// Calls until `stop` exists, 0.1s apart, each ~3,100 weighted tokens; counts them in
/// `steady.count`.
const STEADY: &str = r#"
import json, os, time, urllib.request
base, key = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
i = 0
while not os.path.exists("stop"):
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16,
        "messages": [{"role": "user", "content": f"status report {i}"}]}).encode()
    req = urllib.request.Request(base + "/v1/messages", data=body, headers={
        "x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01",
        "x-fake-cache-write": "2400"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
    i += 1
    with open("steady.count.tmp", "w") as f:
        f.write(str(i))
    os.rename("steady.count.tmp", "steady.count")
    time.sleep(0.1)
time.sleep(3600)
"#;

#[test]
fn a_reload_applies_velocity_settings_live() {
    let fake = FakeUpstream::start(Config::default());
    let hook = Webhook::start();
    let fleet = FleetDir::new();
    fleet.write_secret("steady", "anthropic_key", ANTHROPIC_KEY);
    std::fs::write(fleet.file("steady.py"), STEADY).unwrap();
    let yaml = |velocity: &str| {
        format!(
            "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
alerts: {{ webhook: '{hook}' }}
providers:
  claude: {{ kind: anthropic, upstream: '{upstream}' }}
agents:
  steady:
    command: [python3, steady.py]
    llm: [ {{ provider: claude, key: anthropic_key }} ]
    runaway: {{ velocity: {{ {velocity} }} }}
",
            hook = hook.url,
            upstream = fake.url()
        )
    };
    fleet.write_fleet(&yaml("multiple: off"));
    let mut sup = fleet.run(&[]);
    wait_for("ten calls", || {
        let n: u64 = fleet.read("steady.count")?.trim().parse().ok()?;
        (n >= 10).then_some(())
    });
    assert!(hook.received().is_empty(), "{:#?}", hook.received());
    // ~31k tokens in the window already: over the new limit at once, and
    // the agent goes on (action: alert), no restart.
    fleet.write_fleet(&yaml("multiple: off, max_tokens_per_window: 20k"));
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload applied");
    let alert = wait_for("the spend-velocity alert", || {
        alerts(&hook, "spend_velocity", "steady").into_iter().next()
    });
    assert_eq!(alert["threshold_tokens"], 20_000, "{alert}");
    assert!(
        alert["text"]
            .as_str()
            .unwrap()
            .contains("over `max_tokens_per_window` 20,000"),
        "{alert}"
    );
    assert!(!sup.log().contains("restarting it"), "{}", sup.log());
    std::fs::write(fleet.file("stop"), "").unwrap();
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}

#[test]
fn a_restarted_supervisor_counts_what_the_agent_just_spent() {
    let fake = FakeUpstream::start(Config::default());
    let hook = Webhook::start();
    let fleet = FleetDir::new();
    fleet.write_secret("burst", "anthropic_key", ANTHROPIC_KEY);
    std::fs::write(fleet.file("agent.py"), AGENT).unwrap();
    // Eight calls of ~5,100 tokens: ~41k a run, under the 50k limit.
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
alerts: {{ webhook: '{hook}' }}
providers:
  claude: {{ kind: anthropic, upstream: '{upstream}' }}
agents:
  burst:
    command: [python3, agent.py, burst, '8', '4000', '0', write]
    restart: {{ policy: never }}
    llm: [ {{ provider: claude, key: anthropic_key }} ]
    runaway: {{ velocity: {{ multiple: off, max_tokens_per_window: 50k }} }}
",
        hook = hook.url,
        upstream = fake.url()
    ));
    let mut sup = fleet.run(&[]);
    assert!(statuses(&fleet, "burst", 8).iter().all(|s| s == 200));
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
    assert!(hook.received().is_empty(), "{:#?}", hook.received());

    // The same eight again within the window, under a new supervisor: the
    // first run's spend is read back from the ledger, so the two add up.
    std::fs::remove_file(fleet.file("burst.statuses")).unwrap();
    let mut sup = fleet.run(&[]);
    let alert = wait_for("the spend-velocity alert", || {
        alerts(&hook, "spend_velocity", "burst").into_iter().next()
    });
    let spend = alert["spend_tokens"].as_u64().unwrap();
    assert!((50_001..60_000).contains(&spend), "{alert}");
    assert!(
        alert["text"].as_str().unwrap().contains("(10 requests)")
            || alert["text"].as_str().unwrap().contains("(11 requests)"),
        "{alert}"
    );
    assert!(statuses(&fleet, "burst", 8).iter().all(|s| s == 200));
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}

/// `N`: `N` calls asking for up to 200k output tokens, each sent and then
/// cut by the provider (half a JSON body), as an outage resetting
/// connections after the request went out. Writes `outage.done` after.
const OUTAGE: &str = r#"
import json, os, time, urllib.request
base, key, n = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"], int(os.sys.argv[1])
outcomes = []
for i in range(n):
    body = json.dumps({"model": "claude-sonnet-4-5-fake-cut", "max_tokens": 200000,
        "messages": [{"role": "user", "content": "write the release notes"}]}).encode()
    req = urllib.request.Request(base + "/v1/messages", data=body, headers={
        "x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            outcomes.append(r.status)
    except Exception as e:
        outcomes.append(type(e).__name__)
with open("outage.done.tmp", "w") as f:
    json.dump(outcomes, f)
os.rename("outage.done.tmp", "outage.done")
time.sleep(3600)
"#;

/// The review's two healthy spenders under the shipped defaults, both new
/// agents with no history: a coding agent re-reading a 150k cached context
/// on each of 40 calls (6M tokens billed, about 0.6M weighted), and an agent
/// whose 8 calls an outage cuts after sending them (each charged at its
/// ~200k reservation, nothing seen). Counted as charged, either trips the
/// old wire (5 × the floor with no history: 1M); neither is a runaway.
#[test]
fn cached_contexts_and_cut_retries_of_new_agents_do_not_trip_the_defaults() {
    let fake = FakeUpstream::start(Config::default());
    let hook = Webhook::start();
    let fleet = FleetDir::new();
    for agent in ["coder", "flaky"] {
        fleet.write_secret(agent, "anthropic_key", ANTHROPIC_KEY);
    }
    std::fs::write(fleet.file("agent.py"), AGENT).unwrap();
    std::fs::write(fleet.file("outage.py"), OUTAGE).unwrap();
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
alerts: {{ webhook: '{hook}' }}
providers:
  claude: {{ kind: anthropic, upstream: '{upstream}' }}
defaults:
  restart: {{ policy: never }}
  runaway: {{ velocity: {{ action: quarantine }} }}
agents:
  coder:
    command: [python3, agent.py, coder, '40', '150000', '0', read]
    llm: [ {{ provider: claude, key: anthropic_key }} ]
  flaky:
    command: [python3, outage.py, '8']
    llm: [ {{ provider: claude, key: anthropic_key }} ]
",
        hook = hook.url,
        upstream = fake.url()
    ));
    let mut sup = fleet.run(&[]);
    let coder = statuses(&fleet, "coder", 40);
    assert!(coder.iter().all(|s| s == 200), "{coder:?}\n{}", sup.log());
    let flaky: Vec<Value> = wait_for("the flaky agent's 8 calls", || {
        serde_json::from_str(&fleet.read("outage.done")?).ok()
    });
    assert_eq!(flaky.len(), 8, "{flaky:?}");
    assert!(
        !flaky.iter().any(|s| s == 403),
        "refused as quarantined: {flaky:?}\n{}",
        sup.log()
    );
    let billed = fake.billed().total;
    assert!(
        billed.cache_read_input_tokens >= 6_000_000,
        "the coder's cached context was billed: {billed:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        hook.received().is_empty(),
        "no velocity trip: {:#?}\n{}",
        hook.received(),
        sup.log()
    );
    assert!(!sup.log().contains("spend velocity"), "{}", sup.log());
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}
