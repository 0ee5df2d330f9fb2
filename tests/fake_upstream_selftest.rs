//! Self-test of the fake LLM upstream the proxy tests run against: its pure
//! answer logic (markers, usage, wire shapes, billing rules) as tables, the
//! server over real HTTP, and the official Python SDKs parsing what it sends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fake_upstream::{
    ANTHROPIC_KEY, Api, Billed, Config, DELTAS_BEFORE_FAILURE, Directives, Failure, FakeUpstream,
    OPENAI_KEY, Part, Request, RequestView, directives, plan, prompt_tokens, respond,
};
use common::{PATIENCE, wait_for};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Helpers

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn anthropic_headers() -> Vec<(String, String)> {
    headers(&[
        ("x-api-key", ANTHROPIC_KEY),
        ("anthropic-version", "2023-06-01"),
    ])
}

fn openai_headers() -> Vec<(String, String)> {
    headers(&[("authorization", &format!("Bearer {OPENAI_KEY}"))])
}

fn path_of(api: Api) -> &'static str {
    match api {
        Api::Anthropic => "/v1/messages",
        Api::OpenAiChat => "/v1/chat/completions",
        Api::OpenAiResponses => "/v1/responses",
    }
}

fn auth_for(api: Api) -> Vec<(String, String)> {
    if api == Api::Anthropic {
        anthropic_headers()
    } else {
        openai_headers()
    }
}

/// A minimal valid body for `api`.
fn body_for(api: Api, model: &str, stream: bool) -> Value {
    match api {
        Api::Anthropic => json!({
            "model": model, "max_tokens": 100, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }),
        Api::OpenAiChat => json!({
            "model": model, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }),
        Api::OpenAiResponses => json!({"model": model, "stream": stream, "input": "hi"}),
    }
}

/// Answers `body` on `api` with the default config, as the server would.
fn answer(api: Api, body: &Value) -> common::fake_upstream::Reply {
    answer_with(api, body, &auth_for(api))
}

fn answer_with(api: Api, body: &Value, hdrs: &[(String, String)]) -> common::fake_upstream::Reply {
    let raw = body.to_string();
    let view = RequestView {
        method: "POST",
        path: path_of(api),
        headers: hdrs,
        body: raw.as_bytes(),
    };
    respond(&Config::default(), view, 7).reply
}

/// `(event name, data)` of each SSE event in `text`; data `[DONE]` becomes a string.
fn sse_events(text: &str) -> Vec<(Option<String>, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                } else {
                    panic!("unexpected SSE line {line:?} in {block:?}");
                }
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            (name, data)
        })
        .collect()
}

fn names(events: &[(Option<String>, Value)]) -> Vec<&str> {
    events
        .iter()
        .map(|(n, _)| n.as_deref().unwrap_or("-"))
        .collect()
}

fn body_text(reply: &common::fake_upstream::Reply) -> String {
    String::from_utf8(reply.body_bytes()).expect("utf-8 body")
}

fn usage(input: u64, output: u64, cache_write: u64, cache_read: u64) -> Billed {
    Billed {
        input_tokens: input,
        output_tokens: output,
        cache_creation_input_tokens: cache_write,
        cache_read_input_tokens: cache_read,
        requests: 1,
    }
}

// ---------------------------------------------------------------------------
// Pure: directives and usage

#[test]
fn model_markers_choose_behaviour_and_numbers() {
    let none = Directives::default();
    #[rustfmt::skip]
    let cases: &[(&str, Directives)] = &[
        ("claude-sonnet-4-5", none),
        ("fake-cut", Directives { failure: Some(Failure::Cut), ..none }),
        ("claude-fake-429", Directives { failure: Some(Failure::RateLimited), ..none }),
        ("gpt-fake-400-x", Directives { failure: Some(Failure::BadRequest), ..none }),
        ("m-fake-500", Directives { failure: Some(Failure::ServerError), ..none }),
        ("m-fake-529", Directives { failure: Some(Failure::Overloaded), ..none }),
        ("m-fake-error-midstream", Directives { failure: Some(Failure::ErrorMidstream), ..none }),
        ("m-fake-hang", Directives { failure: Some(Failure::Hang), ..none }),
        ("m-fake-silent", Directives { failure: Some(Failure::Silent), ..none }),
        ("m-fake-slow", Directives { slow: true, ..none }),
        ("m-fake-slow-fake-cut", Directives { slow: true, failure: Some(Failure::Cut), ..none }),
        ("m-cache-read-100-cache-write-7", Directives { cache_read: 100, cache_write: 7, ..none }),
        ("m-out-3", Directives { answer_tokens: Some(3), ..none }),
        // Markers count only between `-` boundaries.
        ("m-fake-5000", none),
        ("m-notfake-cut", none),
        ("m-fake-cutter", none),
        ("m-about-5", none),
        ("m-cache-read-x", none),
        ("m-cache-read-", none),
    ];
    for (model, want) in cases {
        assert_eq!(directives(model, &[]), *want, "model {model:?}");
    }
}

#[test]
fn fake_headers_override_model_numbers() {
    let h = headers(&[
        ("X-Fake-Cache-Read", "5"),
        ("x-fake-cache-write", "6"),
        ("x-fake-output-tokens", "2"),
    ]);
    let d = directives("m-cache-read-100-out-9", &h);
    assert_eq!(
        (d.cache_read, d.cache_write, d.answer_tokens),
        (5, 6, Some(2))
    );
}

#[test]
fn prompt_tokens_are_a_quarter_of_the_compact_prompt_json_rounded_up() {
    // `[{"content":"hi","role":"user"}]` is 32 bytes: keys sorted, no spaces.
    let msgs = json!([{"role": "user", "content": "hi"}]);
    assert_eq!(prompt_tokens(Api::Anthropic, &json!({"messages": msgs})), 8);
    assert_eq!(
        prompt_tokens(
            Api::OpenAiChat,
            &json!({"messages": msgs, "model": "x".repeat(400)})
        ),
        8
    );
    // `"sys"` adds 5 bytes: 37 → 10.
    assert_eq!(
        prompt_tokens(Api::Anthropic, &json!({"system": "sys", "messages": msgs})),
        10
    );
    // Responses: `"hi"` is 4 bytes, `"be brief"` 10: 14 → 4.
    assert_eq!(
        prompt_tokens(
            Api::OpenAiResponses,
            &json!({"input": "hi", "instructions": "be brief"})
        ),
        4
    );
    // Whitespace in what the client sent does not matter; never zero.
    let spaced: Value =
        serde_json::from_str(r#"{ "messages" : [ { "role" : "user" , "content" : "hi" } ] }"#)
            .unwrap();
    assert_eq!(prompt_tokens(Api::Anthropic, &spaced), 8);
    assert_eq!(prompt_tokens(Api::OpenAiChat, &json!({"messages": []})), 1);
}

#[test]
fn plan_caps_output_by_the_request_limit_and_splits_cache_tokens_per_provider() {
    let cfg = Config::default();
    #[rustfmt::skip]
    let cases: &[(Api, Value, Billed, bool)] = &[
        (Api::Anthropic, json!({"model": "m", "max_tokens": 100, "messages": []}), usage(1, 12, 0, 0), false),
        (Api::Anthropic, json!({"model": "m", "max_tokens": 5, "messages": []}), usage(1, 5, 0, 0), true),
        (Api::Anthropic, json!({"model": "m-cache-read-40-cache-write-7", "max_tokens": 100, "messages": []}), usage(1, 12, 7, 40), false),
        (Api::Anthropic, json!({"model": "m-out-500", "max_tokens": 100, "messages": []}), usage(1, 100, 0, 0), true),
        (Api::OpenAiChat, json!({"model": "m", "messages": []}), usage(1, 12, 0, 0), false),
        (Api::OpenAiChat, json!({"model": "m", "messages": [], "max_tokens": 4}), usage(1, 4, 0, 0), true),
        (Api::OpenAiChat, json!({"model": "m", "messages": [], "max_tokens": 4, "max_completion_tokens": 6}), usage(1, 6, 0, 0), true),
        // OpenAI bills no cache writes.
        (Api::OpenAiChat, json!({"model": "m-cache-write-9-cache-read-3", "messages": []}), usage(1, 12, 0, 3), false),
        (Api::OpenAiResponses, json!({"model": "m", "input": "", "max_output_tokens": 3}), usage(1, 3, 0, 0), true),
        (Api::OpenAiResponses, json!({"model": "m-out-2", "input": []}), usage(1, 2, 0, 0), false),
    ];
    for (api, body, want, truncated) in cases {
        let p = plan(&cfg, *api, body, &[]).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        assert_eq!(
            (p.usage, p.truncated),
            (*want, *truncated),
            "{api:?} {body}"
        );
    }
}

#[test]
fn plan_rejects_what_the_provider_rejects() {
    let cfg = Config::default();
    #[rustfmt::skip]
    let cases: &[(Api, Value, &str)] = &[
        (Api::Anthropic, json!({"max_tokens": 1, "messages": []}), "model: Field required"),
        (Api::Anthropic, json!({"model": "m", "messages": []}), "max_tokens: Field required"),
        (Api::Anthropic, json!({"model": "m", "max_tokens": 0, "messages": []}), "max_tokens: must be greater than or equal to 1"),
        (Api::Anthropic, json!({"model": "m", "max_tokens": 1}), "messages: Field required"),
        (Api::OpenAiChat, json!({"model": "m"}), "Missing required parameter: 'messages'."),
        (Api::OpenAiChat, json!({"messages": []}), "Missing required parameter: 'model'."),
        (Api::OpenAiResponses, json!({"model": "m"}), "Missing required parameter: 'input'."),
    ];
    for (api, body, want) in cases {
        let err = plan(&cfg, *api, body, &[]).expect_err(&body.to_string());
        assert_eq!(err.0, *want, "{api:?} {body}");
    }
}

// ---------------------------------------------------------------------------
// Pure: auth, routing and error shapes

/// The body a case expects: a success, or an Anthropic / OpenAI error of a type.
enum Shape {
    Ok,
    A(&'static str),
    O(&'static str),
}

/// (method, path, headers, body, status, expected body)
type AuthCase = (
    &'static str,
    &'static str,
    Vec<(String, String)>,
    String,
    u16,
    Shape,
);

#[test]
fn auth_and_routing_answer_in_each_providers_shape_and_bill_nothing() {
    let ok = json!({"model": "m", "max_tokens": 10, "messages": []});
    let chat = json!({"model": "m", "messages": []});
    let bearer = |k: &str| ("authorization".to_owned(), format!("Bearer {k}"));
    let version = ("anthropic-version".to_owned(), "2023-06-01".to_owned());
    let api_key = |k: &str| ("x-api-key".to_owned(), k.to_owned());
    use Shape::{A, O, Ok};
    #[rustfmt::skip]
    let cases: Vec<AuthCase> = vec![
        ("POST", "/v1/messages", vec![api_key(ANTHROPIC_KEY), version.clone()], ok.to_string(), 200, Ok),
        // Current Anthropic SDKs send the API key as a Bearer token.
        ("POST", "/v1/messages", vec![bearer(ANTHROPIC_KEY), version.clone()], ok.to_string(), 200, Ok),
        ("POST", "/v1/messages?beta=true", vec![api_key(ANTHROPIC_KEY), version.clone()], ok.to_string(), 200, Ok),
        ("POST", "/v1/messages", vec![version.clone()], ok.to_string(), 401, A("authentication_error")),
        ("POST", "/v1/messages", vec![api_key("sk-scoped"), version.clone()], ok.to_string(), 401, A("authentication_error")),
        // x-api-key wins over a Bearer token: a scoped token there is refused.
        ("POST", "/v1/messages", vec![api_key("sk-scoped"), bearer(ANTHROPIC_KEY), version.clone()], ok.to_string(), 401, A("authentication_error")),
        // An OpenAI key is not an Anthropic key.
        ("POST", "/v1/messages", vec![api_key(OPENAI_KEY), version.clone()], ok.to_string(), 401, A("authentication_error")),
        ("POST", "/v1/messages", vec![api_key(ANTHROPIC_KEY)], ok.to_string(), 400, A("invalid_request_error")),
        ("POST", "/v1/messages", vec![api_key(ANTHROPIC_KEY), version.clone()], "{not json".into(), 400, A("invalid_request_error")),
        ("POST", "/v1/messages", vec![api_key(ANTHROPIC_KEY), version.clone()], "[]".into(), 400, A("invalid_request_error")),
        ("GET", "/v1/messages", vec![api_key(ANTHROPIC_KEY), version.clone()], String::new(), 404, A("not_found_error")),
        ("POST", "/v1/chat/completions", vec![bearer(OPENAI_KEY)], chat.to_string(), 200, Ok),
        ("POST", "/v1/chat/completions", vec![], chat.to_string(), 401, O("invalid_request_error")),
        ("POST", "/v1/chat/completions", vec![bearer("sk-scoped")], chat.to_string(), 401, O("invalid_request_error")),
        // OpenAI takes only Bearer.
        ("POST", "/v1/chat/completions", vec![api_key(OPENAI_KEY)], chat.to_string(), 401, O("invalid_request_error")),
        ("POST", "/v1/responses", vec![bearer(OPENAI_KEY)], "nope".into(), 400, O("invalid_request_error")),
        ("POST", "/v1/embeddings", vec![bearer(OPENAI_KEY)], "{}".into(), 404, O("invalid_request_error")),
        ("GET", "/v1/models", vec![bearer(OPENAI_KEY)], String::new(), 200, Ok),
        ("GET", "/v1/models", vec![bearer("sk-scoped")], String::new(), 401, O("invalid_request_error")),
        ("GET", "/v1/models", vec![api_key(ANTHROPIC_KEY), version.clone()], String::new(), 200, Ok),
        ("GET", "/v1/models", vec![bearer(ANTHROPIC_KEY), version.clone()], String::new(), 200, Ok),
        ("GET", "/v1/models", vec![api_key("nope")], String::new(), 401, A("authentication_error")),
    ];
    for (method, path, hdrs, body, status, shape) in &cases {
        let view = RequestView {
            method,
            path,
            headers: hdrs,
            body: body.as_bytes(),
        };
        let reply = respond(&Config::default(), view, 1).reply;
        let what = format!("{method} {path} {hdrs:?} {body}");
        assert_eq!(reply.status, *status, "{what}");
        let json: Value = serde_json::from_slice(&reply.body_bytes()).expect("JSON body");
        match shape {
            Ok => assert!(json.get("error").is_none(), "{what}: {json}"),
            A(kind) => {
                assert_eq!(json["type"], "error", "{what}: {json}");
                assert_eq!(json["error"]["type"], *kind, "{what}: {json}");
                assert!(
                    json["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "{what}"
                );
                assert!(json["request_id"].is_string(), "{what}");
            }
            O(kind) => {
                assert_eq!(json["error"]["type"], *kind, "{what}: {json}");
                let e = json["error"].as_object().expect("error object");
                for field in ["message", "type", "param", "code"] {
                    assert!(e.contains_key(field), "{what}: `{field}` missing in {json}");
                }
            }
        }
        if *status != 200 || path.contains("models") {
            assert_eq!(reply.billed, Billed::default(), "{what}");
        }
    }
}

#[test]
fn forced_errors_bill_nothing_and_match_real_statuses() {
    // (api, model marker, stream, status, error type)
    #[rustfmt::skip]
    let cases: &[(Api, &str, bool, u16, &str)] = &[
        (Api::Anthropic, "fake-400", false, 400, "invalid_request_error"),
        (Api::Anthropic, "fake-429", true, 429, "rate_limit_error"),
        (Api::Anthropic, "fake-500", true, 500, "api_error"),
        (Api::Anthropic, "fake-529", true, 529, "overloaded_error"),
        (Api::Anthropic, "fake-error-midstream", false, 500, "api_error"),
        (Api::OpenAiChat, "fake-400", false, 400, "invalid_request_error"),
        (Api::OpenAiChat, "fake-429", true, 429, "requests"),
        (Api::OpenAiChat, "fake-500", false, 500, "server_error"),
        (Api::OpenAiChat, "fake-529", false, 503, "server_error"),
        (Api::OpenAiChat, "fake-error-midstream", false, 500, "server_error"),
        (Api::OpenAiResponses, "fake-429", false, 429, "requests"),
        (Api::OpenAiResponses, "fake-529", true, 503, "server_error"),
    ];
    for (api, marker, stream, status, kind) in cases {
        let reply = answer(*api, &body_for(*api, &format!("m-{marker}"), *stream));
        let what = format!("{api:?} {marker} stream={stream}");
        assert_eq!(reply.status, *status, "{what}");
        assert_eq!(reply.billed, Billed::default(), "{what}");
        let json: Value = serde_json::from_slice(&reply.body_bytes()).expect("JSON error body");
        assert_eq!(json["error"]["type"], *kind, "{what}: {json}");
        let retry_after = reply
            .headers
            .iter()
            .find(|(k, _)| *k == "retry-after")
            .map(|(_, v)| v.as_str());
        assert_eq!(retry_after, (*status == 429).then_some("1"), "{what}");
    }
}

// ---------------------------------------------------------------------------
// Pure: wire shapes and billing rules

#[test]
fn anthropic_json_answer_has_the_real_shape() {
    let body = json!({"model": "claude-x-cache-read-4-cache-write-2", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let reply = answer(Api::Anthropic, &body);
    assert_eq!(reply.status, 200);
    let m: Value = serde_json::from_slice(&reply.body_bytes()).unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "claude-x-cache-read-4-cache-write-2");
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(
        m["content"][0]["text"],
        "The fake upstream answers every request with the same plain words again"
    );
    assert_eq!(
        m["usage"],
        json!({"input_tokens": 8, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 4, "output_tokens": 12, "service_tier": "standard"})
    );
    assert_eq!(reply.billed, usage(8, 12, 2, 4));
}

#[test]
fn anthropic_stream_has_the_real_event_sequence() {
    let body = json!({"model": "m-cache-read-3", "max_tokens": 4, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let reply = answer(Api::Anthropic, &body);
    assert!(
        reply
            .headers
            .iter()
            .any(|(k, v)| *k == "content-type" && v.starts_with("text/event-stream"))
    );
    let text = body_text(&reply);
    let events = sse_events(&text);
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_deref().unwrap(),
            "the data type repeats the event name"
        );
    }
    let start = &events[0].1["message"];
    assert_eq!(start["usage"]["input_tokens"], 8);
    assert_eq!(start["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(start["usage"]["cache_read_input_tokens"], 3);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(start["content"], json!([]));
    assert_eq!(events[8].1["usage"], json!({"output_tokens": 4}));
    assert_eq!(events[8].1["delta"]["stop_reason"], "max_tokens");
    let streamed: String = events[3..7]
        .iter()
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, "The fake upstream answers");
    assert_eq!(reply.billed, usage(8, 4, 0, 3));
    assert!(!reply.aborts());
}

#[test]
fn openai_chat_json_counts_cached_tokens_inside_the_prompt() {
    let reply = answer(
        Api::OpenAiChat,
        &body_for(Api::OpenAiChat, "gpt-cache-read-10", false),
    );
    let c: Value = serde_json::from_slice(&reply.body_bytes()).unwrap();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    assert_eq!(c["usage"]["prompt_tokens"], 18);
    assert_eq!(c["usage"]["completion_tokens"], 12);
    assert_eq!(c["usage"]["total_tokens"], 30);
    assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 10);
    assert_eq!(reply.billed, usage(8, 12, 0, 10));
}

#[test]
fn openai_chat_stream_sends_the_usage_chunk_only_when_asked() {
    let plain = body_for(Api::OpenAiChat, "gpt", true);
    let events = sse_events(&body_text(&answer(Api::OpenAiChat, &plain)));
    assert!(
        events.iter().all(|(name, _)| name.is_none()),
        "chat chunks carry no event names"
    );
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks = &events[..events.len() - 1];
    assert_eq!(
        chunks.len(),
        1 + 12 + 1,
        "role chunk, one per token, finish chunk"
    );
    for (_, c) in chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c.get("usage").is_none(),
            "no usage field without include_usage: {c}"
        );
        assert_eq!(c["choices"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(chunks[0].1["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[13].1["choices"][0]["finish_reason"], "stop");

    let mut asked = plain.clone();
    asked["stream_options"] = json!({"include_usage": true});
    asked["max_tokens"] = json!(2);
    let reply = answer(Api::OpenAiChat, &asked);
    let events = sse_events(&body_text(&reply));
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks = &events[..events.len() - 1];
    assert_eq!(chunks.len(), 1 + 2 + 1 + 1);
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last.1["choices"], json!([]));
    assert_eq!(last.1["usage"]["prompt_tokens"], 8);
    assert_eq!(last.1["usage"]["completion_tokens"], 2);
    assert_eq!(last.1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    for (_, c) in rest {
        assert_eq!(
            c["usage"],
            Value::Null,
            "earlier chunks carry `usage: null`: {c}"
        );
    }
    assert_eq!(
        rest.last().unwrap().1["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(reply.billed, usage(8, 2, 0, 0));
}

#[test]
fn openai_responses_stream_ends_with_completed_usage() {
    let body = json!({"model": "gpt-cache-read-5", "input": "hi", "instructions": "be brief", "stream": true});
    let reply = answer(Api::OpenAiResponses, &body);
    let events = sse_events(&body_text(&reply));
    let n = names(&events);
    assert_eq!(
        n[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        n.iter()
            .filter(|e| **e == "response.output_text.delta")
            .count(),
        12
    );
    assert_eq!(
        n[n.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_deref().unwrap());
        assert_eq!(data["sequence_number"], i, "sequence numbers count from 0");
    }
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["instructions"], "be brief");
    assert_eq!(done["usage"]["input_tokens"], 4 + 5);
    assert_eq!(done["usage"]["input_tokens_details"]["cached_tokens"], 5);
    assert_eq!(done["usage"]["output_tokens"], 12);
    assert_eq!(done["usage"]["total_tokens"], 21);
    assert_eq!(events[0].1["response"]["usage"], Value::Null);
    assert_eq!(reply.billed, usage(4, 12, 0, 5));

    let capped = json!({"model": "gpt", "input": "hi", "stream": true, "max_output_tokens": 2});
    let events = sse_events(&body_text(&answer(Api::OpenAiResponses, &capped)));
    let last = events.last().unwrap();
    assert_eq!(last.0.as_deref(), Some("response.incomplete"));
    assert_eq!(
        last.1["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

#[test]
fn billing_rules_by_outcome() {
    // Plain prompt: 8 input tokens (1 for Responses' `"hi"`), 12 output, 3 cache reads.
    let full = |api: Api| {
        let input = if api == Api::OpenAiResponses { 1 } else { 8 };
        usage(input, 12, 0, 3)
    };
    let so_far = |api: Api| Billed {
        output_tokens: DELTAS_BEFORE_FAILURE,
        ..full(api)
    };
    for api in [Api::Anthropic, Api::OpenAiChat, Api::OpenAiResponses] {
        #[rustfmt::skip]
        let cases: &[(&str, bool, Billed, bool)] = &[
            ("m-cache-read-3", false, full(api), false),
            ("m-cache-read-3", true, full(api), false),
            ("m-cache-read-3-fake-slow", true, full(api), false),
            // A cut answer bills all the planned work, whatever reached the client.
            ("m-cache-read-3-fake-cut", true, full(api), true),
            ("m-cache-read-3-fake-cut", false, full(api), true),
            // An error mid-stream bills input and the output sent before it.
            ("m-cache-read-3-fake-error-midstream", true, so_far(api), false),
            ("m-cache-read-3-fake-error-midstream", false, Billed::default(), false),
            ("m-cache-read-3-fake-hang", true, Billed::default(), false),
            // Silent: the work was done and billed, the answer never sent.
            ("m-cache-read-3-fake-silent", true, full(api), false),
            ("m-cache-read-3-fake-silent", false, full(api), false),
            ("m-cache-read-3-fake-429", true, Billed::default(), false),
        ];
        for (model, stream, want, aborts) in cases {
            let reply = answer(api, &body_for(api, model, *stream));
            let what = format!("{api:?} {model} stream={stream}");
            assert_eq!(reply.billed, *want, "{what}");
            assert_eq!(reply.aborts(), *aborts, "{what}");
        }
    }
}

#[test]
fn failures_mid_stream_come_after_some_deltas() {
    let midstream = |api| {
        sse_events(&body_text(&answer(
            api,
            &body_for(api, "m-fake-error-midstream", true),
        )))
    };
    let a = midstream(Api::Anthropic);
    assert_eq!(
        names(&a),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        a[6].1,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    let c = midstream(Api::OpenAiChat);
    assert_eq!(c.len(), 1 + 3 + 1);
    assert_eq!(c[4].1["error"]["type"], "server_error", "{:?}", c[4]);
    assert!(c.iter().all(|(_, d)| *d != "[DONE]"));
    let r = midstream(Api::OpenAiResponses);
    assert_eq!(names(&r).last(), Some(&"error"));
    assert_eq!(r.last().unwrap().1["code"], "server_error");

    let cut = answer(
        Api::Anthropic,
        &body_for(Api::Anthropic, "m-fake-cut", true),
    );
    assert_eq!(cut.parts.last(), Some(&Part::Abort));
    let events = sse_events(&body_text(&cut));
    assert_eq!(
        names(&events)
            .iter()
            .filter(|n| **n == "content_block_delta")
            .count(),
        3
    );
    assert!(!names(&events).contains(&"message_stop"));

    let slow = answer(
        Api::OpenAiChat,
        &body_for(Api::OpenAiChat, "m-fake-slow", true),
    );
    assert_eq!(slow.first_byte_delay, Config::default().slow_first_byte);
    assert!(slow.parts.iter().any(|p| matches!(p, Part::Pause(_))));
}

// ---------------------------------------------------------------------------
// Over HTTP

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("reqwest client")
}

async fn post(
    fake: &FakeUpstream,
    api: Api,
    body: &Value,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}{}", fake.url(), path_of(api)))
        .body(body.to_string());
    for (k, v) in auth_for(api).iter() {
        req = req.header(k, v);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.expect("send to the fake")
}

/// Reads a body to its end, or to the error that cut it.
async fn read_all(mut resp: reqwest::Response) -> (String, Option<reqwest::Error>) {
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk),
            Ok(None) => return (String::from_utf8_lossy(&out).into_owned(), None),
            Err(e) => return (String::from_utf8_lossy(&out).into_owned(), Some(e)),
        }
    }
}

#[tokio::test]
async fn serves_json_and_streams_and_keeps_a_tally_per_key() {
    let fake = FakeUpstream::start(Config {
        anthropic_keys: vec![ANTHROPIC_KEY.into(), "sk-ant-second".into()],
        ..Config::default()
    });
    let a = body_for(Api::Anthropic, "claude-cache-write-2", false);
    let resp = post(
        &fake,
        Api::Anthropic,
        &a,
        &[("x-stainless-retry-count", "0")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("request-id").is_some());
    let m = json_of(resp).await;
    assert_eq!(m["usage"]["output_tokens"], 12);

    let s = body_for(Api::Anthropic, "claude", true);
    let resp = client()
        .post(format!("{}/v1/messages", fake.url()))
        .header("x-api-key", "sk-ant-second")
        .header("anthropic-version", "2023-06-01")
        .header("x-stainless-retry-count", "2")
        .body(s.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let (text, err) = read_all(resp).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(names(&sse_events(&text)).last(), Some(&"message_stop"));

    let c = body_for(Api::OpenAiChat, "gpt-cache-read-4", true);
    let (text, err) = read_all(post(&fake, Api::OpenAiChat, &c, &[]).await).await;
    assert!(err.is_none());
    assert!(text.ends_with("data: [DONE]\n\n"));

    let r = body_for(Api::OpenAiResponses, "gpt", false);
    let resp = json_of(post(&fake, Api::OpenAiResponses, &r, &[]).await).await;
    assert_eq!(resp["status"], "completed");

    let refused = client()
        .post(format!("{}/v1/chat/completions", fake.url()))
        .bearer_auth("sk-scoped-token")
        .body(c.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let models = client()
        .get(format!("{}/v1/models", fake.url()))
        .bearer_auth(OPENAI_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);

    let tally = fake.billed();
    assert_eq!(tally.per_key[ANTHROPIC_KEY], usage(8, 12, 2, 0));
    assert_eq!(tally.per_key["sk-ant-second"], usage(8, 12, 0, 0));
    assert_eq!(
        tally.per_key[OPENAI_KEY],
        Billed {
            input_tokens: 8 + 1,
            output_tokens: 24,
            cache_read_input_tokens: 4,
            requests: 2,
            ..Billed::default()
        }
    );
    assert!(
        !tally.per_key.contains_key("sk-scoped-token"),
        "a refused key bills nothing"
    );
    assert_eq!(tally.total.requests, 4);
    assert_eq!(tally.total.tokens(), 22 + 20 + 37);

    let want: BTreeSet<String> = [
        OPENAI_KEY,
        ANTHROPIC_KEY,
        "sk-ant-second",
        "sk-scoped-token",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(fake.keys_seen(), want);
    assert!(fake.saw("sk-scoped-token"));
    assert!(!fake.saw("never-sent"));

    let log = fake.requests();
    let summary: Vec<(&str, u16, bool, Option<u32>)> = log
        .iter()
        .map(|r| (r.path.as_str(), r.status, r.stream, r.retry_count))
        .collect();
    assert_eq!(
        summary,
        [
            ("/v1/messages", 200, false, Some(0)),
            ("/v1/messages", 200, true, Some(2)),
            ("/v1/chat/completions", 200, true, None),
            ("/v1/responses", 200, false, None),
            ("/v1/chat/completions", 401, true, None),
            ("/v1/models", 200, false, None),
        ]
    );
    assert_eq!(log[1].key.as_deref(), Some("sk-ant-second"));
    assert_eq!(log[1].model.as_deref(), Some("claude"));
    assert_eq!(log[1].body, s);
    assert_eq!(log[1].headers["anthropic-version"], "2023-06-01");
    assert_eq!(log[4].key.as_deref(), Some("sk-scoped-token"));
    assert_eq!(log[4].billed, Billed::default());
    // An answer leaves the in-flight count once its body is handed over.
    wait_for("no request in flight", || {
        (fake.in_flight() == 0).then_some(())
    });
}

async fn json_of(resp: reqwest::Response) -> Value {
    let text = resp.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn a_cut_stream_drops_the_connection_after_some_deltas() {
    let fake = FakeUpstream::start(Config::default());
    for api in [Api::Anthropic, Api::OpenAiChat, Api::OpenAiResponses] {
        let resp = post(&fake, api, &body_for(api, "m-fake-cut", true), &[]).await;
        assert_eq!(resp.status(), 200);
        let (text, err) = read_all(resp).await;
        assert!(
            err.is_some(),
            "{api:?}: the body must end in an error, got {text:?}"
        );
        // What was sent before the cut reaches the client.
        let deltas = text.matches("\"delta\"").count();
        assert!(
            deltas >= 3,
            "{api:?}: {deltas} deltas before the cut in {text:?}"
        );
        assert!(
            !text.contains("message_stop")
                && !text.contains("[DONE]")
                && !text.contains("response.completed")
        );
        // A cut JSON answer is half a body, then the same drop.
        let resp = post(&fake, api, &body_for(api, "m-fake-cut", false), &[]).await;
        let (text, err) = read_all(resp).await;
        assert!(err.is_some(), "{api:?}: JSON cut must error, got {text:?}");
        assert!(serde_json::from_str::<Value>(&text).is_err());
    }
    assert_eq!(fake.billed().total.requests, 6);
    assert_eq!(fake.billed().total.output_tokens, 6 * 12);
}

#[tokio::test]
async fn a_midstream_error_ends_the_body_cleanly_and_bills_what_was_sent() {
    let fake = FakeUpstream::start(Config::default());
    let body = body_for(Api::Anthropic, "m-fake-error-midstream", true);
    let (text, err) = read_all(post(&fake, Api::Anthropic, &body, &[]).await).await;
    assert!(err.is_none());
    assert!(text.ends_with("event: error\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\"},\"type\":\"error\"}\n\n"), "{text}");
    assert_eq!(fake.billed().total, usage(8, 3, 0, 0));
}

#[tokio::test]
async fn slow_answers_pause_before_headers_and_between_events() {
    let cfg = Config {
        slow_first_byte: Duration::from_millis(150),
        slow_between: Duration::from_millis(10),
        ..Config::default()
    };
    let fake = FakeUpstream::start(cfg);
    let start = Instant::now();
    let resp = post(
        &fake,
        Api::OpenAiChat,
        &body_for(Api::OpenAiChat, "m-fake-slow", true),
        &[],
    )
    .await;
    // Lower bounds only: a sleep is never shorter than asked.
    assert!(start.elapsed() >= Duration::from_millis(150));
    let (text, err) = read_all(resp).await;
    assert!(err.is_none());
    assert!(start.elapsed() >= Duration::from_millis(150 + 13 * 10));
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn counts_requests_in_flight_and_the_peak() {
    let fake = FakeUpstream::start(Config::default());
    let url = fake.url();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // Hangs until the fake is dropped; the error is expected.
            let _ = reqwest::Client::new()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(OPENAI_KEY)
                .body(json!({"model": "m-fake-hang", "messages": []}).to_string())
                .send()
                .await;
        }));
    }
    let deadline = Instant::now() + PATIENCE;
    while fake.in_flight() < 8 {
        assert!(
            Instant::now() < deadline,
            "only {} of 8 requests in flight",
            fake.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.max_concurrency(), 8);
    assert_eq!(
        fake.billed().total,
        Billed::default(),
        "a hung request bills nothing"
    );
    // Dropping the fake ends hung answers: their clients see the connection close.
    drop(fake);
    for t in tasks {
        tokio::time::timeout(PATIENCE, t)
            .await
            .expect("hung client released")
            .unwrap();
    }
}

#[test]
fn stops_listening_when_dropped() {
    let fake = FakeUpstream::start(Config::default());
    let addr = fake.url().trim_start_matches("http://").to_owned();
    assert!(std::net::TcpStream::connect(&addr).is_ok());
    drop(fake);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still listening on {addr}"
    );
}

// ---------------------------------------------------------------------------
// The official Python SDKs against the fake

#[test]
fn official_sdks_parse_every_answer() {
    let py = common::python_with_sdks();
    let fake = FakeUpstream::start(Config::default());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/fake_selfcheck.py");
    let out = Command::new(&py)
        .arg(&script)
        .env("FAKE_URL", fake.url())
        .env("ANTHROPIC_KEY", ANTHROPIC_KEY)
        .env("OPENAI_KEY", OPENAI_KEY)
        .output()
        .expect("run the SDK check script");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK check failed ({}):\n{stderr}",
        out.status
    );
    let results: Value = serde_json::from_slice(&out.stdout).expect("SDK check prints JSON");

    // Requests by check name, in order (a retried check has several).
    let mut by_check: BTreeMap<String, Vec<Request>> = BTreeMap::new();
    for r in fake.requests() {
        let name = r.headers.get("x-check").cloned().unwrap_or_default();
        by_check.entry(name).or_default().push(r);
    }
    let one = |name: &str| {
        let rs = by_check
            .get(name)
            .unwrap_or_else(|| panic!("no request tagged {name}"));
        assert_eq!(rs.len(), 1, "{name}: {} requests", rs.len());
        rs[0].clone()
    };

    // What the SDK parsed is exactly what the fake billed.
    for name in [
        "anthropic_create",
        "anthropic_stream_helper",
        "anthropic_stream_raw",
        "chat_create",
        "chat_stream_include_usage",
        "chat_stream_helper",
        "responses_create",
        "responses_truncated",
        "responses_stream_raw",
        "responses_stream_helper",
    ] {
        let r = one(name);
        let u = &results[name]["usage"];
        let parsed = Billed {
            input_tokens: u["input_tokens"].as_u64().unwrap(),
            output_tokens: u["output_tokens"].as_u64().unwrap(),
            cache_creation_input_tokens: u["cache_creation_input_tokens"].as_u64().unwrap(),
            cache_read_input_tokens: u["cache_read_input_tokens"].as_u64().unwrap(),
            requests: 1,
        };
        assert_eq!(parsed, r.billed, "{name}: SDK usage vs billed");
        let words = results[name]["text"]
            .as_str()
            .map(|t| t.split_whitespace().count() as u64);
        if let Some(words) = words {
            assert_eq!(
                words, parsed.output_tokens,
                "{name}: one word per output token"
            );
        }
    }
    assert_eq!(
        results["anthropic_create"]["usage"]["cache_creation_input_tokens"],
        7
    );
    assert_eq!(
        results["chat_create"]["usage"]["cache_read_input_tokens"],
        64
    );
    assert_eq!(one("chat_stream_no_usage").billed.output_tokens, 12);

    // Failures as the SDKs see them, and what they billed.
    assert_eq!(results["anthropic_error_midstream"]["deltas"], 3);
    assert_eq!(one("anthropic_error_midstream").billed.output_tokens, 3);
    assert_eq!(one("anthropic_cut").billed.output_tokens, 12);
    assert_eq!(results["anthropic_529"]["error"], "OverloadedError");
    for name in [
        "anthropic_529",
        "anthropic_500",
        "anthropic_400",
        "anthropic_401",
        "chat_429",
        "chat_529",
        "openai_401",
    ] {
        assert_eq!(one(name).billed, Billed::default(), "{name}");
    }
    let retried = &by_check["anthropic_429_retried"];
    let attempts: Vec<Option<u32>> = retried.iter().map(|r| r.retry_count).collect();
    assert_eq!(
        attempts,
        [Some(0), Some(1)],
        "the SDK honours retry-after and retries once"
    );
    assert_eq!(results["openai_401"]["code"], "invalid_api_key");
    assert_eq!(results["anthropic_models"]["ids"], json!(["claude-fake-1"]));
    assert_eq!(results["openai_models"]["ids"], json!(["gpt-fake-1"]));
    // The Anthropic SDK sends its key as a Bearer token; the proxy sends `x-api-key`.
    assert_eq!(one("anthropic_create").key.as_deref(), Some(ANTHROPIC_KEY));
    wait_for("all answers finished", || {
        (fake.in_flight() == 0).then_some(())
    });
}

#[test]
fn responses_previous_response_id_bills_the_chain_and_unknown_ids_are_refused() {
    let first = json!({"model": "gpt-4.1", "input": "Sync the calendars."});
    let reply = answer(Api::OpenAiResponses, &first);
    let answer1: Value = serde_json::from_str(&body_text(&reply)).unwrap();
    let id = answer1["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_fake"), "{id}");
    assert_eq!(answer1["previous_response_id"], Value::Null);
    let items = (json!("Sync the calendars.").to_string().len() as u64).div_ceil(4);
    assert_eq!(
        id,
        format!("resp_fake{:016}c{}", 7, items + reply.billed.output_tokens)
    );

    // Continuing it bills the carried context plus the new prompt.
    let next = json!({"model": "gpt-4.1", "previous_response_id": id, "input": [
        {"role": "user", "content": "Again."}]});
    let reply2 = answer(Api::OpenAiResponses, &next);
    assert_eq!(reply2.status, 200);
    let own = prompt_tokens(Api::OpenAiResponses, &next);
    assert_eq!(
        reply2.billed.input_tokens,
        items + reply.billed.output_tokens + own
    );
    let answer2: Value = serde_json::from_str(&body_text(&reply2)).unwrap();
    assert_eq!(answer2["previous_response_id"], json!(id));
    assert_eq!(
        answer2["usage"]["input_tokens"],
        json!(reply2.billed.input_tokens)
    );

    let unknown = json!({"model": "gpt-4.1", "previous_response_id": "resp_abc", "input": "x"});
    let refused = answer(Api::OpenAiResponses, &unknown);
    assert_eq!(refused.status, 400);
    assert_eq!(refused.billed.requests, 0);
    assert!(body_text(&refused).contains("Previous response with id 'resp_abc' not found."));
}
