//! README "Metering proxy" / "Threat model": no agent reaches an upstream
//! path the allow-list does not name. Every nasty request-target (dot
//! segments in every encoding, encoded slashes and backslashes, double
//! encoding, prefixes of routes, absolute-form targets) is sent byte for
//! byte through the real supervisor with a real scoped token, over a raw
//! socket (an HTTP client library would normalise them first); the fake
//! provider records the exact request-target of everything that reaches it.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::fake_upstream::{ANTHROPIC_KEY, Config, FakeUpstream, OPENAI_KEY};
use common::*;
use serde_json::Value;

const DUMP_ENV: &str = "[sh, -c, 'env > agent.env; exec sleep 1000']";

fn fleet_yaml(upstream: &str) -> String {
    format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
providers:
  claude: {{ kind: anthropic, upstream: '{upstream}' }}
  gpt: {{ kind: openai, upstream: '{upstream}' }}
agents:
  agent:
    command: {DUMP_ENV}
    llm:
      - {{ provider: claude, key: anthropic_key }}
      - {{ provider: gpt, key: openai_key }}
    budget: {{ monthly_tokens: 1M }}
"
    )
}

/// An answer read off a raw socket.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends `method target` exactly as written, with `auth` as the only
/// credential header, and reads the whole answer (`Connection: close`).
fn raw(addr: &str, method: &str, target: &str, auth: (&str, &str), body: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect to the proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n{}: {}\r\n",
        auth.0, auth.1
    );
    if auth.0 == "x-api-key" {
        request.push_str("anthropic-version: 2023-06-01\r\n");
    }
    // Headers some servers read as another path, method or host.
    for (name, value) in OVERRIDES {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str("content-type: application/json\r\n");
        request.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head for {method} {target}: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {method} {target}: {head}"));
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

const OVERRIDES: [(&str, &str); 12] = [
    ("x-original-url", "/v1/organizations/api_keys"),
    ("x-rewrite-url", "/v1/organizations/api_keys"),
    ("x-override-url", "/v1/organizations/api_keys"),
    ("x-forwarded-uri", "/v1/organizations/api_keys"),
    ("x-forwarded-path", "/v1/organizations/api_keys"),
    ("x-forwarded-prefix", "/v1/organizations"),
    ("x-http-method-override", "DELETE"),
    ("x-http-method", "DELETE"),
    ("x-method-override", "DELETE"),
    ("x-forwarded-host", "evil.example"),
    ("x-host", "evil.example"),
    ("forwarded", "host=evil.example"),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dialect {
    Anthropic,
    OpenAi,
}

const MESSAGE: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT: &str = r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn nothing_but_the_allowed_canonical_paths_reaches_upstream() {
    let fake = FakeUpstream::start(Config::default());
    let fleet = FleetDir::new();
    fleet.write_secret("agent", "anthropic_key", ANTHROPIC_KEY);
    fleet.write_secret("agent", "openai_key", OPENAI_KEY);
    fleet.write_fleet(&fleet_yaml(&fake.url()));
    let _sup = fleet.run(&[]);
    let env = fleet.wait_env("agent.env", "OPENAI_API_KEY");
    let addr = env["ANTHROPIC_BASE_URL"]
        .trim_start_matches("http://")
        .to_owned();
    let anthropic_token = env["ANTHROPIC_API_KEY"].to_owned();
    let openai_token = format!("Bearer {}", env["OPENAI_API_KEY"]);
    assert!(anthropic_token.starts_with("sup-"));
    let auth = |d: Dialect| match d {
        Dialect::Anthropic => ("x-api-key", anthropic_token.as_str()),
        Dialect::OpenAi => ("authorization", openai_token.as_str()),
    };

    use Dialect::*;
    // What must not pass: (dialect, method, target, status, words the message has).
    let long = format!("/v1/models/{}v1/files", "../".repeat(300));
    #[rustfmt::skip]
    let nasty: Vec<(Dialect, &str, &str, u16, &str)> = vec![
        (Anthropic, "GET", "/v1/models/../../v1/organizations/api_keys", 400, "dot segment"),
        (OpenAi, "GET", "/v1/models/../../v1/organizations/api_keys", 400, "dot segment"),
        (Anthropic, "GET", "/v1/models/%2e%2e/files/file_1/content", 400, "dot segment"),
        (OpenAi, "GET", "/v1/models/%2e%2e/files/file_1/content", 400, "dot segment"),
        (Anthropic, "GET", "/v1/models/%2E%2E/files/file_1/content", 400, "dot segment"),
        (Anthropic, "GET", "/v1/models/.%2E/files/file_1/content", 400, "dot segment"),
        (Anthropic, "GET", "/v1/models/%2e./files/file_1/content", 400, "dot segment"),
        (Anthropic, "GET", "/v1/models/./../files", 400, "dot segment"),
        (Anthropic, "GET", "/./v1/files/file_1/content", 400, "dot segment"),
        (Anthropic, "GET", "//v1/models/../../v1/files", 400, "dot segment"),
        (Anthropic, "GET", "/v1/models/x/../../files", 400, "dot segment"),
        (Anthropic, "GET", &long, 400, "dot segment"),
        (Anthropic, "GET", "/v1/models/%252e%252e/files/file_1/content", 400, "percent-encoded twice"),
        (OpenAi, "GET", "/v1/models/..%2f..%2fv1%2ffiles", 400, "encoded slash"),
        (OpenAi, "GET", "/v1/models/%2F..%2Ffiles", 400, "encoded slash"),
        (OpenAi, "GET", "/v1/models/Qwen%2FQwen2.5-7B", 400, "encoded slash"),
        (OpenAi, "GET", "/v1/models/..%5c..%5cfiles", 400, "encoded backslash"),
        (OpenAi, "GET", "/v1/models/..\\..\\v1\\files", 400, "backslash"),
        (OpenAi, "GET", "/v1/models\\..\\..\\v1\\files", 400, "backslash"),
        (OpenAi, "GET", "/v1/models/..;/files", 400, "`;`"),
        (OpenAi, "GET", "/v1/models/%00", 400, "`%00`"),
        (Anthropic, "POST", "/v1/messages/../files", 400, "dot segment"),
        (Anthropic, "POST", "/v1/messages/%2e%2e/batches", 400, "dot segment"),
        (OpenAi, "POST", "/v1/chat/completions/../../v1/files", 400, "dot segment"),
        (Anthropic, "GET", "http://evil.example/v1/models/../organizations/api_keys", 400, "dot segment"),
        (Anthropic, "GET", "/v1/files/file_1/content", 404, "only these routes pass"),
        (Anthropic, "GET", "/v1/organizations/api_keys", 404, "only these routes pass"),
        (Anthropic, "GET", "/v1/modelsx", 404, "only these routes pass"),
        (Anthropic, "GET", "/v1/models-admin", 404, "only these routes pass"),
        (Anthropic, "GET", "/v1/models/x/y", 404, "only these routes pass"),
        (OpenAi, "GET", "/v1/models/Qwen/Qwen2.5-7B", 404, "only these routes pass"),
        (Anthropic, "POST", "/v1/messages/batches", 404, "only these routes pass"),
        (Anthropic, "GET", "/v1/messages/batches/msgbatch_1/results", 404, "only these routes pass"),
        (OpenAi, "GET", "/v1/responses/resp_1", 404, "only these routes pass"),
        (OpenAi, "POST", "/v1/messages", 404, "only these routes pass"),
        (Anthropic, "POST", "/v1/chat/completions", 404, "only these routes pass"),
        (Anthropic, "DELETE", "/v1/models/claude-x", 404, "only these routes pass"),
        (Anthropic, "GET", "http://evil.example/v1/files", 404, "only these routes pass"),
    ];
    for (dialect, method, target, status, why) in &nasty {
        let body = if *method == "POST" { MESSAGE } else { "" };
        let answer = raw(&addr, method, target, auth(*dialect), body);
        let what = format!("{dialect:?} {method} {target}");
        let arrived: Vec<String> = fake.requests().iter().map(|r| r.target.clone()).collect();
        assert!(
            arrived.is_empty(),
            "{what} reached upstream as {arrived:?}, with the real key"
        );
        assert_eq!(answer.status, *status, "{what}: {}", answer.body);
        assert_eq!(
            answer
                .headers
                .get("x-supervisor-refusal")
                .map(String::as_str),
            Some("1"),
            "{what}: the proxy answered itself"
        );
        let json: Value = serde_json::from_str(&answer.body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", answer.body));
        let message = match dialect {
            Anthropic => {
                assert_eq!(json["type"], "error", "{what}: {json}");
                let want = if *status == 400 {
                    "invalid_request_error"
                } else {
                    "not_found_error"
                };
                assert_eq!(json["error"]["type"], want, "{what}: {json}");
                json["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            }
            OpenAi => {
                assert_eq!(
                    json["error"]["type"], "invalid_request_error",
                    "{what}: {json}"
                );
                assert!(json["error"]["code"].is_string(), "{what}: {json}");
                json["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            }
        };
        assert!(message.contains(why), "{what}: says why: {message}");
        let path_shown = if target.starts_with("http://") {
            &target["http://evil.example".len()..]
        } else {
            target
        };
        let shown = &path_shown[..path_shown.len().min(60)];
        assert!(
            message.contains(shown),
            "{what}: names the refused path: {message}"
        );
        assert!(message.contains("agent \"agent\""), "{what}: {message}");
    }

    // What must pass, and exactly what upstream must receive for it.
    #[rustfmt::skip]
    let allowed: &[(Dialect, &str, &str, &str, &str)] = &[
        (Anthropic, "GET", "/v1/models", "", "/v1/models"),
        (Anthropic, "GET", "/v1/models?limit=5&after_id=claude-x", "", "/v1/models?limit=5&after_id=claude-x"),
        (Anthropic, "GET", "/v1/models/claude-sonnet-4-5-20250929", "", "/v1/models/claude-sonnet-4-5-20250929"),
        (OpenAi, "GET", "/v1/models/ft:gpt-4o-mini:org::abc", "", "/v1/models/ft:gpt-4o-mini:org::abc"),
        (OpenAi, "GET", "/v1/%6Dodels/ft%3Agpt-4o-mini%3Aorg%3A%3Aabc", "", "/v1/models/ft:gpt-4o-mini:org::abc"),
        (OpenAi, "GET", "/V1//Models/gpt-4.1/", "", "/v1/models/gpt-4.1"),
        (OpenAi, "GET", "/v1/models/x?q=/../../v1/files", "", "/v1/models/x?q=/../../v1/files"),
        (Anthropic, "POST", "/v1/messages", MESSAGE, "/v1/messages"),
        (Anthropic, "POST", "/v1/messages?beta=true", MESSAGE, "/v1/messages?beta=true"),
        (Anthropic, "POST", "//v1/messages/", MESSAGE, "/v1/messages"),
        (OpenAi, "POST", "/v1/chat/completions", CHAT, "/v1/chat/completions"),
    ];
    let mut want_upstream: Vec<String> = Vec::new();
    for (dialect, method, target, body, forwarded) in allowed {
        let answer = raw(&addr, method, target, auth(*dialect), body);
        assert_eq!(
            answer.status, 200,
            "{method} {target} passes: {}",
            answer.body
        );
        want_upstream.push((*forwarded).to_owned());
    }

    // Upstream received exactly the allowed canonical targets, each once,
    // always with the real key and never the scoped token.
    let seen = fake.requests();
    let mut got: Vec<String> = seen.iter().map(|r| r.target.clone()).collect();
    got.sort();
    want_upstream.sort();
    assert_eq!(got, want_upstream, "request-targets that reached upstream");
    for r in &seen {
        assert!(
            r.key.as_deref() == Some(ANTHROPIC_KEY) || r.key.as_deref() == Some(OPENAI_KEY),
            "{}: {:?}",
            r.target,
            r.key
        );
    }
    assert!(!fake.saw(&anthropic_token) && !fake.saw(&env["OPENAI_API_KEY"]));
    for r in &seen {
        for (name, _) in OVERRIDES {
            assert!(
                !r.headers.contains_key(name),
                "{}: `{name}` reached upstream",
                r.target
            );
        }
        assert_ne!(
            r.headers.get("host").map(String::as_str),
            Some(addr.as_str())
        );
    }
    // A metered body still goes with its length, as before.
    let message = seen.iter().find(|r| r.path == "/v1/messages").unwrap();
    assert_eq!(
        message.headers.get("content-length").map(String::as_str),
        Some(MESSAGE.len().to_string().as_str())
    );
    assert_eq!(
        message.body,
        serde_json::from_str::<Value>(MESSAGE).unwrap()
    );
}
