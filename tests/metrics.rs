//! README "Metrics": the admin listener serves `/metrics` in the Prometheus
//! text format with per-agent series, and `/healthz`, from the real binary
//! with agents calling the simulated provider through the proxy.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// An agent that makes `N` Anthropic Messages calls with plain urllib (no
/// retries), writes their statuses to `OUT`, then idles.
const AGENT: &str = r#"
import json, os, sys, time, urllib.error, urllib.request
n, out, max_tokens = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
base, key = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
statuses = []
for i in range(n):
    body = json.dumps({
        "model": "claude-sim",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"request {i}: say hello to the metrics test"}],
    }).encode()
    req = urllib.request.Request(base + "/v1/messages", data=body, headers={
        "x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            statuses.append(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        statuses.append(e.code)
with open(out + ".tmp", "w") as f:
    json.dump(statuses, f)
os.rename(out + ".tmp", out)
time.sleep(3600)
"#;

// ---- a small, strict parser for the Prometheus text format 0.0.4 ----

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Scrape {
    /// Family name → type.
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The one sample named `name` whose labels include all of `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => text
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value {text:?}")),
    }
}

/// `{k="v",...}` → labels, and the rest of the line after `}`.
fn parse_labels(text: &str) -> (BTreeMap<String, String>, &str) {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').expect("labels start with {");
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let (key, after) = rest.split_once("=\"").expect("label `key=\"`");
        assert!(valid_name(key) && !key.contains(':'), "label name {key:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("unterminated label value") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect("dangling escape").1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => panic!("unknown escape \\{other}"),
                },
                (_, '\n') => panic!("raw newline in a label value"),
                (_, c) => value.push(c),
            }
        };
        assert!(
            labels.insert(key.to_owned(), value).is_none(),
            "label {key} twice"
        );
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses a whole exposition, checking what the format requires: HELP and
/// TYPE before a family's samples, each family contiguous and declared once,
/// sample names belonging to their family, no duplicate series, histogram
/// buckets cumulative and ending in `+Inf` equal to `_count`.
fn parse(text: &str) -> Scrape {
    assert!(text.ends_with('\n'), "exposition ends with a newline");
    let mut scrape = Scrape::default();
    let mut current: Option<(String, String)> = None;
    let mut series = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has text");
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            assert!(
                !scrape.types.contains_key(name),
                "family {name} declared twice"
            );
            current = Some((name.to_owned(), String::new()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            let (family, _) = current.as_ref().expect("TYPE after HELP");
            assert_eq!(family, name, "TYPE for another family than HELP");
            scrape.types.insert(name.to_owned(), kind.to_owned());
            current = Some((name.to_owned(), kind.to_owned()));
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let (family, kind) = current.as_ref().expect("sample before any family");
            assert!(!kind.is_empty(), "sample before TYPE: {line}");
            let name_end = line.find(['{', ' ']).expect("sample has a value");
            let name = &line[..name_end];
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..])
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let value = rest.strip_prefix(' ').expect("space before the value");
            assert!(!value.contains(' '), "no timestamps expected: {line}");
            let allowed = match kind.as_str() {
                "histogram" => vec![
                    format!("{family}_bucket"),
                    format!("{family}_sum"),
                    format!("{family}_count"),
                ],
                _ => vec![family.clone()],
            };
            assert!(
                allowed.iter().any(|a| a == name),
                "{name} outside its family {family}"
            );
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} ends in _total");
            }
            assert!(
                series.insert(format!("{name}{labels:?}")),
                "duplicate series {line}"
            );
            scrape.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value: parse_value(value),
            });
        }
    }
    check_histograms(&scrape);
    scrape
}

fn check_histograms(scrape: &Scrape) {
    for (family, _) in scrape.types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut by_series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in scrape.samples.iter().filter(|s| s.name == bucket) {
            let mut labels = s.labels.clone();
            let le = parse_value(&labels.remove("le").expect("bucket has le"));
            by_series
                .entry(format!("{labels:?}"))
                .or_default()
                .push((le, s.value));
        }
        for (labels, buckets) in by_series {
            assert!(
                buckets.windows(2).all(|w| w[0].0 < w[1].0),
                "{family}{labels}: le ascending"
            );
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels}: buckets cumulative {buckets:?}"
            );
            let (last_le, inf) = *buckets.last().expect("buckets");
            assert_eq!(last_le, f64::INFINITY, "{family}{labels}: ends in +Inf");
            let count = scrape
                .samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count") && format!("{:?}", s.labels) == labels
                })
                .expect("_count");
            assert_eq!(count.value, inf, "{family}{labels}: _count = +Inf bucket");
        }
    }
}

// ---- HTTP against the admin listener ----

fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin listener");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn admin_addr(sup: &Supervisor) -> SocketAddr {
    wait_for("the admin listener's address in the log", || {
        let log = sup.log();
        let line = log.lines().find(|l| l.contains("admin listener serving"))?;
        let at = line.find("on http://")? + "on http://".len();
        line[at..].split_whitespace().next()?.parse().ok()
    })
}

fn statuses(fleet: &FleetDir, name: &str) -> Vec<u16> {
    wait_for(&format!("{name}'s statuses"), || {
        serde_json::from_str(&fleet.read(name)?).ok()
    })
}

#[test]
fn metrics_and_healthz_show_each_agents_requests_and_state() {
    let fleet = FleetDir::new();
    std::fs::write(fleet.file("agent.py"), AGENT).unwrap();
    fleet.write_fleet(
        "version: 1
proxy: { listen: '127.0.0.1:0' }
admin: { listen: '127.0.0.1:0' }
providers:
  sim:
    kind: simulated
    prices: { claude-sim: { input: 3, output: 15 } }
defaults:
  restart: { policy: never }
agents:
  worker:
    command: [python3, agent.py, '3', worker.json, '64']
    llm: [ { provider: sim } ]
  limited:
    command: [python3, agent.py, '5', limited.json, '64']
    llm: [ { provider: sim } ]
    budget: { requests_per_minute: 2 }
  capped:
    command: [python3, agent.py, '1', capped.json, '1000']
    llm: [ { provider: sim } ]
    budget: { monthly_tokens: 100 }
",
    );
    let mut sup = fleet.run(&[]);
    let addr = admin_addr(&sup);

    let worker = statuses(&fleet, "worker.json");
    let limited = statuses(&fleet, "limited.json");
    let capped = statuses(&fleet, "capped.json");
    assert_eq!(worker, [200, 200, 200]);
    let limited_ok = limited.iter().filter(|s| **s == 200).count() as f64;
    let limited_429 = limited.iter().filter(|s| **s == 429).count() as f64;
    assert!(limited_429 >= 1.0, "a tiny rate throttles: {limited:?}");
    assert_eq!(limited_ok + limited_429, 5.0, "{limited:?}");
    assert_eq!(capped, [429]);

    // Settlement follows the answer's last byte: wait until it is counted.
    let scrape = wait_for("every answered request to be counted", || {
        let (status, head, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        let scrape = parse(&body);
        let ok = |agent| {
            scrape.get(
                "supervisor_agent_requests_total",
                &[("agent", agent), ("outcome", "ok")],
            )
        };
        let settled = ok("worker") == Some(3.0) && ok("limited") == Some(limited_ok);
        settled.then_some(scrape)
    });

    let requests = |agent: &str, outcome: &str| {
        scrape.value(
            "supervisor_agent_requests_total",
            &[("agent", agent), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("worker", "throttled"), 0.0);
    assert_eq!(requests("limited", "throttled"), limited_429);
    assert_eq!(requests("capped", "refused_ceiling"), 1.0);
    assert_eq!(requests("capped", "ok"), 0.0);
    for agent in ["worker", "limited", "capped"] {
        for outcome in ["upstream_error", "cut", "refused_quarantine", "bad_request"] {
            assert_eq!(requests(agent, outcome), 0.0, "{agent} {outcome}");
        }
    }

    let tokens = |agent: &str, kind: &str| {
        scrape.value(
            "supervisor_agent_tokens_total",
            &[("agent", agent), ("kind", kind)],
        )
    };
    assert!(tokens("worker", "input") > 0.0);
    assert!(tokens("worker", "output") > 0.0);
    assert_eq!(tokens("capped", "input"), 0.0, "a refusal costs nothing");
    let cost = scrape.value("supervisor_agent_cost_usd_total", &[("agent", "worker")]);
    let priced = (tokens("worker", "input") * 3.0 + tokens("worker", "output") * 15.0) / 1e6;
    assert!(
        cost > 0.0 && (cost - priced).abs() < 1e-5,
        "cost {cost} vs {priced}"
    );

    // Only forwarded requests are timed: 3 for the worker, none for `capped`.
    let overhead = |agent: &str| {
        scrape.value(
            "supervisor_proxy_overhead_seconds_count",
            &[("agent", agent)],
        )
    };
    assert_eq!(overhead("worker"), 3.0);
    assert_eq!(overhead("limited"), limited_ok);
    assert_eq!(overhead("capped"), 0.0);
    assert_eq!(
        scrape.value(
            "supervisor_proxy_request_duration_seconds_count",
            &[("agent", "worker")]
        ),
        3.0
    );
    assert_eq!(
        scrape
            .types
            .get("supervisor_proxy_overhead_seconds")
            .map(String::as_str),
        Some("histogram")
    );

    // The supervisor's side: state (one-hot), restarts, quarantine.
    assert_eq!(scrape.value("supervisor_loop_up", &[]), 1.0);
    for agent in ["worker", "limited", "capped"] {
        let state =
            |s: &str| scrape.value("supervisor_agent_state", &[("agent", agent), ("state", s)]);
        assert_eq!(state("running"), 1.0, "{agent}");
        assert_eq!(state("backoff"), 0.0, "{agent}");
        assert_eq!(state("quarantined"), 0.0, "{agent}");
        let ones = scrape
            .samples
            .iter()
            .filter(|s| {
                s.name == "supervisor_agent_state" && s.labels["agent"] == agent && s.value == 1.0
            })
            .count();
        assert_eq!(ones, 1, "{agent}: one state at a time");
        assert_eq!(
            scrape.value("supervisor_agent_restarts_total", &[("agent", agent)]),
            0.0
        );
        assert_eq!(
            scrape.value("supervisor_agent_quarantined", &[("agent", agent)]),
            0.0
        );
        assert_eq!(
            scrape.value("supervisor_agent_quarantines_total", &[("agent", agent)]),
            0.0
        );
    }
    assert_eq!(
        scrape.value(
            "supervisor_agent_monthly_tokens_ceiling",
            &[("agent", "capped")]
        ),
        100.0
    );
    assert_eq!(
        scrape.get(
            "supervisor_agent_monthly_tokens_ceiling",
            &[("agent", "worker")]
        ),
        None
    );
    assert_eq!(
        scrape.value("supervisor_agent_month_tokens", &[("agent", "worker")]),
        tokens("worker", "input") + tokens("worker", "output"),
        "the month's charge is exact usage"
    );

    let (status, _, body) = http_get(addr, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = http_get(addr, "/nope");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("`/metrics` and `/healthz`"), "{body}");

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
    // The ledger agrees with the counters.
    let out = std::process::Command::new(bin())
        .args(["usage", "--json", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == "worker")
        .expect("worker row");
    assert_eq!(
        row["input_tokens"].as_f64(),
        Some(tokens("worker", "input"))
    );
    assert_eq!(
        row["output_tokens"].as_f64(),
        Some(tokens("worker", "output"))
    );
    // The listener closed with the supervisor.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

#[test]
fn admin_listener_warns_when_not_on_loopback_and_is_absent_by_default() {
    let fleet = FleetDir::new();
    fleet.write_fleet("version: 1\nadmin: { listen: '0.0.0.0:0' }\nagents: {}\n");
    let mut sup = fleet.run(&[]);
    sup.wait_log("which is not loopback");
    let addr = admin_addr(&sup);
    let local = SocketAddr::from(([127, 0, 0, 1], addr.port()));
    let (status, _, body) = http_get(local, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());

    let fleet = FleetDir::new();
    fleet.write_fleet("version: 1\nagents: {}\n");
    let mut sup = fleet.run(&[]);
    sup.wait_log("starting fleet");
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    assert!(!sup.log().contains("admin listener"), "{}", sup.log());
}

/// A runaway written with plain urllib: its tool always fails, it appends
/// the failure and retries, until the proxy refuses it.
const LOOPER: &str = r#"
import json, os, signal, urllib.error, urllib.request
# Record the refusal before exiting, even if the supervisor's stop comes first.
signal.signal(signal.SIGTERM, lambda *_: None)
base, key = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
tools = [{"name": "fetch_notes", "description": "fetch notes",
          "input_schema": {"type": "object", "properties": {"folder": {"type": "string"}}}}]
messages = [{"role": "user", "content": "Summarize the notes."}]
attempt = 0
while True:
    body = json.dumps({"model": "claude-sim", "max_tokens": 256, "tools": tools,
                       "messages": messages}).encode()
    req = urllib.request.Request(base + "/v1/messages", data=body, headers={
        "x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        with open("looper.refused", "w") as f:
            f.write(str(e.code))
        raise SystemExit(1)
    messages.append({"role": "assistant", "content": answer["content"]})
    calls = [b for b in answer["content"] if b["type"] == "tool_use"]
    attempt += 1
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": c["id"], "is_error": True,
         "content": f"Traceback: ValueError: malformed JSON at char {attempt * 37} (request {attempt})"}
        for c in calls]})
"#;

#[test]
fn a_quarantined_runaway_shows_in_its_series() {
    let fleet = FleetDir::new();
    std::fs::write(fleet.file("looper.py"), LOOPER).unwrap();
    fleet.write_fleet(
        "version: 1
proxy: { listen: '127.0.0.1:0' }
admin: { listen: '127.0.0.1:0' }
providers:
  sim: { kind: simulated }
defaults:
  restart: { policy: never }
agents:
  looper:
    command: [python3, looper.py]
    llm: [ { provider: sim } ]
    runaway: { failing_retries: 2 }
",
    );
    let mut sup = fleet.run(&[]);
    let addr = admin_addr(&sup);
    sup.wait_log("looper: quarantined: runaway");
    assert_eq!(
        wait_for("the looper's refusal", || fleet
            .read("looper.refused")
            .filter(|s| !s.is_empty())),
        "403"
    );
    let scrape = wait_for("the looper to show as quarantined", || {
        let (status, _, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        let scrape = parse(&body);
        let quarantined = scrape.get(
            "supervisor_agent_state",
            &[("agent", "looper"), ("state", "quarantined")],
        );
        (quarantined == Some(1.0)).then_some(scrape)
    });
    let one = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("agent", "looper")];
        labels.extend_from_slice(extra);
        scrape.value(name, &labels)
    };
    assert_eq!(one("supervisor_agent_quarantined", &[]), 1.0);
    assert_eq!(one("supervisor_agent_quarantines_total", &[]), 1.0);
    assert_eq!(
        one(
            "supervisor_agent_requests_total",
            &[("outcome", "refused_quarantine")]
        ),
        1.0,
        "the tripping request is refused, not forwarded"
    );
    let ok = one("supervisor_agent_requests_total", &[("outcome", "ok")]);
    assert!(
        (1.0..=3.0).contains(&ok),
        "tripped within failing_retries + 1 calls: {ok}"
    );
    assert_eq!(one("supervisor_proxy_overhead_seconds_count", &[]), ok);

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}
