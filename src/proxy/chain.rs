//! What the proxy knows of OpenAI Responses server-side state, per agent: how
//! many tokens of context an answer id (`previous_response_id`) or a
//! `conversation` id carries, learned from the usage of the answers it metered.
//! A continued request's input is then that context plus its own body, which
//! lets the estimate bound it instead of assuming a whole context window.
//!
//! Why the recorded context is never below what a continuation reads:
//! - An answer's `input_tokens` counted its whole input (the context it
//!   continued, its own items, instructions, tools) and `output_tokens` its
//!   whole output (reasoning included); the state a continuation starts from is
//!   those input items and output items, so their sum bounds it. Instructions
//!   and tools are not carried over (slack). The output items' framing, which
//!   `output_tokens` does not count, is added by the estimate
//!   (`estimate::CONTINUATION_OVERHEAD_TOKENS`).
//! - An answer id names immutable state: its context never changes.
//! - A conversation grows with every answer in it, so its context is known only
//!   while no request on it is in flight, and is learned only from an answer
//!   that had the conversation to itself (of two overlapping requests, each may
//!   miss what the other adds: their answers forget it). Anything but a
//!   complete answer with exact usage, or a refusal before any work (4xx
//!   without usage), forgets it too.
//! - `store: false` answers are not recorded: the provider keeps nothing to
//!   continue.
//!
//! Unknown ids (a chain begun before a restart, elsewhere, or evicted) are
//! `None`: the estimate keeps its conservative fallback. Pure state with a
//! bounded LRU per map; must not do I/O or parse answers (the usage tap does).

use std::collections::HashMap;

use serde_json::Value;

use super::usage::{ApiKind, Outcome, TapReport, Usage};

/// Answer ids and conversations remembered per agent (each).
pub const DEFAULT_CAPACITY: usize = 4096;
/// Longest id remembered; a longer one is never recorded, so never known.
const MAX_ID_BYTES: usize = 256;

/// The server-side state a request continues, read from its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainRefs {
    pub previous_response_id: Option<String>,
    pub conversation: Option<String>,
    /// `store` (default `true`): whether the provider keeps this answer.
    pub store: bool,
}

impl ChainRefs {
    /// The refs of a Responses request; none for other APIs. `conversation`
    /// is an id or `{"id": ...}`.
    pub fn of(kind: ApiKind, body: &Value) -> Self {
        let Some(obj) = body
            .as_object()
            .filter(|_| kind == ApiKind::OpenAiResponses)
        else {
            return Self::default();
        };
        let id = |v: Option<&Value>| match v {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let conversation = match obj.get("conversation") {
            Some(Value::Object(c)) => id(c.get("id")),
            other => id(other),
        };
        Self {
            previous_response_id: id(obj.get("previous_response_id")),
            conversation,
            store: !matches!(obj.get("store"), Some(Value::Bool(false))),
        }
    }
}

/// The context tokens known for a request's refs; `None` where unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KnownContext {
    pub previous_response: Option<u64>,
    pub conversation: Option<u64>,
}

/// How a request that began on the record ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainEnd {
    /// A complete answer with exact usage: its id (if it has one) and the
    /// context it leaves (all its input plus all its output).
    Answered { id: Option<String>, context: u64 },
    /// The provider did no work on it (never sent, or refused with a 4xx and
    /// no usage): any state it named is unchanged.
    Unchanged,
    /// Anything else (cut, errored mid-answer, 5xx): a conversation it
    /// continued may have grown by an unknown amount.
    Unknown,
}

impl ChainEnd {
    /// How an answer ended, for the record: `status` is `None` when no
    /// answer began, `exact` its usage when upstream reported it in full on
    /// a success.
    pub fn of(status: Option<u16>, exact: Option<Usage>, report: &TapReport) -> Self {
        match (status, exact) {
            (Some(_), Some(u)) if report.outcome == Outcome::Completed => Self::Answered {
                id: report.response_id.clone(),
                context: u.total(),
            },
            // Refused before any work: nothing was added.
            (Some(400..=499), None) if report.usage.seen().is_none() => Self::Unchanged,
            _ => Self::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Conversation {
    context: Option<u64>,
    in_flight: u32,
    /// Two requests overlapped on it since it was last idle: each may have
    /// missed what the other added, so no answer of theirs gives its size.
    contended: bool,
    tick: u64,
    /// The tick it was created at: a request begun on an entry since evicted
    /// must not end on its successor.
    generation: u64,
}

/// What [`ChainRecord::begin`] hands out and [`ChainRecord::end`] takes back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Begun {
    pub known: KnownContext,
    conversation_generation: Option<u64>,
}

/// One agent's record.
#[derive(Debug)]
pub struct ChainRecord {
    capacity: usize,
    tick: u64,
    responses: HashMap<String, (u64, u64)>,
    conversations: HashMap<String, Conversation>,
}

impl Default for ChainRecord {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl ChainRecord {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            tick: 0,
            responses: HashMap::new(),
            conversations: HashMap::new(),
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// A request with `refs` is about to be estimated: what is known of its
    /// context. Marks its conversation in flight until [`Self::end`], so
    /// the lookup and the mark are one step.
    pub fn begin(&mut self, refs: &ChainRefs) -> Begun {
        let tick = self.next_tick();
        let previous_response = refs.previous_response_id.as_ref().and_then(|id| {
            let entry = self.responses.get_mut(id)?;
            entry.1 = tick;
            Some(entry.0)
        });
        let mut conversation = None;
        let mut conversation_generation = None;
        if let Some(id) = refs
            .conversation
            .as_ref()
            .filter(|id| id.len() <= MAX_ID_BYTES)
        {
            let conv = self.conversation(id, tick);
            if conv.in_flight == 0 {
                conversation = conv.context;
            } else {
                conv.contended = true;
            }
            conv.in_flight = conv.in_flight.saturating_add(1);
            conversation_generation = Some(conv.generation);
        }
        Begun {
            known: KnownContext {
                previous_response,
                conversation,
            },
            conversation_generation,
        }
    }

    /// Records how a request begun with `refs` (handed `begun`) ended.
    pub fn end(&mut self, refs: &ChainRefs, begun: Begun, end: &ChainEnd) {
        let tick = self.next_tick();
        if let ChainEnd::Answered {
            id: Some(id),
            context,
        } = end
            && refs.store
            && id.len() <= MAX_ID_BYTES
        {
            if !self.responses.contains_key(id) && self.responses.len() >= self.capacity {
                evict_oldest(&mut self.responses, |e| e.1);
            }
            self.responses.insert(id.clone(), (*context, tick));
        }
        let (Some(id), Some(generation)) = (&refs.conversation, begun.conversation_generation)
        else {
            return;
        };
        // Evicted while in flight: nothing to end.
        let Some(conv) = self
            .conversations
            .get_mut(id)
            .filter(|c| c.generation == generation)
        else {
            return;
        };
        conv.in_flight = conv.in_flight.saturating_sub(1);
        conv.tick = tick;
        match end {
            _ if conv.contended => conv.context = None,
            // It was alone on the conversation: its input read all of it.
            ChainEnd::Answered { context, .. } => conv.context = Some(*context),
            ChainEnd::Unchanged => {}
            ChainEnd::Unknown => conv.context = None,
        }
        if conv.in_flight == 0 {
            conv.contended = false;
        }
    }

    /// The conversation `id`, created (unknown context) if new, evicting
    /// the least recently used idle one when full.
    fn conversation(&mut self, id: &str, tick: u64) -> &mut Conversation {
        if !self.conversations.contains_key(id) && self.conversations.len() >= self.capacity {
            // Prefer an idle conversation: forgetting one in flight only
            // loses its next figure, but keep that rare.
            let idle = self
                .conversations
                .iter()
                .filter(|(_, c)| c.in_flight == 0)
                .min_by_key(|(_, c)| c.tick)
                .map(|(k, _)| k.clone());
            match idle {
                Some(k) => {
                    self.conversations.remove(&k);
                }
                None => evict_oldest(&mut self.conversations, |c| c.tick),
            }
        }
        let conv = self
            .conversations
            .entry(id.to_owned())
            .or_insert(Conversation {
                context: None,
                in_flight: 0,
                contended: false,
                tick,
                generation: tick,
            });
        conv.tick = tick;
        conv
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.responses.len(), self.conversations.len())
    }
}

/// Removes the entry with the smallest tick. O(len), only on insertion
/// into a full map.
fn evict_oldest<V>(map: &mut HashMap<String, V>, tick: impl Fn(&V) -> u64) {
    if let Some(k) = map
        .iter()
        .min_by_key(|(_, v)| tick(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refs(previous: Option<&str>, conversation: Option<&str>) -> ChainRefs {
        ChainRefs {
            previous_response_id: previous.map(str::to_owned),
            conversation: conversation.map(str::to_owned),
            store: true,
        }
    }

    fn answered(id: &str, context: u64) -> ChainEnd {
        ChainEnd::Answered {
            id: Some(id.to_owned()),
            context,
        }
    }

    #[test]
    fn refs_are_read_from_responses_bodies_only() {
        let body = json!({"model": "m", "previous_response_id": "resp_1", "conversation": {"id": "conv_1"}, "store": false});
        assert_eq!(
            ChainRefs::of(ApiKind::OpenAiResponses, &body),
            ChainRefs {
                previous_response_id: Some("resp_1".into()),
                conversation: Some("conv_1".into()),
                store: false,
            }
        );
        let plain = json!({"model": "m", "conversation": "conv_2", "store": null});
        let got = ChainRefs::of(ApiKind::OpenAiResponses, &plain);
        assert_eq!(got.conversation.as_deref(), Some("conv_2"));
        assert!(got.store, "`store` defaults to true");
        assert_eq!(
            ChainRefs::of(ApiKind::OpenAiChat, &body),
            ChainRefs::default()
        );
    }

    #[test]
    fn how_an_answer_ended_for_the_record() {
        let usage = Usage {
            input_tokens: 100,
            output_tokens: 40,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 60,
        };
        let completed = TapReport {
            outcome: Outcome::Completed,
            usage: super::super::usage::Metered::Exact(usage),
            response_id: Some("resp_1".into()),
            ..TapReport::cut()
        };
        assert_eq!(
            ChainEnd::of(Some(200), Some(usage), &completed),
            ChainEnd::Answered {
                id: Some("resp_1".into()),
                context: 200
            },
            "cached input is context too"
        );
        let cut = TapReport::cut();
        assert_eq!(
            ChainEnd::of(None, None, &cut),
            ChainEnd::Unknown,
            "no answer began"
        );
        assert_eq!(
            ChainEnd::of(Some(200), None, &cut),
            ChainEnd::Unknown,
            "cut"
        );
        assert_eq!(ChainEnd::of(Some(429), None, &cut), ChainEnd::Unchanged);
        assert_eq!(ChainEnd::of(Some(400), None, &cut), ChainEnd::Unchanged);
        assert_eq!(ChainEnd::of(Some(500), None, &cut), ChainEnd::Unknown);
        let errored = TapReport {
            outcome: Outcome::Errored,
            usage: super::super::usage::Metered::AtLeast(usage),
            ..TapReport::cut()
        };
        assert_eq!(
            ChainEnd::of(Some(400), None, &errored),
            ChainEnd::Unknown,
            "it did work"
        );
        assert_eq!(ChainEnd::of(Some(200), None, &errored), ChainEnd::Unknown);
    }

    #[test]
    fn an_answer_id_is_known_once_its_answer_settled() {
        let mut r = ChainRecord::default();
        let first = refs(None, None);
        let b = r.begin(&first);
        assert_eq!(b.known, KnownContext::default());
        r.end(&first, b, &answered("resp_1", 500));
        let next = refs(Some("resp_1"), None);
        let b = r.begin(&next);
        assert_eq!(b.known.previous_response, Some(500));
        r.end(&next, b, &answered("resp_2", 900));
        // A fork from the first answer still reads the first context.
        assert_eq!(r.begin(&next).known.previous_response, Some(500));
        assert_eq!(
            r.begin(&refs(Some("resp_2"), None)).known.previous_response,
            Some(900)
        );
        assert_eq!(
            r.begin(&refs(Some("resp_elsewhere"), None))
                .known
                .previous_response,
            None,
            "a chain this proxy never saw"
        );
    }

    #[test]
    fn unstored_cut_and_failed_answers_are_not_recorded() {
        let mut r = ChainRecord::default();
        let unstored = ChainRefs {
            store: false,
            ..refs(None, None)
        };
        let b = r.begin(&unstored);
        r.end(&unstored, b, &answered("resp_x", 10));
        let plain = refs(None, None);
        for end in [ChainEnd::Unknown, ChainEnd::Unchanged] {
            let b = r.begin(&plain);
            r.end(&plain, b, &end);
        }
        assert_eq!(r.len(), (0, 0));
        assert_eq!(
            r.begin(&refs(Some("resp_x"), None)).known.previous_response,
            None
        );
    }

    #[test]
    fn a_conversation_is_known_after_an_answer_that_had_it_alone() {
        let mut r = ChainRecord::default();
        let conv = refs(None, Some("conv_1"));
        let b = r.begin(&conv);
        assert_eq!(b.known.conversation, None, "never seen");
        r.end(&conv, b, &answered("resp_1", 300));
        let b = r.begin(&conv);
        assert_eq!(b.known.conversation, Some(300));
        r.end(&conv, b, &answered("resp_2", 700));
        let b = r.begin(&conv);
        assert_eq!(b.known.conversation, Some(700));
        r.end(&conv, b, &ChainEnd::Unchanged);
        let b = r.begin(&conv);
        assert_eq!(b.known.conversation, Some(700), "a 4xx adds nothing");
        r.end(&conv, b, &ChainEnd::Unknown);
        assert_eq!(r.begin(&conv).known.conversation, None, "a cut forgets it");
    }

    #[test]
    fn overlapping_requests_on_a_conversation_forget_its_size() {
        let mut r = ChainRecord::default();
        let conv = refs(None, Some("conv_1"));
        let b = r.begin(&conv);
        r.end(&conv, b, &answered("resp_1", 300));
        let a = r.begin(&conv);
        assert_eq!(a.known.conversation, Some(300), "alone: known");
        let b = r.begin(&conv);
        assert_eq!(b.known.conversation, None, "one in flight: unknown");
        r.end(&conv, a, &answered("resp_a", 400));
        let c = r.begin(&conv);
        assert_eq!(c.known.conversation, None, "b still in flight");
        r.end(&conv, b, &answered("resp_b", 450));
        r.end(&conv, c, &answered("resp_c", 500));
        // Each may have missed the others' items: no figure is trusted.
        let d = r.begin(&conv);
        assert_eq!(d.known.conversation, None);
        r.end(&conv, d, &answered("resp_d", 1_600));
        assert_eq!(r.begin(&conv).known.conversation, Some(1_600));
        // The answer ids themselves are exact whatever the conversation did.
        assert_eq!(
            r.begin(&refs(Some("resp_b"), None)).known.previous_response,
            Some(450)
        );
    }

    #[test]
    fn the_record_is_bounded_and_evicts_the_least_recently_used() {
        let mut r = ChainRecord::with_capacity(2);
        let plain = refs(None, None);
        for (id, ctx) in [("resp_1", 1), ("resp_2", 2)] {
            let b = r.begin(&plain);
            r.end(&plain, b, &answered(id, ctx));
        }
        // Touch resp_1, so resp_2 is the oldest.
        assert_eq!(
            r.begin(&refs(Some("resp_1"), None)).known.previous_response,
            Some(1)
        );
        let b = r.begin(&plain);
        r.end(&plain, b, &answered("resp_3", 3));
        assert_eq!(r.len().0, 2);
        assert_eq!(
            r.begin(&refs(Some("resp_2"), None)).known.previous_response,
            None
        );
        assert_eq!(
            r.begin(&refs(Some("resp_1"), None)).known.previous_response,
            Some(1)
        );

        // A conversation evicted while in flight (every entry busy): its end
        // leaves the new entry of the same id alone.
        let c1 = refs(None, Some("conv_1"));
        let early = r.begin(&c1);
        let c2 = refs(None, Some("conv_2"));
        let busy = r.begin(&c2);
        let c3 = refs(None, Some("conv_3"));
        let b = r.begin(&c3); // evicts conv_1, the oldest, though in flight
        r.end(&c3, b, &ChainEnd::Unchanged);
        let late = r.begin(&c1); // a new conv_1, evicting idle conv_3
        assert_eq!(r.len().1, 2);
        r.end(&c1, early, &answered("resp_e", 10));
        let probe = r.begin(&c1);
        assert_eq!(
            probe.known.conversation, None,
            "the late request is still in flight: the early end did not count for it"
        );
        r.end(&c1, probe, &ChainEnd::Unchanged);
        r.end(&c1, late, &answered("resp_l", 20));
        r.end(&c2, busy, &ChainEnd::Unchanged);
        assert_eq!(r.begin(&c1).known.conversation, None, "they overlapped");
    }

    #[test]
    fn overlong_ids_are_never_known() {
        let mut r = ChainRecord::default();
        let long = "r".repeat(MAX_ID_BYTES + 1);
        let plain = refs(None, None);
        let b = r.begin(&plain);
        r.end(&plain, b, &answered(&long, 5));
        let conv = refs(None, Some(&long));
        let b = r.begin(&conv);
        r.end(&conv, b, &answered("resp_1", 5));
        assert_eq!(r.len(), (1, 0));
        assert_eq!(r.begin(&conv).known.conversation, None);
    }
}
