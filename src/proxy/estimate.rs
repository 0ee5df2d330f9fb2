//! A request's worst case before it is forwarded: the model, the most output it
//! may produce, and an upper bound on its input tokens that is never below the
//! real count, so a reservation made from it cannot be overshot. It reads the
//! parsed request body only; it must not tokenize (no tokenizer files, no model
//! tables), and it must not guess low.
//!
//! Why the input bound holds:
//! - Text: both providers tokenize with byte-level BPE, where every token stands
//!   for at least one byte of UTF-8 text, so a text has at most as many tokens as
//!   bytes. The bound counts the UTF-8 bytes of every string and object key in
//!   the body (keys and non-prompt fields like `model` only add slack), plus the
//!   printed length of numbers and booleans.
//! - Framing: the prompt template adds tokens the body does not contain (role
//!   markers, separators, the tool-use system prompt, which Anthropic documents
//!   at a few hundred tokens). The bound adds [`OBJECT_OVERHEAD_TOKENS`] per JSON
//!   object (every message, block and tool is one) and [`REQUEST_OVERHEAD_TOKENS`]
//!   once.
//! - Images: billed by size, not bytes, and often sent by URL. Each image block
//!   counts [`EstimateConfig::image_tokens`] instead of its bytes.
//! - Audio and opaque encrypted blobs (thinking signatures, `encrypted_content`)
//!   count their bytes: base64 audio runs to thousands of bytes per second against
//!   about ten tokens per second.
//! - Anthropic-defined client tools (`bash_*`, `text_editor_*`, `computer_*`,
//!   `memory_*`) have definitions the body does not carry: each counts
//!   [`PROVIDER_TOOL_TOKENS`].
//! - Server-side conversation state (`previous_response_id`, `conversation`):
//!   when the proxy metered the answer the request continues, the context it
//!   carries is known ([`KnownContext`], from `chain::ChainRecord`: that
//!   answer's input plus output tokens) and is added to the body's bound, with
//!   [`CONTINUATION_OVERHEAD_TOKENS`] for the framing of the previous output
//!   items, which its output count does not include. `truncation: "auto"`
//!   only drops context, so the bound still holds.
//! - What the body cannot bound — PDF/file documents, server-side state the
//!   proxy has not seen (an unknown `previous_response_id` or `conversation`,
//!   a stored `prompt`), and server-side tools that feed results back as
//!   input (web search, code execution, file search, MCP) — counts as
//!   [`EstimateConfig::unbounded_input_tokens`], and the estimate says why in
//!   `unbounded_reason`.
//! - Any bound above [`EstimateConfig::context_window_tokens`] is cut to it: the
//!   provider refuses, unbilled, a prompt larger than the model's window.

use serde_json::{Map, Value};

pub use super::chain::KnownContext;
use super::usage::ApiKind;

/// Tokens added once per request for template text the body does not contain.
pub const REQUEST_OVERHEAD_TOKENS: u64 = 4096;
/// Tokens added per JSON object (message, content block, tool) for its framing.
pub const OBJECT_OVERHEAD_TOKENS: u64 = 8;
/// Tokens added to a known server-side context for re-reading the previous
/// answer's output items as input: a few framing tokens per item (message,
/// reasoning, function call), which `output_tokens` does not count.
pub const CONTINUATION_OVERHEAD_TOKENS: u64 = 1024;
/// Tokens per Anthropic-defined client tool, whose definition the provider adds
/// (computer use documents about 700 plus its system prompt).
pub const PROVIDER_TOOL_TOKENS: u64 = 2048;

/// The worst case of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEstimate {
    pub model: String,
    /// Output tokens the request may produce, all choices together.
    pub max_output_tokens: u64,
    /// Never below the input tokens the provider will bill (see the module doc).
    pub input_tokens_upper_bound: u64,
    pub stream: bool,
    /// Set when the body alone could not bound the input and the configured
    /// `unbounded_input_tokens` was used: names what made it so.
    pub unbounded_reason: Option<&'static str>,
}

/// Limits the estimate cannot read from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EstimateConfig {
    /// Output assumed when an OpenAI request sets no `max_completion_tokens`,
    /// `max_tokens` or `max_output_tokens`: the largest output of any model served.
    pub default_max_output_tokens: u64,
    /// Tokens counted per image block.
    pub image_tokens: u64,
    /// The largest context window of any model served: the ceiling of any bound.
    pub context_window_tokens: u64,
    /// Input assumed when the body cannot bound it (see the module doc).
    pub unbounded_input_tokens: u64,
}

impl EstimateConfig {
    /// Conservative defaults for one API.
    ///
    /// - Anthropic: images are resized to at most about 1.15 megapixels (≈1,600
    ///   tokens at 750 pixels a token); 8,000 leaves room for higher-resolution
    ///   models. Context windows reach 1M tokens. `max_tokens` is required there,
    ///   so the output default only serves malformed requests, which fail anyway.
    /// - OpenAI: `gpt-4o-mini` bills a high-detail image at up to about 48,000
    ///   tokens (2,833 + 5,667 per tile, 8 tiles), hence 50,000. `gpt-4.1` has a
    ///   1,047,576-token window; `gpt-5` may write 128,000 tokens when no limit
    ///   is set.
    pub fn for_kind(kind: ApiKind) -> Self {
        match kind {
            ApiKind::Anthropic => Self {
                default_max_output_tokens: 128_000,
                image_tokens: 8_000,
                context_window_tokens: 1_000_000,
                unbounded_input_tokens: 1_000_000,
            },
            ApiKind::OpenAiChat | ApiKind::OpenAiResponses => Self {
                default_max_output_tokens: 128_000,
                image_tokens: 50_000,
                context_window_tokens: 1_050_000,
                unbounded_input_tokens: 1_050_000,
            },
        }
    }
}

/// A request the proxy cannot estimate, so refuses (400, in the provider's shape).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    #[error(
        "the request body is not a JSON object: send the request parameters as one JSON object"
    )]
    NotAnObject,
    #[error(
        "the request body has no `model`: name the model to call, e.g. `\"model\": \"{example}\"`"
    )]
    MissingModel { example: &'static str },
    #[error(
        "`max_tokens` is missing from the request body: the Messages API requires it, and the proxy reserves budget by it"
    )]
    MissingMaxTokens,
    #[error("`{field}` in the request body must be {expected}")]
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
}

/// Estimates one request. `body` is the parsed request JSON; `kind` comes from
/// its route (`route::resolve`); `known` is what the proxy knows of the
/// server-side context the body continues (`KnownContext::default()`: nothing).
pub fn estimate_request(
    kind: ApiKind,
    body: &Value,
    config: &EstimateConfig,
    known: &KnownContext,
) -> Result<RequestEstimate, EstimateError> {
    let obj = body.as_object().ok_or(EstimateError::NotAnObject)?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => {
            let example = match kind {
                ApiKind::Anthropic => "claude-sonnet-4-5",
                ApiKind::OpenAiChat | ApiKind::OpenAiResponses => "gpt-4.1",
            };
            return Err(EstimateError::MissingModel { example });
        }
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        Some(_) => return Err(invalid("model", "a non-empty string")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "`true` or `false`")),
    };
    let max_output_tokens = match kind {
        ApiKind::Anthropic => {
            positive(obj, "max_tokens")?.ok_or(EstimateError::MissingMaxTokens)?
        }
        ApiKind::OpenAiChat => {
            // `max_tokens` is the deprecated spelling; if both are sent, assume
            // the larger applies.
            let limit = match (
                positive(obj, "max_completion_tokens")?,
                positive(obj, "max_tokens")?,
            ) {
                (None, None) => config.default_max_output_tokens,
                (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)),
            };
            // Each of `n` choices may produce the full limit.
            let n = positive(obj, "n")?.unwrap_or(1);
            limit.saturating_mul(n)
        }
        ApiKind::OpenAiResponses => {
            positive(obj, "max_output_tokens")?.unwrap_or(config.default_max_output_tokens)
        }
    };

    let mut walk = Walk::default();
    walk.top_level(kind, obj, known);
    walk.value(body, false);
    let input_tokens_upper_bound = match walk.unbounded {
        Some(_) => config.unbounded_input_tokens,
        None => {
            let images = walk.images.saturating_mul(config.image_tokens);
            let objects = walk.objects.saturating_mul(OBJECT_OVERHEAD_TOKENS);
            let tools = walk.provider_tools.saturating_mul(PROVIDER_TOOL_TOKENS);
            walk.bytes
                .saturating_add(walk.server_context)
                .saturating_add(images)
                .saturating_add(objects)
                .saturating_add(tools)
                .saturating_add(REQUEST_OVERHEAD_TOKENS)
                .min(config.context_window_tokens)
        }
    };
    Ok(RequestEstimate {
        model,
        max_output_tokens,
        input_tokens_upper_bound,
        stream,
        unbounded_reason: walk.unbounded,
    })
}

fn invalid(field: &'static str, expected: &'static str) -> EstimateError {
    EstimateError::InvalidField { field, expected }
}

/// An optional positive integer field.
fn positive(obj: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, EstimateError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(field, "a positive integer")),
        },
    }
}

#[derive(Debug, Default)]
struct Walk {
    bytes: u64,
    objects: u64,
    images: u64,
    provider_tools: u64,
    /// Known server-side context the request continues.
    server_context: u64,
    unbounded: Option<&'static str>,
}

impl Walk {
    fn add(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_add(n as u64);
    }

    fn unbounded(&mut self, reason: &'static str) {
        self.unbounded.get_or_insert(reason);
    }

    fn continues(&mut self, context_tokens: u64) {
        self.server_context = self
            .server_context
            .saturating_add(context_tokens)
            .saturating_add(CONTINUATION_OVERHEAD_TOKENS);
    }

    /// Request fields that pull in input the body does not contain.
    fn top_level(&mut self, kind: ApiKind, obj: &Map<String, Value>, known: &KnownContext) {
        let present = |field: &str| obj.get(field).is_some_and(|v| !v.is_null());
        match kind {
            ApiKind::Anthropic => {
                if obj
                    .get("mcp_servers")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
                {
                    self.unbounded("`mcp_servers` feed tool results in server-side");
                }
                if present("container") {
                    self.unbounded("a `container` brings server-side files");
                }
            }
            ApiKind::OpenAiChat => {
                if present("web_search_options") {
                    self.unbounded("`web_search_options` add search results to the input");
                }
            }
            ApiKind::OpenAiResponses => {
                // Both at once is a provider error; counting both is safe.
                if present("previous_response_id") {
                    match known.previous_response {
                        Some(tokens) => self.continues(tokens),
                        None => self.unbounded(
                            "`previous_response_id` continues a response this proxy has not metered",
                        ),
                    }
                }
                if present("conversation") {
                    match known.conversation {
                        Some(tokens) => self.continues(tokens),
                        None => self.unbounded(
                            "`conversation` continues a conversation whose size this proxy does not know",
                        ),
                    }
                }
                if present("prompt") {
                    self.unbounded("a stored `prompt` adds server-side text");
                }
            }
        }
        if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
            for tool in tools {
                self.tool(kind, tool);
            }
        }
    }

    fn tool(&mut self, kind: ApiKind, tool: &Value) {
        let Some(kind_field) = tool.get("type").and_then(Value::as_str) else {
            return; // a plain client tool, counted by the walk
        };
        match kind {
            ApiKind::Anthropic => {
                if kind_field == "custom" {
                    return;
                }
                let provider_defined = ["bash_", "text_editor_", "computer_", "memory_"];
                if provider_defined.iter().any(|p| kind_field.starts_with(p)) {
                    self.provider_tools += 1;
                } else {
                    self.unbounded("a server-side tool adds its results to the input");
                }
            }
            ApiKind::OpenAiChat | ApiKind::OpenAiResponses => {
                if !matches!(kind_field, "function" | "custom") {
                    self.unbounded("a hosted tool adds its results to the input");
                }
            }
        }
    }

    /// Counts a value. In `plain` mode (free-form JSON such as a `tool_use`
    /// block's `input`, which the model reads as text) no object is taken for a
    /// media block.
    fn value(&mut self, value: &Value, plain: bool) {
        match value {
            Value::Null => self.add(4),
            Value::Bool(_) => self.add(5),
            Value::Number(n) => self.add(n.to_string().len()),
            Value::String(s) => self.add(s.len()),
            Value::Array(items) => {
                for item in items {
                    self.value(item, plain);
                }
            }
            Value::Object(map) => {
                self.objects += 1;
                if !plain && self.media_block(map) {
                    return;
                }
                let tool_use = map
                    .get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.ends_with("tool_use"));
                for (key, item) in map {
                    self.add(key.len());
                    self.value(item, plain || (tool_use && key == "input"));
                }
            }
        }
    }

    /// Counts an object's fields except `skip` (a media payload, billed by the
    /// image allowance instead of its bytes).
    fn fields_except(&mut self, map: &Map<String, Value>, skip: &str) {
        for (key, item) in map {
            self.add(key.len());
            if key != skip {
                self.value(item, false);
            }
        }
    }

    /// Content blocks billed other than by their bytes. Returns whether the
    /// block has been accounted for (its fields are then not walked again).
    fn media_block(&mut self, block: &Map<String, Value>) -> bool {
        let Some(kind) = block.get("type").and_then(Value::as_str) else {
            return false;
        };
        let nested = |field: &str| block.get(field).and_then(Value::as_object);
        match kind {
            // Anthropic: `{"type":"image","source":{"type":"base64","data":..}}`.
            "image" => {
                self.images += 1;
                self.fields_except(block, "source");
                if let Some(source) = nested("source") {
                    self.fields_except(source, "data");
                }
                true
            }
            // OpenAI chat: `{"type":"image_url","image_url":{"url":..,"detail":..}}`.
            "image_url" => {
                self.images += 1;
                self.fields_except(block, "image_url");
                if let Some(image) = nested("image_url") {
                    self.fields_except(image, "url");
                }
                true
            }
            // Responses: `{"type":"input_image","image_url":"..."}` (or `file_id`).
            "input_image" => {
                self.images += 1;
                self.fields_except(block, "image_url");
                true
            }
            // Anthropic documents: plain text and content blocks are walked;
            // PDFs, URLs and files cannot be bounded from here.
            "document" => {
                let source = nested("source")
                    .and_then(|s| s.get("type"))
                    .and_then(Value::as_str);
                if matches!(source, Some("text" | "content")) {
                    return false;
                }
                self.unbounded("a PDF or file document");
                true
            }
            // OpenAI chat `file`, Responses `input_file`.
            "file" | "input_file" => {
                self.unbounded("a file input");
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn anthropic() -> EstimateConfig {
        EstimateConfig::for_kind(ApiKind::Anthropic)
    }

    fn openai() -> EstimateConfig {
        EstimateConfig::for_kind(ApiKind::OpenAiChat)
    }

    fn est(kind: ApiKind, body: Value) -> RequestEstimate {
        match estimate_request(
            kind,
            &body,
            &EstimateConfig::for_kind(kind),
            &KnownContext::default(),
        ) {
            Ok(e) => e,
            Err(e) => panic!("{body}: {e}"),
        }
    }

    const PROSE: &str = "The quick brown fox jumps over the lazy dog. Tokenizers split common \
        English words into about one token each, so a rule of thumb is four characters per token.";

    #[test]
    fn anthropic_basic() {
        let e = est(
            ApiKind::Anthropic,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 1024,
                "stream": true,
                "system": "You are terse.",
                "messages": [{"role": "user", "content": PROSE}]
            }),
        );
        assert_eq!(e.model, "claude-sonnet-4-5");
        assert_eq!(e.max_output_tokens, 1024);
        assert!(e.stream);
        assert_eq!(e.unbounded_reason, None);
        // Rule of thumb: ~4 characters per token. The bound is far above it.
        let thumb = (PROSE.len() + "You are terse.".len()) as u64 / 4;
        assert!(e.input_tokens_upper_bound >= 4 * thumb + REQUEST_OVERHEAD_TOKENS);
    }

    #[test]
    fn bound_is_at_least_one_token_per_byte_of_text_whatever_the_script() {
        // Worst cases for tokenizers: CJK, emoji, random punctuation, where
        // real counts approach one token per byte.
        for text in [
            "日本語のテキストです。",
            "🦀🚀🔥👍🏽",
            "}{][)(*&^%$#@!~`",
            "a b c d e f",
        ] {
            for reps in [1usize, 10, 1000] {
                let content = text.repeat(reps);
                let e = est(
                    ApiKind::OpenAiChat,
                    json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": content}]}),
                );
                assert!(
                    e.input_tokens_upper_bound >= content.len() as u64,
                    "{text} x{reps}"
                );
            }
        }
    }

    #[test]
    fn bound_grows_with_every_message() {
        let mut messages = Vec::new();
        let mut last = 0;
        for i in 0..20 {
            messages.push(
                json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "ok"}),
            );
            let e = est(
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": 1, "messages": messages}),
            );
            // Each message adds its bytes and its framing allowance.
            assert!(e.input_tokens_upper_bound >= last + 2 + OBJECT_OVERHEAD_TOKENS);
            last = e.input_tokens_upper_bound;
        }
    }

    #[test]
    fn images_count_an_allowance_not_their_bytes() {
        let data = "iVBORw0KGgo".repeat(10_000); // 110 kB of base64
        let image_block = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}});
        let url_block =
            json!({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}});
        let e = est(
            ApiKind::Anthropic,
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [image_block, url_block, {"type": "text", "text": "what is this?"}]}]}),
        );
        assert!(e.input_tokens_upper_bound >= 2 * anthropic().image_tokens);
        assert!(e.input_tokens_upper_bound < 110_000);

        let chat = est(
            ApiKind::OpenAiChat,
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "describe"},
                {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg", "detail": "high"}}
            ]}]}),
        );
        assert!(chat.input_tokens_upper_bound >= openai().image_tokens);
        let responses = est(
            ApiKind::OpenAiResponses,
            json!({"model": "gpt-4.1", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "https://example.com/c.jpg"}
            ]}]}),
        );
        assert!(responses.input_tokens_upper_bound >= openai().image_tokens);
    }

    #[test]
    fn what_the_body_cannot_bound_is_flagged() {
        let cases = [
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]}]}),
                "a PDF or file document",
            ),
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": 1, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}),
                "a server-side tool adds its results to the input",
            ),
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": 1, "messages": [], "mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}]}),
                "`mcp_servers` feed tool results in server-side",
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}]}),
                "a file input",
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "gpt-4o-search-preview", "messages": [], "web_search_options": {}}),
                "`web_search_options` add search results to the input",
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m", "input": "hi", "previous_response_id": "resp_123"}),
                "`previous_response_id` continues a response this proxy has not metered",
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m", "input": "hi", "conversation": "conv_123"}),
                "`conversation` continues a conversation whose size this proxy does not know",
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m", "prompt": {"id": "pmpt_123"}}),
                "a stored `prompt` adds server-side text",
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m", "input": "hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}),
                "a hosted tool adds its results to the input",
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}]}),
                "a file input",
            ),
        ];
        for (kind, body, reason) in cases {
            let e = est(kind, body.clone());
            assert_eq!(e.unbounded_reason, Some(reason), "{body}");
            assert_eq!(
                e.input_tokens_upper_bound,
                EstimateConfig::for_kind(kind).unbounded_input_tokens
            );
        }
    }

    #[test]
    fn a_known_server_side_context_is_added_to_the_body_bound() {
        let cfg = openai();
        let body = json!({"model": "gpt-5", "input": [{"role": "user", "content": "next step"}], "previous_response_id": "resp_1", "max_output_tokens": 4000});
        let fresh = {
            let mut b = body.clone();
            b.as_object_mut().map(|o| o.remove("previous_response_id"));
            est(ApiKind::OpenAiResponses, b)
        };
        for (known, context) in [
            (
                KnownContext {
                    previous_response: Some(50_000),
                    conversation: None,
                },
                50_000,
            ),
            (
                KnownContext {
                    previous_response: Some(0),
                    conversation: None,
                },
                0,
            ),
        ] {
            let e = estimate_request(ApiKind::OpenAiResponses, &body, &cfg, &known)
                .expect("valid request");
            assert_eq!(e.unbounded_reason, None);
            assert_eq!(e.max_output_tokens, 4000);
            // The body's own bound (its bytes, framing, overhead) plus the
            // context it continues, plus the previous output's framing.
            assert!(
                e.input_tokens_upper_bound
                    >= fresh.input_tokens_upper_bound + context + CONTINUATION_OVERHEAD_TOKENS
            );
            assert!(e.input_tokens_upper_bound < cfg.unbounded_input_tokens);
        }
        // The same with a conversation; `truncation: auto` only drops context.
        let conv = json!({"model": "gpt-5", "input": "hi", "conversation": {"id": "conv_1"}, "truncation": "auto"});
        let known = KnownContext {
            previous_response: None,
            conversation: Some(200_000),
        };
        let e = estimate_request(ApiKind::OpenAiResponses, &conv, &cfg, &known).expect("valid");
        assert_eq!(e.unbounded_reason, None);
        assert!(e.input_tokens_upper_bound >= 200_000 + CONTINUATION_OVERHEAD_TOKENS);
        // Known context for a field the body does not set changes nothing.
        let e =
            estimate_request(ApiKind::OpenAiResponses, &fresh_body(), &cfg, &known).expect("valid");
        assert_eq!(e, est(ApiKind::OpenAiResponses, fresh_body()));
    }

    fn fresh_body() -> Value {
        json!({"model": "gpt-5", "input": "hi"})
    }

    #[test]
    fn an_unknown_chain_or_a_stored_prompt_stays_unbounded() {
        let cfg = openai();
        let known = KnownContext {
            previous_response: Some(10),
            conversation: None,
        };
        let cases = [
            (
                json!({"model": "m", "input": "hi", "conversation": "conv_1"}),
                "`conversation` continues a conversation whose size this proxy does not know",
            ),
            (
                json!({"model": "m", "input": "hi", "previous_response_id": "resp_1", "prompt": {"id": "pmpt_1"}}),
                "a stored `prompt` adds server-side text",
            ),
            (
                json!({"model": "m", "input": "hi", "previous_response_id": "resp_1", "tools": [{"type": "web_search"}]}),
                "a hosted tool adds its results to the input",
            ),
        ];
        for (body, reason) in cases {
            let e = estimate_request(ApiKind::OpenAiResponses, &body, &cfg, &known)
                .expect("valid request");
            assert_eq!(e.unbounded_reason, Some(reason), "{body}");
            assert_eq!(e.input_tokens_upper_bound, cfg.unbounded_input_tokens);
        }
    }

    #[test]
    fn a_known_context_is_capped_at_the_window_and_saturates() {
        let cfg = openai();
        let body = json!({"model": "m", "input": "hi", "previous_response_id": "resp_1"});
        for context in [cfg.context_window_tokens, u64::MAX] {
            let known = KnownContext {
                previous_response: Some(context),
                conversation: Some(context),
            };
            let e = estimate_request(ApiKind::OpenAiResponses, &body, &cfg, &known)
                .expect("valid request");
            assert_eq!(e.input_tokens_upper_bound, cfg.context_window_tokens);
        }
    }

    #[test]
    fn a_chain_bound_is_never_below_a_provider_that_bills_the_context_plus_the_prompt() {
        // The provider bills a continued request the context it carries plus
        // its own prompt; the chain record holds the previous answer's input
        // plus output. Walk a 10-step chain, each bound against that bill.
        let cfg = openai();
        let mut context = 0u64; // what the record holds
        let mut previous: Option<String> = None;
        for step in 0..10u64 {
            let text = format!("step {step}: ").repeat(50 * (step as usize + 1));
            let mut body = json!({"model": "gpt-5", "instructions": "be terse", "input": text, "max_output_tokens": 2000});
            if let Some(id) = &previous {
                body["previous_response_id"] = json!(id);
            }
            let known = KnownContext {
                previous_response: previous.as_ref().map(|_| context),
                conversation: None,
            };
            let e = estimate_request(ApiKind::OpenAiResponses, &body, &cfg, &known)
                .expect("valid request");
            assert_eq!(e.unbounded_reason, None, "step {step}");
            // The worst tokenizer: one token per byte of the new text.
            let billed_input = context + text.len() as u64 + "be terse".len() as u64;
            assert!(e.input_tokens_upper_bound >= billed_input, "step {step}");
            let output = 2000; // the most it may write
            context = billed_input + output;
            previous = Some(format!("resp_{step}"));
        }
    }

    #[test]
    fn client_tools_are_bounded() {
        let e = est(
            ApiKind::Anthropic,
            json!({"model": "m", "max_tokens": 1, "messages": [], "tools": [
                {"name": "get_weather", "description": "Get the weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}},
                {"type": "custom", "name": "x", "input_schema": {"type": "object"}},
                {"type": "bash_20250124", "name": "bash"},
                {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}
            ]}),
        );
        assert_eq!(e.unbounded_reason, None);
        assert!(e.input_tokens_upper_bound >= 2 * PROVIDER_TOOL_TOKENS + REQUEST_OVERHEAD_TOKENS);
        let e = est(
            ApiKind::OpenAiResponses,
            json!({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]}),
        );
        assert_eq!(e.unbounded_reason, None);
    }

    #[test]
    fn media_shapes_inside_tool_input_are_counted_as_text() {
        // A tool's input is JSON the model reads as text, whatever it looks like.
        let text = "z".repeat(100_000);
        let e = est(
            ApiKind::Anthropic,
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "save", "input": {"type": "image", "source": {"type": "base64", "data": text}}}
            ]}]}),
        );
        assert!(e.input_tokens_upper_bound >= 100_000);
        // But an image inside a tool result is an image.
        let data = "A".repeat(100_000);
        let e = est(
            ApiKind::Anthropic,
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}
            ]}]}),
        );
        assert!(e.input_tokens_upper_bound < 100_000);
        assert!(e.input_tokens_upper_bound >= anthropic().image_tokens);
    }

    #[test]
    fn text_documents_are_counted_by_their_bytes() {
        let text = "x".repeat(50_000);
        let e = est(
            ApiKind::Anthropic,
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}}]}]}),
        );
        assert_eq!(e.unbounded_reason, None);
        assert!(e.input_tokens_upper_bound >= 50_000);
    }

    #[test]
    fn bound_is_capped_at_the_context_window() {
        let huge = "y".repeat(1_200_000);
        let e = est(
            ApiKind::Anthropic,
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": huge}]}),
        );
        assert_eq!(
            e.input_tokens_upper_bound,
            anthropic().context_window_tokens
        );
    }

    #[test]
    fn max_output_tokens_per_api() {
        let cfg = openai();
        let cases = [
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": 64000}),
                64_000,
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m"}),
                cfg.default_max_output_tokens,
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "max_tokens": 100}),
                100,
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "max_completion_tokens": 300}),
                300,
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "max_completion_tokens": 300, "max_tokens": 500}),
                500,
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "max_completion_tokens": 300, "n": 3}),
                900,
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "max_tokens": null, "n": null}),
                cfg.default_max_output_tokens,
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m", "max_output_tokens": 2048}),
                2048,
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m"}),
                cfg.default_max_output_tokens,
            ),
        ];
        for (kind, body, want) in cases {
            assert_eq!(est(kind, body.clone()).max_output_tokens, want, "{body}");
        }
    }

    #[test]
    fn the_default_output_cap_is_a_parameter() {
        let config = EstimateConfig {
            default_max_output_tokens: 4096,
            ..openai()
        };
        let e = estimate_request(
            ApiKind::OpenAiChat,
            &json!({"model": "m", "n": 2}),
            &config,
            &KnownContext::default(),
        );
        assert_eq!(e.map(|e| e.max_output_tokens), Ok(8192));
    }

    #[test]
    fn bad_requests_are_refused_with_a_clear_message() {
        let cases = [
            (
                ApiKind::Anthropic,
                json!([1, 2]),
                "the request body is not a JSON object: send the request parameters as one JSON object",
            ),
            (
                ApiKind::Anthropic,
                json!("hi"),
                "the request body is not a JSON object: send the request parameters as one JSON object",
            ),
            (
                ApiKind::Anthropic,
                json!({"max_tokens": 1}),
                "the request body has no `model`: name the model to call, e.g. `\"model\": \"claude-sonnet-4-5\"`",
            ),
            (
                ApiKind::OpenAiChat,
                json!({"messages": []}),
                "the request body has no `model`: name the model to call, e.g. `\"model\": \"gpt-4.1\"`",
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": 4}),
                "`model` in the request body must be a non-empty string",
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": " "}),
                "`model` in the request body must be a non-empty string",
            ),
            (
                ApiKind::Anthropic,
                json!({"model": "m"}),
                "`max_tokens` is missing from the request body: the Messages API requires it, and the proxy reserves budget by it",
            ),
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": 0}),
                "`max_tokens` in the request body must be a positive integer",
            ),
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": -5}),
                "`max_tokens` in the request body must be a positive integer",
            ),
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": 1.5}),
                "`max_tokens` in the request body must be a positive integer",
            ),
            (
                ApiKind::Anthropic,
                json!({"model": "m", "max_tokens": "100"}),
                "`max_tokens` in the request body must be a positive integer",
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "n": 0}),
                "`n` in the request body must be a positive integer",
            ),
            (
                ApiKind::OpenAiResponses,
                json!({"model": "m", "max_output_tokens": true}),
                "`max_output_tokens` in the request body must be a positive integer",
            ),
            (
                ApiKind::OpenAiChat,
                json!({"model": "m", "stream": "true"}),
                "`stream` in the request body must be `true` or `false`",
            ),
        ];
        for (kind, body, want) in cases {
            let got = estimate_request(
                kind,
                &body,
                &EstimateConfig::for_kind(kind),
                &KnownContext::default(),
            );
            assert_eq!(
                got.map_err(|e| e.to_string()),
                Err(want.to_owned()),
                "{body}"
            );
        }
    }

    #[test]
    fn output_and_input_saturate_instead_of_overflowing() {
        let e = est(
            ApiKind::OpenAiChat,
            json!({"model": "m", "max_completion_tokens": u64::MAX, "n": 2}),
        );
        assert_eq!(e.max_output_tokens, u64::MAX);
    }
}
