//! A fake LLM provider for the integration tests: Anthropic `POST /v1/messages`,
//! OpenAI `POST /v1/chat/completions` and `POST /v1/responses` (JSON and SSE, in
//! the providers' real wire formats, so the official SDKs parse them) and a free
//! `GET /v1/models`. It checks the real key (Anthropic: `x-api-key`, else a
//! `Bearer` token, which is what its current Python SDK sends; OpenAI: `Bearer`),
//! records every key and request it was shown, and keeps its own
//! billing tally, so tests can hold the proxy's ledger against what a provider
//! would have charged.
//!
//! It owns the wire formats and the billing rules; it must not depend on the
//! crate under test (it is the independent oracle) and must not reach the network
//! beyond its own loopback listener.
//!
//! Requests that fail validation get the provider's 400 (`model`, `messages` /
//! `input` and, for Anthropic, `max_tokens` and the `anthropic-version` header
//! are required), unknown paths its 404; neither bills.
//!
//! Shape: [`respond`] is a pure function from a request to a scripted [`Reply`]
//! (status, headers, body parts, pauses, abort) plus what it bills; the server
//! around it only reads requests, records them and plays the script.
//!
//! # Usage
//! Deterministic, so tests can predict exact numbers:
//! - input tokens = `ceil(bytes / 4)` of the prompt, where the prompt is the
//!   compact JSON (keys sorted) of each of these fields present, summed:
//!   Anthropic `system`, `messages`, `tools`; chat `messages`, `tools`;
//!   Responses `instructions`, `input`, `tools` (see [`prompt_tokens`]);
//! - output tokens = min(the request's limit, the answer length), the answer length
//!   being [`Config::answer_tokens`] (default 12), an `out-N` model marker or an
//!   `x-fake-output-tokens` header; one streamed delta and one word of text per
//!   token; a capped answer stops with `max_tokens` / `length` / `incomplete`;
//! - OpenAI Responses `previous_response_id`: the provider keeps the chain, so
//!   the input billed is the previous response's context (its input items and
//!   output, carried in the fake's answer id `resp_fake<seq>c<tokens>`) plus
//!   this request's prompt; the answer echoes `previous_response_id`. An id the
//!   fake never issued gets the provider's 400 (`invalid_request_error` on
//!   `previous_response_id`);
//! - cache tokens from the model markers `cache-read-N` / `cache-write-N` or the
//!   headers `x-fake-cache-read` / `x-fake-cache-write` (headers win). Anthropic
//!   reports both apart from `input_tokens`; OpenAI has no cache writes and counts
//!   cache reads inside `prompt_tokens` / `input_tokens` (as `cached_tokens`).
//!
//! # Behaviours, chosen by markers in the model name (e.g. `claude-x-fake-cut`)
//! `fake-400`, `fake-429` (with `retry-after`), `fake-500`, `fake-529` (Anthropic
//! `overloaded_error`; OpenAI answers 503, its overload status),
//! `fake-error-midstream`, `fake-cut`, `fake-slow` (pause before the headers and
//! between events), `fake-hang` (never answers), `fake-silent` (does the work
//! and bills it, but never answers). A marker counts only between `-`
//! boundaries or the ends of the name.
//!
//! # Billing rules (the tally, [`FakeUpstream::billed`])
//! Decided when the answer starts, before its first byte, so the tally is never
//! behind anything a client saw, and it is conservative:
//! - a complete answer (slow or not) bills its usage;
//! - a cut answer (`fake-cut`: connection dropped after the start and a few deltas,
//!   or half a JSON body) bills the full planned usage: the provider did the work;
//! - an error mid-stream (`fake-error-midstream`, streaming) bills input and cache
//!   tokens plus the output deltas sent before the error;
//! - a silent answer (`fake-silent`) bills the full planned usage, as a provider
//!   does for a generation whose client timed out before it finished;
//! - any error status (4xx, 429, 5xx, 529), including `fake-error-midstream` on a
//!   non-streaming request (then a 500), and `fake-hang`, bills nothing;
//! - a client hanging up early changes nothing: what was decided is billed.
//!
//! `Billed::requests` counts billed requests only; [`FakeUpstream::requests`] has
//! every request (path, the exact request-target, key, model, stream,
//! `x-stainless-retry-count`, all headers, body, status, what it billed). [`FakeUpstream::keys_seen`] and
//! [`FakeUpstream::saw`] are for "the scoped token never reached upstream" checks;
//! [`FakeUpstream::in_flight`] and [`FakeUpstream::max_concurrency`] for
//! concurrency tests.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::io;
use std::net::TcpListener as StdListener;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// The real Anthropic key [`Config::default`] accepts.
pub const ANTHROPIC_KEY: &str = "test-anthropic-upstream-real-key";
/// The real OpenAI key [`Config::default`] accepts.
pub const OPENAI_KEY: &str = "test-openai-upstream-real-key";
/// Output deltas sent before a mid-stream error or a cut (fewer if the answer is shorter).
pub const DELTAS_BEFORE_FAILURE: u64 = 3;
/// Fixed `created` timestamps: the SDKs only need a number.
const CREATED: u64 = 1_741_569_952;

const WORDS: [&str; 12] = [
    "The", "fake", "upstream", "answers", "every", "request", "with", "the", "same", "plain",
    "words", "again",
];

#[derive(Debug, Clone)]
pub struct Config {
    /// Keys accepted on `/v1/messages`, in `x-api-key` or as a `Bearer` token.
    pub anthropic_keys: Vec<String>,
    /// Keys accepted as `Authorization: Bearer` on the OpenAI paths.
    pub openai_keys: Vec<String>,
    /// Output tokens of a full answer; a request's own limit caps it.
    pub answer_tokens: u64,
    /// `fake-slow`: pause before the status line and headers.
    pub slow_first_byte: Duration,
    /// `fake-slow`: pause before each body part after the first.
    pub slow_between: Duration,
    /// `retry-after` seconds on a `fake-429` answer.
    pub retry_after_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            anthropic_keys: vec![ANTHROPIC_KEY.to_owned()],
            openai_keys: vec![OPENAI_KEY.to_owned()],
            answer_tokens: 12,
            slow_first_byte: Duration::from_millis(200),
            slow_between: Duration::from_millis(20),
            retry_after_secs: 1,
        }
    }
}

/// Tokens billed, in the provider-neutral split the ledger uses: `input_tokens`
/// excludes cache reads and writes (OpenAI's `cached_tokens` are moved out of its
/// prompt count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Billed {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Billed requests (an answer that billed nothing does not count).
    pub requests: u64,
}

impl Billed {
    /// Every token, input of all kinds and output.
    pub fn tokens(&self) -> u64 {
        self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
    }

    fn add(&mut self, other: &Billed) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.requests += other.requests;
    }
}

/// The billing tally: per real key and in total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub total: Billed,
    pub per_key: BTreeMap<String, Billed>,
}

/// One request as the fake saw it, with what it answered.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// The request-target exactly as it arrived on the request line (path and
    /// query, undecoded), for "nothing else reached upstream" checks.
    pub target: String,
    /// The credential presented for this path's provider (Anthropic: `x-api-key`,
    /// else the `Bearer` value; OpenAI: the `Bearer` value), accepted or not.
    pub key: Option<String>,
    pub model: Option<String>,
    pub stream: bool,
    /// `x-stainless-retry-count`, the SDKs' attempt number.
    pub retry_count: Option<u32>,
    /// Every header, names lower-case; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON, `Value::Null` if it was not JSON.
    pub body: Value,
    /// The body as text (lossy), for "was this string ever sent" checks.
    pub body_text: String,
    pub status: u16,
    pub billed: Billed,
}

/// Which API a metered path speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Anthropic,
    OpenAiChat,
    OpenAiResponses,
}

/// A behaviour forced by a model-name marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    BadRequest,
    RateLimited,
    ServerError,
    Overloaded,
    ErrorMidstream,
    Cut,
    Hang,
    Silent,
}

/// What a request asked of the fake through its model name and `x-fake-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    pub failure: Option<Failure>,
    pub slow: bool,
    pub cache_read: u64,
    pub cache_write: u64,
    pub answer_tokens: Option<u64>,
}

/// Reads the markers of a model name, then lets `x-fake-cache-read`,
/// `x-fake-cache-write` and `x-fake-output-tokens` headers override the numbers.
pub fn directives(model: &str, headers: &[(String, String)]) -> Directives {
    let failures = [
        ("fake-400", Failure::BadRequest),
        ("fake-429", Failure::RateLimited),
        ("fake-500", Failure::ServerError),
        ("fake-529", Failure::Overloaded),
        ("fake-error-midstream", Failure::ErrorMidstream),
        ("fake-cut", Failure::Cut),
        ("fake-hang", Failure::Hang),
        ("fake-silent", Failure::Silent),
    ];
    let header_number = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
    };
    Directives {
        failure: failures
            .iter()
            .find(|(marker, _)| has_marker(model, marker))
            .map(|(_, f)| *f),
        slow: has_marker(model, "fake-slow"),
        cache_read: header_number("x-fake-cache-read")
            .or_else(|| marker_number(model, "cache-read-"))
            .unwrap_or(0),
        cache_write: header_number("x-fake-cache-write")
            .or_else(|| marker_number(model, "cache-write-"))
            .unwrap_or(0),
        answer_tokens: header_number("x-fake-output-tokens")
            .or_else(|| marker_number(model, "out-")),
    }
}

/// Marker starts: at 0 or right after a `-`.
fn marker_starts<'a>(model: &'a str, marker: &'a str) -> impl Iterator<Item = usize> + 'a {
    model
        .match_indices(marker)
        .map(|(i, _)| i)
        .filter(move |&i| i == 0 || model.as_bytes()[i - 1] == b'-')
}

fn has_marker(model: &str, marker: &str) -> bool {
    marker_starts(model, marker).any(|i| {
        let end = i + marker.len();
        end == model.len() || model.as_bytes()[end] == b'-'
    })
}

fn marker_number(model: &str, prefix: &str) -> Option<u64> {
    marker_starts(model, prefix).find_map(|i| {
        let rest = &model[i + prefix.len()..];
        let digits = rest.split('-').next().unwrap_or("");
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    })
}

/// Input tokens of a request body's prompt: `ceil(bytes / 4)` of the compact,
/// key-sorted JSON of each prompt field present (see the module doc), at least 1.
pub fn prompt_tokens(api: Api, body: &Value) -> u64 {
    let fields: &[&str] = match api {
        Api::Anthropic => &["system", "messages", "tools"],
        Api::OpenAiChat => &["messages", "tools"],
        Api::OpenAiResponses => &["instructions", "input", "tools"],
    };
    let bytes: usize = fields
        .iter()
        .filter_map(|f| body.get(*f))
        .filter(|v| !v.is_null())
        .map(|v| v.to_string().len())
        .sum();
    (bytes as u64).div_ceil(4).max(1)
}

/// A request as [`respond`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// One step of playing an answer's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Data(Bytes),
    Pause(Duration),
    /// Drop the connection without finishing the body.
    Abort,
}

/// A scripted answer and what it bills.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// Pause before the status line (`fake-slow`).
    pub first_byte_delay: Duration,
    /// Never answer (`fake-hang`).
    pub hang: bool,
    pub parts: Vec<Part>,
    pub billed: Billed,
}

impl Reply {
    /// The body bytes the script sends, pauses and abort left out.
    pub fn body_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for part in &self.parts {
            if let Part::Data(b) = part {
                out.extend_from_slice(b);
            }
        }
        out
    }

    pub fn aborts(&self) -> bool {
        self.parts.contains(&Part::Abort)
    }
}

/// What [`respond`] learned about the request, for the request log.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub key: Option<String>,
    pub model: Option<String>,
    pub stream: bool,
    pub reply: Reply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Anthropic,
    OpenAi,
}

/// Decides the whole answer to one request. `seq` makes ids unique.
pub fn respond(config: &Config, req: RequestView<'_>, seq: u64) -> Exchange {
    let path = req.path.split_once('?').map_or(req.path, |(p, _)| p);
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let bearer = header("authorization").map(|v| v.strip_prefix("Bearer ").unwrap_or(v).to_owned());
    let api_key = header("x-api-key").map(str::to_owned);
    // Read for the request log even when the request is refused before parsing.
    let parsed = serde_json::from_slice::<Value>(req.body).ok();
    let mut exchange = Exchange {
        key: None,
        model: parsed
            .as_ref()
            .and_then(|b| b.get("model"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        stream: parsed
            .as_ref()
            .and_then(|b| b.get("stream"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        reply: Reply::error(Flavour::OpenAi, 404, "not_found", "not found", seq),
    };

    let api = match (req.method, path) {
        ("POST", "/v1/messages") => Api::Anthropic,
        ("POST", "/v1/chat/completions") => Api::OpenAiChat,
        ("POST", "/v1/responses") => Api::OpenAiResponses,
        ("GET", "/v1/models") => {
            // One path for both providers: Anthropic clients identify themselves.
            let anthropic = api_key.is_some() || header("anthropic-version").is_some();
            let (flavour, key, accepted) = if anthropic {
                (
                    Flavour::Anthropic,
                    api_key.or(bearer),
                    &config.anthropic_keys,
                )
            } else {
                (Flavour::OpenAi, bearer, &config.openai_keys)
            };
            exchange.reply = match check_key(flavour, key.as_deref(), accepted, seq) {
                Err(reply) => reply,
                Ok(()) => Reply::json(flavour, 200, &models_list(flavour), seq),
            };
            exchange.key = key;
            return exchange;
        }
        ("GET", p) if p.starts_with("/v1/models/") && !p["/v1/models/".len()..].contains('/') => {
            let id = &p["/v1/models/".len()..];
            let anthropic = api_key.is_some() || header("anthropic-version").is_some();
            let (flavour, key, accepted) = if anthropic {
                (
                    Flavour::Anthropic,
                    api_key.or(bearer),
                    &config.anthropic_keys,
                )
            } else {
                (Flavour::OpenAi, bearer, &config.openai_keys)
            };
            exchange.reply = match check_key(flavour, key.as_deref(), accepted, seq) {
                Err(reply) => reply,
                Ok(()) => Reply::json(flavour, 200, &model_object(flavour, id), seq),
            };
            exchange.key = key;
            return exchange;
        }
        _ => {
            let flavour = if path.starts_with("/v1/messages") {
                Flavour::Anthropic
            } else {
                Flavour::OpenAi
            };
            let message = format!("no route for {} {path}", req.method);
            exchange.reply = Reply::error(flavour, 404, "not_found_error", &message, seq);
            return exchange;
        }
    };
    let flavour = if api == Api::Anthropic {
        Flavour::Anthropic
    } else {
        Flavour::OpenAi
    };
    let (key, accepted) = match flavour {
        Flavour::Anthropic => (api_key.or(bearer), &config.anthropic_keys),
        Flavour::OpenAi => (bearer, &config.openai_keys),
    };
    exchange.key = key.clone();
    if let Err(reply) = check_key(flavour, key.as_deref(), accepted, seq) {
        exchange.reply = reply;
        return exchange;
    }
    if flavour == Flavour::Anthropic && header("anthropic-version").is_none() {
        exchange.reply =
            Reply::bad_request(flavour, "anthropic-version: header is required", None, seq);
        return exchange;
    }
    let body = match parsed {
        Some(v @ Value::Object(_)) => v,
        _ => {
            let message = match flavour {
                Flavour::Anthropic => "invalid request: request body is not valid JSON",
                Flavour::OpenAi => "We could not parse the JSON body of your request.",
            };
            exchange.reply = Reply::bad_request(flavour, message, None, seq);
            return exchange;
        }
    };
    exchange.reply = match plan(config, api, &body, req.headers) {
        Err(message) => Reply::bad_request(flavour, &message.0, Some(message.1), seq),
        Ok(plan) => answer(config, &plan, seq),
    };
    exchange
}

fn check_key(
    flavour: Flavour,
    key: Option<&str>,
    accepted: &[String],
    seq: u64,
) -> Result<(), Reply> {
    match (flavour, key) {
        (_, Some(k)) if accepted.iter().any(|a| a == k) => Ok(()),
        (Flavour::Anthropic, None) => Err(Reply::error(
            flavour,
            401,
            "authentication_error",
            "x-api-key header is required",
            seq,
        )),
        (Flavour::Anthropic, Some(_)) => Err(Reply::error(
            flavour,
            401,
            "authentication_error",
            "invalid x-api-key",
            seq,
        )),
        (Flavour::OpenAi, None) => Err(Reply::openai_error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
            None,
            seq,
        )),
        (Flavour::OpenAi, Some(_)) => Err(Reply::openai_error(
            401,
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
            seq,
        )),
    }
}

/// Everything an answer depends on, read from a valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub api: Api,
    pub model: String,
    pub stream: bool,
    /// OpenAI chat `stream_options.include_usage`.
    pub include_usage: bool,
    /// The answer was capped by the request's limit.
    pub truncated: bool,
    pub directives: Directives,
    /// The full answer's usage, `requests: 1`.
    pub usage: Billed,
    /// Responses: `instructions` and `max_output_tokens`, echoed back.
    pub instructions: Value,
    pub max_output_tokens: Value,
    /// Responses: the `previous_response_id` continued (echoed back), and
    /// the context tokens the chain carries after this answer.
    pub previous_response_id: Value,
    pub context_tokens: u64,
}

/// A validation failure: message and the offending parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String, pub &'static str);

/// Validates a request body the way the provider would and plans the answer.
pub fn plan(
    config: &Config,
    api: Api,
    body: &Value,
    headers: &[(String, String)],
) -> Result<Plan, Invalid> {
    let model = match body.get("model").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => return Err(missing(api, "model")),
    };
    let prompt_field = match api {
        Api::Anthropic | Api::OpenAiChat => "messages",
        Api::OpenAiResponses => "input",
    };
    match body.get(prompt_field) {
        Some(Value::Array(_)) => {}
        Some(Value::String(_)) if api == Api::OpenAiResponses => {}
        _ => return Err(missing(api, prompt_field)),
    }
    let limit = match api {
        Api::Anthropic => match body.get("max_tokens").and_then(Value::as_u64) {
            Some(n) if n >= 1 => Some(n),
            Some(_) => {
                return Err(Invalid(
                    "max_tokens: must be greater than or equal to 1".into(),
                    "max_tokens",
                ));
            }
            None => return Err(missing(api, "max_tokens")),
        },
        Api::OpenAiChat => body
            .get("max_completion_tokens")
            .and_then(Value::as_u64)
            .or_else(|| body.get("max_tokens").and_then(Value::as_u64)),
        Api::OpenAiResponses => body.get("max_output_tokens").and_then(Value::as_u64),
    };
    let d = directives(&model, headers);
    let answer_tokens = d.answer_tokens.unwrap_or(config.answer_tokens).max(1);
    let output = limit.map_or(answer_tokens, |l| l.min(answer_tokens));
    let previous = match body.get("previous_response_id") {
        Some(Value::String(id)) if api == Api::OpenAiResponses => match chain_context(id) {
            Some(tokens) => tokens,
            None => {
                return Err(Invalid(
                    format!("Previous response with id '{id}' not found."),
                    "previous_response_id",
                ));
            }
        },
        _ => 0,
    };
    let input = previous + prompt_tokens(api, body);
    let items = body
        .get("input")
        .map_or(0, |v| (v.to_string().len() as u64).div_ceil(4));
    // OpenAI bills no cache writes; its cache reads are part of the prompt.
    let cache_write = if api == Api::Anthropic {
        d.cache_write
    } else {
        0
    };
    Ok(Plan {
        api,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        truncated: output < answer_tokens,
        usage: Billed {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: cache_write,
            cache_read_input_tokens: d.cache_read,
            requests: 1,
        },
        directives: d,
        instructions: body.get("instructions").cloned().unwrap_or(Value::Null),
        max_output_tokens: body
            .get("max_output_tokens")
            .cloned()
            .unwrap_or(Value::Null),
        previous_response_id: body
            .get("previous_response_id")
            .cloned()
            .unwrap_or(Value::Null),
        context_tokens: previous + items + output,
        model,
    })
}

/// The context tokens a fake answer id carries (`resp_fake<seq>c<tokens>`).
fn chain_context(id: &str) -> Option<u64> {
    let rest = id.strip_prefix("resp_fake")?;
    let (seq, tokens) = rest.split_once('c')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tokens.parse().ok()
}

fn response_id(plan: &Plan, seq: u64) -> String {
    format!("resp_fake{seq:016}c{}", plan.context_tokens)
}

fn missing(api: Api, field: &'static str) -> Invalid {
    match api {
        Api::Anthropic => Invalid(format!("{field}: Field required"), field),
        _ => Invalid(format!("Missing required parameter: '{field}'."), field),
    }
}

/// The answer to a valid request: a failure it asked for, or the answer.
fn answer(config: &Config, plan: &Plan, seq: u64) -> Reply {
    let flavour = if plan.api == Api::Anthropic {
        Flavour::Anthropic
    } else {
        Flavour::OpenAi
    };
    let mut reply = match plan.directives.failure {
        Some(Failure::BadRequest) => {
            return Reply::bad_request(
                flavour,
                "fake-400: this model refuses every request",
                Some("model"),
                seq,
            );
        }
        Some(Failure::RateLimited) => {
            let mut reply = match flavour {
                Flavour::Anthropic => Reply::error(
                    flavour,
                    429,
                    "rate_limit_error",
                    "Number of request tokens has exceeded your per-minute rate limit",
                    seq,
                ),
                Flavour::OpenAi => Reply::openai_error(
                    429,
                    "Rate limit reached for requests per min (RPM). Please try again in 1s.",
                    "requests",
                    None,
                    Some("rate_limit_exceeded"),
                    seq,
                ),
            };
            reply
                .headers
                .push(("retry-after", config.retry_after_secs.to_string()));
            return reply;
        }
        Some(Failure::ServerError) => return server_error(flavour, seq),
        Some(Failure::ErrorMidstream) if !plan.stream => return server_error(flavour, seq),
        Some(Failure::Overloaded) => {
            return match flavour {
                Flavour::Anthropic => {
                    Reply::error(flavour, 529, "overloaded_error", "Overloaded", seq)
                }
                Flavour::OpenAi => Reply::openai_error(
                    503,
                    "The engine is currently overloaded, please try again later.",
                    "server_error",
                    None,
                    None,
                    seq,
                ),
            };
        }
        Some(Failure::Hang) => {
            let mut reply = Reply::json(flavour, 200, &Value::Null, seq);
            reply.hang = true;
            reply.parts.clear();
            return reply;
        }
        Some(Failure::Silent) => {
            // The work is done (and billed); the answer never leaves.
            let mut reply = if plan.stream {
                stream_reply(plan, seq)
            } else {
                json_reply(plan, seq)
            };
            reply.hang = true;
            reply.parts.clear();
            return reply;
        }
        Some(Failure::ErrorMidstream) | Some(Failure::Cut) | None => {
            if plan.stream {
                stream_reply(plan, seq)
            } else {
                json_reply(plan, seq)
            }
        }
    };
    if plan.directives.slow {
        reply.first_byte_delay = config.slow_first_byte;
        let mut paced = Vec::with_capacity(reply.parts.len() * 2);
        for (i, part) in reply.parts.drain(..).enumerate() {
            if i > 0 && part != Part::Abort {
                paced.push(Part::Pause(config.slow_between));
            }
            paced.push(part);
        }
        reply.parts = paced;
    }
    reply
}

fn server_error(flavour: Flavour, seq: u64) -> Reply {
    match flavour {
        Flavour::Anthropic => Reply::error(flavour, 500, "api_error", "Internal server error", seq),
        Flavour::OpenAi => Reply::openai_error(
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
            seq,
        ),
    }
}

impl Reply {
    fn json(flavour: Flavour, status: u16, body: &Value, seq: u64) -> Reply {
        let id_header = match flavour {
            Flavour::Anthropic => "request-id",
            Flavour::OpenAi => "x-request-id",
        };
        Reply {
            status,
            headers: vec![
                ("content-type", "application/json".to_owned()),
                (id_header, format!("req_fake{seq:016}")),
            ],
            first_byte_delay: Duration::ZERO,
            hang: false,
            parts: vec![Part::Data(Bytes::from(body.to_string()))],
            billed: Billed::default(),
        }
    }

    /// A provider-shaped error: Anthropic's envelope, or OpenAI's with no code.
    fn error(flavour: Flavour, status: u16, kind: &str, message: &str, seq: u64) -> Reply {
        match flavour {
            Flavour::Anthropic => Reply::json(
                flavour,
                status,
                &json!({
                    "type": "error",
                    "error": {"type": kind, "message": message},
                    "request_id": format!("req_fake{seq:016}"),
                }),
                seq,
            ),
            Flavour::OpenAi => {
                Reply::openai_error(status, message, "invalid_request_error", None, None, seq)
            }
        }
    }

    fn openai_error(
        status: u16,
        message: &str,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
        seq: u64,
    ) -> Reply {
        Reply::json(
            Flavour::OpenAi,
            status,
            &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
            seq,
        )
    }

    fn bad_request(flavour: Flavour, message: &str, param: Option<&str>, seq: u64) -> Reply {
        match flavour {
            Flavour::Anthropic => Reply::error(flavour, 400, "invalid_request_error", message, seq),
            Flavour::OpenAi => {
                Reply::openai_error(400, message, "invalid_request_error", param, None, seq)
            }
        }
    }
}

fn models_list(flavour: Flavour) -> Value {
    match flavour {
        Flavour::Anthropic => json!({
            "data": [{
                "type": "model",
                "id": "claude-fake-1",
                "display_name": "Claude Fake 1",
                "created_at": "2025-01-01T00:00:00Z",
            }],
            "has_more": false,
            "first_id": "claude-fake-1",
            "last_id": "claude-fake-1",
        }),
        Flavour::OpenAi => json!({
            "object": "list",
            "data": [{"id": "gpt-fake-1", "object": "model", "created": CREATED, "owned_by": "fake-upstream"}],
        }),
    }
}

/// One model, as `GET /v1/models/{id}` answers it (any id exists).
fn model_object(flavour: Flavour, id: &str) -> Value {
    match flavour {
        Flavour::Anthropic => json!({
            "type": "model",
            "id": id,
            "display_name": id,
            "created_at": "2025-01-01T00:00:00Z",
        }),
        Flavour::OpenAi => {
            json!({"id": id, "object": "model", "created": CREATED, "owned_by": "fake-upstream"})
        }
    }
}

/// Token `i` of the answer as it is streamed (words after the first carry their space).
fn token_text(i: u64) -> String {
    let word = WORDS[(i % WORDS.len() as u64) as usize];
    if i == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    }
}

fn answer_text(tokens: u64) -> String {
    (0..tokens).map(token_text).collect()
}

/// How far a stream gets before the planned failure, if any.
fn deltas_sent(plan: &Plan) -> u64 {
    match plan.directives.failure {
        Some(Failure::ErrorMidstream) | Some(Failure::Cut) => {
            plan.usage.output_tokens.min(DELTAS_BEFORE_FAILURE)
        }
        _ => plan.usage.output_tokens,
    }
}

/// What a streaming answer bills, by how it ends.
fn stream_billed(plan: &Plan) -> Billed {
    match plan.directives.failure {
        Some(Failure::ErrorMidstream) => Billed {
            output_tokens: deltas_sent(plan),
            ..plan.usage
        },
        _ => plan.usage,
    }
}

fn json_reply(plan: &Plan, seq: u64) -> Reply {
    let flavour = if plan.api == Api::Anthropic {
        Flavour::Anthropic
    } else {
        Flavour::OpenAi
    };
    let body = match plan.api {
        Api::Anthropic => anthropic_message(plan, seq, true),
        Api::OpenAiChat => chat_completion(plan, seq),
        Api::OpenAiResponses => response_object(plan, seq, true),
    };
    let mut reply = Reply::json(flavour, 200, &body, seq);
    reply.billed = plan.usage;
    if plan.directives.failure == Some(Failure::Cut) {
        let bytes = reply.body_bytes();
        reply.parts = vec![
            Part::Data(Bytes::from(bytes[..bytes.len() / 2].to_vec())),
            Part::Abort,
        ];
    }
    reply
}

fn stream_reply(plan: &Plan, seq: u64) -> Reply {
    let events = match plan.api {
        Api::Anthropic => anthropic_events(plan, seq),
        Api::OpenAiChat => chat_events(plan, seq),
        Api::OpenAiResponses => responses_events(plan, seq),
    };
    let id_header = if plan.api == Api::Anthropic {
        "request-id"
    } else {
        "x-request-id"
    };
    let mut parts: Vec<Part> = events
        .into_iter()
        .map(|e| Part::Data(Bytes::from(e)))
        .collect();
    if plan.directives.failure == Some(Failure::Cut) {
        parts.push(Part::Abort);
    }
    Reply {
        status: 200,
        headers: vec![
            (
                "content-type",
                "text/event-stream; charset=utf-8".to_owned(),
            ),
            ("cache-control", "no-cache".to_owned()),
            (id_header, format!("req_fake{seq:016}")),
        ],
        first_byte_delay: Duration::ZERO,
        hang: false,
        parts,
        billed: stream_billed(plan),
    }
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn anthropic_usage(u: &Billed, output: u64) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "output_tokens": output,
        "service_tier": "standard",
    })
}

fn anthropic_message(plan: &Plan, seq: u64, complete: bool) -> Value {
    let (content, stop, output) = if complete {
        let stop = if plan.truncated {
            "max_tokens"
        } else {
            "end_turn"
        };
        (
            json!([{"type": "text", "text": answer_text(plan.usage.output_tokens)}]),
            json!(stop),
            plan.usage.output_tokens,
        )
    } else {
        (json!([]), Value::Null, 1)
    };
    json!({
        "id": format!("msg_fake{seq:016}"),
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": anthropic_usage(&plan.usage, output),
    })
}

fn anthropic_events(plan: &Plan, seq: u64) -> Vec<String> {
    let mut out = vec![
        sse(
            "message_start",
            &json!({"type": "message_start", "message": anthropic_message(plan, seq, false)}),
        ),
        sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse("ping", &json!({"type": "ping"})),
    ];
    for i in 0..deltas_sent(plan) {
        out.push(sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token_text(i)}}),
        ));
    }
    match plan.directives.failure {
        Some(Failure::ErrorMidstream) => out.push(sse(
            "error",
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )),
        Some(Failure::Cut) => {}
        _ => {
            let stop = if plan.truncated { "max_tokens" } else { "end_turn" };
            out.push(sse("content_block_stop", &json!({"type": "content_block_stop", "index": 0})));
            out.push(sse(
                "message_delta",
                &json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": null},
                    "usage": {"output_tokens": plan.usage.output_tokens},
                }),
            ));
            out.push(sse("message_stop", &json!({"type": "message_stop"})));
        }
    }
    out
}

fn chat_usage(u: &Billed) -> Value {
    let prompt = u.input_tokens + u.cache_read_input_tokens;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_input_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

fn chat_finish(plan: &Plan) -> &'static str {
    if plan.truncated { "length" } else { "stop" }
}

fn chat_completion(plan: &Plan, seq: u64) -> Value {
    json!({
        "id": format!("chatcmpl-fake{seq:016}"),
        "object": "chat.completion",
        "created": CREATED,
        "model": plan.model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": answer_text(plan.usage.output_tokens),
                "refusal": null,
                "annotations": [],
            },
            "logprobs": null,
            "finish_reason": chat_finish(plan),
        }],
        "usage": chat_usage(&plan.usage),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    })
}

fn chat_events(plan: &Plan, seq: u64) -> Vec<String> {
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": format!("chatcmpl-fake{seq:016}"),
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": plan.model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": choices,
        });
        // With include_usage every chunk carries `usage`, null until the last.
        if plan.include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        format!("data: {c}\n\n")
    };
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut out = vec![chunk(
        choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ),
        None,
    )];
    for i in 0..deltas_sent(plan) {
        out.push(chunk(
            choice(json!({"content": token_text(i)}), Value::Null),
            None,
        ));
    }
    match plan.directives.failure {
        Some(Failure::ErrorMidstream) => out.push(format!(
            "data: {}\n\n",
            json!({"error": {
                "message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": null,
                "code": null,
            }})
        )),
        Some(Failure::Cut) => {}
        _ => {
            out.push(chunk(choice(json!({}), json!(chat_finish(plan))), None));
            if plan.include_usage {
                out.push(chunk(json!([]), Some(chat_usage(&plan.usage))));
            }
            out.push("data: [DONE]\n\n".to_owned());
        }
    }
    out
}

fn responses_usage(u: &Billed) -> Value {
    let input = u.input_tokens + u.cache_read_input_tokens;
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": u.cache_read_input_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + u.output_tokens,
    })
}

fn responses_message(plan: &Plan, seq: u64, text: Option<String>) -> Value {
    let (status, content) = match text {
        Some(t) => (
            if plan.truncated {
                "incomplete"
            } else {
                "completed"
            },
            json!([{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]),
        ),
        None => ("in_progress", json!([])),
    };
    json!({
        "id": format!("msg_fake{seq:016}"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

/// The Responses object; `done: false` is the in-progress snapshot streams open with.
fn response_object(plan: &Plan, seq: u64, done: bool) -> Value {
    let (status, incomplete, output, usage) = if done {
        let status = if plan.truncated {
            "incomplete"
        } else {
            "completed"
        };
        let incomplete = if plan.truncated {
            json!({"reason": "max_output_tokens"})
        } else {
            Value::Null
        };
        let text = answer_text(plan.usage.output_tokens);
        (
            status,
            incomplete,
            json!([responses_message(plan, seq, Some(text))]),
            responses_usage(&plan.usage),
        )
    } else {
        ("in_progress", Value::Null, json!([]), Value::Null)
    };
    json!({
        "id": response_id(plan, seq),
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": plan.instructions,
        "max_output_tokens": plan.max_output_tokens,
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": plan.previous_response_id,
        "reasoning": {"effort": null, "summary": null},
        "store": true,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": null,
        "metadata": {},
    })
}

fn responses_events(plan: &Plan, seq: u64) -> Vec<String> {
    let item_id = format!("msg_fake{seq:016}");
    let mut out = Vec::new();
    let mut push = |name: &str, mut data: Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(out.len());
        out.push(sse(name, &data));
    };
    push(
        "response.created",
        json!({"response": response_object(plan, seq, false)}),
    );
    push(
        "response.in_progress",
        json!({"response": response_object(plan, seq, false)}),
    );
    push(
        "response.output_item.added",
        json!({"output_index": 0, "item": responses_message(plan, seq, None)}),
    );
    push(
        "response.content_part.added",
        json!({
            "item_id": item_id, "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        }),
    );
    for i in 0..deltas_sent(plan) {
        push(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": token_text(i), "logprobs": []}),
        );
    }
    match plan.directives.failure {
        Some(Failure::ErrorMidstream) => push(
            "error",
            json!({"code": "server_error", "message": "The server had an error while processing your request.", "param": null}),
        ),
        Some(Failure::Cut) => {}
        _ => {
            let text = answer_text(plan.usage.output_tokens);
            let part =
                json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
            push(
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
            );
            push(
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
            );
            push(
                "response.output_item.done",
                json!({"output_index": 0, "item": responses_message(plan, seq, Some(text.clone()))}),
            );
            let last = if plan.truncated {
                "response.incomplete"
            } else {
                "response.completed"
            };
            push(last, json!({"response": response_object(plan, seq, true)}));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The server: a thin shell that records requests and plays scripted replies.

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    keys_seen: BTreeSet<String>,
    tally: Tally,
}

struct Shared {
    config: Config,
    state: Mutex<State>,
    seq: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the tally.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Counts a request in flight from arrival until its body is done or dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(Arc::clone(shared))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body fed by the task that plays the script.
struct ScriptBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, io::Error>>,
    exact_len: Option<u64>,
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.exact_len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A running fake provider on `127.0.0.1`; stops when dropped.
pub struct FakeUpstream {
    url: String,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts on an ephemeral loopback port, on its own thread and runtime, so
    /// plain `#[test]` functions can use it.
    pub fn start(config: Config) -> FakeUpstream {
        let listener = StdListener::bind("127.0.0.1:0").expect("fake upstream: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("fake upstream: set listener non-blocking");
        let addr = listener.local_addr().expect("fake upstream: local address");
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
            seq: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let (tx, rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("fake upstream: tokio runtime");
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fake-upstream".into())
            .spawn(move || runtime.block_on(serve(listener, thread_shared, rx)))
            .expect("fake upstream: spawn thread");
        FakeUpstream {
            url: format!("http://{addr}"),
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The origin, e.g. `http://127.0.0.1:43121` (no trailing slash, no `/v1`).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Every credential presented in `x-api-key` or `Authorization` (the `Bearer`
    /// value), on any path, accepted or not.
    pub fn keys_seen(&self) -> BTreeSet<String> {
        self.shared.state().keys_seen.clone()
    }

    /// The billing tally so far.
    pub fn billed(&self) -> Tally {
        self.shared.state().tally.clone()
    }

    /// Every request so far, in arrival order of their answers.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.state().requests.clone()
    }

    /// True if `needle` appeared in any header value or body sent to the fake.
    pub fn saw(&self, needle: &str) -> bool {
        self.shared
            .state()
            .requests
            .iter()
            .any(|r| r.body_text.contains(needle) || r.headers.values().any(|v| v.contains(needle)))
    }

    /// Requests being served right now (answers still streaming count).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests in flight at once so far.
    pub fn max_concurrency(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: StdListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => panic!("fake upstream: cannot register the listener with tokio: {e}"),
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                    // A client hanging up mid-answer is an ordinary outcome here.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
    // Returning drops the runtime, which cancels every connection and hung answer.
}

async fn handle(
    shared: Arc<Shared>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<ScriptBody>, Infallible> {
    let guard = InFlight::enter(&shared);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in &parts.headers {
        headers.push((
            name.as_str().to_owned(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ));
    }
    let path = parts.uri.path().to_owned();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let seq = shared.seq.fetch_add(1, Ordering::SeqCst);
    let exchange = respond(
        &shared.config,
        RequestView {
            method: parts.method.as_str(),
            path: &path,
            headers: &headers,
            body: &body,
        },
        seq,
    );
    let reply = exchange.reply;
    {
        let mut state = shared.state();
        for (name, value) in &headers {
            match name.as_str() {
                "x-api-key" => {
                    state.keys_seen.insert(value.clone());
                }
                "authorization" => {
                    state
                        .keys_seen
                        .insert(value.strip_prefix("Bearer ").unwrap_or(value).to_owned());
                }
                _ => {}
            }
        }
        if reply.billed.requests > 0 {
            let key = exchange.key.clone().unwrap_or_default();
            state.tally.total.add(&reply.billed);
            state
                .tally
                .per_key
                .entry(key)
                .or_default()
                .add(&reply.billed);
        }
        let mut header_map: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &headers {
            header_map
                .entry(name.clone())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(value);
                })
                .or_insert_with(|| value.clone());
        }
        state.requests.push(Request {
            method: parts.method.as_str().to_owned(),
            path,
            target,
            key: exchange.key,
            model: exchange.model,
            stream: exchange.stream,
            retry_count: header_map
                .get("x-stainless-retry-count")
                .and_then(|v| v.parse().ok()),
            headers: header_map,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            body_text: String::from_utf8_lossy(&body).into_owned(),
            status: reply.status,
            billed: reply.billed,
        });
    }

    if !reply.first_byte_delay.is_zero() {
        tokio::time::sleep(reply.first_byte_delay).await;
    }
    if reply.hang {
        std::future::pending::<()>().await;
    }
    let exact_len = (!reply.aborts() && !reply.parts.iter().any(|p| matches!(p, Part::Pause(_))))
        .then(|| reply.body_bytes().len() as u64);
    let (tx, rx) = mpsc::channel(8);
    let mut response = hyper::Response::new(ScriptBody { rx, exact_len });
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in &reply.headers {
        if let Ok(value) = hyper::header::HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, value);
        }
    }
    tokio::spawn(async move {
        let _guard = guard;
        for part in reply.parts {
            let sent = match part {
                Part::Data(bytes) => tx.send(Ok(Frame::data(bytes))).await,
                Part::Pause(d) => {
                    tokio::time::sleep(d).await;
                    Ok(())
                }
                Part::Abort => {
                    // hyper drops what it has buffered when a body fails, so let it
                    // take and flush every frame first: the client must receive
                    // the deltas sent before the cut. Once the channel is empty,
                    // hyper's next poll finds nothing and flushes its buffer.
                    while tx.capacity() < tx.max_capacity() {
                        tokio::task::yield_now().await;
                    }
                    for _ in 0..8 {
                        tokio::task::yield_now().await;
                    }
                    let _ = tx
                        .send(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "fake-cut",
                        )))
                        .await;
                    return;
                }
            };
            if sent.is_err() {
                // The client hung up; billing was already decided.
                return;
            }
        }
    });
    Ok(response)
}
