//! README "Metering proxy": scoped tokens, exact usage (JSON and SSE), refusals
//! in the provider's own shape, ceilings that hold under concurrency, and a
//! ledger that survives kill -9 — against a fake provider on loopback that keeps
//! its own billing tally.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::fake_upstream::{ANTHROPIC_KEY, Config, FakeUpstream, OPENAI_KEY};
use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// The agent dumps its environment so the test can act as its SDK.
const DUMP_ENV: &str = "[sh, -c, 'env > agent.env; echo $$ > agent.pid; exec sleep 1000']";

fn fleet_yaml(upstream: &str, budget: &str, extra_provider: &str) -> String {
    format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0', max_body: 64KiB }}
vault: {{ backend: dir, path: secrets }}
providers:
  claude:
    kind: anthropic
    upstream: '{upstream}'
    prices: {{ claude-sonnet-4-5: {{ input: 3, output: 15, cache_write: 3.75, cache_read: 0.3 }} }}
  gpt:
    kind: openai
    upstream: '{upstream}'
    prices: {{ gpt-4.1: {{ input: 2, output: 8, cache_read: 0.5 }} }}
{extra_provider}agents:
  agent:
    command: {DUMP_ENV}
    llm:
      - {{ provider: claude, key: anthropic_key }}
      - {{ provider: gpt, key: openai_key }}
    budget: {{ {budget} }}
"
    )
}

struct Agent {
    env: BTreeMap<String, String>,
}

impl Agent {
    fn wait(fleet: &FleetDir) -> Self {
        fleet.wait_pid("agent");
        let text = wait_for("agent.env", || fleet.read("agent.env"));
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self { env }
    }

    fn var(&self, name: &str) -> &str {
        self.env.get(name).map(String::as_str).unwrap_or("")
    }
}

fn setup(budget: &str, extra_provider: &str) -> (FakeUpstream, FleetDir, Supervisor, Agent) {
    let fake = FakeUpstream::start(Config::default());
    let fleet = FleetDir::new();
    fleet.write_secret("agent", "anthropic_key", ANTHROPIC_KEY);
    fleet.write_secret("agent", "openai_key", OPENAI_KEY);
    fleet.write_fleet(&fleet_yaml(&fake.url(), budget, extra_provider));
    let sup = fleet.run(&[]);
    let agent = Agent::wait(&fleet);
    (fake, fleet, sup, agent)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn anthropic(agent: &Agent, body: Value) -> (u16, reqwest::header::HeaderMap, String) {
    let resp = client()
        .post(format!("{}/v1/messages", agent.var("ANTHROPIC_BASE_URL")))
        .header("x-api-key", agent.var("ANTHROPIC_API_KEY"))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap_or_default())
}

async fn openai(agent: &Agent, body: Value) -> (u16, String) {
    let resp = client()
        .post(format!("{}/chat/completions", agent.var("OPENAI_BASE_URL")))
        .bearer_auth(agent.var("OPENAI_API_KEY"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 200, "stream": stream,
           "messages": [{"role": "user", "content": "How many notes are there?"}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn scoped_tokens_and_exact_usage() {
    let (fake, fleet, mut sup, agent) = setup("monthly_tokens: 1M", "");
    let token = agent.var("ANTHROPIC_API_KEY").to_owned();
    assert!(
        token.starts_with("sup-"),
        "a scoped token, not the real key"
    );
    let env_text = fleet.read("agent.env").unwrap();
    assert!(
        !env_text.contains(ANTHROPIC_KEY) && !env_text.contains(OPENAI_KEY),
        "real keys never reach the agent"
    );
    assert!(agent.var("OPENAI_BASE_URL").ends_with("/v1"));

    // JSON and SSE, Anthropic and OpenAI (streaming without include_usage too).
    let (status, headers, body) = anthropic(&agent, ask("claude-sonnet-4-5", false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("content-length").and_then(|v| v.to_str().ok()),
        Some(body.len().to_string().as_str()),
        "a JSON answer passes unchanged, so its length is forwarded"
    );
    let (status, headers, body) = anthropic(
        &agent,
        ask("claude-sonnet-4-5-cache-read-40-cache-write-8", true),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("event: message_stop"), "{body}");
    assert!(
        headers.get("content-length").is_none(),
        "the tap may change a stream's bytes, so its length is not forwarded"
    );
    let (status, body) = openai(
        &agent,
        json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = openai(
        &agent,
        json!({"model": "gpt-4.1-cache-read-16", "stream": true,
        "messages": [{"role": "user", "content": "hello there"}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("data: [DONE]"));
    assert!(
        !body.contains("\"prompt_tokens\""),
        "the usage chunk the client did not ask for is dropped: {body}"
    );
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.body["stream_options"]["include_usage"] == json!(true)),
        "but upstream was asked for it"
    );

    // The upstream saw only real keys, never the scoped tokens.
    let seen = fake.keys_seen();
    assert!(
        seen.contains(ANTHROPIC_KEY) && seen.contains(OPENAI_KEY),
        "{seen:?}"
    );
    assert!(!fake.saw(&token) && !fake.saw(agent.var("OPENAI_API_KEY")));

    // The ledger equals what the upstream billed, kind by kind.
    let billed = fake.billed().total;
    let rows = usage_json(&fleet);
    let row = &rows[0];
    assert_eq!(row["agent"], "agent");
    assert_eq!(row["requests"], 4);
    assert_eq!(row["input_tokens"], billed.input_tokens);
    assert_eq!(row["output_tokens"], billed.output_tokens);
    assert_eq!(
        row["cache_creation_input_tokens"],
        billed.cache_creation_input_tokens
    );
    assert_eq!(
        row["cache_read_input_tokens"],
        billed.cache_read_input_tokens
    );
    assert_eq!(row["charged_tokens"], billed.tokens());
    assert!(row["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(row["monthly_tokens_ceiling"], 1_000_000);
    assert_eq!(row["monthly_usd_ceiling"], Value::Null);

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    let log = sup.log();
    assert!(
        !log.contains(&token) && !log.contains(ANTHROPIC_KEY),
        "no secret in the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_speak_the_providers_shape_and_cost_nothing() {
    let extra = "  dead: { kind: anthropic, upstream: 'http://127.0.0.1:9' }\n";
    let (fake, fleet, _sup, agent) = setup("monthly_tokens: 1M", extra);
    let base = agent.var("ANTHROPIC_BASE_URL").to_owned();

    // unknown token
    let resp = client()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sup-0000")
        .json(&ask("claude-sonnet-4-5", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");

    // not JSON, too large, unknown path
    let token = agent.var("ANTHROPIC_API_KEY");
    let resp = client()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = client()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", token)
        .body(vec![b' '; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let resp = client()
        .post(format!("{base}/v1/messages/batches"))
        .header("x-api-key", token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(fake.requests().len(), 0, "no refusal was forwarded");

    // OpenAI shape for OpenAI paths
    let resp = client()
        .post(format!("{}/chat/completions", agent.var("OPENAI_BASE_URL")))
        .bearer_auth("sup-nope")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");

    // An upstream error is passed through and not charged.
    let (status, _, _) = anthropic(&agent, ask("claude-sonnet-4-5-fake-529", false)).await;
    assert_eq!(status, 529);
    let rows = usage_json(&fleet);
    assert_eq!(rows[0]["charged_tokens"], 0, "{rows}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_a_502_and_releases_the_reservation() {
    let fleet = FleetDir::new();
    fleet.write_secret("agent", "anthropic_key", ANTHROPIC_KEY);
    fleet.write_secret("agent", "openai_key", OPENAI_KEY);
    // Port 9 (discard) is closed on loopback: connection refused.
    fleet.write_fleet(&fleet_yaml("http://127.0.0.1:9", "monthly_tokens: 10k", ""));
    let _sup = fleet.run(&[]);
    let agent = Agent::wait(&fleet);
    for _ in 0..5 {
        let (status, _, body) = anthropic(&agent, ask("claude-sonnet-4-5", false)).await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("could not be reached"), "{body}");
    }
    // Five refused requests each reserved ~4.3k of a 10k ceiling; all released.
    let rows = usage_json(&fleet);
    assert_eq!(rows[0]["charged_tokens"], 0, "{rows}");
}

/// A client that gives up while upstream is still thinking: the request
/// may have been billed, so it is charged as cut at its reservation, and its
/// ledger row is settled at once rather than left in flight until a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_abandoned_before_its_answer_is_charged_at_its_reservation() {
    let (fake, fleet, _sup, agent) = setup("monthly_tokens: 1M", "");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let sent = impatient
        .post(format!("{}/v1/messages", agent.var("ANTHROPIC_BASE_URL")))
        .header("x-api-key", agent.var("ANTHROPIC_API_KEY"))
        .header("anthropic-version", "2023-06-01")
        .json(&ask("claude-sonnet-4-5-fake-hang", false))
        .send()
        .await;
    assert!(sent.is_err_and(|e| e.is_timeout()));
    assert_eq!(fake.requests().len(), 1, "it reached upstream");
    let rows = wait_for("the abandoned request to settle", || {
        let rows = usage_json(&fleet);
        (rows[0]["unsettled_requests"] == 0).then_some(rows)
    });
    assert_eq!(rows[0]["requests"], 1, "{rows}");
    let conn = rusqlite::Connection::open(fleet.file(".supervisor/ledger.db")).unwrap();
    let (outcome, status, charged, reserved): (String, Option<i64>, i64, i64) = conn
        .query_row(
            "SELECT outcome, status, charged_tokens, reserved_tokens FROM requests",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!((outcome.as_str(), status), ("cut", None));
    assert!(reserved > 200, "a worst case covers max_tokens: {reserved}");
    assert_eq!(charged, reserved);
    assert_eq!(rows[0]["charged_tokens"], charged, "{rows}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_never_overshoot_a_ceiling() {
    const CEILING: u64 = 30_000;
    let (fake, fleet, _sup, agent) = setup(&format!("monthly_tokens: {CEILING}"), "");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let env = agent.env.clone();
        tasks.push(tokio::spawn(async move {
            let agent = Agent { env };
            let mut ok = 0;
            loop {
                // ~800 output tokens each; the worst case reserved is larger.
                let (status, headers, body) = anthropic(
                    &agent,
                    json!({"model": "claude-sonnet-4-5-out-800", "max_tokens": 1000,
                        "stream": ok % 2 == 0, "messages": [{"role": "user", "content": "go"}]}),
                )
                .await;
                match status {
                    200 => ok += 1,
                    429 => {
                        assert_eq!(headers.get("x-should-retry").unwrap(), "false", "{body}");
                        assert!(body.contains("monthly ceiling"), "{body}");
                        return ok;
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
        }));
    }
    let mut total_ok = 0;
    for t in tasks {
        total_ok += t.await.unwrap();
    }
    let billed = fake.billed().total.tokens();
    assert!(
        billed <= CEILING,
        "upstream billed {billed} over the ceiling {CEILING}"
    );
    assert!(
        billed >= CEILING / 2,
        "most of the ceiling is used: {billed} of {CEILING} in {total_ok} requests"
    );
    let rows = usage_json(&fleet);
    assert_eq!(rows[0]["charged_tokens"], billed, "ledger = upstream tally");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_stream_is_charged_at_its_reservation() {
    let (fake, fleet, _sup, agent) = setup("monthly_tokens: 1M", "");
    let _ = anthropic(&agent, ask("claude-sonnet-4-5-fake-cut", true)).await;
    let billed = fake.billed().total.tokens();
    let conn = rusqlite::Connection::open(fleet.file(".supervisor/ledger.db")).unwrap();
    let (outcome, charged, reserved): (String, i64, i64) = wait_for("the cut to settle", || {
        conn.query_row(
            "SELECT outcome, charged_tokens, reserved_tokens FROM requests WHERE settled = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok()
    });
    assert_eq!(outcome, "cut");
    assert_eq!(charged, reserved, "charged conservatively");
    assert!(
        charged as u64 >= billed,
        "never below what upstream billed ({billed})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_traffic_loses_no_usage() {
    let (fake, fleet, mut sup, agent) = setup("monthly_tokens: 10M", "");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let env = agent.env.clone();
        tasks.push(tokio::spawn(async move {
            let agent = Agent { env };
            for _ in 0..50 {
                let model = if i % 2 == 0 {
                    "claude-sonnet-4-5-fake-slow"
                } else {
                    "claude-sonnet-4-5"
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    anthropic(&agent, ask(model, true)),
                )
                .await;
            }
        }));
    }
    wait_for("traffic to flow", || {
        (fake.billed().total.requests >= 10).then_some(())
    });
    sup.signal(Signal::SIGKILL);
    let _ = sup.wait_exit();
    for t in tasks {
        let _ = t.await;
    }
    let billed = fake.billed().total.tokens();
    let rows = usage_json(&fleet);
    let recorded = rows[0]["charged_tokens"].as_u64().unwrap();
    assert!(
        recorded >= billed,
        "ledger {recorded} < upstream billed {billed}"
    );
    // Clean up the agent the killed supervisor left behind.
    if let Some(pid) = fleet
        .read("agent.pid")
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_dies_with_its_launch() {
    let (fake, fleet, sup, agent) = setup("monthly_tokens: 1M", "");
    let old_pid = fleet.wait_pid("agent");
    let (status, _, _) = anthropic(&agent, ask("claude-sonnet-4-5", false)).await;
    assert_eq!(status, 200);

    // Change the agent (a new env value): the reload restarts it with new tokens.
    let _ = std::fs::remove_file(fleet.file("agent.pid"));
    let _ = std::fs::remove_file(fleet.file("agent.env"));
    let yaml = fleet_yaml(&fake.url(), "monthly_tokens: 1M", "")
        .replace("    budget:", "    env: { GENERATION: two }\n    budget:");
    fleet.write_fleet(&yaml);
    sup.signal(Signal::SIGHUP);
    let new_pid = fleet.wait_pid("agent");
    assert_ne!(new_pid, old_pid);
    let fresh = Agent::wait(&fleet);
    assert_ne!(
        fresh.var("ANTHROPIC_API_KEY"),
        agent.var("ANTHROPIC_API_KEY")
    );

    let (status, _, body) = anthropic(&agent, ask("claude-sonnet-4-5", false)).await;
    assert_eq!(status, 401, "the old launch's token is dead: {body}");
    let (status, _, _) = anthropic(&fresh, ask("claude-sonnet-4-5", false)).await;
    assert_eq!(status, 200);
    assert_eq!(
        fake.billed().total.requests,
        2,
        "the refused request never reached upstream"
    );
}
