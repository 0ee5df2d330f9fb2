//! README "Tuning ceilings" and `budget.alert_at`: `supervisor tune` on a
//! synthetic ledger, `--apply`'s overlay accepted by `check` and picked up by
//! a running supervisor, and the soft budget alert reaching a webhook.

mod common;

use agent_supervisor::budget::Month;
use agent_supervisor::ledger::{Ledger, unix_millis_now};
use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const DAY: i64 = 86_400_000;

/// A row as the proxy would have settled it.
struct Row<'a> {
    agent: &'a str,
    at_ms: i64,
    tokens: u64,
    micro_usd: u64,
    outcome: &'a str,
}

fn row(agent: &str, at_ms: i64, tokens: u64, micro_usd: u64) -> Row<'_> {
    Row {
        agent,
        at_ms,
        tokens,
        micro_usd,
        outcome: "ok",
    }
}

/// Writes `rows` into `state_dir/ledger.db` with the real schema.
fn write_ledger(state_dir: &std::path::Path, rows: &[Row]) {
    std::fs::create_dir_all(state_dir).unwrap();
    drop(Ledger::open(state_dir).unwrap());
    let conn = rusqlite::Connection::open(state_dir.join("ledger.db")).unwrap();
    for r in rows {
        let month = Month::from_unix_secs(r.at_ms / 1000).to_string();
        let charged = if r.outcome == "released" { 0 } else { r.tokens };
        conn.execute(
            "INSERT INTO requests (agent, provider, model, month, started_at_ms, reserved_tokens,
                                   reserved_micro_usd, settled, outcome, status, charged_tokens,
                                   charged_micro_usd)
             VALUES (?1, 'sim', 'claude-sonnet-4-5', ?2, ?3, ?4, ?5, 1, ?6, 200, ?7, ?5)",
            rusqlite::params![
                r.agent,
                month,
                r.at_ms,
                r.tokens as i64,
                r.micro_usd as i64,
                r.outcome,
                charged as i64
            ],
        )
        .unwrap();
    }
}

fn cli(fleet: &FleetDir, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two significant digits, rounded up (the documented rounding).
fn friendly(n: u64) -> u64 {
    if n < 100 {
        return n;
    }
    let step = 10u64.pow(n.ilog10() - 1);
    n.div_ceil(step) * step
}

#[test]
fn tune_recommends_exactly_from_a_synthetic_ledger_and_applies_an_overlay_check_accepts() {
    let fleet = FleetDir::new();
    let fleet_yaml = "version: 1
agents:
  steady:
    command: [sleep, '1000']
    budget: { monthly_tokens: 1M, tokens_per_minute: 100k }
  spiky:
    command: [sleep, '1000']
  hot:
    command: [sleep, '1000']
    budget: { monthly_tokens: 5k }
  idle:
    command: [sleep, '1000']
";
    fleet.write_fleet(fleet_yaml);
    let now = unix_millis_now();
    let days = agent_supervisor::tune::days_in_month(Month::from_unix_secs(now / 1000));
    let mut rows = Vec::new();
    // Every day of the window: two requests of 1,000 tokens and $0.003, minutes apart.
    for d in 0..30 {
        rows.push(row("steady", now - d * DAY - 3_600_000, 1_000, 3_000));
        rows.push(row("steady", now - d * DAY - 3_720_000, 1_000, 3_000));
    }
    // Two days: 500 tokens, then 10,000 in one minute; a released request is no usage.
    rows.push(row("spiky", now - 2 * DAY, 500, 0));
    rows.push(row("spiky", now - 1_000, 10_000, 0));
    rows.push(Row {
        outcome: "released",
        ..row("spiky", now - 2_000, 1_000_000, 0)
    });
    rows.push(row("hot", now - 1_000, 5_000, 0));
    // Older than the window: not looked at.
    rows.push(row("idle", now - 40 * DAY, 9_999, 0));
    write_ledger(&fleet.file(".supervisor"), &rows);

    let report: Value = serde_json::from_str(&stdout(&cli(&fleet, &["tune", "--json"]))).unwrap();
    assert_eq!(report["headroom_percent"], 25);
    assert_eq!(report["window_days"], 30);
    let agents = report["agents"].as_array().unwrap();
    let by_name = |name: &str| agents.iter().find(|a| a["agent"] == name).unwrap().clone();
    let names: Vec<&str> = agents
        .iter()
        .map(|a| a["agent"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hot", "idle", "spiky", "steady"]);

    let steady = by_name("steady");
    assert_eq!(steady["basis"], "observed", "{steady}");
    assert_eq!(steady["monthly_tokens"], 60_000);
    assert_eq!(steady["monthly_usd"], 0.18);
    assert_eq!(steady["peak_tokens_per_minute"], 1_000);
    assert_eq!(
        steady["current"],
        json!({"monthly_tokens": 1_000_000, "monthly_usd": null, "tokens_per_minute": 100_000})
    );
    assert_eq!(
        steady["recommended"],
        json!({"monthly_tokens": 75_000, "monthly_usd": 1.0, "tokens_per_minute": 1_300})
    );
    assert_eq!(
        steady["flags"],
        json!([{"flag": "underused", "field": "budget.monthly_tokens", "percent": 6}])
    );

    let spiky = by_name("spiky");
    assert_eq!(spiky["basis"], "projected", "{spiky}");
    assert_eq!(spiky["days_observed"], 2);
    assert_eq!(
        spiky["monthly_tokens"],
        10_000 * days,
        "daily p95 × days in month"
    );
    assert_eq!(spiky["peak_tokens_per_minute"], 10_000);
    assert_eq!(
        spiky["recommended"],
        json!({"monthly_tokens": friendly(12_500 * days), "monthly_usd": null, "tokens_per_minute": 13_000})
    );
    assert_eq!(spiky["flags"], json!([]));

    let hot = by_name("hot");
    assert_eq!(hot["recommended"]["monthly_tokens"], friendly(6_250 * days));
    assert_eq!(hot["flags"][0]["flag"], "near_ceiling", "{hot}");
    assert_eq!(hot["flags"][0]["field"], "budget.monthly_tokens");

    let idle = by_name("idle");
    assert_eq!(idle["basis"], "no_traffic");
    assert_eq!(
        idle["recommended"],
        json!({"monthly_tokens": null, "monthly_usd": null, "tokens_per_minute": null})
    );

    // The table says the same, with the flags under it.
    let table = stdout(&cli(&fleet, &["tune"]));
    assert!(table.contains("1,000,000 → 75,000"), "{table}");
    assert!(
        table.contains("agent \"steady\": uses 6% of `budget.monthly_tokens`"),
        "{table}"
    );

    // --apply: the overlay, which `check` accepts and `usage` reads.
    let applied = stdout(&cli(&fleet, &["tune", "--apply"]));
    assert!(applied.contains("wrote `"), "{applied}");
    assert!(
        applied
            .contains("no supervisor is running; the next `supervisor run` uses the new budgets"),
        "{applied}"
    );
    let overlay = fleet.read("fleet.budgets.yaml").unwrap();
    assert!(
        overlay.starts_with("# Generated by `supervisor tune --apply`"),
        "{overlay}"
    );
    assert!(
        overlay.contains(
            "  steady:\n    budget:\n      monthly_tokens: 75k\n      monthly_usd: 1\n      tokens_per_minute: 1.3k\n"
        ),
        "{overlay}"
    );
    assert!(!overlay.contains("idle"), "{overlay}");
    assert_eq!(
        fleet.read("fleet.yaml").unwrap(),
        fleet_yaml,
        "fleet.yaml is never rewritten"
    );
    let checked = stdout(&cli(&fleet, &["check"]));
    assert!(checked.contains("ok — 4 agents"), "{checked}");
    let usage: Value = serde_json::from_str(&stdout(&cli(&fleet, &["usage", "--json"]))).unwrap();
    let ceiling = |name: &str| {
        usage
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["agent"] == name)
            .unwrap()["monthly_tokens_ceiling"]
            .clone()
    };
    assert_eq!(ceiling("steady"), 1_000_000, "fleet.yaml's own value wins");
    assert_eq!(ceiling("spiky"), friendly(12_500 * days), "the overlay's");
    assert_eq!(ceiling("idle"), Value::Null);

    // An overlay naming an agent the fleet no longer has is a warning, not an error.
    std::fs::write(
        fleet.file("fleet.budgets.yaml"),
        format!("{overlay}  retired:\n    budget: {{ monthly_tokens: 1k }}\n"),
    )
    .unwrap();
    // Warnings go to stderr, like every diagnostic; the summary to stdout.
    let out = cli(&fleet, &["check"]);
    assert!(out.status.success());
    let checked = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        checked.contains("warning: ") && checked.contains("agent \"retired\": not an agent of"),
        "{checked}"
    );
}

#[test]
fn the_running_supervisor_picks_up_the_overlay_and_its_ceiling_refuses() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
providers:
  sim: {{ kind: simulated }}
agents:
  worker:
    command: [python3, '{script}']
    env: {{ MODE: gate, MAX_TOKENS: '100000' }}
    llm: [ {{ provider: sim }} ]
    budget: {{ tokens_per_minute: 10M }}
",
        script = repo_file("tests/sdk/plain_agent.py").display(),
    ));
    // Two days ago the worker used 10 tokens.
    write_ledger(
        &fleet.file(".supervisor"),
        &[row("worker", unix_millis_now() - 2 * DAY, 10, 0)],
    );
    let mut sup = fleet.run(&[]);
    let first = wait_for("the worker's first answer", || {
        fleet.read("worker.log").filter(|l| l.lines().count() >= 1)
    });
    assert!(first.starts_with("ok 200"), "no ceiling yet: {first}");
    let pid = fleet.wait_pid("worker");

    let applied = stdout(&cli(&fleet, &["tune", "--apply"]));
    assert!(
        applied.contains("the running supervisor reloaded: the new budgets are in force"),
        "{applied}"
    );
    sup.wait_log("reload applied");
    let overlay = fleet.read("fleet.budgets.yaml").unwrap();
    assert!(overlay.contains("monthly_tokens: "), "{overlay}");
    std::fs::write(fleet.file("go"), "").unwrap();
    let log = wait_for("the worker's second answer", || {
        fleet.read("worker.log").filter(|l| l.lines().count() >= 2)
    });
    let second = log.lines().nth(1).unwrap();
    assert!(
        second.starts_with("refused 429") && second.contains("monthly ceiling"),
        "the overlay's `monthly_tokens` refuses a 100,000-token worst case: {log}"
    );
    assert_eq!(
        pid,
        fleet.wait_pid("worker"),
        "budgets apply without a restart"
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}

#[test]
fn alert_at_sends_one_soft_alert_per_agent_and_month() {
    let hook = common::webhook::Webhook::start();
    let fleet = FleetDir::new();
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
alerts: {{ webhook: '{url}' }}
providers:
  sim: {{ kind: simulated }}
agents:
  worker:
    command: [python3, '{script}']
    env: {{ MODE: loop, PROMPT_BYTES: '40000' }}
    llm: [ {{ provider: sim }} ]
    budget: {{ monthly_tokens: 100k, alert_at: 50% }}
",
        url = hook.url,
        script = repo_file("tests/sdk/plain_agent.py").display(),
    ));
    let mut sup = fleet.run(&[]);
    let alert = wait_for("the soft budget alert", || {
        hook.received()
            .into_iter()
            .find(|a| a["event"] == "budget_threshold")
    });
    assert_eq!(alert["agent"], "worker");
    assert_eq!(alert["percent"], 50);
    assert_eq!(alert["ceiling_field"], "budget.monthly_tokens");
    assert_eq!(alert["ceiling_tokens"], 100_000);
    let used = alert["used_tokens"].as_u64().unwrap();
    assert!((50_000..100_000).contains(&used), "{alert}");
    assert!(
        alert["text"]
            .as_str()
            .unwrap()
            .contains("past its `alert_at` of 50%"),
        "{alert}"
    );
    // It keeps going until the ceiling refuses; the soft alert is not repeated.
    wait_for("the ceiling alert", || {
        hook.received()
            .into_iter()
            .find(|a| a["event"] == "ceiling_reached")
    });
    let soft = hook
        .received()
        .into_iter()
        .filter(|a| a["event"] == "budget_threshold")
        .count();
    assert_eq!(soft, 1, "{:#?}", hook.received());
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}
