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
    // Forty days of history: the first request before the window.
    rows.push(row("steady", now - 40 * DAY, 0, 0));
    // Two days: 500 tokens on the first, partial, day; then 10,000 in one
    // minute on the whole day after it; a released request is no usage.
    rows.push(row("spiky", now - 2 * DAY, 500, 0));
    rows.push(row("spiky", now - DAY, 10_000, 0));
    rows.push(Row {
        outcome: "released",
        ..row("spiky", now - 2_000, 1_000_000, 0)
    });
    rows.push(row("hot", now - 3 * DAY, 0, 0));
    rows.push(row("hot", now - DAY, 5_000, 0));
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
    assert_eq!(spiky["whole_days"], 1);
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

    // --apply: refused on two days of history unless `--min-days` allows it.
    let refused = cli(&fleet, &["tune", "--apply"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(fleet.read("fleet.budgets.yaml").is_none());
    // The overlay, which `check` accepts and `usage` reads; fleet.yaml's own
    // `monthly_tokens` for `steady` shadows the overlay's, and says so.
    let applied = stdout(&cli(&fleet, &["tune", "--apply", "--min-days", "2"]));
    let spiky_tokens = grouped(friendly(12_500 * days));
    let hot_tokens = grouped(friendly(6_250 * days));
    let after_table: Vec<&str> = applied
        .lines()
        .skip_while(|l| !l.starts_with("wrote `"))
        .skip(1)
        .collect();
    assert_eq!(
        after_table.join("\n"),
        format!(
            "\
agent \"hot\": monthly_tokens {hot_tokens}: shadowed, `fleet.yaml:8` sets `budget.monthly_tokens: 5,000` for this agent and wins; remove it there to let {hot_tokens} apply
agent \"hot\": tokens_per_minute 6,300: takes effect
agent \"spiky\": monthly_tokens {spiky_tokens}: takes effect
agent \"spiky\": tokens_per_minute 13,000: takes effect
agent \"steady\": monthly_tokens 75,000: shadowed, `fleet.yaml:3` sets `budget.monthly_tokens: 1,000,000` for this agent and wins; remove it there to let 75,000 apply
agent \"steady\": monthly_usd $1.00: takes effect
agent \"steady\": tokens_per_minute 1,300: shadowed, `fleet.yaml:3` sets `budget.tokens_per_minute: 100,000` for this agent and wins; remove it there to let 1,300 apply
no supervisor is running; the next `supervisor run` uses the 4 new values; 3 stay shadowed by fleet.yaml"
        )
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
    // Two days ago and yesterday the worker used 10 tokens.
    let now = unix_millis_now();
    write_ledger(
        &fleet.file(".supervisor"),
        &[
            row("worker", now - 2 * DAY, 10, 0),
            row("worker", now - DAY, 10, 0),
        ],
    );
    let mut sup = fleet.run(&[]);
    let first = wait_for("the worker's first answer", || {
        fleet.read("worker.log").filter(|l| l.lines().count() >= 1)
    });
    assert!(first.starts_with("ok 200"), "no ceiling yet: {first}");
    let pid = fleet.wait_pid("worker");

    let applied = stdout(&cli(&fleet, &["tune", "--apply", "--min-days", "0"]));
    assert!(
        applied.contains("agent \"worker\": monthly_tokens ")
            && applied.contains(": takes effect\n")
            && applied.contains(
                "the running supervisor reloaded: 1 new value in force, 1 shadowed by fleet.yaml\n"
            ),
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

/// `1234567` → `1,234,567`, as the table prints counts.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The last UTC midnight at or before `ms`.
fn midnight(ms: i64) -> i64 {
    ms - ms.rem_euclid(DAY)
}

/// One hour, three days and forty days of history: what each supports.
fn three_histories(fleet: &FleetDir) -> i64 {
    fleet.write_fleet(
        "version: 1
agents:
  hour:
    command: [sleep, '1000']
    budget: { monthly_usd: 50, tokens_per_minute: 200k }
  three:
    command: [sleep, '1000']
    budget: { tokens_per_minute: 100k }
  forty:
    command: [sleep, '1000']
    budget: { monthly_tokens: 1M }
",
    );
    let now = unix_millis_now();
    let today = midnight(now);
    let mut rows = vec![
        // An hour of demo traffic.
        row("hour", now - 3_600_000, 400, 2_000),
        row("hour", now - 1_800_000, 600, 3_000),
        // Three whole days since midnight, then a busy partial day today.
        row("three", today - 3 * DAY, 1_000, 10_000),
        row("three", today - 2 * DAY, 2_000, 20_000),
        row("three", today - DAY, 3_000, 30_000),
        row("three", now - 1_000, 50_000, 0),
        // Forty days: the first request long before the window.
        row("forty", now - 40 * DAY, 7, 0),
    ];
    for d in 0..30 {
        rows.push(row("forty", now - d * DAY - 60_000, 2_000, 50_000));
    }
    write_ledger(&fleet.file(".supervisor"), &rows);
    now
}

#[test]
fn tune_recommends_only_what_one_hour_three_days_and_forty_days_support() {
    let fleet = FleetDir::new();
    let now = three_histories(&fleet);
    let days = agent_supervisor::tune::days_in_month(Month::from_unix_secs(now / 1000));
    let proj = grouped(3_000 * days);
    let rec = grouped(friendly(3_750 * days));
    let cost = format!("${:.2}", 0.03 * days as f64);
    let table = stdout(&cli(&fleet, &["tune"]));
    assert_eq!(
        table,
        format!(
            "\
AGENT  HISTORY  DAYS  MONTHLY TOKENS   MONTHLY COST  PEAK TPM      MONTHLY_TOKENS   MONTHLY_USD  TOKENS_PER_MINUTE
forty     40d     30          60,000          $1.50     2,000  1,000,000 → 75,000  none → $2.00       none → 2,500
hour    1h 0m*     1               -              -       600                   -             -      200,000 → 750
three      3d*     4  {proj} (proj.)  {cost} (proj.)    50,000      none → {rec}  none → $2.00   100,000 → 63,000
* under 7 days of history: low confidence; `--apply` refuses while a row with a recommendation is marked (`--min-days` sets the minimum)
agent \"forty\": monthly_tokens 75,000: 30-day total 60,000 + 25%, rounded up
agent \"forty\": monthly_usd $2.00: 30-day total $1.50 + 25%, rounded up
agent \"forty\": tokens_per_minute 2,500: peak minute 2,000 + 25%, rounded up
agent \"hour\": monthly_tokens none: no whole UTC day of history yet (1h 0m); a partial day is not projected to a month
agent \"hour\": monthly_usd none: no whole UTC day of history yet (1h 0m); a partial day is not projected to a month
agent \"hour\": tokens_per_minute 750: peak minute 600 + 25%, rounded up
agent \"three\": monthly_tokens {rec}: p95 daily 3,000 over 3 whole days × {days} + 25%, rounded up
agent \"three\": monthly_usd $2.00: p95 daily $0.03 over 3 whole days × {days} + 25%, rounded up
agent \"three\": tokens_per_minute 63,000: peak minute 50,000 + 25%, rounded up
agent \"forty\": uses 6% of `budget.monthly_tokens`
"
        )
    );

    let report: Value = serde_json::from_str(&stdout(&cli(&fleet, &["tune", "--json"]))).unwrap();
    assert_eq!(report["min_days"], 7);
    let agent = |name: &str| {
        report["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent"] == name)
            .unwrap()
            .clone()
    };
    let hour = agent("hour");
    assert_eq!(hour["basis"], "too_short");
    assert_eq!(hour["low_confidence"], true);
    let secs = hour["history_seconds"].as_i64().unwrap();
    assert!((3_600..3_660).contains(&secs), "{hour}");
    assert_eq!(
        hour["recommended"],
        json!({"monthly_tokens": null, "monthly_usd": null, "tokens_per_minute": 750})
    );
    assert_eq!(
        hour["reasons"]["tokens_per_minute"],
        "peak minute 600 + 25%, rounded up"
    );
    let three = agent("three");
    assert_eq!(three["basis"], "projected");
    assert_eq!(three["whole_days"], 3);
    assert_eq!(
        three["daily_p95_tokens"], 3_000,
        "today's 50,000 is partial"
    );
    assert_eq!(three["low_confidence"], true);
    let forty = agent("forty");
    assert_eq!(forty["basis"], "observed");
    assert_eq!(forty["low_confidence"], false);
    assert!(forty["history_seconds"].as_i64().unwrap() >= 40 * 86_400);

    // `--apply` refuses while low-confidence rows have values to write.
    let out = cli(&fleet, &["tune", "--apply"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: not applied: agents have under 7 days of history: `hour` (1h 0m), `three` (3d)\n\
         hint: recommendations from so little traffic are guesses; wait until they have 7 days, or pass `--min-days 0` to apply them anyway\n"
    );
    assert!(
        fleet.read("fleet.budgets.yaml").is_none(),
        "nothing written"
    );
    // `--min-days 3` still holds `hour` back.
    let out = cli(&fleet, &["tune", "--apply", "--min-days", "3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with(
            "error: not applied: 1 agent has under 3 days of history: `hour` (1h 0m)\n"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fleet.read("fleet.budgets.yaml").is_none(),
        "nothing written"
    );

    // `--min-days 0` applies; fleet.yaml's own values shadow some, and it says so.
    let applied = stdout(&cli(&fleet, &["tune", "--apply", "--min-days", "0"]));
    let said: Vec<&str> = applied
        .lines()
        .skip_while(|l| !l.starts_with("wrote `"))
        .skip(1)
        .collect();
    assert_eq!(
        said.join("\n"),
        format!(
            "\
agent \"forty\": monthly_tokens 75,000: shadowed, `fleet.yaml:9` sets `budget.monthly_tokens: 1,000,000` for this agent and wins; remove it there to let 75,000 apply
agent \"forty\": monthly_usd $2.00: takes effect
agent \"forty\": tokens_per_minute 2,500: takes effect
agent \"hour\": tokens_per_minute 750: shadowed, `fleet.yaml:3` sets `budget.tokens_per_minute: 200,000` for this agent and wins; remove it there to let 750 apply
agent \"three\": monthly_tokens {rec}: takes effect
agent \"three\": monthly_usd $2.00: takes effect
agent \"three\": tokens_per_minute 63,000: shadowed, `fleet.yaml:6` sets `budget.tokens_per_minute: 100,000` for this agent and wins; remove it there to let 63,000 apply
no supervisor is running; the next `supervisor run` uses the 4 new values; 3 stay shadowed by fleet.yaml"
        )
    );
    // `status`/`usage` show what is in force: fleet.yaml's value, not the overlay's.
    let usage: Value = serde_json::from_str(&stdout(&cli(&fleet, &["usage", "--json"]))).unwrap();
    let forty = usage
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == "forty")
        .unwrap()
        .clone();
    assert_eq!(forty["monthly_tokens_ceiling"], 1_000_000, "{forty}");
}
