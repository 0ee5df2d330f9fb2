//! Request and answer summaries: what the detector needs from one LLM call,
//! read from the JSON the proxy has already parsed. Understands Anthropic
//! Messages, OpenAI Chat Completions and OpenAI Responses. Pure; owns no state.
//! Must not keep raw texts or ids: only fingerprints, flags, tool names and
//! normalised, truncated failure excerpts leave this module.

use serde::Deserialize;
use serde_json::Value;

use super::normalize::{
    EXCERPT_CHARS, Fingerprint, excerpt, is_opaque_block, normalize, reads_as_error,
};

/// The request shape of an upstream API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST /v1/messages`: `system`, `messages[]` with content blocks.
    AnthropicMessages,
    /// `POST /v1/chat/completions`: `messages[]` with `tool_calls` and `tool` messages.
    #[serde(rename = "openai_chat")]
    OpenAiChat,
    /// `POST /v1/responses`: `instructions`, `input` (string or items).
    #[serde(rename = "openai_responses")]
    OpenAiResponses,
}

impl Api {
    fn messages_field(self) -> &'static str {
        match self {
            Api::AnthropicMessages | Api::OpenAiChat => "messages",
            Api::OpenAiResponses => "input",
        }
    }
}

/// Identifies one conversation of an agent: system prompt (normalised, so a
/// clock in it does not split the conversation) plus the first message (in
/// canonical form, so cache markers do not split it either). A request that
/// continues server-side state is keyed by that state instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConversationKey(pub Fingerprint);

impl ConversationKey {
    /// The key of a request continuing the answer `response_id`; the detector
    /// resolves it to the conversation that answer belongs to.
    pub fn continuing(response_id: Fingerprint) -> Self {
        Self(Fingerprint(0x9e37_79b9).combine(response_id))
    }

    /// The key of a provider-side conversation object (`conversation: conv_…`).
    pub fn server_conversation(id: Fingerprint) -> Self {
        Self(Fingerprint(0xc0_7e55).combine(id))
    }
}

/// Server-side conversation state a request continues (OpenAI Responses):
/// the provider holds the history, the request carries only the new items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// `previous_response_id`: fingerprint of the answer it continues.
    PreviousResponse(Fingerprint),
    /// `conversation`: fingerprint of the conversation id.
    Conversation(Fingerprint),
}

/// Why a body could not be summarised; the proxy forwards such requests
/// without runaway detection (upstream will judge them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SummaryError {
    #[error("request body is not a JSON object; hint: send the provider's JSON request shape")]
    NotAnObject,
    #[error(
        "request body has no `{field}` array; hint: `{field}` must list the conversation's messages"
    )]
    NoMessages { field: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    /// OpenAI `tool` messages and Responses `function_call_output` items.
    Tool,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Text,
    ToolUse,
    ToolResult,
    Other,
}

/// A tool call: its name (truncated, kept for evidence) and a fingerprint of
/// name plus canonical arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub fingerprint: Fingerprint,
    /// The tool's name.
    pub shape: Fingerprint,
    /// Top-level arguments that name something (strings, objects, arrays;
    /// not numbers or flags), as (key, normalised value) digests, sorted,
    /// at most [`MAX_NAMED_ARGS`]. See [`ToolCall::same_shape`].
    pub named_args: Vec<(Fingerprint, Fingerprint)>,
}

/// Named arguments kept per call.
pub const MAX_NAMED_ARGS: usize = 8;

const TOOL_NAME_CHARS: usize = 64;

impl ToolCall {
    /// `arguments` may be an object (Anthropic `input`) or a JSON string
    /// (OpenAI `arguments`); a string is parsed first so key order and
    /// whitespace do not matter.
    pub fn new(name: &str, arguments: &Value) -> Self {
        let parsed;
        let value = match arguments {
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s)
                    .unwrap_or_else(|_| Value::String(s.trim().to_owned()));
                &parsed
            }
            other => other,
        };
        let args = Fingerprint::of_value_canonical(value);
        let mut named_args: Vec<(Fingerprint, Fingerprint)> = match value {
            Value::Object(map) => map
                .iter()
                .filter_map(|(k, v)| {
                    let text = match v {
                        Value::String(s) => normalize(s),
                        // serde_json's map is ordered by key: canonical text.
                        Value::Array(_) | Value::Object(_) => normalize(&v.to_string()),
                        _ => return None,
                    };
                    Some((Fingerprint::of_str(k), names_in(&text)))
                })
                .take(MAX_NAMED_ARGS)
                .collect(),
            Value::String(s) => vec![(Fingerprint(0), names_in(&normalize(s)))],
            _ => Vec::new(),
        };
        named_args.sort_unstable();
        let name: String = name.chars().take(TOOL_NAME_CHARS).collect();
        let named = Fingerprint::of_str(&name);
        Self {
            fingerprint: named.combine(args),
            shape: named,
            named_args,
            name,
        }
    }

    /// A call whose arguments were already reduced to a digest (by the
    /// proxy's answer tap, the same for streamed and JSON answers). Its
    /// arguments cannot be normalised any more, so its shape is its name:
    /// the failure alone decides whether such a call's step repeats.
    pub fn from_digest(name: &str, arguments_digest: u64) -> Self {
        let name: String = name.chars().take(TOOL_NAME_CHARS).collect();
        let named = Fingerprint::of_str(&name);
        Self {
            fingerprint: named.combine(Fingerprint(arguments_digest)),
            shape: named,
            named_args: Vec::new(),
            name,
        }
    }

    /// Whether `other` is this call again with a bumped counter, a fresh id
    /// or an argument added or dropped (`{"n": 3}` / `{"n": 4}`): same tool,
    /// and every argument both name agrees once normalised. Calls naming
    /// different things (`::test_case_1` / `::test_case_2`) differ.
    pub fn same_shape(&self, other: &ToolCall) -> bool {
        self.shape == other.shape
            && self
                .named_args
                .iter()
                .all(|(k, v)| other.named_args.iter().all(|(ok, ov)| ok != k || ov == v))
    }
}

/// The set of names (words of 3+ characters) in a normalised argument, so
/// two spellings of one command (`a.py::test_x`, `a.py -k test_x`) agree
/// and commands naming different things (`test_case_1`, `test_case_2`) not.
fn names_in(normalized: &str) -> Fingerprint {
    let mut words: Vec<&str> = normalized
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.chars().count() >= 3)
        .collect();
    words.sort_unstable();
    words.dedup();
    Fingerprint::of_str(&words.join(" "))
}

/// Distinct lines kept per failure; further lines fold into the last one.
pub const MAX_FAILURE_LINES: usize = 48;
/// Lines two reports of one failure may differ in (none of them an error line).
const MAX_DIFFERING_LINES: usize = 2;

/// One normalised line of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FailureLine {
    pub text: Fingerprint,
    /// The line without a trailing bracketed detail and end punctuation
    /// (`… immediately after. (request_id: #)` → `… immediately after`).
    pub stem: Fingerprint,
    /// The line states an error itself (exception, "failed", status line).
    pub is_error: bool,
}

/// A failure reduced to what identifies it: fingerprints of its normalised
/// lines. Comparable without the text (see [`FailureId::same_failure`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureId {
    /// Fingerprint of the whole normalised text.
    pub full: Fingerprint,
    /// Distinct normalised lines, sorted; at most [`MAX_FAILURE_LINES`].
    pub lines: Vec<FailureLine>,
}

impl FailureId {
    /// Two reports are one failure when their normalised texts are equal, or
    /// when every line that states an error is shared (or has the same stem:
    /// a bracketed detail appended to a stable message) and they differ in at most two other lines — a quoted payload, a
    /// progress line, an id normalisation missed — while sharing more than
    /// they differ. So a changing payload under a stable error still matches,
    /// while two pytest runs failing differently under one long session
    /// banner differ: their failure lines (test names, assertions) are not
    /// shared, whatever the banner's length.
    pub fn same_failure(&self, other: &FailureId) -> bool {
        if self.full == other.full {
            return true;
        }
        let only = |x: &FailureId, y: &FailureId| -> Vec<FailureLine> {
            x.lines
                .iter()
                .filter(|l| y.lines.binary_search_by(|m| m.text.cmp(&l.text)).is_err())
                .copied()
                .collect()
        };
        let (only_a, only_b) = (only(self, other), only(other, self));
        let common = self.lines.len() - only_a.len();
        let mut used = vec![false; only_b.len()];
        let mut paired = 0;
        let mut unpaired_a = 0;
        for line in &only_a {
            let partner = only_b
                .iter()
                .enumerate()
                .position(|(k, m)| !used[k] && m.stem == line.stem);
            match partner {
                Some(k) => {
                    used[k] = true;
                    paired += 1;
                }
                None if line.is_error => return false,
                None => unpaired_a += 1,
            }
        }
        let mut unpaired_b = 0;
        for (line, used) in only_b.iter().zip(&used) {
            if !used {
                if line.is_error {
                    return false;
                }
                unpaired_b += 1;
            }
        }
        let differing = unpaired_a.max(unpaired_b);
        let shared = common + paired;
        shared > 0 && differing <= MAX_DIFFERING_LINES && shared >= 2 * differing
    }
}

/// A failure text reduced to what the detector compares and shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureText {
    pub id: FailureId,
    /// Normalised and truncated; never the raw text.
    pub excerpt: String,
}

impl FailureText {
    pub fn from_text(text: &str) -> Self {
        let mut joined = String::new();
        let mut lines: Vec<FailureLine> = Vec::new();
        // Line by line up to a bound; a longer text's remainder is one more
        // (folded) line, so a huge tool result costs one pass, not a scan
        // for error words per line.
        let cut = floor_boundary(text, MAX_LINE_SCAN_BYTES);
        let (scanned, rest) = text.split_at(cut);
        for line in scanned.lines().chain((!rest.is_empty()).then_some(rest)) {
            let normalized = normalize(line);
            if normalized.is_empty() {
                continue;
            }
            let fp = Fingerprint::of_str(&normalized);
            let is_error = reads_as_error(line);
            if let Some(seen) = lines.iter_mut().find(|l| l.text == fp) {
                seen.is_error |= is_error;
            } else if lines.len() < MAX_FAILURE_LINES {
                lines.push(FailureLine {
                    text: fp,
                    stem: Fingerprint::of_str(stem(&normalized)),
                    is_error,
                });
            } else if let Some(last) = lines.last_mut() {
                last.text = last.text.combine(fp);
                last.stem = last.text;
                last.is_error |= is_error;
            }
            if !joined.is_empty() {
                joined.push(' ');
            }
            joined.push_str(&normalized);
        }
        lines.sort_unstable_by_key(|l| l.text);
        Self {
            id: FailureId {
                full: Fingerprint::of_str(&joined),
                lines,
            },
            excerpt: excerpt(&joined, EXCERPT_CHARS),
        }
    }
}

/// Bytes of a failure text read line by line; the rest folds into one line.
const MAX_LINE_SCAN_BYTES: usize = 256 * 1024;

fn floor_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    let mut i = at;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A normalised line without its trailing `(…)` / `[…]` / `{…}` group and
/// end punctuation.
fn stem(line: &str) -> &str {
    fn trim(s: &str) -> &str {
        s.trim_end_matches(|c: char| c.is_whitespace() || ".,;:-".contains(c))
    }
    let line = trim(line);
    let Some(close) = line.chars().last() else {
        return line;
    };
    let open = match close {
        ')' => '(',
        ']' => '[',
        '}' => '{',
        _ => return line,
    };
    let mut depth = 0usize;
    for (i, c) in line.char_indices().rev() {
        if c == close {
            depth += 1;
        } else if c == open {
            depth -= 1;
            if depth == 0 {
                return trim(&line[..i]);
            }
        }
    }
    line
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSummary {
    pub kind: BlockKind,
    /// Anthropic `tool_result.is_error`.
    pub is_error: bool,
    /// Fingerprint of the normalised text (text and tool-result blocks).
    pub text: Option<Fingerprint>,
    /// Set when the block reports a failure (`is_error`, or reads as an error).
    pub failure: Option<FailureText>,
    /// For tool results: digest of the raw content, for the byte-identical
    /// no-progress check.
    pub result: Option<Fingerprint>,
    /// For tool uses: the call. For tool results: the call it answers, when
    /// that call is in the same summarised suffix.
    pub call: Option<ToolCall>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSummary {
    pub role: Role,
    pub blocks: Vec<BlockSummary>,
}

/// At most this many trailing messages are summarised in detail.
pub const MAX_RECENT: usize = 32;

/// Everything the detector needs from one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSummary {
    pub api: Api,
    pub conversation: ConversationKey,
    /// Chained hashes: `prefix[i]` covers conversation messages `0..=i`
    /// (leading system/developer messages excluded; they are in the key).
    pub prefix: Vec<Fingerprint>,
    /// Identity of the whole body, for recognising SDK transport retries.
    pub body: Fingerprint,
    /// Index of the first message in `recent`.
    pub recent_start: usize,
    /// Detailed summaries of the trailing messages back through the latest
    /// assistant turn (at most [`MAX_RECENT`]): in an agent loop this covers
    /// the appended tail.
    pub recent: Vec<MessageSummary>,
    /// Rough input size (characters / 4) until the answer reports usage.
    pub estimated_input_tokens: u64,
    /// `x-stainless-retry-count` of this request (0 when absent).
    pub transport_retry: u32,
    /// Server-side state this request continues; then `prefix` covers only
    /// the request's own (new) items.
    pub server_state: Option<ServerState>,
    /// When the proxy received the request: milliseconds on a monotonic
    /// clock of the proxy's choosing (the detector never reads a clock).
    pub at_ms: u64,
}

/// Parses an `x-stainless-retry-count` header value; anything unreadable is 0.
pub fn parse_retry_count(header: Option<&[u8]>) -> u32 {
    header
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl RequestSummary {
    /// Summarises a parsed request body. Cost: one hashing walk over the
    /// messages (no copies) plus normalisation of the trailing turn only.
    pub fn from_json(api: Api, body: &Value, transport_retry: u32) -> Result<Self, SummaryError> {
        let obj = body.as_object().ok_or(SummaryError::NotAnObject)?;
        let field = api.messages_field();
        let owned_input;
        let items: &[Value] = match obj.get(field) {
            Some(Value::Array(items)) => items,
            // Responses accepts a bare string as the whole input.
            Some(s @ Value::String(_)) if api == Api::OpenAiResponses => {
                owned_input = [serde_json::json!({"role": "user", "content": s})];
                &owned_input
            }
            _ => return Err(SummaryError::NoMessages { field }),
        };

        // Leading system/developer messages belong to the key, not the
        // chain; reasoning items are opaque state frameworks drop at will.
        let lead = items
            .iter()
            .take_while(|m| matches!(role_str(m), Some("system" | "developer")))
            .count();
        let messages: Vec<&Value> = items[lead..]
            .iter()
            .filter(|m| !is_opaque_block(m))
            .collect();
        let server_state = if api == Api::OpenAiResponses {
            server_state(obj)
        } else {
            None
        };

        let mut key = Fingerprint(0x5eed);
        for sys in obj
            .get("system")
            .into_iter()
            .chain(obj.get("instructions"))
            .chain(items[..lead].iter().filter_map(|m| m.get("content")))
        {
            key = key.combine(Fingerprint::of_str(&normalize(&plain_text(sys))));
        }

        let mut size = 0u64;
        let mut prefix = Vec::with_capacity(messages.len());
        let mut chain = Fingerprint(0);
        let mut first = None;
        for m in &messages {
            let (fp, n) = Fingerprint::of_message(m);
            size += n;
            first.get_or_insert(fp);
            chain = chain.combine(fp);
            prefix.push(chain);
        }
        if let Some(first) = first {
            key = key.combine(first);
        }
        let conversation = match server_state {
            Some(ServerState::PreviousResponse(id)) => ConversationKey::continuing(id),
            Some(ServerState::Conversation(id)) => ConversationKey::server_conversation(id),
            None => ConversationKey(key),
        };

        let mut body_fp = chain;
        for (k, v) in obj {
            if k != field {
                let (fp, n) = Fingerprint::of_value(v);
                size += n;
                body_fp = body_fp.combine(Fingerprint::of_str(k)).combine(fp);
            }
        }

        let recent_start = recent_start(&messages, api);
        let recent = summarize_recent(api, &messages[recent_start..]);

        Ok(Self {
            api,
            conversation,
            prefix,
            body: body_fp,
            recent_start,
            recent,
            estimated_input_tokens: size / 4,
            transport_retry,
            server_state,
            at_ms: 0,
        })
    }

    /// Stamps the time the proxy received the request (monotonic ms).
    pub fn at(mut self, at_ms: u64) -> Self {
        self.at_ms = at_ms;
        self
    }

    pub fn message_count(&self) -> usize {
        self.prefix.len()
    }
}

/// `previous_response_id` or `conversation` (a string or `{ "id": … }`).
fn server_state(obj: &serde_json::Map<String, Value>) -> Option<ServerState> {
    if let Some(id) = obj.get("previous_response_id").and_then(Value::as_str) {
        return Some(ServerState::PreviousResponse(Fingerprint::of_str(id)));
    }
    let conversation = obj.get("conversation")?;
    let id = conversation
        .as_str()
        .or_else(|| conversation.get("id").and_then(Value::as_str))?;
    Some(ServerState::Conversation(Fingerprint::of_str(id)))
}

fn role_str(m: &Value) -> Option<&str> {
    m.get("role").and_then(Value::as_str)
}

fn role_of(api: Api, m: &Value) -> Role {
    if api == Api::OpenAiResponses {
        match m.get("type").and_then(Value::as_str) {
            Some("function_call" | "custom_tool_call") => return Role::Assistant,
            Some("function_call_output" | "custom_tool_call_output") => return Role::Tool,
            Some("message") | None => {}
            Some(_) => return Role::Other,
        }
    }
    match role_str(m) {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool" | "function") => Role::Tool,
        _ => Role::Other,
    }
}

/// Walks back from the end through the latest contiguous assistant turn.
fn recent_start(messages: &[&Value], api: Api) -> usize {
    let floor = messages.len().saturating_sub(MAX_RECENT);
    let mut seen_assistant = false;
    let mut i = messages.len();
    while i > floor {
        let is_assistant = role_of(api, messages[i - 1]) == Role::Assistant;
        if seen_assistant && !is_assistant {
            break;
        }
        seen_assistant |= is_assistant;
        i -= 1;
    }
    i
}

fn summarize_recent(api: Api, messages: &[&Value]) -> Vec<MessageSummary> {
    let mut out: Vec<MessageSummary> = messages
        .iter()
        .map(|m| MessageSummary {
            role: role_of(api, m),
            blocks: blocks_of(api, m),
        })
        .collect();
    link_results_to_calls(api, messages, &mut out);
    out
}

fn blocks_of(api: Api, m: &Value) -> Vec<BlockSummary> {
    let mut blocks = Vec::new();
    match api {
        Api::AnthropicMessages => match m.get("content") {
            Some(Value::String(s)) => blocks.push(text_block(s)),
            Some(Value::Array(parts)) => {
                for part in parts {
                    blocks.push(match part.get("type").and_then(Value::as_str) {
                        Some("text") => text_block(str_field(part, "text")),
                        Some("tool_use") => tool_use_block(
                            str_field(part, "name"),
                            part.get("input").unwrap_or(&Value::Null),
                        ),
                        Some("tool_result") => tool_result_block(
                            part.get("content").unwrap_or(&Value::Null),
                            part.get("is_error")
                                .and_then(Value::as_bool)
                                .unwrap_or(false),
                        ),
                        _ => other_block(),
                    });
                }
            }
            _ => {}
        },
        Api::OpenAiChat => {
            let content = m.get("content").unwrap_or(&Value::Null);
            if role_str(m) == Some("tool") || role_str(m) == Some("function") {
                blocks.push(tool_result_block(content, false));
            } else if !content.is_null() {
                blocks.push(text_block(&plain_text(content)));
            }
            for call in m
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let f = call.get("function").unwrap_or(&Value::Null);
                blocks.push(tool_use_block(
                    str_field(f, "name"),
                    f.get("arguments").unwrap_or(&Value::Null),
                ));
            }
        }
        Api::OpenAiResponses => match m.get("type").and_then(Value::as_str) {
            Some("function_call" | "custom_tool_call") => blocks.push(tool_use_block(
                str_field(m, "name"),
                m.get("arguments")
                    .or_else(|| m.get("input"))
                    .unwrap_or(&Value::Null),
            )),
            Some("function_call_output" | "custom_tool_call_output") => blocks.push(
                tool_result_block(m.get("output").unwrap_or(&Value::Null), false),
            ),
            Some("message") | None => blocks.push(text_block(&plain_text(
                m.get("content").unwrap_or(&Value::Null),
            ))),
            Some(_) => blocks.push(other_block()),
        },
    }
    blocks
}

/// The ids that pair calls with results, per API, read only here and never kept.
fn call_id(api: Api, m: &Value, block_index: usize) -> Option<&str> {
    match api {
        Api::AnthropicMessages => m.get("content")?.get(block_index)?.get("id")?.as_str(),
        Api::OpenAiChat => m
            .get("tool_calls")?
            .as_array()?
            .get(block_index.checked_sub(usize::from(!m["content"].is_null()))?)?
            .get("id")?
            .as_str(),
        Api::OpenAiResponses => m.get("call_id")?.as_str(),
    }
}

fn result_id(api: Api, m: &Value, block_index: usize) -> Option<&str> {
    match api {
        Api::AnthropicMessages => m
            .get("content")?
            .get(block_index)?
            .get("tool_use_id")?
            .as_str(),
        Api::OpenAiChat => m.get("tool_call_id")?.as_str(),
        Api::OpenAiResponses => m.get("call_id")?.as_str(),
    }
}

fn link_results_to_calls(api: Api, messages: &[&Value], out: &mut [MessageSummary]) {
    let mut calls: Vec<(&str, ToolCall)> = Vec::new();
    for (m, summary) in messages.iter().zip(out.iter_mut()) {
        for (i, block) in summary.blocks.iter_mut().enumerate() {
            match block.kind {
                BlockKind::ToolUse => {
                    if let (Some(id), Some(call)) = (call_id(api, m, i), &block.call) {
                        calls.push((id, call.clone()));
                    }
                }
                BlockKind::ToolResult => {
                    if let Some(id) = result_id(api, m, i) {
                        block.call = calls.iter().find(|(c, _)| *c == id).map(|(_, c)| c.clone());
                    }
                }
                _ => {}
            }
        }
    }
}

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or("")
}

/// Text of a content value: a string, or the `text` of its parts joined.
fn plain_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.as_str()),
                other => other.get("text").and_then(Value::as_str),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn text_block(text: &str) -> BlockSummary {
    let failing = reads_as_error(text);
    BlockSummary {
        kind: BlockKind::Text,
        is_error: false,
        text: Some(Fingerprint::of_str(&normalize(text))),
        failure: failing.then(|| FailureText::from_text(text)),
        result: None,
        call: None,
    }
}

fn tool_use_block(name: &str, args: &Value) -> BlockSummary {
    BlockSummary {
        kind: BlockKind::ToolUse,
        is_error: false,
        text: None,
        failure: None,
        result: None,
        call: Some(ToolCall::new(name, args)),
    }
}

fn tool_result_block(content: &Value, is_error: bool) -> BlockSummary {
    let text = plain_text(content);
    let failure = (is_error || reads_as_error(&text)).then(|| FailureText::from_text(&text));
    BlockSummary {
        kind: BlockKind::ToolResult,
        is_error,
        text: failure
            .as_ref()
            .map(|f| f.id.full)
            .or_else(|| Some(Fingerprint::of_str(&normalize(&text)))),
        failure,
        result: Some(Fingerprint::of_value(content).0),
        call: None,
    }
}

fn other_block() -> BlockSummary {
    BlockSummary {
        kind: BlockKind::Other,
        is_error: false,
        text: None,
        failure: None,
        result: None,
        call: None,
    }
}

/// Input tokens of an answer, by kind, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct InputUsage {
    pub input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl InputUsage {
    /// The growth measure of the design: all input, cached or not.
    pub fn total(&self) -> u64 {
        self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
    }

    /// What the input cost, in uncached-token equivalents: cache reads are
    /// billed at a tenth (Anthropic, and OpenAI's cached input at most).
    pub fn billed(&self) -> u64 {
        self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens / 10
    }
}

/// What the detector needs from one upstream answer (JSON or SSE).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseSummary {
    pub status: u16,
    /// Provider error type, e.g. `invalid_request_error` (truncated).
    pub error_type: Option<String>,
    /// The error message, normalised; set for error answers.
    pub error: Option<FailureText>,
    /// Tool calls the model asked for (from JSON, or assembled from SSE deltas).
    pub tool_calls: Vec<ToolCall>,
    pub usage: Option<InputUsage>,
    /// Fingerprint of the answer's id (OpenAI Responses `resp_…`), so a
    /// later `previous_response_id` finds its conversation.
    pub response_id: Option<Fingerprint>,
    /// When the answer ended (the proxy's monotonic ms, as
    /// [`RequestSummary::at_ms`]); `None` when unknown.
    pub at_ms: Option<u64>,
}

impl ResponseSummary {
    /// For answers whose body is not JSON (an HTML 502, a cut stream).
    pub fn upstream_error(status: u16, error_type: Option<&str>, message: &str) -> Self {
        let error_type: Option<String> =
            error_type.map(|t| t.chars().take(TOOL_NAME_CHARS).collect());
        let text = format!("{status} {} {message}", error_type.as_deref().unwrap_or(""));
        Self {
            status,
            error: Some(FailureText::from_text(&text)),
            error_type,
            ..Self::default()
        }
    }

    pub fn is_error(&self) -> bool {
        self.status >= 400
    }

    /// Summarises a complete JSON answer of `api`.
    pub fn from_json(api: Api, status: u16, body: &Value) -> Self {
        if status >= 400 {
            let err = body.get("error").unwrap_or(body);
            let message = match err.get("message") {
                Some(m) => plain_text(m),
                None => body.to_string(),
            };
            return Self::upstream_error(
                status,
                err.get("type")
                    .or_else(|| err.get("code"))
                    .and_then(Value::as_str),
                &message,
            );
        }
        let mut tool_calls = Vec::new();
        let usage = body.get("usage");
        let usage = match api {
            Api::AnthropicMessages => {
                for block in body
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                        tool_calls.push(ToolCall::new(
                            str_field(block, "name"),
                            block.get("input").unwrap_or(&Value::Null),
                        ));
                    }
                }
                usage.and_then(|u| InputUsage::deserialize(u).ok())
            }
            Api::OpenAiChat => {
                let message = body.pointer("/choices/0/message").unwrap_or(&Value::Null);
                for call in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let f = call.get("function").unwrap_or(&Value::Null);
                    tool_calls.push(ToolCall::new(
                        str_field(f, "name"),
                        f.get("arguments").unwrap_or(&Value::Null),
                    ));
                }
                // `prompt_tokens` already includes cached tokens.
                usage
                    .and_then(|u| u.get("prompt_tokens"))
                    .and_then(Value::as_u64)
                    .map(|n| InputUsage {
                        input_tokens: n,
                        ..InputUsage::default()
                    })
            }
            Api::OpenAiResponses => {
                for item in body
                    .get("output")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if item.get("type").and_then(Value::as_str) == Some("function_call") {
                        tool_calls.push(ToolCall::new(
                            str_field(item, "name"),
                            item.get("arguments").unwrap_or(&Value::Null),
                        ));
                    }
                }
                // `input_tokens` already includes cached tokens.
                usage
                    .and_then(|u| u.get("input_tokens"))
                    .and_then(Value::as_u64)
                    .map(|n| InputUsage {
                        input_tokens: n,
                        ..InputUsage::default()
                    })
            }
        };
        let response_id = match api {
            Api::OpenAiResponses => body
                .get("id")
                .and_then(Value::as_str)
                .map(Fingerprint::of_str),
            _ => None,
        };
        Self {
            status,
            error_type: None,
            error: None,
            tool_calls,
            usage,
            response_id,
            at_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn anthropic_loop(results: &[(&str, bool)]) -> Value {
        let mut messages = vec![json!({"role": "user", "content": "Summarise my notes."})];
        for (i, (text, is_error)) in results.iter().enumerate() {
            messages.push(json!({"role": "assistant", "content": [
                {"type": "text", "text": "Reading the notes."},
                {"type": "tool_use", "id": format!("toolu_{i}"), "name": "read_notes", "input": {"path": "notes.md"}}
            ]}));
            messages.push(json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": format!("toolu_{i}"), "content": text, "is_error": is_error}
            ]}));
        }
        json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": "You are helpful. Now: 2025-01-01T10:00:00Z", "messages": messages})
    }

    #[test]
    fn anthropic_tail_blocks_and_links() {
        let body = anthropic_loop(&[("ok", false), ("Malformed output at byte 17", true)]);
        let s = RequestSummary::from_json(Api::AnthropicMessages, &body, 0).unwrap();
        assert_eq!(s.message_count(), 5);
        assert_eq!(
            s.recent_start, 3,
            "the tail is the last assistant turn and its result"
        );
        assert_eq!(s.recent[0].role, Role::Assistant);
        let kinds: Vec<_> = s.recent[0].blocks.iter().map(|b| b.kind).collect();
        assert_eq!(kinds, [BlockKind::Text, BlockKind::ToolUse]);
        let result = &s.recent[1].blocks[0];
        assert_eq!(result.kind, BlockKind::ToolResult);
        assert!(result.is_error);
        let failure = result.failure.as_ref().unwrap();
        assert_eq!(failure.excerpt, "malformed output at byte #");
        assert_eq!(result.call.as_ref().unwrap().name, "read_notes");
        assert_eq!(result.call, s.recent[0].blocks[1].call);
    }

    #[test]
    fn prefix_hashes_extend_when_messages_are_appended() {
        let short = anthropic_loop(&[("one", false)]);
        let long = anthropic_loop(&[("one", false), ("two", false)]);
        let a = RequestSummary::from_json(Api::AnthropicMessages, &short, 0).unwrap();
        let b = RequestSummary::from_json(Api::AnthropicMessages, &long, 0).unwrap();
        assert_eq!(a.conversation, b.conversation);
        assert_eq!(a.prefix[..], b.prefix[..a.prefix.len()]);
        assert_ne!(a.body, b.body);
        assert!(b.estimated_input_tokens > a.estimated_input_tokens);

        let changed = anthropic_loop(&[("ONE", false), ("two", false)]);
        let c = RequestSummary::from_json(Api::AnthropicMessages, &changed, 0).unwrap();
        assert_eq!(c.prefix[..2], a.prefix[..2]);
        assert_ne!(
            c.prefix[2], a.prefix[2],
            "an edited message breaks the prefix"
        );
    }

    #[test]
    fn system_clock_does_not_split_the_conversation() {
        let mut a = anthropic_loop(&[]);
        let mut b = a.clone();
        a["system"] = json!("You are helpful. Now: 2025-01-01T10:00:00Z");
        b["system"] = json!("You are helpful. Now: 2025-01-01T10:05:13Z");
        let a = RequestSummary::from_json(Api::AnthropicMessages, &a, 0).unwrap();
        let b = RequestSummary::from_json(Api::AnthropicMessages, &b, 0).unwrap();
        assert_eq!(a.conversation, b.conversation);
        assert_ne!(a.body, b.body);
    }

    #[test]
    fn openai_chat_tool_messages() {
        let body = json!({"model": "gpt-4.1", "messages": [
            {"role": "system", "content": "You file tickets."},
            {"role": "user", "content": "File the bug."},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a1", "type": "function", "function": {"name": "create_ticket", "arguments": "{\"title\": \"x\"}"}}]},
            {"role": "tool", "tool_call_id": "call_a1", "content": "HTTP 500 Internal Server Error (request 7f3e)"}
        ]});
        let s = RequestSummary::from_json(Api::OpenAiChat, &body, 2).unwrap();
        assert_eq!(
            s.message_count(),
            3,
            "the system message is part of the key only"
        );
        assert_eq!(s.transport_retry, 2);
        assert_eq!(s.recent.len(), 2);
        let result = &s.recent[1].blocks[0];
        assert_eq!(s.recent[1].role, Role::Tool);
        assert!(!result.is_error);
        assert!(result.failure.is_some());
        let call = result.call.as_ref().unwrap();
        assert_eq!(
            call,
            &ToolCall::new("create_ticket", &json!({"title": "x"}))
        );
    }

    #[test]
    fn openai_responses_function_call_output() {
        let body = json!({"model": "gpt-4.1", "instructions": "Sync calendars.", "input": [
            {"role": "user", "content": "Sync now."},
            {"type": "function_call", "call_id": "call_9", "name": "sync", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_9", "output": "invalid calendar id"}
        ]});
        let s = RequestSummary::from_json(Api::OpenAiResponses, &body, 0).unwrap();
        assert_eq!(s.recent_start, 1);
        assert_eq!(s.recent[0].role, Role::Assistant);
        assert_eq!(s.recent[1].role, Role::Tool);
        assert!(s.recent[1].blocks[0].failure.is_some());
        assert_eq!(s.recent[1].blocks[0].call.as_ref().unwrap().name, "sync");

        let bare = json!({"model": "gpt-4.1", "input": "hello"});
        let s = RequestSummary::from_json(Api::OpenAiResponses, &bare, 0).unwrap();
        assert_eq!(s.message_count(), 1);
    }

    fn same(a: &str, b: &str) -> bool {
        FailureText::from_text(a)
            .id
            .same_failure(&FailureText::from_text(b).id)
    }

    #[test]
    fn failure_identity_table() {
        let banner = "=== test session starts ===\nplatform linux -- Python 3.12.3, pytest-8.3.2\n\
            rootdir: /home/dev/shop\nplugins: anyio-4.4.0, cov-5.0.0, xdist-3.6.1\n\
            cachedir: .pytest_cache\nconfigfile: pyproject.toml\ntestpaths: tests\n";
        let pytest = |test: &str, err: &str| {
            format!(
                "{banner}collected 1 item\n\ntests/test_api.py::{test} FAILED\n\
                 === FAILURES ===\n___ {test} ___\n    def {test}():\nE       {err}\n\
                 tests/test_api.py:12: AssertionError\n\
                 FAILED tests/test_api.py::{test} - {err}\n=== 1 failed in 0.12s ==="
            )
        };
        let traceback = |line: u32, id: &str| {
            format!(
                "Traceback (most recent call last):\n  File \"/srv/x.py\", line {line}, in run\n\
                 ValueError: malformed record {id}\n(raw output: {{\"notes\": [{line}, \"x\"]}})"
            )
        };
        let cases = [
            // Two different pytest failures under one long banner differ.
            (
                pytest("test_create", "assert 500 == 201"),
                pytest("test_update", "KeyError: 'sku'"),
                false,
            ),
            (
                pytest("test_create", "assert 500 == 201"),
                pytest("test_cancel", "assert 500 == 201"),
                false,
            ),
            // One failure, other line numbers, durations, ids: the same.
            (
                pytest("test_create", "assert 500 == 201"),
                pytest("test_create", "assert 404 == 201"),
                true,
            ),
            (
                traceback(88, "4f1c0a2b"),
                traceback(91, "deadbeef-cafe-abcd-beef-facefeedbead"),
                true,
            ),
            // A changing quoted payload line under a stable error still matches.
            (
                "ParseError: expected JSON\nline 1\ngot: Sure! Here is the summary.".into(),
                "ParseError: expected JSON\nline 1\ngot: Of course. The notes say".into(),
                true,
            ),
            // A detail appended to a stable message.
            (
                "tool_use ids were found without tool_result blocks.".into(),
                "tool_use ids were found without tool_result blocks. (request_id: req_x)".into(),
                true,
            ),
            // Different single-line errors differ.
            (
                "HTTP 503 Service Unavailable".into(),
                "HTTP 404 Not Found".into(),
                false,
            ),
            (
                "file a.txt: permission denied".into(),
                "file b.txt: no such file or directory".into(),
                false,
            ),
        ];
        for (a, b, want) in cases {
            assert_eq!(same(&a, &b), want, "{a:?}\nvs\n{b:?}");
            assert_eq!(same(&b, &a), want, "symmetric: {b:?}\nvs\n{a:?}");
        }
    }

    #[test]
    fn cache_markers_keep_key_and_prefix() {
        let plain = anthropic_loop(&[("one", false), ("two", false)]);
        let mut cached = plain.clone();
        cached["system"] = json!([{"type": "text", "text": "You are helpful. Now: 2025-01-01T10:00:00Z",
            "cache_control": {"type": "ephemeral"}}]);
        cached["messages"][0]["content"] = json!([{"type": "text", "text": "Summarise my notes.", "cache_control": {"type": "ephemeral"}}]);
        cached["messages"][4]["content"][0]["cache_control"] = json!({"type": "ephemeral"});
        let a = RequestSummary::from_json(Api::AnthropicMessages, &plain, 0).unwrap();
        let b = RequestSummary::from_json(Api::AnthropicMessages, &cached, 0).unwrap();
        assert_eq!(a.conversation, b.conversation);
        assert_eq!(a.prefix, b.prefix);
    }

    #[test]
    fn responses_server_state_and_answer_ids() {
        let body = json!({"model": "gpt-4.1", "previous_response_id": "resp_abc", "input": [
            {"type": "function_call_output", "call_id": "call_9", "output": "invalid calendar id"}]});
        let s = RequestSummary::from_json(Api::OpenAiResponses, &body, 0)
            .unwrap()
            .at(1234);
        let id = Fingerprint::of_str("resp_abc");
        assert_eq!(s.server_state, Some(ServerState::PreviousResponse(id)));
        assert_eq!(s.conversation, ConversationKey::continuing(id));
        assert_eq!(s.at_ms, 1234);
        assert_eq!(s.message_count(), 1);
        for conversation in [json!("conv_1"), json!({"id": "conv_1"})] {
            let body = json!({"model": "gpt-4.1", "conversation": conversation, "input": "next"});
            let s = RequestSummary::from_json(Api::OpenAiResponses, &body, 0).unwrap();
            assert_eq!(
                s.server_state,
                Some(ServerState::Conversation(Fingerprint::of_str("conv_1")))
            );
        }
        let answer = json!({"id": "resp_abc", "output": [], "usage": {"input_tokens": 5}});
        let r = ResponseSummary::from_json(Api::OpenAiResponses, 200, &answer);
        assert_eq!(r.response_id, Some(id));
        // Reasoning items are opaque: dropped from the chain.
        let with_reasoning = json!({"model": "gpt-4.1", "input": [
            {"role": "user", "content": "go"},
            {"type": "reasoning", "id": "rs_1", "encrypted_content": "gAAA", "summary": []},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]});
        let s = RequestSummary::from_json(Api::OpenAiResponses, &with_reasoning, 0).unwrap();
        assert_eq!(s.message_count(), 2);
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert_eq!(
            RequestSummary::from_json(Api::AnthropicMessages, &json!([1]), 0),
            Err(SummaryError::NotAnObject)
        );
        let err =
            RequestSummary::from_json(Api::OpenAiChat, &json!({"model": "m"}), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request body has no `messages` array; hint: `messages` must list the conversation's messages"
        );
    }

    #[test]
    fn retry_count_header() {
        assert_eq!(parse_retry_count(None), 0);
        assert_eq!(parse_retry_count(Some(b"2")), 2);
        assert_eq!(parse_retry_count(Some(b" 1 ")), 1);
        assert_eq!(parse_retry_count(Some(b"x")), 0);
    }

    #[test]
    fn responses_from_json() {
        let ok = json!({"content": [{"type": "tool_use", "id": "t", "name": "read_notes", "input": {"path": "notes.md"}}],
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000, "output_tokens": 5}});
        let r = ResponseSummary::from_json(Api::AnthropicMessages, 200, &ok);
        assert!(!r.is_error());
        assert_eq!(r.usage.unwrap().total(), 3210);
        assert_eq!(
            r.tool_calls,
            [ToolCall::new("read_notes", &json!({"path": "notes.md"}))]
        );

        let err = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "messages.3: tool_use ids must be unique (toolu_01X)"}});
        let r = ResponseSummary::from_json(Api::AnthropicMessages, 400, &err);
        assert!(r.is_error());
        assert_eq!(r.error_type.as_deref(), Some("invalid_request_error"));
        assert_eq!(
            r.error.unwrap().excerpt,
            "# invalid_request_error messages.#: tool_use ids must be unique (#)"
        );

        let chat = json!({"choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
            "usage": {"prompt_tokens": 900, "completion_tokens": 3}});
        let r = ResponseSummary::from_json(Api::OpenAiChat, 200, &chat);
        assert_eq!(r.usage.unwrap().total(), 900);
        assert_eq!(r.tool_calls[0], ToolCall::new("f", &json!({"a": 1})));
    }
}
