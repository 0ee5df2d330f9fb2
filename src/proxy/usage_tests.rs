//! Tests for `usage`, on wire samples written from the providers' API docs
//! (`tests/usage_fixtures/`).

use serde_json::json;

use super::*;
use crate::proxy::sse::SseParser;

const ANTHROPIC_TEXT: &str = include_str!("../../tests/usage_fixtures/anthropic_text.sse");
const ANTHROPIC_TOOL: &str = include_str!("../../tests/usage_fixtures/anthropic_tool_use.sse");
const ANTHROPIC_ERROR: &str =
    include_str!("../../tests/usage_fixtures/anthropic_error_midstream.sse");
const CHAT_USAGE: &str = include_str!("../../tests/usage_fixtures/openai_chat_include_usage.sse");
const CHAT_TOOLS: &str = include_str!("../../tests/usage_fixtures/openai_chat_tool_calls.sse");
const RESPONSES: &str = include_str!("../../tests/usage_fixtures/openai_responses.sse");
const RESPONSES_FAILED: &str =
    include_str!("../../tests/usage_fixtures/openai_responses_failed.sse");

fn usage(input: u64, output: u64, cache_write: u64, cache_read: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_creation_input_tokens: cache_write,
        cache_read_input_tokens: cache_read,
    }
}

/// Runs a whole stream through a tap, in the given chunks; returns the report and
/// the bytes the client would receive.
fn tap_chunks(kind: ApiKind, options: TapOptions, chunks: &[&[u8]]) -> (TapReport, Vec<u8>) {
    let mut tap = UsageTap::new(kind, options);
    let mut sent = Vec::new();
    for chunk in chunks {
        match tap.push(chunk) {
            Forward::Unchanged => sent.extend_from_slice(chunk),
            Forward::Bytes(b) => sent.extend_from_slice(b),
        }
    }
    sent.extend_from_slice(tap.end());
    (tap.report(), sent)
}

fn tap(kind: ApiKind, stream: &str) -> TapReport {
    tap_chunks(kind, TapOptions::default(), &[stream.as_bytes()]).0
}

fn weather_sf() -> u64 {
    fingerprint_value(&json!({"location": "San Francisco, CA", "unit": "fahrenheit"}))
}

fn weather_paris() -> u64 {
    fingerprint_value(&json!({"location": "Paris, France"}))
}

#[test]
fn usage_totals_count_every_kind_of_input() {
    let u = usage(10, 20, 30, 40);
    assert_eq!(u.input_total(), 80);
    assert_eq!(u.total(), 100);
    let max = usage(u64::MAX, 1, 1, 1);
    assert_eq!(max.total(), u64::MAX);
}

#[test]
fn openai_mapping_never_double_counts_cached_tokens() {
    // (prompt, completion, cached) -> Usage
    let cases = [
        ((1117, 9, 1024), usage(93, 9, 0, 1024)),
        ((500, 0, 0), usage(500, 0, 0, 0)),
        ((10, 5, 10), usage(0, 5, 0, 10)),
        // An inconsistent upstream figure must not underflow or lose tokens.
        ((10, 5, 50), usage(0, 5, 0, 10)),
    ];
    for ((prompt, completion, cached), want) in cases {
        let got = Usage::from_openai(prompt, completion, cached);
        assert_eq!(got, want);
        assert_eq!(got.input_total(), prompt);
    }
}

#[test]
fn anthropic_text_stream() {
    let r = tap(ApiKind::Anthropic, ANTHROPIC_TEXT);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.usage, Metered::Exact(usage(472, 15, 1200, 3000)));
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
    assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(r.error, None);
    assert!(r.tool_calls.is_empty());
    assert_eq!((r.oversized_events, r.unreadable_events), (0, 0));
}

#[test]
fn anthropic_tool_use_stream_fingerprints_like_the_json_answer() {
    let r = tap(ApiKind::Anthropic, ANTHROPIC_TOOL);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.usage, Metered::Exact(usage(472, 89, 0, 0)));
    assert_eq!(r.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(
        r.tool_calls,
        vec![ToolCall {
            name: "get_weather".into(),
            args_fingerprint: weather_sf()
        }]
    );
    let body = include_bytes!("../../tests/usage_fixtures/anthropic_message.json");
    let json = parse_answer(ApiKind::Anthropic, body).map_err(|e| e.to_string());
    assert_eq!(json.map(|j| j.tool_calls), Ok(r.tool_calls));
}

#[test]
fn anthropic_message_delta_overrides_only_fields_present() {
    let stream = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"model":"claude-opus-4-1","usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":7,"output_tokens":1}}}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":4}}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"input_tokens":12,"cache_read_input_tokens":null,"output_tokens":9}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );
    let r = tap(ApiKind::Anthropic, stream);
    assert_eq!(r.usage, Metered::Exact(usage(12, 9, 5, 7)));
    assert_eq!(r.stop_reason.as_deref(), Some("max_tokens"));
}

#[test]
fn anthropic_error_mid_stream() {
    let r = tap(ApiKind::Anthropic, ANTHROPIC_ERROR);
    assert_eq!(r.outcome, Outcome::Errored);
    assert_eq!(r.usage, Metered::AtLeast(usage(2048, 1, 0, 0)));
    assert_eq!(
        r.error,
        Some(UpstreamError {
            kind: "overloaded_error".into(),
            code: None,
            message: "Overloaded".into()
        })
    );
}

#[test]
fn anthropic_events_without_event_lines_are_typed_by_their_data() {
    let without_names: String = ANTHROPIC_TEXT
        .lines()
        .filter(|l| !l.starts_with("event:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        tap(ApiKind::Anthropic, &without_names),
        tap(ApiKind::Anthropic, ANTHROPIC_TEXT)
    );
}

#[test]
fn openai_chat_stream_with_usage() {
    let r = tap(ApiKind::OpenAiChat, CHAT_USAGE);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.usage, Metered::Exact(usage(93, 9, 0, 1024)));
    assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(r.stop_reason.as_deref(), Some("stop"));
    assert!(!r.dropped_usage_chunk);
}

#[test]
fn openai_chat_stream_tool_calls_without_usage() {
    let r = tap(ApiKind::OpenAiChat, CHAT_TOOLS);
    assert_eq!(r.outcome, Outcome::Completed);
    // The client did not ask for usage and we did not inject it: unknown.
    assert_eq!(r.usage, Metered::Unknown);
    assert_eq!(r.stop_reason.as_deref(), Some("tool_calls"));
    assert_eq!(
        r.tool_calls,
        vec![ToolCall {
            name: "get_weather".into(),
            args_fingerprint: weather_paris()
        }]
    );
    let body = include_bytes!("../../tests/usage_fixtures/openai_chat.json");
    let json = parse_answer(ApiKind::OpenAiChat, body).map_err(|e| e.to_string());
    assert_eq!(json.map(|j| j.tool_calls), Ok(r.tool_calls));
}

#[test]
fn openai_chat_error_chunk_mid_stream() {
    let stream = concat!(
        r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
        "\n\n",
    );
    let r = tap(ApiKind::OpenAiChat, stream);
    assert_eq!(r.outcome, Outcome::Errored);
    assert_eq!(r.usage, Metered::Unknown);
    assert_eq!(r.error.map(|e| e.kind), Some("server_error".to_owned()));
}

#[test]
fn openai_responses_stream() {
    let r = tap(ApiKind::OpenAiResponses, RESPONSES);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.usage, Metered::Exact(usage(289, 38, 0, 2048)));
    assert_eq!(r.model.as_deref(), Some("gpt-4.1-2025-04-14"));
    assert_eq!(r.stop_reason.as_deref(), Some("completed"));
    assert_eq!(
        r.response_id.as_deref(),
        Some("resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654"),
        "the answer's id, for previous_response_id chains"
    );
    assert_eq!(
        r.tool_calls,
        vec![ToolCall {
            name: "get_weather".into(),
            args_fingerprint: weather_paris()
        }]
    );
    // A stream cut after `response.created` still names its answer.
    let created = RESPONSES.split("\n\n").next().unwrap_or_default();
    let cut = tap(ApiKind::OpenAiResponses, &format!("{created}\n\n"));
    assert_eq!(cut.outcome, Outcome::Cut);
    assert_eq!(cut.response_id, r.response_id);
    let body = include_bytes!("../../tests/usage_fixtures/openai_responses.json");
    let json = parse_answer(ApiKind::OpenAiResponses, body).map_err(|e| e.to_string());
    let json = json.map(|mut j| {
        j.outcome = Outcome::Completed;
        j
    });
    assert_eq!(json, Ok(r));
}

#[test]
fn openai_responses_failed_and_error_events() {
    let r = tap(ApiKind::OpenAiResponses, RESPONSES_FAILED);
    assert_eq!(r.outcome, Outcome::Errored);
    assert_eq!(r.usage, Metered::Unknown);
    assert_eq!(r.model.as_deref(), Some("gpt-4.1-2025-04-14"));
    let err = r.error.clone().map(|e| (e.kind, e.message));
    assert_eq!(
        err,
        Some((
            "server_error".into(),
            "The model failed to generate a response.".into()
        ))
    );

    let stream = concat!(
        "event: error\n",
        r#"data: {"type":"error","code":"rate_limit_exceeded","message":"Rate limit reached","param":null,"sequence_number":2}"#,
        "\n\n"
    );
    let r = tap(ApiKind::OpenAiResponses, stream);
    assert_eq!(r.outcome, Outcome::Errored);
    assert_eq!(
        r.error,
        Some(UpstreamError {
            kind: "rate_limit_exceeded".into(),
            code: Some("rate_limit_exceeded".into()),
            message: "Rate limit reached".into()
        })
    );
}

#[test]
fn openai_responses_incomplete_is_completed_with_its_reason() {
    let stream = concat!(
        "event: response.incomplete\n",
        r#"data: {"type":"response.incomplete","response":{"model":"o4-mini","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"output":[],"usage":{"input_tokens":50,"input_tokens_details":{"cached_tokens":0},"output_tokens":1000,"output_tokens_details":{"reasoning_tokens":1000}}}}"#,
        "\n\n"
    );
    let r = tap(ApiKind::OpenAiResponses, stream);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.usage, Metered::Exact(usage(50, 1000, 0, 0)));
    assert_eq!(r.stop_reason.as_deref(), Some("max_output_tokens"));
}

fn all_streams() -> Vec<(ApiKind, &'static str)> {
    vec![
        (ApiKind::Anthropic, ANTHROPIC_TEXT),
        (ApiKind::Anthropic, ANTHROPIC_TOOL),
        (ApiKind::Anthropic, ANTHROPIC_ERROR),
        (ApiKind::OpenAiChat, CHAT_USAGE),
        (ApiKind::OpenAiChat, CHAT_TOOLS),
        (ApiKind::OpenAiResponses, RESPONSES),
        (ApiKind::OpenAiResponses, RESPONSES_FAILED),
    ]
}

#[test]
fn every_split_position_gives_the_same_report_and_bytes() {
    for (kind, stream) in all_streams() {
        let bytes = stream.as_bytes();
        let whole = tap(kind, stream);
        for at in 0..=bytes.len() {
            let (got, sent) =
                tap_chunks(kind, TapOptions::default(), &[&bytes[..at], &bytes[at..]]);
            assert_eq!(got, whole, "{kind} split at {at}");
            assert_eq!(sent, bytes, "{kind} split at {at}");
        }
        // Byte by byte too.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(tap_chunks(kind, TapOptions::default(), &singles).0, whole);
    }
}

#[test]
fn crlf_streams_read_the_same() {
    for (kind, stream) in all_streams() {
        let crlf = stream.replace('\n', "\r\n");
        assert_eq!(tap(kind, &crlf), tap(kind, stream), "{kind}");
    }
}

#[test]
fn cut_streams_are_flagged_and_never_exact_before_usage() {
    for (kind, stream) in all_streams() {
        let whole = tap(kind, stream);
        for at in 0..stream.len() {
            let r = tap_chunks(kind, TapOptions::default(), &[&stream.as_bytes()[..at]]).0;
            // Cut before the terminal event: never `Completed`.
            if r.outcome == Outcome::Completed {
                panic!("{kind} cut at {at} reported completed");
            }
            // Whatever was seen is a lower bound of the final figures.
            if let (Some(seen), Some(last)) = (r.usage.seen(), whole.usage.seen()) {
                assert!(seen.input_total() <= last.input_total(), "{kind} at {at}");
                assert!(seen.output_tokens <= last.output_tokens, "{kind} at {at}");
            }
            if kind == ApiKind::Anthropic {
                assert!(!matches!(r.usage, Metered::Exact(_)), "{kind} at {at}");
            }
        }
    }
    // Cut after message_start: input known, at least.
    let cut = &ANTHROPIC_TEXT[..ANTHROPIC_TEXT.find("event: ping").unwrap_or(0)];
    let r = tap(ApiKind::Anthropic, cut);
    assert_eq!(r.outcome, Outcome::Cut);
    assert_eq!(r.usage, Metered::AtLeast(usage(472, 2, 1200, 3000)));
}

#[test]
fn openai_chat_cut_after_usage_but_before_done_is_cut_with_exact_usage() {
    let cut = &CHAT_USAGE[..CHAT_USAGE.find("data: [DONE]").unwrap_or(0)];
    let r = tap(ApiKind::OpenAiChat, cut);
    assert_eq!(r.outcome, Outcome::Cut);
    assert_eq!(r.usage, Metered::Exact(usage(93, 9, 0, 1024)));
}

#[test]
fn ensure_openai_stream_usage_cases() {
    let cases = [
        (
            json!({"stream": true}),
            true,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            json!({"stream": true, "stream_options": null}),
            true,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            json!({"stream": true, "stream_options": {"include_usage": false}}),
            true,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            json!({"stream": true, "stream_options": {"include_obfuscation": false}}),
            true,
            json!({"stream": true, "stream_options": {"include_obfuscation": false, "include_usage": true}}),
        ),
        (
            json!({"stream": true, "stream_options": {"include_usage": true}}),
            false,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
        (json!({"stream": false}), false, json!({"stream": false})),
        (json!({}), false, json!({})),
        (json!({"stream": "yes"}), false, json!({"stream": "yes"})),
        (
            json!({"stream": true, "stream_options": 3}),
            false,
            json!({"stream": true, "stream_options": 3}),
        ),
        (json!([1]), false, json!([1])),
    ];
    for (mut body, injected, want) in cases {
        let before = body.clone();
        assert_eq!(ensure_openai_stream_usage(&mut body), injected, "{before}");
        assert_eq!(body, want, "{before}");
    }
}

#[test]
fn injected_usage_chunk_is_dropped_whatever_the_split() {
    let usage_event_start = CHAT_USAGE.find(r#"data: {"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_eb9dce56a8","choices":[],"#);
    let done_start = CHAT_USAGE.find("data: [DONE]");
    let (Some(s), Some(e)) = (usage_event_start, done_start) else {
        panic!("fixture lost its usage chunk");
    };
    let client_view = format!("{}{}", &CHAT_USAGE[..s], &CHAT_USAGE[e..]);
    let options = TapOptions {
        drop_injected_usage: true,
        ..TapOptions::default()
    };
    let bytes = CHAT_USAGE.as_bytes();
    for at in 0..=bytes.len() {
        let (r, sent) = tap_chunks(ApiKind::OpenAiChat, options, &[&bytes[..at], &bytes[at..]]);
        assert_eq!(String::from_utf8_lossy(&sent), client_view, "split at {at}");
        assert_eq!(r.usage, Metered::Exact(usage(93, 9, 0, 1024)));
        assert!(r.dropped_usage_chunk);
        assert_eq!(r.outcome, Outcome::Completed);
    }
    // What the client parses: every chunk, none with usage.
    let mut events = 0;
    SseParser::default().feed(client_view.as_bytes(), |e| {
        events += 1;
        assert!(!contains_value(e.data, "usage"), "{}", e.data);
    });
    assert_eq!(events, 5);
}

#[test]
fn usage_on_a_chunk_with_choices_is_never_dropped() {
    // Some compatible servers put usage on the last content chunk.
    let stream = concat!(
        r#"data: {"model":"m","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        "\n\ndata: [DONE]\n\n"
    );
    let options = TapOptions {
        drop_injected_usage: true,
        ..TapOptions::default()
    };
    let (r, sent) = tap_chunks(ApiKind::OpenAiChat, options, &[stream.as_bytes()]);
    assert_eq!(sent, stream.as_bytes());
    assert_eq!(r.usage, Metered::Exact(usage(3, 1, 0, 0)));
    assert!(!r.dropped_usage_chunk);
}

#[test]
fn oversized_event_is_counted_and_usage_stays_unknown() {
    let options = TapOptions {
        drop_injected_usage: false,
        max_event_bytes: 1024,
    };
    let (r, sent) = tap_chunks(ApiKind::OpenAiResponses, options, &[RESPONSES.as_bytes()]);
    assert_eq!(sent, RESPONSES.as_bytes());
    assert!(r.oversized_events >= 1);
    assert_eq!(r.outcome, Outcome::Cut);
    assert_eq!(r.usage, Metered::Unknown);
}

#[test]
fn unreadable_usage_event_is_counted_not_fatal() {
    let stream =
        "event: message_start\ndata: {\"message\": {\"usage\": {\"input_tokens\": -5}}}\n\n";
    let r = tap(ApiKind::Anthropic, stream);
    assert_eq!(r.unreadable_events, 1);
    assert_eq!(r.usage, Metered::Unknown);
}

#[test]
fn json_answers() {
    let anthropic = parse_answer(
        ApiKind::Anthropic,
        include_bytes!("../../tests/usage_fixtures/anthropic_message.json"),
    )
    .map_err(|e| e.to_string());
    let anthropic = anthropic.map(|r| (r.outcome, r.usage, r.model, r.stop_reason));
    assert_eq!(
        anthropic,
        Ok((
            Outcome::Completed,
            Metered::Exact(usage(472, 89, 0, 0)),
            Some("claude-sonnet-4-5-20250929".into()),
            Some("tool_use".into())
        ))
    );
    let chat = parse_answer(
        ApiKind::OpenAiChat,
        include_bytes!("../../tests/usage_fixtures/openai_chat.json"),
    )
    .map_err(|e| e.to_string());
    let chat = chat.map(|r| (r.outcome, r.usage, r.model, r.stop_reason));
    assert_eq!(
        chat,
        Ok((
            Outcome::Completed,
            Metered::Exact(usage(93, 46, 0, 1024)),
            Some("gpt-4.1-2025-04-14".into()),
            Some("tool_calls".into())
        ))
    );
}

#[test]
fn json_error_answers_are_errored_and_free() {
    let r = parse_answer(
        ApiKind::Anthropic,
        include_bytes!("../../tests/usage_fixtures/anthropic_error.json"),
    )
    .map_err(|e| e.to_string());
    let r = r.map(|r| (r.outcome, r.usage, r.error.map(|e| e.kind)));
    assert_eq!(
        r,
        Ok((
            Outcome::Errored,
            Metered::Exact(Usage::default()),
            Some("rate_limit_error".into())
        ))
    );
    let body = include_bytes!("../../tests/usage_fixtures/openai_error.json");
    for kind in [ApiKind::OpenAiChat, ApiKind::OpenAiResponses] {
        let r = parse_answer(kind, body).map_err(|e| e.to_string());
        let Ok(r) = r else {
            panic!("{kind}: {r:?}");
        };
        assert_eq!(r.outcome, Outcome::Errored);
        let Some(err) = r.error else {
            panic!("{kind}: no error")
        };
        assert_eq!(err.kind, "invalid_request_error");
        assert_eq!(err.code.as_deref(), Some("invalid_api_key"));
        // The key the upstream quoted back is not kept.
        assert!(!err.message.contains("sk-proj"), "{}", err.message);
        assert!(
            err.message
                .starts_with("Incorrect API key provided: [REDACTED]")
        );
    }
}

#[test]
fn json_answer_errors_say_what_failed() {
    let cases: [(&[u8], &str); 3] = [
        (
            b"not json",
            "could not read usage from the anthropic answer: the body is not JSON (line 1, column 2); it is charged at its reservation",
        ),
        (
            b"{}",
            "could not read usage from the anthropic answer: it has no `usage` and no `error`; it is charged at its reservation",
        ),
        (
            br#"{"usage": {"input_tokens": "many"}}"#,
            "could not read usage from the anthropic answer: the body is JSON but not the expected shape (line 1, column 33); it is charged at its reservation",
        ),
    ];
    for (body, want) in cases {
        let got = parse_answer(ApiKind::Anthropic, body).map(|_| ());
        assert_eq!(got.map_err(|e| e.to_string()), Err(want.to_owned()));
    }
}

#[test]
fn contains_value_cases() {
    let cases = [
        (r#"{"usage":null}"#, "usage", false),
        (r#"{"usage" : null}"#, "usage", false),
        (r#"{"usage":{"a":1}}"#, "usage", true),
        (r#"{"usage": {"a":1}}"#, "usage", true),
        (r#"{"text":"\"usage\": 1"}"#, "usage", false),
        (r#"{"name":"usage"}"#, "usage", false),
        (r#"{"my_usage":1}"#, "usage", false),
        (r#"{"finish_reason":"stop"}"#, "finish_reason", true),
        (
            r#"{"finish_reason":null,"usage":null}"#,
            "finish_reason",
            false,
        ),
        (r#"{"a":"usage","usage":2}"#, "usage", true),
        ("", "usage", false),
    ];
    for (json, key, want) in cases {
        assert_eq!(contains_value(json, key), want, "{json} / {key}");
    }
}

#[test]
fn fingerprints_ignore_formatting_but_not_content() {
    let a = fingerprint_json_text(r#"{"b": [1, 2], "a": {"x": null}}"#);
    let b = fingerprint_json_text(r#"{"a":{"x":null},"b":[1,2]}"#);
    assert_eq!(a, b);
    let distinct = [
        r#"{"a":{"x":null},"b":[2,1]}"#,
        r#"{"a":{"x":false},"b":[1,2]}"#,
        r#"{"a":"1"}"#,
        r#"{"a":1}"#,
        r#"["a",1]"#,
        r#"["a1"]"#,
        "not json",
        "",
    ];
    let mut seen = vec![a];
    for text in distinct {
        let fp = fingerprint_json_text(text);
        assert!(!seen.contains(&fp), "collision for {text}");
        seen.push(fp);
    }
}

#[test]
fn error_text_is_bounded_on_a_char_boundary() {
    let long = "é".repeat(400);
    let err = upstream_error(ErrorBody {
        kind: Some("x".repeat(100)),
        code: None,
        message: Some(long),
    });
    assert!(err.message.len() <= MAX_ERROR_MESSAGE_BYTES + "…".len());
    assert!(err.message.ends_with('…'));
    assert!(err.kind.len() <= 64 + "…".len());
    assert_eq!(
        redact_keys("key sk-ant-api03-abcdef, again"),
        "key [REDACTED] again"
    );
}
