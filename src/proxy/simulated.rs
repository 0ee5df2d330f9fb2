//! The `simulated` provider: a deterministic stand-in model that answers
//! Anthropic Messages and OpenAI Chat Completions requests inside the
//! supervisor, with realistic usage and SSE, for offline development, dry runs
//! of a fleet, and the demo. Pure: request JSON in, wire bytes out.
//!
//! Behaviour, chosen so tool-using agents do believable work:
//! - tools offered and the conversation's last turn is not a tool result →
//!   call a tool (picked by the turn count), with arguments built from its schema;
//! - the last tool result reports an error → call the same tool again (as a
//!   real model retrying would — the shape runaway containment exists for);
//! - otherwise → a short text answer that quotes what it was given.
//!
//! Usage: input tokens = ceil(bytes of the conversation / 4), output tokens =
//! ceil(bytes of the answer / 4), at least 1; never more than `max_tokens`.

use serde_json::{Value, json};

use super::refusal::Api;

/// A complete simulated answer, split into the chunks it is sent as.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub chunks: Vec<String>,
}

/// What the model decided to say, independent of the wire format.
#[derive(Debug, Clone, PartialEq)]
enum Turn {
    Text(String),
    ToolCall {
        id: String,
        name: String,
        arguments: Value,
    },
}

struct Decision {
    turn: Turn,
    model: String,
    input_tokens: u64,
    output_tokens: u64,
    stream: bool,
    include_usage: bool,
    id: String,
}

/// Answers one request. `path` selects the dialect's endpoint.
pub fn answer(api: Api, body: &Value) -> SimulatedAnswer {
    let decision = decide(api, body);
    match (api, decision.stream) {
        (Api::Anthropic, false) => SimulatedAnswer {
            status: 200,
            content_type: "application/json",
            chunks: vec![anthropic_json(&decision).to_string()],
        },
        (Api::Anthropic, true) => SimulatedAnswer {
            status: 200,
            content_type: "text/event-stream",
            chunks: anthropic_sse(&decision),
        },
        (Api::OpenAi, false) => SimulatedAnswer {
            status: 200,
            content_type: "application/json",
            chunks: vec![openai_json(&decision).to_string()],
        },
        (Api::OpenAi, true) => SimulatedAnswer {
            status: 200,
            content_type: "text/event-stream",
            chunks: openai_sse(&decision),
        },
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn ceil_div4(n: usize) -> u64 {
    (n as u64).div_ceil(4).max(1)
}

/// The text of a tool result or message content, whatever its shape.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| {
                b.get("text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| b.get("content").map(content_text))
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn looks_like_error(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    [
        "error",
        "exception",
        "traceback",
        "malformed",
        "failed",
        "invalid",
    ]
    .iter()
    .any(|w| lower.contains(w))
}

/// The last turn as (is a tool result, reports an error, text, tool name it answers).
fn last_turn(api: Api, body: &Value) -> (bool, bool, String, Option<String>) {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let Some(last) = messages.last() else {
        return (false, false, String::new(), None);
    };
    match api {
        Api::Anthropic => {
            let blocks = last.get("content").and_then(Value::as_array);
            let result = blocks.and_then(|bs| {
                bs.iter()
                    .rev()
                    .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            });
            match result {
                Some(block) => {
                    let text = block.get("content").map(content_text).unwrap_or_default();
                    let is_error = block.get("is_error").and_then(Value::as_bool) == Some(true)
                        || looks_like_error(&text);
                    let tool_use_id = block.get("tool_use_id").and_then(Value::as_str);
                    let name = tool_use_id.and_then(|id| anthropic_tool_name(messages, id));
                    (true, is_error, text, name)
                }
                None => (
                    false,
                    false,
                    last.get("content").map(content_text).unwrap_or_default(),
                    None,
                ),
            }
        }
        Api::OpenAi => {
            if last.get("role").and_then(Value::as_str) == Some("tool") {
                let text = last.get("content").map(content_text).unwrap_or_default();
                let id = last.get("tool_call_id").and_then(Value::as_str);
                let name = id.and_then(|id| openai_tool_name(messages, id));
                (true, looks_like_error(&text), text, name)
            } else {
                (
                    false,
                    false,
                    last.get("content").map(content_text).unwrap_or_default(),
                    None,
                )
            }
        }
    }
}

fn anthropic_tool_name(messages: &[Value], tool_use_id: &str) -> Option<String> {
    messages.iter().rev().find_map(|m| {
        m.get("content")?.as_array()?.iter().find_map(|b| {
            (b.get("id").and_then(Value::as_str) == Some(tool_use_id))
                .then(|| b.get("name").and_then(Value::as_str).map(str::to_owned))
                .flatten()
        })
    })
}

fn openai_tool_name(messages: &[Value], call_id: &str) -> Option<String> {
    messages.iter().rev().find_map(|m| {
        m.get("tool_calls")?.as_array()?.iter().find_map(|c| {
            (c.get("id").and_then(Value::as_str) == Some(call_id))
                .then(|| {
                    c.pointer("/function/name")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .flatten()
        })
    })
}

/// Tool names and input schemas offered by the request.
fn tools(api: Api, body: &Value) -> Vec<(String, Value)> {
    let list = body
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    list.iter()
        .filter_map(|t| match api {
            Api::Anthropic => Some((
                t.get("name")?.as_str()?.to_owned(),
                t.get("input_schema").cloned().unwrap_or(Value::Null),
            )),
            Api::OpenAi => Some((
                t.pointer("/function/name")?.as_str()?.to_owned(),
                t.pointer("/function/parameters")
                    .cloned()
                    .unwrap_or(Value::Null),
            )),
        })
        .collect()
}

/// Arguments satisfying a JSON schema's properties with plausible values.
fn arguments_for(schema: &Value, salt: u64) -> Value {
    let mut args = serde_json::Map::new();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let value = match prop.get("type").and_then(Value::as_str) {
                Some("integer") | Some("number") => json!(salt % 97 + 1),
                Some("boolean") => json!(salt.is_multiple_of(2)),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!(format!("{name}-{}", salt % 1000)),
            };
            args.insert(name.clone(), value);
        }
    }
    Value::Object(args)
}

fn decide(api: Api, body: &Value) -> Decision {
    let conversation =
        serde_json::to_string(&(body.get("system"), body.get("messages"))).unwrap_or_default();
    let hash = fnv1a(conversation.as_bytes());
    let turns = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let offered = tools(api, body);
    let (is_tool_result, is_error, text, answered_tool) = last_turn(api, body);

    let turn = if !offered.is_empty() && (!is_tool_result || is_error) {
        // Retry the failing tool as a real model would; otherwise pick one.
        let (name, schema) = answered_tool
            .filter(|_| is_error)
            .and_then(|n| offered.iter().find(|(o, _)| *o == n).cloned())
            .unwrap_or_else(|| offered[turns / 2 % offered.len()].clone());
        Turn::ToolCall {
            id: format!("{:016x}", hash),
            arguments: arguments_for(&schema, hash),
            name,
        }
    } else {
        let quoted: String = text
            .split_whitespace()
            .take(12)
            .collect::<Vec<_>>()
            .join(" ");
        Turn::Text(if is_tool_result {
            format!("Done. The tool reported: {quoted}")
        } else {
            format!("Simulated answer to: {quoted}")
        })
    };
    let answer_bytes = match &turn {
        Turn::Text(t) => t.len(),
        Turn::ToolCall {
            name, arguments, ..
        } => name.len() + arguments.to_string().len() + 16,
    };
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(4096)
        .max(1);
    Decision {
        turn,
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("simulated")
            .to_owned(),
        input_tokens: ceil_div4(
            conversation.len() + body.get("tools").map_or(0, |t| t.to_string().len()),
        ),
        output_tokens: ceil_div4(answer_bytes).min(max_tokens),
        stream: body.get("stream").and_then(Value::as_bool) == Some(true),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true),
        id: format!("{hash:016x}"),
    }
}

fn anthropic_usage(d: &Decision) -> Value {
    json!({
        "input_tokens": d.input_tokens,
        "output_tokens": d.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

fn anthropic_content(d: &Decision) -> (Value, &'static str) {
    match &d.turn {
        Turn::Text(text) => (json!({"type": "text", "text": text}), "end_turn"),
        Turn::ToolCall {
            id,
            name,
            arguments,
        } => (
            json!({"type": "tool_use", "id": format!("toolu_sim_{id}"), "name": name, "input": arguments}),
            "tool_use",
        ),
    }
}

fn anthropic_json(d: &Decision) -> Value {
    let (block, stop_reason) = anthropic_content(d);
    json!({
        "id": format!("msg_sim_{}", d.id),
        "type": "message",
        "role": "assistant",
        "model": d.model,
        "content": [block],
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": anthropic_usage(d),
    })
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn anthropic_sse(d: &Decision) -> Vec<String> {
    let (block, stop_reason) = anthropic_content(d);
    let mut start_usage = anthropic_usage(d);
    start_usage["output_tokens"] = json!(1);
    let mut chunks = vec![sse(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": format!("msg_sim_{}", d.id), "type": "message", "role": "assistant",
            "model": d.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": start_usage,
        }}),
    )];
    match &d.turn {
        Turn::Text(text) => {
            chunks.push(sse(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            chunks.push(sse("ping", &json!({"type": "ping"})));
            for piece in split_words(text, 4) {
                chunks.push(sse(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
        }
        Turn::ToolCall { arguments, .. } => {
            let mut start = block.clone();
            start["input"] = json!({});
            chunks.push(sse(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": start}),
            ));
            let args = arguments.to_string();
            let mid = args.len() / 2;
            let split = (0..=mid)
                .rev()
                .find(|i| args.is_char_boundary(*i))
                .unwrap_or(0);
            for piece in [&args[..split], &args[split..]] {
                chunks.push(sse(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
        }
    }
    chunks.push(sse(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    chunks.push(sse(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": d.output_tokens}}),
    ));
    chunks.push(sse("message_stop", &json!({"type": "message_stop"})));
    chunks
}

fn split_words(text: &str, per_chunk: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    words.chunks(per_chunk.max(1)).map(|c| c.concat()).collect()
}

fn openai_usage(d: &Decision) -> Value {
    json!({
        "prompt_tokens": d.input_tokens,
        "completion_tokens": d.output_tokens,
        "total_tokens": d.input_tokens + d.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

fn openai_message(d: &Decision) -> (Value, &'static str) {
    match &d.turn {
        Turn::Text(text) => (json!({"role": "assistant", "content": text}), "stop"),
        Turn::ToolCall {
            id,
            name,
            arguments,
        } => (
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": format!("call_sim_{id}"), "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()},
            }]}),
            "tool_calls",
        ),
    }
}

fn openai_json(d: &Decision) -> Value {
    let (message, finish_reason) = openai_message(d);
    json!({
        "id": format!("chatcmpl-sim-{}", d.id),
        "object": "chat.completion",
        "created": 1_764_000_000u64,
        "model": d.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": null}],
        "usage": openai_usage(d),
    })
}

fn openai_sse(d: &Decision) -> Vec<String> {
    let chunk = |choices: Value, usage: Value| {
        let mut c = json!({
            "id": format!("chatcmpl-sim-{}", d.id),
            "object": "chat.completion.chunk",
            "created": 1_764_000_000u64,
            "model": d.model,
            "choices": choices,
        });
        if d.include_usage {
            c["usage"] = usage;
        }
        format!("data: {c}\n\n")
    };
    let (message, finish_reason) = openai_message(d);
    let mut chunks = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        Value::Null,
    )];
    match &d.turn {
        Turn::Text(text) => {
            for piece in split_words(text, 4) {
                chunks.push(chunk(
                    json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]),
                    Value::Null,
                ));
            }
        }
        Turn::ToolCall { .. } => {
            let call = &message["tool_calls"][0];
            chunks.push(chunk(
                json!([{"index": 0, "delta": {"tool_calls": [{
                    "index": 0, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                }]}, "finish_reason": null}]),
                Value::Null,
            ));
        }
    }
    chunks.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": finish_reason}]),
        Value::Null,
    ));
    if d.include_usage {
        chunks.push(chunk(json!([]), openai_usage(d)));
    }
    chunks.push("data: [DONE]\n\n".to_owned());
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anthropic_request(messages: Value, stream: bool) -> Value {
        json!({
            "model": "claude-sonnet-4-5", "max_tokens": 512, "stream": stream,
            "system": "You summarize notes.",
            "tools": [{"name": "fetch_notes", "description": "fetch", "input_schema": {
                "type": "object", "properties": {"folder": {"type": "string"}, "limit": {"type": "integer"}}}}],
            "messages": messages,
        })
    }

    #[test]
    fn anthropic_calls_a_tool_then_answers() {
        let first = anthropic_request(
            json!([{"role": "user", "content": "summarize today's notes"}]),
            false,
        );
        let a = answer(Api::Anthropic, &first);
        let body: Value = serde_json::from_str(&a.chunks[0]).unwrap();
        assert_eq!(body["stop_reason"], "tool_use");
        assert_eq!(body["content"][0]["name"], "fetch_notes");
        assert!(body["content"][0]["input"]["folder"].is_string());
        assert!(body["usage"]["input_tokens"].as_u64().unwrap() > 10);
        let call = body["content"][0].clone();

        let second = anthropic_request(
            json!([
                {"role": "user", "content": "summarize today's notes"},
                {"role": "assistant", "content": [call.clone()]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "3 notes: budget, hiring, launch"}]},
            ]),
            false,
        );
        let body: Value = serde_json::from_str(&answer(Api::Anthropic, &second).chunks[0]).unwrap();
        assert_eq!(body["stop_reason"], "end_turn");
        assert!(
            body["content"][0]["text"]
                .as_str()
                .unwrap()
                .contains("budget")
        );

        let failing = anthropic_request(
            json!([
                {"role": "user", "content": "summarize today's notes"},
                {"role": "assistant", "content": [call.clone()]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "is_error": true, "content": "malformed response"}]},
            ]),
            false,
        );
        let body: Value =
            serde_json::from_str(&answer(Api::Anthropic, &failing).chunks[0]).unwrap();
        assert_eq!(body["stop_reason"], "tool_use", "retries the failing tool");
        assert_eq!(body["content"][0]["name"], "fetch_notes");
    }

    #[test]
    fn answers_are_deterministic() {
        let req = anthropic_request(json!([{"role": "user", "content": "hi"}]), true);
        assert_eq!(answer(Api::Anthropic, &req), answer(Api::Anthropic, &req));
    }

    #[test]
    fn anthropic_stream_has_the_real_event_sequence() {
        let req = anthropic_request(json!([{"role": "user", "content": "hi"}]), true);
        let a = answer(Api::Anthropic, &req);
        assert_eq!(a.content_type, "text/event-stream");
        let events: Vec<&str> = a
            .chunks
            .iter()
            .map(|c| c.lines().next().unwrap().trim_start_matches("event: "))
            .collect();
        assert_eq!(events.first(), Some(&"message_start"));
        assert_eq!(events.last(), Some(&"message_stop"));
        assert!(events.contains(&"message_delta"));
        let delta = a
            .chunks
            .iter()
            .find(|c| c.starts_with("event: message_delta"))
            .unwrap();
        assert!(delta.contains("\"output_tokens\""));
    }

    #[test]
    fn openai_stream_usage_only_when_asked() {
        let mut req = json!({"model": "gpt-4.1", "stream": true,
            "messages": [{"role": "user", "content": "hello there"}]});
        let plain = answer(Api::OpenAi, &req);
        assert!(plain.chunks.iter().all(|c| !c.contains("prompt_tokens")));
        assert_eq!(plain.chunks.last().unwrap(), "data: [DONE]\n\n");
        req["stream_options"] = json!({"include_usage": true});
        let with_usage = answer(Api::OpenAi, &req);
        let usage_chunk = &with_usage.chunks[with_usage.chunks.len() - 2];
        assert!(usage_chunk.contains("\"choices\":[]") && usage_chunk.contains("prompt_tokens"));
    }

    #[test]
    fn openai_tool_messages() {
        let req = json!({"model": "gpt-4.1",
            "tools": [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
            "messages": [{"role": "user", "content": "find it"}]});
        let body: Value = serde_json::from_str(&answer(Api::OpenAi, &req).chunks[0]).unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        let call = body["choices"][0]["message"]["tool_calls"][0].clone();
        assert_eq!(call["function"]["name"], "search");
        let next = json!({"model": "gpt-4.1", "tools": req["tools"], "messages": [
            {"role": "user", "content": "find it"},
            {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
            {"role": "tool", "tool_call_id": call["id"], "content": "found 2 results"},
        ]});
        let body: Value = serde_json::from_str(&answer(Api::OpenAi, &next).chunks[0]).unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            body["usage"]["total_tokens"].as_u64(),
            Some(
                body["usage"]["prompt_tokens"].as_u64().unwrap()
                    + body["usage"]["completion_tokens"].as_u64().unwrap()
            )
        );
    }

    #[test]
    fn output_never_exceeds_max_tokens() {
        let req = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "a long question indeed"}]});
        let body: Value = serde_json::from_str(&answer(Api::Anthropic, &req).chunks[0]).unwrap();
        assert_eq!(body["usage"]["output_tokens"], 1);
    }
}
