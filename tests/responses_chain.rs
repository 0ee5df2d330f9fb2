//! README "Metering proxy", continued Responses requests: a request that
//! continues server-side state (`previous_response_id`, `conversation`) is
//! reserved at the context the proxy saw its chain carry plus its own body,
//! not a whole context window, so an agent loop runs under a small ceiling;
//! a chain the proxy never saw keeps the conservative fallback. Against the
//! fake provider, which bills a continued request its previous context plus
//! its own prompt; the last test drives it with the official `openai` SDK.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::fake_upstream::{Config, FakeUpstream, OPENAI_KEY};
use common::*;
use serde_json::{Value, json};

const DUMP_ENV: &str = "[sh, -c, 'env > agent.env; echo $$ > agent.pid; exec sleep 1000']";
/// The fallback worst case of a continued request the proxy cannot bound:
/// OpenAI's whole context window plus the default output cap.
const FALLBACK: i64 = 1_050_000 + 128_000;

fn setup(monthly_tokens: &str) -> (FakeUpstream, FleetDir, Supervisor, BTreeMap<String, String>) {
    let fake = FakeUpstream::start(Config::default());
    let fleet = FleetDir::new();
    fleet.write_secret("agent", "openai_key", OPENAI_KEY);
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
providers:
  gpt: {{ kind: openai, upstream: '{}' }}
agents:
  agent:
    command: {DUMP_ENV}
    llm: [{{ provider: gpt, key: openai_key }}]
    budget: {{ monthly_tokens: {monthly_tokens} }}
",
        fake.url()
    ));
    let sup = fleet.run(&[]);
    fleet.wait_pid("agent");
    let text = wait_for("agent.env", || fleet.read("agent.env"));
    let env = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (fake, fleet, sup, env)
}

/// `POST /v1/responses` as the SDK sends it: status and body text.
async fn respond(env: &BTreeMap<String, String>, body: Value) -> (u16, String) {
    let var = |k: &str| env.get(k).map(String::as_str).unwrap_or("");
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(format!("{}/responses", var("OPENAI_BASE_URL")))
        .bearer_auth(var("OPENAI_API_KEY"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// The answer's id, from a JSON answer or a stream's `response.completed`.
fn answer_id(text: &str, stream: bool) -> String {
    let response = if stream {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["type"] == "response.completed")
            .map(|v| v["response"].clone())
            .unwrap_or_else(|| panic!("no response.completed in {text}"))
    } else {
        serde_json::from_str(text).unwrap()
    };
    response["id"].as_str().unwrap().to_owned()
}

/// Every settled row: (reserved, charged) tokens, in request order.
fn rows(fleet: &FleetDir) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(fleet.file(".supervisor/ledger.db")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT reserved_tokens, charged_tokens FROM requests WHERE settled = 1 ORDER BY id",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn step(n: usize) -> Value {
    json!([{"role": "user", "content": format!("Step {n}: run the next tool and report. {}", "Context. ".repeat(40 * n))}])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_previous_response_id_chain_runs_under_a_small_ceiling() {
    const CEILING: i64 = 200_000;
    let (fake, fleet, _sup, env) = setup("200k");

    // A chain the proxy never saw (begun before a restart, or elsewhere):
    // unbounded, so refused under this ceiling, and nothing is forwarded.
    let foreign = "resp_fake0000000000000999c5000";
    let (status, body) = respond(
        &env,
        json!({"model": "gpt-5", "input": "go on", "previous_response_id": foreign}),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("monthly ceiling"), "{body}");
    assert!(
        body.contains("`previous_response_id` continues a response this proxy has not metered"),
        "the refusal says why the worst case is so large: {body}"
    );
    assert!(fake.requests().is_empty());

    // The SDK's agent loop: instructions each time, no output cap, only the
    // new items sent, streamed and not in turn.
    let mut previous: Option<String> = None;
    for n in 0..10 {
        let stream = n % 2 == 1;
        let mut body = json!({"model": "gpt-5", "instructions": "You are a careful agent.",
            "input": step(n), "stream": stream});
        if let Some(id) = &previous {
            body["previous_response_id"] = json!(id);
        }
        let (status, text) = respond(&env, body).await;
        assert_eq!(status, 200, "step {n}: {text}");
        previous = Some(answer_id(&text, stream));

        let billed = fake.requests();
        let rows = wait_for("the step to settle", || {
            let r = rows(&fleet);
            (r.len() == n + 1).then_some(r)
        });
        let (reserved, charged) = rows[n];
        let bill = billed[n].billed.tokens() as i64;
        assert_eq!(charged, bill, "step {n}: charged exactly what was billed");
        assert!(
            reserved >= bill,
            "step {n}: the reservation {reserved} covers the bill {bill}"
        );
        assert!(
            reserved < FALLBACK,
            "step {n}: reserved {reserved}, bounded by the chain's context"
        );
        let total: i64 = rows.iter().map(|r| r.1).sum();
        assert_eq!(total, fake.billed().total.tokens() as i64);
        assert!(total <= CEILING);
    }
    assert!(
        fake.billed().total.input_tokens > 10 * 1_000,
        "the chain's context grew and was billed at every step"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_server_side_state_is_reserved_conservatively() {
    let (fake, fleet, _sup, env) = setup("5M");
    // A valid chain the proxy never metered: served, at the fallback.
    let (status, body) = respond(
        &env,
        json!({"model": "gpt-5", "input": "go on", "previous_response_id": "resp_fake0000000000000999c5000"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A conversation: unknown at first, then bounded by its last answer.
    let conv = json!({"model": "gpt-5", "input": "next", "conversation": {"id": "conv_1"}});
    for _ in 0..2 {
        let (status, body) = respond(&env, conv.clone()).await;
        assert_eq!(status, 200, "{body}");
    }
    // An answer that is not stored cannot be continued: not recorded.
    let (status, body) = respond(
        &env,
        json!({"model": "gpt-5", "input": "once", "store": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let unstored = answer_id(&body, false);
    let (status, body) = respond(
        &env,
        json!({"model": "gpt-5", "input": "and then", "previous_response_id": unstored}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let rows = wait_for("all five to settle", || {
        let r = rows(&fleet);
        (r.len() == 5).then_some(r)
    });
    let reserved: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert!(reserved[0] >= FALLBACK, "unknown chain: {reserved:?}");
    assert!(
        reserved[1] >= FALLBACK,
        "unknown conversation: {reserved:?}"
    );
    assert!(reserved[2] < 200_000, "known conversation: {reserved:?}");
    assert!(reserved[3] < 200_000, "a fresh request: {reserved:?}");
    assert!(reserved[4] >= FALLBACK, "unstored answer: {reserved:?}");
    for (i, r) in fake.requests().iter().enumerate() {
        assert!(rows[i].1 >= r.billed.tokens() as i64, "row {i}");
    }
}

/// The official `openai` SDK's loop (see `tests/sdk/responses_chain_agent.py`)
/// under a 200k ceiling: every turn served, JSON and streamed alike.
#[test]
fn the_official_sdk_chains_ten_turns_under_a_small_ceiling() {
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
    budget: {{ monthly_tokens: 200k }}
",
        url = fake.url(),
        py = py.display(),
        script = repo_file("tests/sdk/responses_chain_agent.py").display(),
    ));
    let _sup = fleet.run(&[]);
    let log = wait_for_within("the agent's ten turns", PATIENCE_SDK, || {
        fleet.read("chainer.log").filter(|l| l.contains("done\n"))
    });
    let calls: Vec<&str> = log.lines().filter(|l| l.starts_with("ok ")).collect();
    assert_eq!(calls.len(), 10, "{log}");
    let requests = fake.requests();
    assert_eq!(requests.len(), 10);
    for (i, r) in requests.iter().enumerate().skip(1) {
        assert!(
            r.body["previous_response_id"].is_string(),
            "turn {i} continued the chain"
        );
    }
    let rows = rows(&fleet);
    assert_eq!(rows.len(), 10);
    for (i, ((reserved, charged), r)) in rows.iter().zip(&requests).enumerate() {
        let bill = r.billed.tokens() as i64;
        assert_eq!(*charged, bill, "turn {i}");
        assert!(
            *reserved >= bill && *reserved < FALLBACK,
            "turn {i}: {reserved}"
        );
    }
}
