//! What an LLM answer cost and what it said, read from the provider's own bytes:
//! exact usage from JSON answers ([`parse_answer`]) and from SSE streams
//! ([`UsageTap`]), plus the cheap facts the runaway detector wants (model, stop
//! reason, upstream error, tool-call names with argument fingerprints). Also the
//! one request rewrite the tap depends on ([`ensure_openai_stream_usage`]).
//! It must not do I/O, log, or price anything (that is `crate::pricing`), and the
//! tap never alters the bytes it forwards except dropping the one usage chunk it
//! asked for on a client's behalf.
//!
//! Per-chunk cost of the tap: the SSE parser scans each byte once for line ends
//! (memchr) and buffers only the current event's `data`. Events are then
//! filtered by their `event:` name before any JSON is parsed: for Anthropic only
//! `message_start`, `message_delta`, `message_stop`, `error` and, while a
//! `tool_use` block is open, its deltas; for OpenAI Responses only the terminal
//! `response.*` events, `error` and, until the model and the answer's id are
//! known, `response.created`.
//! Text deltas, by far the most events, cost the line scan and a string compare.
//! OpenAI chat chunks carry no event names, so each chunk gets a few substring
//! checks (`"usage"`, `"finish_reason"`, `"tool_calls"`, `"error"` followed by a
//! non-null value) and is parsed only when one hits, or while the model is still
//! unknown. Parsing uses typed structs that skip unknown fields without
//! allocating.
//!
//! Mapping to [`Usage`] (nothing double-counted):
//! - Anthropic: fields as they are; `input_tokens` already excludes cache reads
//!   and writes.
//! - OpenAI chat: `prompt_tokens` *includes* `prompt_tokens_details.cached_tokens`,
//!   so `input_tokens = prompt_tokens - cached_tokens`,
//!   `cache_read_input_tokens = cached_tokens`, `cache_creation_input_tokens = 0`
//!   (OpenAI does not bill cache writes), `output_tokens = completion_tokens`
//!   (reasoning tokens are already inside it).
//! - OpenAI Responses: the same with `input_tokens`, `input_tokens_details`,
//!   `output_tokens`.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::sse::{DEFAULT_MAX_EVENT_BYTES, Disposition, SseEvent, SseFilter, SseParser};

/// Which provider API a request speaks, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// `POST /v1/messages`
    Anthropic,
    /// `POST /v1/chat/completions`
    OpenAiChat,
    /// `POST /v1/responses`
    OpenAiResponses,
}

impl ApiKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anthropic => "anthropic",
            Self::OpenAiChat => "openai-chat",
            Self::OpenAiResponses => "openai-responses",
        }
    }
}

impl fmt::Display for ApiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tokens of one answer, by how they are billed. See the module doc for how
/// each provider's fields map here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens read neither from nor into the prompt cache.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// All input, however billed: how context growth is counted.
    pub fn input_total(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }

    /// Every token of the answer, input and output.
    pub fn total(&self) -> u64 {
        self.input_total().saturating_add(self.output_tokens)
    }

    /// From OpenAI's fields, where the prompt count includes the cached part.
    pub fn from_openai(prompt_tokens: u64, completion_tokens: u64, cached_tokens: u64) -> Self {
        // A cached count above the prompt count would be an upstream bug; keep
        // the larger figure billed rather than lose tokens.
        let cached = cached_tokens.min(prompt_tokens);
        Self {
            input_tokens: prompt_tokens - cached,
            output_tokens: completion_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: cached,
        }
    }
}

/// How much of an answer's usage is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    /// The provider's final figures: settle to exactly this.
    Exact(Usage),
    /// Figures seen before the answer ended early (cut or errored): the real
    /// usage is at least this; charge no less than the reservation.
    AtLeast(Usage),
    /// No figures arrived: charge the reservation.
    Unknown,
}

impl Metered {
    /// The usage seen, exact or partial.
    pub fn seen(&self) -> Option<Usage> {
        match self {
            Self::Exact(u) | Self::AtLeast(u) => Some(*u),
            Self::Unknown => None,
        }
    }
}

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The terminal event arrived (or a whole JSON answer was read).
    Completed,
    /// The stream ended, or was abandoned, before its terminal event.
    Cut,
    /// The provider reported an error (JSON error answer or error event).
    Errored,
}

/// An error the provider reported, bounded in size and with key-like words
/// redacted, so it can go into evidence and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// `error.type` (e.g. `overloaded_error`, `invalid_request_error`), else the code.
    pub kind: String,
    /// OpenAI's `code` (e.g. `context_length_exceeded`), when given.
    pub code: Option<String>,
    /// The message, truncated to [`MAX_ERROR_MESSAGE_BYTES`].
    pub message: String,
}

/// Bound on [`UpstreamError::message`].
pub const MAX_ERROR_MESSAGE_BYTES: usize = 300;
/// At most this many tool calls are recorded per answer.
pub const MAX_TOOL_CALLS: usize = 64;
/// Tool arguments longer than this are fingerprinted by their raw prefix and length.
const MAX_TOOL_ARGS_BYTES: usize = 64 * 1024;

/// A tool call the model made: its name and a fingerprint of its arguments that
/// is the same whether the answer was streamed or not, and whatever the key
/// order or whitespace of the arguments' JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub args_fingerprint: u64,
}

/// Everything the proxy learns from one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapReport {
    pub outcome: Outcome,
    pub usage: Metered,
    /// The model named by the answer (may be more specific than the request's).
    pub model: Option<String>,
    /// Anthropic `stop_reason`, OpenAI chat `finish_reason`, Responses
    /// `status` or `incomplete_details.reason`.
    pub stop_reason: Option<String>,
    pub error: Option<UpstreamError>,
    pub tool_calls: Vec<ToolCall>,
    /// OpenAI Responses: the answer's `id` (`resp_…`, bounded), which a later
    /// request may continue with `previous_response_id`.
    pub response_id: Option<String>,
    /// The usage chunk requested on the client's behalf was dropped.
    pub dropped_usage_chunk: bool,
    /// Events too large to buffer, passed through unread.
    pub oversized_events: u32,
    /// Events that should have carried usage or errors but did not parse.
    pub unreadable_events: u32,
}

impl TapReport {
    /// An answer that ended (or never began) before any usage was seen:
    /// charged at its reservation.
    pub fn cut() -> Self {
        TapReport {
            outcome: Outcome::Cut,
            usage: Metered::Unknown,
            model: None,
            stop_reason: None,
            error: None,
            tool_calls: Vec::new(),
            response_id: None,
            dropped_usage_chunk: false,
            oversized_events: 0,
            unreadable_events: 0,
        }
    }
}

/// A JSON answer that is not what the provider sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not read usage from the {kind} answer: {reason}; it is charged at its reservation")]
pub struct AnswerError {
    pub kind: ApiKind,
    pub reason: String,
}

/// For a streaming OpenAI chat request that did not ask for usage, asks for it
/// (`stream_options.include_usage = true`) and returns `true`: the caller then
/// builds its tap with [`TapOptions::drop_injected_usage`] so the extra final
/// chunk never reaches a client that did not ask for it. Returns `false` when
/// the request does not stream, already asks, or has a malformed
/// `stream_options` (left for the upstream to refuse).
pub fn ensure_openai_stream_usage(body: &mut Value) -> bool {
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return false;
    }
    match obj.get_mut("stream_options") {
        None | Some(Value::Null) => {
            let mut options = serde_json::Map::new();
            options.insert("include_usage".into(), Value::Bool(true));
            obj.insert("stream_options".into(), Value::Object(options));
            true
        }
        Some(Value::Object(options)) => {
            if options.get("include_usage") == Some(&Value::Bool(true)) {
                false
            } else {
                options.insert("include_usage".into(), Value::Bool(true));
                true
            }
        }
        Some(_) => false,
    }
}

// ---------------------------------------------------------------------------
// Wire shapes: only the fields we read; serde skips the rest without allocating.

#[derive(Deserialize, Default)]
#[serde(default)]
struct AnthropicUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Fields present override (message_delta usage is cumulative).
    fn merge_into(&self, usage: &mut Usage) {
        let set = |field: &mut u64, value: Option<u64>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut usage.input_tokens, self.input_tokens);
        set(&mut usage.output_tokens, self.output_tokens);
        set(
            &mut usage.cache_creation_input_tokens,
            self.cache_creation_input_tokens,
        );
        set(
            &mut usage.cache_read_input_tokens,
            self.cache_read_input_tokens,
        );
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<Value>,
    message: Option<String>,
}

/// Anthropic message (JSON answer, or `message_start.message`), or its error answer.
#[derive(Deserialize, Default)]
#[serde(default)]
struct AnthropicMessage {
    model: Option<String>,
    stop_reason: Option<String>,
    usage: Option<AnthropicUsage>,
    content: Vec<AnthropicBlock>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AnthropicBlock {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    input: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AnthropicEvent {
    index: Option<u64>,
    message: Option<AnthropicMessage>,
    content_block: Option<AnthropicBlock>,
    delta: Option<AnthropicDelta>,
    usage: Option<AnthropicUsage>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AnthropicDelta {
    stop_reason: Option<String>,
    partial_json: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OpenAiDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<OpenAiDetails>,
}

impl ChatUsage {
    fn to_usage(&self) -> Usage {
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        Usage::from_openai(self.prompt_tokens, self.completion_tokens, cached)
    }
}

/// A chat completion (JSON answer) or one streamed chunk of one.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatCompletion {
    model: Option<String>,
    choices: Vec<ChatChoice>,
    usage: Option<ChatUsage>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatChoice {
    index: u64,
    finish_reason: Option<String>,
    message: Option<ChatMessage>,
    delta: Option<ChatMessage>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatMessage {
    tool_calls: Option<Vec<ChatToolCall>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatToolCall {
    index: Option<u64>,
    function: Option<ChatFunction>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatFunction {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponsesUsage {
    input_tokens: u64,
    output_tokens: u64,
    input_tokens_details: Option<OpenAiDetails>,
}

impl ResponsesUsage {
    fn to_usage(&self) -> Usage {
        let cached = self
            .input_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        Usage::from_openai(self.input_tokens, self.output_tokens, cached)
    }
}

/// A Responses API response object (JSON answer or inside a stream event).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseObject {
    id: Option<String>,
    model: Option<String>,
    status: Option<String>,
    usage: Option<ResponsesUsage>,
    error: Option<ErrorBody>,
    incomplete_details: Option<Incomplete>,
    output: Vec<ResponseItem>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Incomplete {
    reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseItem {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    arguments: Option<String>,
}

/// A Responses stream event: `response.*` events carry `response`; `error`
/// events carry `code`/`message` at the top level (or, in some versions, `error`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponsesEvent {
    #[serde(rename = "type")]
    kind: Option<String>,
    response: Option<ResponseObject>,
    code: Option<Value>,
    message: Option<String>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: Option<String>,
}

// ---------------------------------------------------------------------------
// JSON answers.

/// Reads a whole (non-streamed) answer: a success body or the provider's error
/// body. An error answer is reported as `Errored` with `Exact(0)` usage:
/// neither provider bills a request it answers with an error status.
pub fn parse_answer(kind: ApiKind, body: &[u8]) -> Result<TapReport, AnswerError> {
    let unreadable = |e: serde_json::Error| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "is JSON but not the expected shape",
            _ => "is not JSON",
        };
        AnswerError {
            kind,
            reason: format!("the body {what} (line {}, column {})", e.line(), e.column()),
        }
    };
    let mut report = Collected::default();
    match kind {
        ApiKind::Anthropic => {
            let msg: AnthropicMessage = serde_json::from_slice(body).map_err(unreadable)?;
            if let Some(err) = msg.error {
                report.error = Some(upstream_error(err));
                report.usage = Some(Usage::default());
            } else {
                let Some(u) = msg.usage else {
                    return Err(missing_usage(kind));
                };
                let mut usage = Usage::default();
                u.merge_into(&mut usage);
                report.usage = Some(usage);
                for block in msg.content.into_iter().filter(|b| b.kind == "tool_use") {
                    let fp = block.input.as_ref().map_or(0, fingerprint_value);
                    report.push_tool(block.name.unwrap_or_default(), fp);
                }
            }
            report.model = msg.model;
            report.stop_reason = msg.stop_reason;
        }
        ApiKind::OpenAiChat => {
            let chat: ChatCompletion = serde_json::from_slice(body).map_err(unreadable)?;
            if let Some(err) = chat.error {
                report.error = Some(upstream_error(err));
                report.usage = Some(Usage::default());
            } else {
                let Some(u) = chat.usage else {
                    return Err(missing_usage(kind));
                };
                report.usage = Some(u.to_usage());
                for choice in chat.choices {
                    if choice.finish_reason.is_some() && report.stop_reason.is_none() {
                        report.stop_reason = choice.finish_reason;
                    }
                    let calls = choice
                        .message
                        .and_then(|m| m.tool_calls)
                        .unwrap_or_default();
                    for call in calls {
                        let f = call.function.unwrap_or_default();
                        let fp = fingerprint_json_text(f.arguments.as_deref().unwrap_or(""));
                        report.push_tool(f.name.unwrap_or_default(), fp);
                    }
                }
            }
            report.model = chat.model;
        }
        ApiKind::OpenAiResponses => {
            let resp: ResponseObject = serde_json::from_slice(body).map_err(unreadable)?;
            if resp.usage.is_none() && resp.error.is_some() {
                report.usage = Some(Usage::default());
            }
            report.take_response(resp);
            if report.usage.is_none() {
                return Err(missing_usage(kind));
            }
        }
    }
    report.exact = true;
    report.terminal = true;
    Ok(report.finish())
}

fn missing_usage(kind: ApiKind) -> AnswerError {
    AnswerError {
        kind,
        reason: "it has no `usage` and no `error`".into(),
    }
}

// ---------------------------------------------------------------------------
// Streams.

/// How a [`UsageTap`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapOptions {
    /// [`ensure_openai_stream_usage`] injected `include_usage`: drop the final
    /// usage-only chunk (`choices: []`) so the client sees what it asked for.
    /// Every other chunk then carries `"usage": null`, which is left as is:
    /// the official SDKs type `usage` as optional, and rewriting every chunk
    /// would cost a copy of the whole stream.
    pub drop_injected_usage: bool,
    /// Bound on one event's data; see [`DEFAULT_MAX_EVENT_BYTES`].
    pub max_event_bytes: usize,
}

impl Default for TapOptions {
    fn default() -> Self {
        Self {
            drop_injected_usage: false,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// What to send on to the client for one chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward<'a> {
    /// Send the chunk exactly as it came (no copy was made).
    Unchanged,
    /// Send these bytes instead (possibly empty): used only while filtering.
    Bytes(&'a [u8]),
}

/// Watches one streamed answer, chunk by chunk, as it passes to the client.
///
/// ```text
/// let mut tap = UsageTap::new(kind, options);
/// for chunk in upstream { match tap.push(&chunk) { Unchanged => send(chunk), Bytes(b) => send(b) } }
/// send(tap.end());            // only when upstream ended; skip if the client left
/// let report = tap.report();  // Cut unless the terminal event was seen
/// ```
#[derive(Debug)]
pub struct UsageTap {
    stream: Stream,
    state: TapState,
    out: Vec<u8>,
}

#[derive(Debug)]
enum Stream {
    Observe(SseParser),
    Filter(SseFilter),
}

impl UsageTap {
    pub fn new(kind: ApiKind, options: TapOptions) -> Self {
        let filter = options.drop_injected_usage && kind == ApiKind::OpenAiChat;
        let stream = if filter {
            Stream::Filter(SseFilter::new(options.max_event_bytes))
        } else {
            Stream::Observe(SseParser::new(options.max_event_bytes))
        };
        Self {
            stream,
            state: TapState {
                kind,
                drop_injected_usage: filter,
                c: Collected::default(),
                anthropic_tool: None,
                chat_tools: Vec::new(),
            },
            out: Vec::new(),
        }
    }

    /// Observes one chunk from upstream and says what to forward.
    pub fn push(&mut self, chunk: &[u8]) -> Forward<'_> {
        let Self { stream, state, out } = self;
        match stream {
            Stream::Observe(parser) => {
                parser.feed(chunk, |event| {
                    state.observe(event);
                });
                Forward::Unchanged
            }
            Stream::Filter(filter) => {
                out.clear();
                filter.push(chunk, out, |event| state.observe(event));
                Forward::Bytes(out)
            }
        }
    }

    /// Upstream ended: returns the bytes still to forward (empty unless filtering).
    pub fn end(&mut self) -> &[u8] {
        self.out.clear();
        match &mut self.stream {
            Stream::Observe(parser) => {
                parser.finish();
            }
            Stream::Filter(filter) => {
                filter.finish(&mut self.out);
            }
        }
        &self.out
    }

    /// The findings so far; `Cut` unless the terminal event was seen.
    pub fn report(mut self) -> TapReport {
        self.state.close_chat_tools();
        self.state.c.finish()
    }

    /// Feeds one already-parsed event (for callers with their own SSE parser).
    pub fn observe(&mut self, event: &SseEvent<'_>) -> Disposition {
        self.state.observe(event)
    }
}

/// Findings accumulated for a report.
#[derive(Debug, Default)]
struct Collected {
    usage: Option<Usage>,
    exact: bool,
    terminal: bool,
    model: Option<String>,
    stop_reason: Option<String>,
    error: Option<UpstreamError>,
    tool_calls: Vec<ToolCall>,
    response_id: Option<String>,
    dropped_usage_chunk: bool,
    oversized_events: u32,
    unreadable_events: u32,
}

impl Collected {
    fn push_tool(&mut self, name: String, args_fingerprint: u64) {
        if self.tool_calls.len() < MAX_TOOL_CALLS {
            self.tool_calls.push(ToolCall {
                name: bounded(&name, 128),
                args_fingerprint,
            });
        }
    }

    fn set_response_id(&mut self, id: Option<String>) {
        if let Some(id) = id {
            self.response_id = Some(bounded(&id, 128));
        }
    }

    fn set_model(&mut self, model: Option<String>) {
        if let Some(m) = model {
            self.model = Some(bounded(&m, 128));
        }
    }

    /// A Responses API response object: JSON answer or terminal stream event.
    fn take_response(&mut self, resp: ResponseObject) {
        self.set_response_id(resp.id);
        self.set_model(resp.model);
        if let Some(u) = resp.usage {
            self.usage = Some(u.to_usage());
        }
        if let Some(err) = resp.error {
            self.error = Some(upstream_error(err));
        }
        self.stop_reason = resp
            .incomplete_details
            .and_then(|d| d.reason)
            .or(resp.status);
        for item in resp
            .output
            .into_iter()
            .filter(|i| i.kind == "function_call")
        {
            let fp = fingerprint_json_text(item.arguments.as_deref().unwrap_or(""));
            self.push_tool(item.name.unwrap_or_default(), fp);
        }
    }

    fn finish(self) -> TapReport {
        let outcome = if self.error.is_some() {
            Outcome::Errored
        } else if self.terminal {
            Outcome::Completed
        } else {
            Outcome::Cut
        };
        let usage = match self.usage {
            Some(u) if self.exact => Metered::Exact(u),
            Some(u) => Metered::AtLeast(u),
            None => Metered::Unknown,
        };
        TapReport {
            outcome,
            usage,
            model: self.model,
            stop_reason: self.stop_reason,
            error: self.error,
            tool_calls: self.tool_calls,
            response_id: self.response_id,
            dropped_usage_chunk: self.dropped_usage_chunk,
            oversized_events: self.oversized_events,
            unreadable_events: self.unreadable_events,
        }
    }
}

#[derive(Debug)]
struct TapState {
    kind: ApiKind,
    drop_injected_usage: bool,
    c: Collected,
    /// Anthropic streams one content block at a time: the open `tool_use` one.
    anthropic_tool: Option<OpenTool>,
    /// OpenAI chat tool calls being streamed, by (choice, tool index).
    chat_tools: Vec<OpenTool>,
}

#[derive(Debug)]
struct OpenTool {
    key: (u64, u64),
    name: String,
    args: ToolArgs,
}

impl TapState {
    fn observe(&mut self, event: &SseEvent<'_>) -> Disposition {
        if event.oversized {
            self.c.oversized_events = self.c.oversized_events.saturating_add(1);
            return Disposition::Forward;
        }
        match self.kind {
            ApiKind::Anthropic => self.observe_anthropic(event),
            ApiKind::OpenAiChat => return self.observe_chat(event),
            ApiKind::OpenAiResponses => self.observe_responses(event),
        }
        Disposition::Forward
    }

    fn unreadable(&mut self) {
        self.c.unreadable_events = self.c.unreadable_events.saturating_add(1);
    }

    fn observe_anthropic(&mut self, event: &SseEvent<'_>) {
        let typed;
        let name = match event.event {
            Some(name) => name,
            None => {
                typed = serde_json::from_str::<TypeOnly>(event.data).unwrap_or_default();
                typed.kind.as_deref().unwrap_or("")
            }
        };
        let needs_parse = match name {
            "message_start" | "message_delta" | "error" => true,
            "content_block_start" => event.data.contains("\"tool_use\""),
            "content_block_delta" | "content_block_stop" => self.anthropic_tool.is_some(),
            "message_stop" => {
                self.c.terminal = true;
                self.c.exact = self.c.usage.is_some();
                false
            }
            _ => false, // ping, text deltas, unknown future events
        };
        if !needs_parse {
            return;
        }
        let Ok(ev) = serde_json::from_str::<AnthropicEvent>(event.data) else {
            self.unreadable();
            return;
        };
        match name {
            "message_start" => {
                if let Some(msg) = ev.message {
                    self.c.set_model(msg.model);
                    let mut usage = self.c.usage.unwrap_or_default();
                    if let Some(u) = msg.usage {
                        u.merge_into(&mut usage);
                    }
                    self.c.usage = Some(usage);
                }
            }
            "message_delta" => {
                if let Some(delta) = ev.delta
                    && delta.stop_reason.is_some()
                {
                    self.c.stop_reason = delta.stop_reason;
                }
                if let Some(u) = ev.usage {
                    let mut usage = self.c.usage.unwrap_or_default();
                    u.merge_into(&mut usage);
                    self.c.usage = Some(usage);
                }
            }
            "error" => {
                self.c.error = Some(upstream_error(ev.error.unwrap_or_default()));
            }
            "content_block_start" => {
                if let Some(block) = ev.content_block
                    && block.kind == "tool_use"
                {
                    let mut args = ToolArgs::default();
                    if let Some(input) = block.input.as_ref() {
                        args.initial = Some(fingerprint_value(input));
                    }
                    self.anthropic_tool = Some(OpenTool {
                        key: (0, ev.index.unwrap_or(0)),
                        name: block.name.unwrap_or_default(),
                        args,
                    });
                }
            }
            "content_block_delta" => {
                if let Some(tool) = self.anthropic_tool.as_mut()
                    && tool.key.1 == ev.index.unwrap_or(0)
                    && let Some(part) = ev.delta.and_then(|d| d.partial_json)
                {
                    tool.args.push(&part);
                }
            }
            "content_block_stop" => {
                if self
                    .anthropic_tool
                    .as_ref()
                    .is_some_and(|t| t.key.1 == ev.index.unwrap_or(0))
                    && let Some(tool) = self.anthropic_tool.take()
                {
                    let fp = tool.args.fingerprint();
                    self.c.push_tool(tool.name, fp);
                }
            }
            _ => {}
        }
    }

    fn observe_chat(&mut self, event: &SseEvent<'_>) -> Disposition {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.c.terminal = true;
            self.close_chat_tools();
            return Disposition::Forward;
        }
        let is_error = event.event == Some("error") || contains_value(data, "error");
        let needs_parse = is_error
            || self.c.model.is_none()
            || contains_value(data, "usage")
            || contains_value(data, "finish_reason")
            || contains_value(data, "tool_calls");
        if !needs_parse {
            return Disposition::Forward;
        }
        let chunk = match serde_json::from_str::<ChatCompletion>(data) {
            Ok(chunk) => chunk,
            Err(_) => {
                if is_error {
                    // An error event whose payload is not the usual object.
                    self.c.error = Some(upstream_error(ErrorBody::default()));
                }
                self.unreadable();
                return Disposition::Forward;
            }
        };
        if let Some(err) = chunk.error {
            self.c.error = Some(upstream_error(err));
        } else if event.event == Some("error") {
            self.c.error = Some(upstream_error(ErrorBody::default()));
        }
        if self.c.model.is_none() {
            self.c.set_model(chunk.model);
        }
        let no_choices = chunk.choices.is_empty();
        for choice in chunk.choices {
            if choice.finish_reason.is_some() {
                self.c.stop_reason = choice.finish_reason;
            }
            let calls = choice.delta.and_then(|d| d.tool_calls).unwrap_or_default();
            for call in calls {
                let key = (choice.index, call.index.unwrap_or(0));
                let function = call.function.unwrap_or_default();
                let slot = match self.chat_tools.iter().position(|t| t.key == key) {
                    Some(i) => i,
                    None if self.chat_tools.len() < MAX_TOOL_CALLS => {
                        self.chat_tools.push(OpenTool {
                            key,
                            name: String::new(),
                            args: ToolArgs::default(),
                        });
                        self.chat_tools.len() - 1
                    }
                    None => continue,
                };
                let tool = &mut self.chat_tools[slot];
                if let Some(name) = function.name {
                    tool.name.push_str(&name);
                }
                if let Some(args) = function.arguments {
                    tool.args.push(&args);
                }
            }
        }
        if let Some(u) = chunk.usage {
            self.c.usage = Some(u.to_usage());
            self.c.exact = true;
            if self.drop_injected_usage && no_choices {
                self.c.dropped_usage_chunk = true;
                return Disposition::Drop;
            }
        }
        Disposition::Forward
    }

    fn close_chat_tools(&mut self) {
        for tool in self.chat_tools.drain(..) {
            let fp = tool.args.fingerprint();
            self.c.push_tool(tool.name, fp);
        }
    }

    fn observe_responses(&mut self, event: &SseEvent<'_>) {
        let typed;
        let name = match event.event {
            Some(name) => name,
            None => {
                typed = serde_json::from_str::<TypeOnly>(event.data).unwrap_or_default();
                typed.kind.as_deref().unwrap_or("")
            }
        };
        let terminal = matches!(
            name,
            "response.completed" | "response.incomplete" | "response.failed"
        );
        let wanted = terminal
            || name == "error"
            || ((self.c.model.is_none() || self.c.response_id.is_none())
                && matches!(name, "response.created" | "response.in_progress"));
        if !wanted {
            return;
        }
        let Ok(ev) = serde_json::from_str::<ResponsesEvent>(event.data) else {
            self.unreadable();
            return;
        };
        if name == "error" || ev.kind.as_deref() == Some("error") {
            let err = ev.error.unwrap_or(ErrorBody {
                kind: None,
                code: ev.code,
                message: ev.message,
            });
            self.c.error = Some(upstream_error(err));
            return;
        }
        let Some(resp) = ev.response else {
            self.unreadable();
            return;
        };
        if terminal {
            self.c.take_response(resp);
            self.c.terminal = true;
            self.c.exact = self.c.usage.is_some();
            if name == "response.failed" && self.c.error.is_none() {
                self.c.error = Some(upstream_error(ErrorBody::default()));
            }
        } else {
            self.c.set_response_id(resp.id);
            self.c.set_model(resp.model);
        }
    }
}

/// Tool-call arguments streamed in pieces, kept (bounded) until the call ends.
#[derive(Debug, Default)]
struct ToolArgs {
    text: String,
    total_len: usize,
    /// The block's initial `input`, used when no argument deltas follow.
    initial: Option<u64>,
}

impl ToolArgs {
    fn push(&mut self, part: &str) {
        self.total_len = self.total_len.saturating_add(part.len());
        if self.text.len() + part.len() <= MAX_TOOL_ARGS_BYTES {
            self.text.push_str(part);
        }
    }

    fn fingerprint(&self) -> u64 {
        if self.total_len == 0
            && let Some(fp) = self.initial
        {
            return fp;
        }
        if self.total_len > self.text.len() {
            let mut h = Sha256::new();
            h.update(b"truncated");
            h.update(self.text.as_bytes());
            h.update(self.total_len.to_le_bytes());
            return digest_u64(h);
        }
        fingerprint_json_text(&self.text)
    }
}

/// Fingerprint of tool arguments given as JSON text: canonical when it parses,
/// else of the raw text.
pub fn fingerprint_json_text(text: &str) -> u64 {
    match serde_json::from_str::<Value>(text) {
        Ok(value) => fingerprint_value(&value),
        Err(_) => {
            let mut h = Sha256::new();
            h.update(b"raw");
            h.update(text.as_bytes());
            digest_u64(h)
        }
    }
}

/// Fingerprint of a JSON value, independent of key order and formatting.
pub fn fingerprint_value(value: &Value) -> u64 {
    let mut h = Sha256::new();
    hash_canonical(value, &mut h);
    digest_u64(h)
}

fn hash_canonical(value: &Value, h: &mut Sha256) {
    // Tagged and length-prefixed, so distinct values never feed the same bytes.
    let str_bytes = |h: &mut Sha256, s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    match value {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            str_bytes(h, &n.to_string());
        }
        Value::String(s) => {
            h.update(b"s");
            str_bytes(h, s);
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            for item in items {
                hash_canonical(item, h);
            }
        }
        Value::Object(map) => {
            h.update(b"{");
            h.update((map.len() as u64).to_le_bytes());
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                str_bytes(h, k);
                hash_canonical(v, h);
            }
        }
    }
}

fn digest_u64(h: Sha256) -> u64 {
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Whether `"key"` occurs in `json` followed by `:` and a value other than
/// `null`. A cheap pre-check before parsing: it may say yes when the key is
/// nested (then the parse finds nothing), but never says no when the key is
/// present with a value, because a quote inside a JSON string is always
/// escaped, so `"key"` followed by `:` only occurs as a real key. (Keys written
/// with `\u` escapes would be missed; no provider does that.)
fn contains_value(json: &str, key: &str) -> bool {
    let bytes = json.as_bytes();
    let mut at = 0;
    while let Some(found) = memchr::memmem::find(&bytes[at..], key.as_bytes()) {
        let start = at + found;
        let end = start + key.len();
        at = end;
        if start == 0 || bytes[start - 1] != b'"' || bytes.get(end) != Some(&b'"') {
            continue;
        }
        let rest = json[end + 1..].trim_start();
        let Some(value) = rest.strip_prefix(':') else {
            continue;
        };
        if !value.trim_start().starts_with("null") {
            return true;
        }
    }
    false
}

fn upstream_error(err: ErrorBody) -> UpstreamError {
    let code = match err.code {
        Some(Value::String(s)) => Some(bounded(&s, 64)),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let kind = err
        .kind
        .map(|k| bounded(&k, 64))
        .or_else(|| code.clone())
        .unwrap_or_else(|| "error".to_owned());
    let message = redact_keys(&err.message.unwrap_or_default());
    UpstreamError {
        kind,
        code,
        message: bounded(&message, MAX_ERROR_MESSAGE_BYTES),
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Upstream messages sometimes quote the key they were sent; never keep one.
fn redact_keys(message: &str) -> String {
    message
        .split(' ')
        .map(|word| {
            let w = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_');
            if w.starts_with("sk-") && w.len() > 8 {
                "[REDACTED]"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;
