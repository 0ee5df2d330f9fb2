//! The runaway detector: one pure state machine per agent, fed request and
//! answer summaries, returning verdicts with evidence. Owns only bounded
//! per-conversation state (an LRU of recent conversations); must not do I/O,
//! read clocks, or keep raw texts.
//!
//! A step is one request of a conversation. It *grows* the conversation when
//! it equals the previous request's messages plus an appended tail, compared
//! in canonical form (cache markers, provider ids and reasoning blobs left
//! out, see [`Fingerprint::of_message`]), or when it continues the latest
//! answer of the conversation on the provider's side (OpenAI Responses
//! `previous_response_id`, or a `conversation` id): then its own items are
//! the tail, and the chain of answer ids (an LRU per agent) is the
//! conversation. A growing
//! step *fails* when the tail reports a failure (a tool result flagged or
//! reading as an error, user text reading as an error) or the previous answer
//! was an upstream error. A failing step *repeats* when a failure or a tool
//! call of it was already seen in one of the last [`WINDOW`] failing steps of
//! the current run — so A-B-A-B loops count too (failures compare with
//! [`FailureId::same_failure`]). Once a run repeats, every further repeating
//! step is one more failing retry; a failing step that repeats nothing
//! restarts the count, a healthy step or a broken prefix ends the run. A
//! slower second wire counts steps whose tool calls got byte-identical
//! results to the step before, fired back to back; an identical call sent
//! after the agent waited `poll_interval` is a poll, which never trips by
//! count but only once the polls' input tokens exceed `poll_budget_tokens`.
//! Time comes from the summaries (the proxy's monotonic clock).

use std::collections::{HashMap, VecDeque};
use std::fmt;

use serde::Serialize;

use super::config::RunawayConfig;
use super::normalize::Fingerprint;
#[cfg(doc)]
use super::summary::FailureId;
use super::summary::{
    BlockKind, ConversationKey, FailureText, RequestSummary, ResponseSummary, Role, ServerState,
    ToolCall,
};

/// Conversations tracked per agent before the least recently used is dropped.
pub const DEFAULT_CONVERSATIONS: usize = 64;
/// Longest loop period recognised as a repeat (A-B-C-D-A...).
const WINDOW: usize = 4;
/// Steps kept per conversation as evidence.
const HISTORY: usize = 5;
/// Fingerprints kept per failing step; bounds memory on huge fan-outs.
const MAX_MARKS: usize = 16;
/// Tool names kept per evidence step.
const MAX_TOOL_NAMES: usize = 4;
/// Failures kept per failing step for comparison (each holds its line set).
const MAX_FAILURES: usize = 4;
/// Answer ids remembered per tracked conversation slot, for chains.
const ALIASES_PER_CONVERSATION: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TripReason {
    /// Consecutive failing retries with a growing context.
    FailingRetries,
    /// The same tool call answered with a byte-identical result, again and again.
    NoProgress,
    /// Polls with identical answers spent the poll budget.
    PollBudget,
    /// More identical polls in a row than `max_polls`.
    PollCount,
}

/// One step of a conversation as shown in evidence. Never holds a prompt,
/// an id or a secret: sizes, tool names and a normalised failure excerpt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepEvidence {
    /// 1-based position of the step in its conversation chain.
    pub step: u64,
    pub messages: usize,
    /// Messages appended since the previous step.
    pub appended: usize,
    /// Input size estimated from the request body.
    pub estimated_input_tokens: u64,
    /// Estimated growth over the previous step.
    pub growth: i64,
    /// Input tokens the answer reported (incl. cache tokens); `None` until
    /// answered, and for the step that tripped (it was never forwarded).
    pub input_tokens: Option<u64>,
    /// Status of the upstream answer to this step, once known.
    pub status: Option<u16>,
    /// Normalised, truncated (≤ 200 chars) failure this step reported.
    pub failure: Option<String>,
    /// Tool calls the agent made in this step.
    pub tools: Vec<String>,
}

/// Why an agent tripped, and what it was doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    pub reason: TripReason,
    /// Failing retries, identical answers or polls, in a row.
    pub count: u32,
    /// For [`TripReason::PollBudget`]: input tokens the polls spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_tokens: Option<u64>,
    /// The last few steps of the conversation, oldest first, ending with the
    /// step that tripped.
    pub steps: Vec<StepEvidence>,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            TripReason::FailingRetries => write!(
                f,
                "{} failing retries in a row (context grew, failure repeated)",
                self.count
            )?,
            TripReason::NoProgress => write!(
                f,
                "the same tool call got a byte-identical result {} times in a row",
                self.count
            )?,
            TripReason::PollCount => write!(
                f,
                "polled {} times in a row with identical answers (more than `max_polls`)",
                self.count
            )?,
            TripReason::PollBudget => write!(
                f,
                "polled {} times with identical answers, spending ~{} input tokens (the poll budget)",
                self.count,
                self.poll_tokens.unwrap_or(0)
            )?,
        }
        if let (Some(first), Some(last)) = (self.steps.first(), self.steps.last()) {
            write!(
                f,
                "; input ~{} → ~{} tokens over the last {} steps",
                first.estimated_input_tokens,
                last.estimated_input_tokens,
                self.steps.len()
            )?;
        }
        if let Some(failure) = self.steps.iter().rev().find_map(|s| s.failure.as_deref()) {
            write!(f, "; last failure: `{failure}`")?;
        }
        let mut tools: Vec<&str> = self
            .steps
            .iter()
            .flat_map(|s| s.tools.iter().map(String::as_str))
            .collect();
        tools.sort_unstable();
        tools.dedup();
        if !tools.is_empty() {
            write!(f, "; tools: {}", tools.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Tripped(Evidence),
}

impl Verdict {
    pub fn is_tripped(&self) -> bool {
        matches!(self, Verdict::Tripped(_))
    }
}

/// The previous upstream answer, kept until the next step consumes it.
#[derive(Debug, Clone)]
struct Answer {
    error: Option<FailureText>,
    calls: Vec<ToolCall>,
}

#[derive(Debug, Clone)]
struct FailingStep {
    failures: Vec<super::summary::FailureId>,
    calls: Vec<Fingerprint>,
    /// The calls themselves, for [`ToolCall::same_shape`].
    shapes: Vec<ToolCall>,
}

impl FailingStep {
    /// The same call failing again, or the same failure after a call of the
    /// same shape (a retry with a bumped counter or a fresh id) or without
    /// calls. The same failure after a call naming something else (the next
    /// test id, another file) is the agent moving on, not a retry.
    fn repeats(&self, other: &FailingStep) -> bool {
        intersects(&self.calls, &other.calls)
            || ((self.calls.is_empty()
                || other.calls.is_empty()
                || self
                    .shapes
                    .iter()
                    .any(|a| other.shapes.iter().any(|b| a.same_shape(b))))
                && self
                    .failures
                    .iter()
                    .any(|f| other.failures.iter().any(|g| f.same_failure(g))))
    }
}

#[derive(Debug, Default)]
struct Conversation {
    last_used: u64,
    /// Steps seen in the current chain; 0 = nothing seen yet.
    step: u64,
    len: usize,
    last_prefix: Option<Fingerprint>,
    body: Option<Fingerprint>,
    answer: Option<Answer>,
    /// Failing steps of the current run, newest last, at most [`WINDOW`].
    run: VecDeque<FailingStep>,
    failing_retries: u32,
    /// (call, result) pairs of the previous step, sorted.
    observation: Vec<(Fingerprint, Fingerprint)>,
    identical_answers: u32,
    /// Polls in the current run of identical answers, and their input tokens.
    polls: u32,
    poll_tokens: u64,
    /// The latest step was a poll: its answer's tokens count against the budget.
    polling: bool,
    /// When the latest answer ended (proxy ms).
    answered_at: Option<u64>,
    /// Id of the latest answer, which a chained request must continue.
    last_response: Option<Fingerprint>,
    /// The answer the latest request continued (re-sends repeat it).
    continued: Option<Fingerprint>,
    history: VecDeque<StepEvidence>,
}

impl Conversation {
    fn reset_chain(&mut self) {
        let (last_used, last_response) = (self.last_used, self.last_response);
        *self = Self {
            last_used,
            last_response,
            ..Self::default()
        };
    }

    fn clear_counts(&mut self) {
        self.run.clear();
        self.failing_retries = 0;
        self.observation.clear();
        self.identical_answers = 0;
        self.polls = 0;
        self.poll_tokens = 0;
        self.polling = false;
    }

    fn push_history(&mut self, step: StepEvidence) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(step);
    }
}

/// Per-agent runaway detector. The proxy calls [`Detector::observe_request`]
/// before forwarding each request and [`Detector::observe_response`] once the
/// answer (or its stream's summary) is known.
#[derive(Debug)]
pub struct Detector {
    config: RunawayConfig,
    capacity: usize,
    tick: u64,
    conversations: HashMap<ConversationKey, Conversation>,
    /// `ConversationKey::continuing(answer id)` → the conversation it
    /// belongs to, with the tick of its last use; `alias_order` evicts the
    /// least recently used (entries whose tick is stale are skipped).
    aliases: HashMap<ConversationKey, (ConversationKey, u64)>,
    alias_order: VecDeque<(ConversationKey, u64)>,
}

impl Detector {
    pub fn new(config: RunawayConfig) -> Self {
        Self::with_capacity(config, DEFAULT_CONVERSATIONS)
    }

    /// `conversations`: how many conversations to track (at least 1).
    pub fn with_capacity(config: RunawayConfig, conversations: usize) -> Self {
        Self {
            config,
            capacity: conversations.max(1),
            tick: 0,
            conversations: HashMap::new(),
            aliases: HashMap::new(),
            alias_order: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &RunawayConfig {
        &self.config
    }

    /// Applies reloaded settings; tracked conversations keep their counts.
    pub fn set_config(&mut self, config: RunawayConfig) {
        self.config = config;
    }

    /// Forgets every conversation (e.g. on `supervisor release`).
    pub fn reset(&mut self) {
        self.conversations.clear();
        self.aliases.clear();
        self.alias_order.clear();
    }

    pub fn tracked_conversations(&self) -> usize {
        self.conversations.len()
    }

    /// Judges one request before it is forwarded. After a trip the
    /// conversation's counts restart, so with `action: alert` a loop that
    /// goes on trips again after as many steps.
    pub fn observe_request(&mut self, req: &RequestSummary) -> Verdict {
        self.tick += 1;
        let tick = self.tick;
        let RunawayConfig {
            failing_retries,
            no_progress_repeats,
            poll_interval_ms,
            poll_budget_tokens,
            max_polls,
            ..
        } = self.config;
        let key = self.resolve(req.conversation);
        let conv = self.conversation(key);
        conv.last_used = tick;

        let own = req.message_count();
        let last_prefix = req.prefix.last().copied();
        if conv.step > 0 && req.transport_retry > 0 && conv.body == Some(req.body) {
            return Verdict::Healthy;
        }
        let continued = match req.server_state {
            Some(ServerState::PreviousResponse(id)) => Some(id),
            _ => None,
        };
        let (resend, grew) = match req.server_state {
            // The provider holds the history: the request's items are the tail.
            Some(ServerState::PreviousResponse(id)) => (
                conv.step > 0 && conv.continued == Some(id) && conv.body == Some(req.body),
                conv.step > 0 && conv.last_response == Some(id),
            ),
            Some(ServerState::Conversation(_)) => (false, conv.step > 0),
            None => (
                conv.step > 0 && own == conv.len && last_prefix == conv.last_prefix,
                conv.step > 0
                    && conv.len > 0
                    && own > conv.len
                    && conv.last_prefix.is_some()
                    && Some(req.prefix[conv.len - 1]) == conv.last_prefix,
            ),
        };
        if resend {
            // A re-send without growth: neither progress nor a failing retry.
            conv.body = Some(req.body);
            return Verdict::Healthy;
        }
        if !grew {
            conv.reset_chain();
        }
        let stateful = req.server_state.is_some();
        // Tail start in the request's own items, and the chain length after it.
        let (tail_start, n) = match (stateful, grew) {
            (true, true) => (0, conv.len + own),
            (true, false) => (0, own),
            (false, true) => (conv.len, own),
            (false, false) => (0, own),
        };

        let from = tail_start.max(req.recent_start);
        let tail = &req.recent[from - req.recent_start..];
        let answer = conv.answer.take();
        let answer_calls: &[ToolCall] = answer.as_ref().map_or(&[], |a| a.calls.as_slice());

        let mut calls: Vec<&ToolCall> = tail
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .flat_map(|m| &m.blocks)
            .filter(|b| b.kind == BlockKind::ToolUse)
            .filter_map(|b| b.call.as_ref())
            .collect();
        if calls.is_empty() {
            calls = answer_calls.iter().collect();
        }
        let mut failures: Vec<&FailureText> = tail
            .iter()
            .filter(|m| matches!(m.role, Role::User | Role::Tool))
            .flat_map(|m| &m.blocks)
            .filter_map(|b| b.failure.as_ref())
            .collect();
        if let Some(error) = answer.as_ref().and_then(|a| a.error.as_ref()) {
            failures.push(error);
        }
        // Results whose call is not in the request (server-side state) pair
        // with the previous answer's calls by position, never by id.
        let mut unlinked = 0;
        let mut observation: Vec<(Fingerprint, Fingerprint)> = tail
            .iter()
            .flat_map(|m| &m.blocks)
            .filter(|b| b.kind == BlockKind::ToolResult)
            .filter_map(|b| {
                let call = b.call.as_ref().or_else(|| {
                    unlinked += 1;
                    answer_calls.get(unlinked - 1)
                })?;
                Some((call.fingerprint, b.result?))
            })
            .collect();
        observation.sort_unstable();
        observation.dedup();
        let waited = match conv.answered_at {
            Some(at) => req.at_ms.saturating_sub(at),
            None => 0,
        };
        let is_poll = poll_interval_ms > 0 && waited >= poll_interval_ms;

        let previous_estimate = conv.history.back().map(|s| s.estimated_input_tokens);
        let mut tools: Vec<String> = Vec::new();
        for call in &calls {
            if tools.len() < MAX_TOOL_NAMES && !tools.contains(&call.name) {
                tools.push(call.name.clone());
            }
        }
        conv.push_history(StepEvidence {
            step: conv.step + 1,
            messages: n,
            appended: own - tail_start,
            estimated_input_tokens: req.estimated_input_tokens,
            growth: previous_estimate.map_or(0, |p| {
                i64::try_from(req.estimated_input_tokens).unwrap_or(i64::MAX)
                    - i64::try_from(p).unwrap_or(i64::MAX)
            }),
            input_tokens: None,
            status: None,
            failure: failures.first().map(|f| f.excerpt.clone()),
            tools,
        });
        conv.step += 1;
        conv.len = n;
        conv.last_prefix = if stateful { None } else { last_prefix };
        conv.continued = continued;
        conv.body = Some(req.body);
        conv.polling = false;
        if !grew {
            return Verdict::Healthy;
        }

        let mut tripped = None;
        if failures.is_empty() {
            conv.run.clear();
            conv.failing_retries = 0;
        } else {
            let step = FailingStep {
                failures: failures
                    .iter()
                    .take(MAX_FAILURES)
                    .map(|f| f.id.clone())
                    .collect(),
                calls: calls
                    .iter()
                    .map(|c| c.fingerprint)
                    .take(MAX_MARKS)
                    .collect(),
                shapes: calls.iter().take(MAX_MARKS).map(|c| (*c).clone()).collect(),
            };
            let period = conv
                .run
                .iter()
                .rev()
                .enumerate()
                .find(|(_, prev)| prev.repeats(&step))
                .map(|(i, prev)| (i as u32 + 1, intersects(&prev.calls, &step.calls)));
            conv.failing_retries = match period {
                // The first repeat proves the steps since the repeated one
                // were retries already — for a long period only when the
                // call came back too: a failure recurring after different
                // calls failing differently (a full test run, each test
                // alone, then `--lf`) is one repeat, not a loop's worth.
                Some((p, same_call)) if conv.failing_retries == 0 => {
                    if p <= 2 || same_call {
                        p
                    } else {
                        1
                    }
                }
                Some(_) => conv.failing_retries + 1,
                None => 0,
            };
            if conv.run.len() == WINDOW {
                conv.run.pop_front();
            }
            conv.run.push_back(step);
            if conv.failing_retries >= failing_retries.max(1) {
                tripped = Some((TripReason::FailingRetries, conv.failing_retries));
            }
        }

        if !observation.is_empty() && observation == conv.observation {
            if is_poll && conv.polls < max_polls {
                // The agent waited: polling, capped by its cost and a
                // generous count (the wait may be a slow tool, not a sleep).
                conv.polls += 1;
                conv.polling = true;
                conv.identical_answers = 1;
            } else if is_poll {
                tripped = tripped.or(Some((TripReason::PollCount, conv.polls + 1)));
            } else {
                conv.identical_answers += 1;
            }
        } else {
            conv.identical_answers = u32::from(!observation.is_empty());
            conv.observation = observation;
            conv.polls = 0;
            conv.poll_tokens = 0;
        }
        if tripped.is_none() && conv.identical_answers >= no_progress_repeats.max(2) {
            tripped = Some((TripReason::NoProgress, conv.identical_answers));
        }
        if tripped.is_none() && conv.polling && conv.poll_tokens >= poll_budget_tokens {
            tripped = Some((TripReason::PollBudget, conv.polls));
        }

        match tripped {
            None => Verdict::Healthy,
            Some((reason, count)) => {
                let poll_tokens = (reason == TripReason::PollBudget).then_some(conv.poll_tokens);
                conv.clear_counts();
                Verdict::Tripped(Evidence {
                    reason,
                    count,
                    poll_tokens,
                    steps: conv.history.iter().cloned().collect(),
                })
            }
        }
    }

    /// Records the upstream answer to the last request of `conversation`:
    /// its status, error and tool calls feed the next step; its usage fills
    /// in the evidence (and the poll budget); its id continues the chain.
    /// Unknown (evicted) conversations are ignored.
    pub fn observe_response(&mut self, conversation: ConversationKey, resp: &ResponseSummary) {
        let key = self.resolve(conversation);
        let Some(conv) = self.conversations.get_mut(&key) else {
            return;
        };
        let error = resp.is_error().then(|| {
            resp.error.clone().unwrap_or_else(|| {
                FailureText::from_text(&format!(
                    "{} {}",
                    resp.status,
                    resp.error_type.as_deref().unwrap_or("")
                ))
            })
        });
        conv.answer = Some(Answer {
            error,
            calls: resp.tool_calls.clone(),
        });
        conv.answered_at = resp.at_ms.or(conv.answered_at);
        if let Some(last) = conv.history.back_mut() {
            last.status = Some(resp.status);
            if let Some(usage) = resp.usage {
                last.input_tokens = Some(usage.total());
            }
            if conv.polling {
                // Charged by what the poll cost: a cached context is cheap.
                let spent = resp
                    .usage
                    .map_or(last.estimated_input_tokens, |u| u.billed());
                conv.poll_tokens = conv.poll_tokens.saturating_add(spent);
            }
        }
        if let Some(id) = resp.response_id {
            conv.last_response = Some(id);
            self.alias(ConversationKey::continuing(id), key);
        }
    }

    /// The conversation a request key stands for: a chained request's key
    /// (`continuing(id)`) maps to the conversation of answer `id`.
    fn resolve(&mut self, key: ConversationKey) -> ConversationKey {
        self.tick += 1;
        let tick = self.tick;
        match self.aliases.get_mut(&key) {
            Some((target, used)) => {
                *used = tick;
                let target = *target;
                self.alias_order.push_back((key, tick));
                self.trim_aliases();
                target
            }
            None => key,
        }
    }

    fn alias(&mut self, from: ConversationKey, to: ConversationKey) {
        self.tick += 1;
        self.aliases.insert(from, (to, self.tick));
        self.alias_order.push_back((from, self.tick));
        self.trim_aliases();
    }

    /// Drops least recently used aliases beyond the bound; also compacts the
    /// order queue, which holds one entry per use.
    fn trim_aliases(&mut self) {
        let cap = self.capacity * ALIASES_PER_CONVERSATION;
        while self.aliases.len() > cap || self.alias_order.len() > 2 * cap {
            let Some((key, tick)) = self.alias_order.pop_front() else {
                break;
            };
            if self
                .aliases
                .get(&key)
                .is_some_and(|(_, used)| *used == tick)
            {
                if self.aliases.len() > cap {
                    self.aliases.remove(&key);
                } else {
                    // Still live and within the bound: keep it, re-queued.
                    self.alias_order.push_back((key, tick));
                    if self.alias_order.len() <= 2 * cap {
                        break;
                    }
                }
            }
        }
    }

    /// The state of `key`, evicting the least recently used conversation
    /// when a new one does not fit. O(capacity) only on insertion.
    fn conversation(&mut self, key: ConversationKey) -> &mut Conversation {
        if !self.conversations.contains_key(&key) && self.conversations.len() >= self.capacity {
            let oldest = self
                .conversations
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.conversations.remove(&oldest);
            }
        }
        self.conversations.entry(key).or_default()
    }
}

fn intersects(a: &[Fingerprint], b: &[Fingerprint]) -> bool {
    a.iter().any(|x| b.contains(x))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::runaway::summary::{Api, InputUsage};

    /// An Anthropic conversation the test appends turns to.
    struct Chat {
        body: Value,
        calls: usize,
    }

    impl Chat {
        fn new(first: &str) -> Self {
            Self {
                body: json!({"model": "claude-sonnet-4-5", "max_tokens": 512,
                    "system": "You keep notes.", "messages": [{"role": "user", "content": first}]}),
                calls: 0,
            }
        }

        fn push(&mut self, message: Value) {
            self.body["messages"].as_array_mut().unwrap().push(message);
        }

        /// Appends one tool call and its result.
        fn tool(&mut self, name: &str, args: Value, result: &str, is_error: bool) {
            self.calls += 1;
            let id = format!("toolu_{:04}", self.calls);
            self.push(json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": id, "name": name, "input": args}]}));
            self.push(json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": id, "content": result, "is_error": is_error}]}));
        }

        fn summary(&self, retry: u32) -> RequestSummary {
            RequestSummary::from_json(Api::AnthropicMessages, &self.body, retry).unwrap()
        }
    }

    fn ok_answer() -> ResponseSummary {
        ResponseSummary {
            status: 200,
            usage: Some(InputUsage {
                input_tokens: 100,
                ..InputUsage::default()
            }),
            ..ResponseSummary::default()
        }
    }

    /// Observes the chat's current request and a 200 answer.
    fn step(d: &mut Detector, chat: &Chat) -> Verdict {
        let s = chat.summary(0);
        let v = d.observe_request(&s);
        d.observe_response(s.conversation, &ok_answer());
        v
    }

    fn detector() -> Detector {
        Detector::new(RunawayConfig::default())
    }

    /// Runs a failing loop; returns the 1-based failing step that tripped.
    fn failing_loop(d: &mut Detector, chat: &mut Chat, results: &[&str]) -> Option<usize> {
        for (i, result) in results.iter().enumerate() {
            chat.tool("read_notes", json!({"path": "notes.md"}), result, true);
            if step(d, chat).is_tripped() {
                return Some(i + 1);
            }
        }
        None
    }

    #[test]
    fn repeated_failure_trips_after_failing_retries() {
        let mut d = detector();
        let mut chat = Chat::new("summarise");
        assert_eq!(step(&mut d, &chat), Verdict::Healthy);
        let results = vec!["malformed JSON at byte 17 (req 8a7f)"; 10];
        assert_eq!(failing_loop(&mut d, &mut chat, &results), Some(5));
    }

    #[test]
    fn same_failure_after_calls_naming_other_things_is_progress() {
        // Each call names another test; the failure text does not say which.
        let mut d = detector();
        let mut chat = Chat::new("find the failing tests");
        assert_eq!(step(&mut d, &chat), Verdict::Healthy);
        for n in 1..=40 {
            let args = json!({"args": format!("tests/test_api.py::test_case_{n}"), "timeout": 60});
            chat.tool(
                "run_tests",
                args,
                "E       assert 200 == 404\n1 failed in 0.12s",
                true,
            );
            assert_eq!(step(&mut d, &chat), Verdict::Healthy, "call {n}");
        }
        // The same failure after calls that differ only by a counter or a
        // respelling is a retry loop, and trips as before.
        let mut d = detector();
        let mut chat = Chat::new("export");
        assert_eq!(step(&mut d, &chat), Verdict::Healthy);
        let mut tripped = None;
        for n in 1..=9 {
            let spelling = if n % 2 == 0 {
                "orders"
            } else {
                "--table orders"
            };
            let args = json!({"table": spelling, "chunk": n, "request": format!("req_{n:04}")});
            chat.tool(
                "start_export",
                args,
                "OSError: No space left on device",
                true,
            );
            if step(&mut d, &chat).is_tripped() {
                tripped = Some(n);
                break;
            }
        }
        assert_eq!(tripped, Some(5));
    }

    #[test]
    fn failing_retries_is_configurable() {
        for n in 1..=6u32 {
            let mut d = Detector::new(RunawayConfig {
                failing_retries: n,
                ..RunawayConfig::default()
            });
            let mut chat = Chat::new("summarise");
            step(&mut d, &chat);
            let results = vec!["boom: invalid output"; 20];
            assert_eq!(
                failing_loop(&mut d, &mut chat, &results),
                Some(n as usize + 1)
            );
        }
    }

    #[test]
    fn evidence_is_bounded_and_normalised() {
        let mut d = detector();
        let mut chat = Chat::new("summarise");
        step(&mut d, &chat);
        let mut verdict = Verdict::Healthy;
        for i in 0..5 {
            chat.tool(
                "read_notes",
                json!({}),
                &format!(
                    "malformed output, trace id sk-{i}abc999 {}",
                    "x".repeat(300)
                ),
                true,
            );
            verdict = step(&mut d, &chat);
        }
        let Verdict::Tripped(e) = verdict else {
            panic!("expected a trip")
        };
        assert_eq!(e.reason, TripReason::FailingRetries);
        assert_eq!(e.count, 4);
        assert_eq!(e.steps.len(), HISTORY);
        let last = e.steps.last().unwrap();
        assert_eq!(last.tools, ["read_notes"]);
        assert_eq!(last.appended, 2);
        assert!(last.growth > 0);
        assert_eq!(
            last.input_tokens, None,
            "the tripping step was never answered"
        );
        assert_eq!(e.steps[0].input_tokens, Some(100));
        let failure = last.failure.as_deref().unwrap();
        assert!(failure.chars().count() <= 201);
        assert!(
            failure.starts_with("malformed output, trace id sk-#"),
            "{failure}"
        );
        let text = e.to_string();
        assert!(text.starts_with("4 failing retries in a row"), "{text}");
        assert!(!text.contains("abc999"), "{text}");
    }

    #[test]
    fn changing_ids_and_timestamps_still_repeat() {
        let mut d = detector();
        let mut chat = Chat::new("sync");
        step(&mut d, &chat);
        for i in 0..5 {
            chat.tool(
                "fetch",
                json!({"page": i}), // a different call each time
                &format!(
                    "Error: request req_{i:x}9f failed at 2025-03-0{}T10:{i:02}:00Z",
                    i + 1
                ),
                false,
            );
            let v = step(&mut d, &chat);
            assert_eq!(v.is_tripped(), i == 4, "step {i}");
        }
    }

    #[test]
    fn alternating_failures_trip_as_fast_as_a_simple_loop() {
        let mut d = detector();
        let mut chat = Chat::new("deploy");
        step(&mut d, &chat);
        let mut tripped_at = None;
        for i in 0..8 {
            let (tool, err) = if i % 2 == 0 {
                ("build", "build failed: missing file")
            } else {
                ("lint", "lint exception: bad config")
            };
            chat.tool(tool, json!({}), err, true);
            if step(&mut d, &chat).is_tripped() {
                tripped_at = Some(i + 1);
                break;
            }
        }
        assert_eq!(tripped_at, Some(5));
    }

    const NATO: [&str; 20] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
        "sierra", "tango",
    ];

    #[test]
    fn distinct_failures_or_a_success_restart_the_count() {
        let mut d = detector();
        let mut chat = Chat::new("explore");
        step(&mut d, &chat);
        for i in 0..20 {
            // Every failure is new, every call is new: exploration, not a loop.
            chat.tool(
                &format!("tool_{}", char::from(b'a' + i)),
                json!({}),
                &format!("{} failed", NATO[i as usize]),
                true,
            );
            assert!(!step(&mut d, &chat).is_tripped(), "step {i}");
        }
        for _ in 0..10 {
            // Three repeats, then a success: never reaches four.
            for _ in 0..3 {
                chat.tool("read_notes", json!({}), "malformed", true);
                assert!(!step(&mut d, &chat).is_tripped());
            }
            chat.tool("read_notes", json!({}), "3 notes read", false);
            assert!(!step(&mut d, &chat).is_tripped());
        }
    }

    #[test]
    fn upstream_errors_count_as_failures() {
        let mut d = detector();
        let mut chat = Chat::new("go");
        let mut tripped_at = None;
        for i in 0..8 {
            let s = chat.summary(0);
            if d.observe_request(&s).is_tripped() {
                tripped_at = Some(i);
                break;
            }
            let answer = ResponseSummary::from_json(
                Api::AnthropicMessages,
                400,
                &json!({"type": "error", "error": {"type": "invalid_request_error",
                    "message": format!("messages.{}: unexpected `tool_use_id`", 2 * i + 1)}}),
            );
            d.observe_response(s.conversation, &answer);
            chat.push(json!({"role": "user", "content": "Please try again."}));
        }
        // Request 0 gets the first 400; requests 1..=4 repeat it.
        assert_eq!(tripped_at, Some(5));
    }

    #[test]
    fn compaction_starts_a_fresh_chain() {
        let mut d = detector();
        let mut chat = Chat::new("summarise");
        step(&mut d, &chat);
        assert_eq!(failing_loop(&mut d, &mut chat, &["malformed"; 3]), None);
        // Compaction: the history is replaced by a summary; the key stays.
        let mut compacted = Chat::new("summarise");
        compacted
            .push(json!({"role": "assistant", "content": "Summary so far: notes unreadable."}));
        compacted.push(json!({"role": "user", "content": "Continue."}));
        assert!(!step(&mut d, &compacted).is_tripped());
        // The old streak is gone: it takes a full new run to trip.
        assert_eq!(
            failing_loop(&mut d, &mut compacted, &["malformed"; 10]),
            Some(5)
        );
    }

    #[test]
    fn prefix_must_match_to_count_as_growth() {
        let mut d = detector();
        let mut chat = Chat::new("summarise");
        step(&mut d, &chat);
        for i in 0..10 {
            // The agent rewrites an earlier message each time: never a clean
            // "previous + tail", so never a failing retry.
            chat.body["messages"][0]["content"] = json!("summarise");
            chat.tool("read_notes", json!({}), "malformed", true);
            let msgs = chat.body["messages"].as_array_mut().unwrap();
            let n = msgs.len();
            msgs[n - 3] = json!({"role": "user", "content": format!("edited {i}")});
            assert!(!step(&mut d, &chat).is_tripped(), "step {i}");
        }
    }

    #[test]
    fn transport_retries_are_ignored() {
        let mut d = detector();
        let mut chat = Chat::new("summarise");
        step(&mut d, &chat);
        for _ in 0..3 {
            chat.tool("read_notes", json!({}), "malformed", true);
            assert!(!step(&mut d, &chat).is_tripped());
        }
        // The SDK resends the identical body many times: no effect.
        for retry in 1..=10 {
            assert!(!d.observe_request(&chat.summary(retry)).is_tripped());
        }
        // The loop's own count was kept: retries 3 and 4 trip as before.
        chat.tool("read_notes", json!({}), "malformed", true);
        assert!(!step(&mut d, &chat).is_tripped());
        chat.tool("read_notes", json!({}), "malformed", true);
        assert!(step(&mut d, &chat).is_tripped());
    }

    #[test]
    fn no_progress_trips_on_byte_identical_results() {
        let mut d = detector();
        let mut chat = Chat::new("wait for the job");
        step(&mut d, &chat);
        let mut tripped = None;
        for i in 1..=12 {
            chat.tool("poll_job", json!({"id": 42}), "status: pending", false);
            if let Verdict::Tripped(e) = step(&mut d, &chat) {
                tripped = Some((i, e.reason, e.count));
                break;
            }
        }
        assert_eq!(tripped, Some((8, TripReason::NoProgress, 8)));
    }

    #[test]
    fn polling_with_changing_results_is_healthy() {
        let mut d = detector();
        let mut chat = Chat::new("wait for the job");
        step(&mut d, &chat);
        for i in 1..=40 {
            chat.tool(
                "poll_job",
                json!({"id": 42}),
                &format!("status: running, {i}% done"),
                false,
            );
            assert!(!step(&mut d, &chat).is_tripped(), "poll {i}");
        }
    }

    #[test]
    fn parallel_conversations_are_independent() {
        let mut d = detector();
        let mut a = Chat::new("task a");
        let mut b = Chat::new("task b");
        step(&mut d, &a);
        step(&mut d, &b);
        for i in 0..4 {
            a.tool("read_notes", json!({}), "malformed", true);
            assert!(!step(&mut d, &a).is_tripped(), "a {i}");
            b.tool(
                "search",
                json!({"q": i}),
                &format!("result {i}: found {} docs", i * 7 + 1),
                false,
            );
            assert!(!step(&mut d, &b).is_tripped(), "b {i}");
        }
        assert_eq!(d.tracked_conversations(), 2);
        a.tool("read_notes", json!({}), "malformed", true);
        assert!(step(&mut d, &a).is_tripped(), "a's fifth failing call");
    }

    #[test]
    fn lru_evicts_the_least_recently_used_conversation() {
        let mut d = Detector::with_capacity(RunawayConfig::default(), 3);
        let mut looping = Chat::new("looping");
        step(&mut d, &looping);
        assert_eq!(failing_loop(&mut d, &mut looping, &["malformed"; 3]), None);
        for i in 0..3 {
            step(&mut d, &Chat::new(&format!("other {i}")));
            assert!(d.tracked_conversations() <= 3);
        }
        assert_eq!(d.tracked_conversations(), 3);
        // `looping` was evicted: its next request starts a fresh chain, and
        // the loop needs a full failing_retries + 1 calls again.
        looping.tool("read_notes", json!({}), "malformed", true);
        assert!(!step(&mut d, &looping).is_tripped());
        assert_eq!(
            failing_loop(&mut d, &mut looping, &["malformed"; 10]),
            Some(5)
        );

        // Recently used conversations survive.
        let mut d = Detector::with_capacity(RunawayConfig::default(), 2);
        let mut kept = Chat::new("kept");
        step(&mut d, &kept);
        assert_eq!(failing_loop(&mut d, &mut kept, &["malformed"; 3]), None);
        step(&mut d, &Chat::new("x"));
        step(&mut d, &kept);
        step(&mut d, &Chat::new("y"));
        assert_eq!(failing_loop(&mut d, &mut kept, &["malformed"; 10]), Some(2));
    }

    /// One Responses request continuing `prev` with a failing output; the
    /// answer (a call, with id `resp_{n}`) is observed `latency` ms later.
    fn chain_step(d: &mut Detector, prev: Option<&str>, n: u32, output: &str) -> Verdict {
        let mut body = json!({"model": "gpt-4.1", "instructions": "Sync.", "input": [
            {"type": "function_call_output", "call_id": format!("call_{n}"), "output": output}]});
        match prev {
            Some(p) => body["previous_response_id"] = json!(p),
            None => body["input"] = json!([{"role": "user", "content": "Sync now."}]),
        }
        let s = RequestSummary::from_json(Api::OpenAiResponses, &body, 0).unwrap();
        let v = d.observe_request(&s);
        let answer = json!({"id": format!("resp_{n}"), "output": [
            {"type": "function_call", "call_id": format!("call_{}", n + 1), "name": "sync", "arguments": "{}"}],
            "usage": {"input_tokens": 100 * u64::from(n + 1)}});
        d.observe_response(
            s.conversation,
            &ResponseSummary::from_json(Api::OpenAiResponses, 200, &answer),
        );
        v
    }

    #[test]
    fn previous_response_id_chains_are_one_conversation() {
        let mut d = detector();
        assert!(!chain_step(&mut d, None, 0, "").is_tripped());
        let mut tripped_at = None;
        for n in 1..10 {
            let prev = format!("resp_{}", n - 1);
            if chain_step(&mut d, Some(&prev), n, "sync failed: invalid calendar id").is_tripped() {
                tripped_at = Some(n);
                break;
            }
        }
        assert_eq!(tripped_at, Some(5), "failing_retries + 1 looping calls");
        assert_eq!(d.tracked_conversations(), 1);

        // A healthy chain never trips, and forking from an older answer
        // starts a fresh chain rather than counting.
        let mut d = detector();
        chain_step(&mut d, None, 0, "");
        for n in 1..45 {
            let prev = format!("resp_{}", n - 1);
            let out = format!(
                "synced team {}",
                ["a", "b", "c", "d", "e", "f", "g"][n as usize % 7]
            );
            assert!(
                !chain_step(&mut d, Some(&prev), n, &out).is_tripped(),
                "{n}"
            );
        }
        for n in 100..110 {
            assert!(
                !chain_step(&mut d, Some("resp_3"), n, "sync failed").is_tripped(),
                "{n}"
            );
        }
    }

    #[test]
    fn chain_aliases_are_bounded() {
        let mut d = Detector::with_capacity(RunawayConfig::default(), 2);
        chain_step(&mut d, None, 0, "");
        for n in 1..500 {
            let prev = format!("resp_{}", n - 1);
            chain_step(&mut d, Some(&prev), n, &format!("page {n} synced"));
        }
        assert!(d.aliases.len() <= 2 * ALIASES_PER_CONVERSATION);
        assert!(d.alias_order.len() <= 4 * ALIASES_PER_CONVERSATION + 1);
        assert_eq!(
            d.tracked_conversations(),
            1,
            "the chain stayed one conversation"
        );
    }

    /// Polls `n` times with a byte-identical answer, `wait_ms` after each
    /// answer; returns the 1-based poll that tripped, with the reason.
    fn poll(d: &mut Detector, n: u32, wait_ms: u64) -> Option<(u32, TripReason)> {
        let mut chat = Chat::new("wait for CI");
        let mut clock = 0;
        for i in 1..=n {
            chat.tool(
                "get_ci_status",
                json!({"pr": 4821}),
                "status: pending",
                false,
            );
            clock += wait_ms;
            let s = chat.summary(0).at(clock);
            let v = d.observe_request(&s);
            clock += 900;
            d.observe_response(
                s.conversation,
                &ResponseSummary {
                    at_ms: Some(clock),
                    ..ok_answer()
                },
            );
            if let Verdict::Tripped(e) = v {
                return Some((i, e.reason));
            }
        }
        None
    }

    #[test]
    fn polls_with_waits_never_trip_by_count_but_by_budget() {
        assert_eq!(poll(&mut detector(), 60, 5_000), None, "a poller waits");
        assert_eq!(
            poll(&mut detector(), 60, 150),
            Some((9, TripReason::NoProgress)),
            "back to back is no progress"
        );
        let mut d = Detector::new(RunawayConfig {
            poll_budget_tokens: 1_000,
            ..RunawayConfig::default()
        });
        // Call 1 starts the conversation, call 2 is the first answer seen,
        // calls 3.. are polls; each answer reports 100 input tokens, so call
        // 13 finds the 1,000-token budget spent.
        assert_eq!(poll(&mut d, 60, 5_000), Some((13, TripReason::PollBudget)));
        let mut d = Detector::new(RunawayConfig {
            poll_interval_ms: 0,
            ..RunawayConfig::default()
        });
        assert_eq!(
            poll(&mut d, 60, 5_000),
            Some((9, TripReason::NoProgress)),
            "poll_interval 0 turns polling off"
        );
    }

    #[test]
    fn resend_without_growth_is_neutral_and_reset_forgets() {
        let mut d = detector();
        let mut chat = Chat::new("summarise");
        step(&mut d, &chat);
        assert_eq!(failing_loop(&mut d, &mut chat, &["malformed"; 3]), None);
        for _ in 0..5 {
            assert!(!step(&mut d, &chat).is_tripped(), "identical re-send");
        }
        assert_eq!(failing_loop(&mut d, &mut chat, &["malformed"; 10]), Some(2));
        d.reset();
        assert_eq!(d.tracked_conversations(), 0);
    }
}
