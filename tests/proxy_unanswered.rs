//! README "Metering proxy": a metered request that gets no answer is charged
//! as cut at its reservation once it may have reached the provider (a silent
//! upstream past `upstream_timeout`, a connection dropped after the request
//! was sent), and released with nothing charged only when it provably never
//! left the proxy (connection refused, a TLS handshake that never finished).

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use common::fake_upstream::{ANTHROPIC_KEY, Config, FakeUpstream};
use common::*;
use serde_json::{Value, json};

const CEILING: u64 = 10_000;
/// Each request's worst case is a little over this, so two never fit under
/// the ceiling together.
const MAX_TOKENS: u64 = 2_000;

fn agent(name: &str, provider: &str) -> String {
    format!(
        "  {name}:
    command: [sh, -c, 'env > {name}.env; exec sleep 1000']
    llm: [{{ provider: {provider}, key: key }}]
    budget: {{ monthly_tokens: {CEILING} }}
"
    )
}

struct Agent {
    base: String,
    token: String,
}

fn wait_agent(fleet: &FleetDir, name: &str) -> Agent {
    let env = fleet.wait_env(&format!("{name}.env"), "ANTHROPIC_API_KEY");
    Agent {
        base: env["ANTHROPIC_BASE_URL"].clone(),
        token: env["ANTHROPIC_API_KEY"].clone(),
    }
}

async fn ask(agent: &Agent, model: &str) -> (u16, Value) {
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(format!("{}/v1/messages", agent.base))
        .header("x-api-key", &agent.token)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": model, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "Write a long essay."}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The ledger's one row for `agent`: outcome, status, charged, reserved.
fn ledger_row(fleet: &FleetDir, agent: &str) -> (String, Option<i64>, i64, i64) {
    let conn = rusqlite::Connection::open(fleet.file(".supervisor/ledger.db")).unwrap();
    wait_for(&format!("{agent}'s request to settle"), || {
        conn.query_row(
            "SELECT outcome, status, charged_tokens, reserved_tokens FROM requests
             WHERE agent = ?1 AND settled = 1",
            [agent],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .ok()
    })
}

fn usage_of(fleet: &FleetDir, agent: &str) -> Value {
    let rows = usage_json(fleet);
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == agent)
        .cloned()
        .unwrap_or_else(|| panic!("no usage row for {agent}: {rows}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_reached_the_provider_is_charged_even_without_an_answer() {
    // Bills the request, never answers.
    let fake = FakeUpstream::start(Config::default());
    // Reads the request, then drops the connection without a word.
    let dropper = TcpListener::bind("127.0.0.1:0").unwrap();
    let dropper_url = format!("http://{}", dropper.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in dropper.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 65536];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = stream.read(&mut buf);
        }
    });
    // Connection refused: a port just freed.
    let refused_url = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // Accepts TCP but never completes a TLS handshake.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_url = format!("https://{}", mute.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in mute.incoming().take(1) {
            open.push(stream);
        }
        std::thread::sleep(Duration::from_secs(20));
        drop(open);
    });

    let fleet = FleetDir::new();
    for name in ["silent", "dropped", "refused", "mute"] {
        fleet.write_secret(name, "key", ANTHROPIC_KEY);
    }
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0', upstream_timeout: 1s }}
admin: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
providers:
  silent: {{ kind: anthropic, upstream: '{}' }}
  dropped: {{ kind: anthropic, upstream: '{dropper_url}' }}
  refused: {{ kind: anthropic, upstream: '{refused_url}' }}
  mute: {{ kind: anthropic, upstream: '{mute_url}' }}
agents:
{}{}{}{}",
        fake.url(),
        agent("silent", "silent"),
        agent("dropped", "dropped"),
        agent("refused", "refused"),
        agent("mute", "mute"),
    ));
    let sup = fleet.run(&[]);

    // A silent provider: 504, charged as cut at the reservation.
    let silent = wait_agent(&fleet, "silent");
    let (status, body) = ask(&silent, "claude-sonnet-4-5-fake-silent").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["type"], "timeout_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("did not answer within `proxy.upstream_timeout` (1s)")
            && message.contains("charged as cut at its reservation"),
        "{message}"
    );
    assert_eq!(fake.billed().total.requests, 1, "the provider billed it");
    let (outcome, status, charged, reserved) = ledger_row(&fleet, "silent");
    assert_eq!((outcome.as_str(), status), ("cut", None));
    assert!(reserved as u64 > MAX_TOKENS, "{reserved}");
    assert!(
        (reserved as u64) < CEILING && 2 * reserved as u64 > CEILING,
        "one worst case ({reserved}) fits under the ceiling, two do not"
    );
    assert_eq!(charged, reserved, "charged at its reservation");
    assert!(charged as u64 >= fake.billed().total.tokens());
    assert!(
        message.contains(&format!("({reserved} tokens)")),
        "{message}"
    );
    let row = usage_of(&fleet, "silent");
    assert_eq!(row["charged_tokens"], reserved, "{row}");
    assert_eq!(row["unsettled_requests"], 0, "{row}");
    // The ceiling counts it: a second worst case no longer fits.
    let (status, body) = ask(&silent, "claude-sonnet-4-5").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("monthly ceiling"),
        "{body}"
    );
    assert_eq!(fake.billed().total.requests, 1, "the refusal never left");

    // Dropped after the request was sent: 502, charged as cut.
    let dropped = wait_agent(&fleet, "dropped");
    let (status, body) = ask(&dropped, "claude-sonnet-4-5").await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("failed before its answer began")
            && message.contains("charged as cut at its reservation"),
        "{message}"
    );
    let (outcome, _, charged, reserved) = ledger_row(&fleet, "dropped");
    assert_eq!(outcome, "cut");
    assert_eq!(charged, reserved);

    // Connection refused: nothing left the proxy, nothing charged.
    let refused = wait_agent(&fleet, "refused");
    let (status, body) = ask(&refused, "claude-sonnet-4-5").await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("could not be reached") && message.contains("nothing was charged"),
        "{message}"
    );
    let (outcome, _, charged, _) = ledger_row(&fleet, "refused");
    assert_eq!((outcome.as_str(), charged), ("released", 0));
    assert_eq!(usage_of(&fleet, "refused")["charged_tokens"], 0);

    // A TLS handshake that never finishes within the timeout: nothing of
    // the request was written, so nothing is charged.
    let mute = wait_agent(&fleet, "mute");
    let (status, body) = ask(&mute, "claude-sonnet-4-5").await;
    assert_eq!(status, 504, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("could not be connected to within")
            && message.contains("nothing was charged"),
        "{message}"
    );
    let (outcome, _, charged, _) = ledger_row(&fleet, "mute");
    assert_eq!((outcome.as_str(), charged), ("released", 0));

    // The metrics count all four where unreachable and timed-out upstreams
    // always were, as upstream errors (the ledger rows say cut or released).
    let addr = wait_for("the admin listener's address in the log", || {
        let log = sup.log();
        let line = log.lines().find(|l| l.contains("admin listener serving"))?;
        let at = line.find("on http://")? + "on http://".len();
        line[at..].split_whitespace().next().map(str::to_owned)
    });
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for agent in ["silent", "dropped", "refused", "mute"] {
        for (outcome, n) in [("upstream_error", 1), ("cut", 0)] {
            let line = format!(
                "supervisor_agent_requests_total{{agent=\"{agent}\",outcome=\"{outcome}\"}} {n}"
            );
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
    }
    drop(held);
}
