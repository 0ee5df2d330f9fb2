//! Incremental Server-Sent-Events parsing (WHATWG "event stream interpretation")
//! for the usage tap. It owns line splitting, field parsing, event dispatch, the
//! memory bound per event and the byte span of every event in the stream, so the
//! proxy can forward the upstream's original bytes untouched, or, in
//! [`SseFilter`], drop whole events. It must not interpret event payloads (that
//! is `usage`), and it never rewrites the bytes of an event it forwards.
//!
//! Chunks may be split anywhere: inside a UTF-8 sequence (lines are buffered as
//! bytes and decoded only once complete; `\r` and `\n` never occur inside a
//! multi-byte sequence) or between the `\r` and `\n` of a line ending.

use std::ops::Range;

/// Default bound on one event's `data` (and on any one line): 8 MiB. Streams of
/// the supported APIs send events of a few hundred bytes; the largest, an OpenAI
/// Responses `response.completed`, repeats the whole answer and stays far below.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// Bytes of an over-long line kept so its field name can still be recognised.
const FIELD_PREFIX_KEPT: usize = 16;

/// One dispatched event. Borrowed from the parser: copy out what you keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field; `None` when absent (the spec's default, `message`).
    pub event: Option<&'a str>,
    /// The `data:` lines joined with `\n`. Empty when `oversized`.
    pub data: &'a str,
    /// Byte offsets in the stream, from the first byte of the event's first line
    /// to the end of the blank line that dispatched it. If a chunk ends between
    /// the `\r` and `\n` of that blank line, the `\n` falls outside the span
    /// (dispatch does not wait for the next chunk); it is then an inter-event
    /// byte, a harmless empty line to any client.
    pub span: Range<u64>,
    /// The event's data exceeded the bound and was discarded, not buffered.
    pub oversized: bool,
}

/// Incremental event-stream parser with bounded memory.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    /// Stream offset of the next byte to be fed.
    offset: u64,
    /// Bytes of the current line not yet terminated (it began in an earlier chunk).
    line: Vec<u8>,
    /// The current line outgrew the bound; only its first bytes were kept.
    line_overflow: bool,
    line_start: u64,
    /// The previous chunk ended with `\r`: a leading `\n` completes that ending.
    skip_lf: bool,
    /// The first line has been seen (a leading byte-order mark is stripped from it).
    started: bool,
    block_start: Option<u64>,
    data: Vec<u8>,
    has_data: bool,
    event: Vec<u8>,
    oversized: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

/// What was left when the stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEnd {
    /// Bytes fed in total.
    pub bytes: u64,
    /// An event had started (a field line was read) but no blank line ended it:
    /// per the spec it is discarded, and it usually means the stream was cut.
    pub incomplete_event: bool,
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            offset: 0,
            line: Vec::new(),
            line_overflow: false,
            line_start: 0,
            skip_lf: false,
            started: false,
            block_start: None,
            data: Vec::new(),
            has_data: false,
            event: Vec::new(),
            oversized: false,
        }
    }

    /// Bytes fed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Feeds one chunk; calls `on_event` for every event it completes, in order.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&SseEvent<'_>)) {
        let base = self.offset;
        let mut i = 0;
        if self.skip_lf && !chunk.is_empty() {
            self.skip_lf = false;
            if chunk[0] == b'\n' {
                i = 1;
                self.line_start = base + 1;
            }
        }
        while i < chunk.len() {
            let Some(rel) = memchr::memchr2(b'\r', b'\n', &chunk[i..]) else {
                self.buffer_partial_line(&chunk[i..]);
                break;
            };
            let end = i + rel;
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                if next < chunk.len() {
                    if chunk[next] == b'\n' {
                        next += 1;
                    }
                } else {
                    self.skip_lf = true;
                }
            }
            let line_end_offset = base + next as u64;
            if self.line.is_empty() && !self.line_overflow {
                self.process_line(&chunk[i..end], line_end_offset, &mut on_event);
            } else {
                self.buffer_partial_line(&chunk[i..end]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, line_end_offset, &mut on_event);
                self.line = line;
                self.line.clear();
                self.line_overflow = false;
            }
            self.line_start = line_end_offset;
            i = next;
        }
        self.offset = base + chunk.len() as u64;
    }

    /// Ends the stream. Per the spec an unterminated event is not dispatched.
    pub fn finish(&mut self) -> SseEnd {
        let incomplete_event = self.block_start.is_some() || !self.line.is_empty();
        SseEnd {
            bytes: self.offset,
            incomplete_event,
        }
    }

    fn buffer_partial_line(&mut self, bytes: &[u8]) {
        if self.line_overflow {
            return;
        }
        let room = (self.max_event_bytes + FIELD_PREFIX_KEPT).saturating_sub(self.line.len());
        if bytes.len() > room {
            // Keep only a prefix: enough to know which field the line was.
            let keep = FIELD_PREFIX_KEPT.saturating_sub(self.line.len());
            self.line.truncate(FIELD_PREFIX_KEPT);
            self.line.extend_from_slice(&bytes[..keep.min(bytes.len())]);
            self.line_overflow = true;
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn process_line(
        &mut self,
        mut line: &[u8],
        line_end: u64,
        on_event: &mut impl FnMut(&SseEvent<'_>),
    ) {
        let overflowed = self.line_overflow;
        if !self.started {
            self.started = true;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() && !overflowed {
            self.end_block(line_end, on_event);
            return;
        }
        if self.block_start.is_none() {
            self.block_start = Some(self.line_start);
        }
        if line.first() == Some(&b':') {
            return; // comment
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                let needed = self.data.len() + usize::from(self.has_data) + value.len();
                if overflowed || self.oversized || needed > self.max_event_bytes {
                    self.oversized = true;
                    self.data.clear();
                } else {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                }
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                if overflowed || value.len() > self.max_event_bytes {
                    self.oversized = true;
                } else {
                    self.event.extend_from_slice(value);
                }
            }
            // `id` and `retry` steer reconnection, which the proxy never does;
            // unknown fields are ignored by the spec.
            _ => {}
        }
    }

    fn end_block(&mut self, line_end: u64, on_event: &mut impl FnMut(&SseEvent<'_>)) {
        let Some(start) = self.block_start.take() else {
            return; // a blank line between events
        };
        if self.has_data {
            let data = String::from_utf8_lossy(&self.data);
            let event = (!self.event.is_empty()).then(|| String::from_utf8_lossy(&self.event));
            on_event(&SseEvent {
                event: event.as_deref(),
                data: &data,
                span: start..line_end,
                oversized: self.oversized,
            });
        }
        self.data.clear();
        self.event.clear();
        self.has_data = false;
        self.oversized = false;
    }
}

/// Whether an event's bytes go on to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    Drop,
}

/// An [`SseParser`] that also produces the bytes to forward: the input minus the
/// whole events the caller drops. Bytes of an event are held until the event
/// completes (a client acts only on complete events anyway); everything between
/// events (comments, blank lines) passes unchanged.
///
/// Memory stays bounded: if an event's raw bytes outgrow twice the event bound,
/// they are forwarded as they come and that event can no longer be dropped
/// (such an event is `oversized`, and the tap never drops one).
#[derive(Debug)]
pub struct SseFilter {
    parser: SseParser,
    /// Bytes fed but not yet forwarded or dropped, starting at `held_start`.
    held: Vec<u8>,
    held_start: u64,
    max_held: usize,
}

impl SseFilter {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            parser: SseParser::new(max_event_bytes),
            held: Vec::new(),
            held_start: 0,
            max_held: max_event_bytes.saturating_mul(2).saturating_add(4096),
        }
    }

    /// Feeds one chunk; appends the bytes now ready to forward to `out`.
    pub fn push(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<u8>,
        mut decide: impl FnMut(&SseEvent<'_>) -> Disposition,
    ) {
        let Self {
            parser,
            held,
            held_start,
            max_held,
        } = self;
        held.extend_from_slice(chunk);
        // Everything before `done` has been forwarded or dropped.
        let mut done = *held_start;
        parser.feed(chunk, |event| {
            let start = event.span.start.max(done);
            let end = event.span.end;
            let at = |offset: u64| usize::try_from(offset - *held_start).unwrap_or(usize::MAX);
            // Inter-event bytes (comments, blank lines, a stray `\n`) always pass.
            out.extend_from_slice(&held[at(done)..at(start)]);
            // An event whose head was already flushed can only be completed.
            let droppable = event.span.start >= done;
            if !(droppable && decide(event) == Disposition::Drop) {
                out.extend_from_slice(&held[at(start)..at(end)]);
            }
            done = end;
        });
        let consumed = usize::try_from(done - *held_start).unwrap_or(held.len());
        held.drain(..consumed);
        *held_start = done;
        if held.len() > *max_held {
            out.append(held);
            *held_start = parser.offset();
        }
    }

    /// Ends the stream: forwards whatever is held (an unterminated event, which
    /// the client will discard just as the parser does).
    pub fn finish(&mut self, out: &mut Vec<u8>) -> SseEnd {
        out.append(&mut self.held);
        self.held_start = self.parser.offset();
        self.parser.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        event: Option<String>,
        data: String,
        span: Range<u64>,
        oversized: bool,
    }

    fn collect(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, |e| {
                events.push(Owned {
                    event: e.event.map(str::to_owned),
                    data: e.data.to_owned(),
                    span: e.span.clone(),
                    oversized: e.oversized,
                })
            });
        }
        events
    }

    type Parsed = Vec<(Option<String>, String)>;

    fn parse(input: &str) -> Parsed {
        let mut parser = SseParser::default();
        collect(&mut parser, &[input.as_bytes()])
            .into_iter()
            .map(|e| (e.event, e.data))
            .collect()
    }

    fn ev(event: Option<&str>, data: &str) -> (Option<String>, String) {
        (event.map(str::to_owned), data.to_owned())
    }

    #[test]
    fn spec_cases() {
        let cases: &[(&str, &str, Parsed)] = &[
            ("plain", "data: hi\n\n", vec![ev(None, "hi")]),
            (
                "event name",
                "event: ping\ndata: {}\n\n",
                vec![ev(Some("ping"), "{}")],
            ),
            (
                "multi-line data joined with LF",
                "data: a\ndata: b\n\n",
                vec![ev(None, "a\nb")],
            ),
            (
                "only one space stripped",
                "data:  x\n\n",
                vec![ev(None, " x")],
            ),
            ("no space after colon", "data:x\n\n", vec![ev(None, "x")]),
            ("field without colon", "data\n\n", vec![ev(None, "")]),
            (
                "empty data lines count",
                "data\ndata\n\n",
                vec![ev(None, "\n")],
            ),
            (
                "comment ignored",
                ": keep-alive\n\ndata: x\n\n",
                vec![ev(None, "x")],
            ),
            ("CRLF endings", "data: a\r\n\r\n", vec![ev(None, "a")]),
            ("CR endings", "data: a\rdata: b\r\r", vec![ev(None, "a\nb")]),
            (
                "event without data is not dispatched",
                "event: x\n\n",
                vec![],
            ),
            (
                "event type resets after a block",
                "event: x\n\ndata: y\n\n",
                vec![ev(None, "y")],
            ),
            ("unterminated event discarded", "data: a\n", vec![]),
            (
                "unknown fields ignored",
                "id: 7\nretry: 10\nfoo: bar\ndata: z\n\n",
                vec![ev(None, "z")],
            ),
            (
                "leading BOM stripped",
                "\u{feff}data: b\n\n",
                vec![ev(None, "b")],
            ),
            (
                "colon in value kept",
                "data: {\"a\":1}\n\n",
                vec![ev(None, "{\"a\":1}")],
            ),
            (
                "event field may follow data",
                "data: d\nevent: late\n\n",
                vec![ev(Some("late"), "d")],
            ),
            (
                "blank lines between events",
                "\n\n\ndata: q\n\n\n",
                vec![ev(None, "q")],
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(&parse(input), want, "case: {name}");
        }
    }

    #[test]
    fn spans_cover_each_event() {
        let input = ": c\n\nevent: a\ndata: 1\n\r\ndata: 2\r\n\r\n";
        let mut parser = SseParser::default();
        let events = collect(&mut parser, &[input.as_bytes()]);
        let spans: Vec<&str> = events
            .iter()
            .map(|e| &input[e.span.start as usize..e.span.end as usize])
            .collect();
        assert_eq!(spans, vec!["event: a\ndata: 1\n\r\n", "data: 2\r\n\r\n"]);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let input =
            "\u{feff}event: é\r\ndata: 日本\r\ndata: x\r\r: c\n\ndata\r\n\r\nevent: e\ndata: ü\n\n";
        let bytes = input.as_bytes();
        let whole = collect(&mut SseParser::default(), &[bytes]);
        assert_eq!(whole.len(), 3);
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let got = collect(
                    &mut SseParser::default(),
                    &[&bytes[..a], &bytes[a..b], &bytes[b..]],
                );
                // A split between the `\r` and `\n` of the dispatching blank
                // line leaves that `\n` outside the span (it is not yet known
                // when the event is dispatched): everything else is identical.
                let relaxed = |events: &[Owned]| -> Vec<Owned> {
                    events
                        .iter()
                        .map(|e| Owned {
                            span: e.span.start..0,
                            ..e.clone()
                        })
                        .collect()
                };
                assert_eq!(relaxed(&got), relaxed(&whole), "split at {a} and {b}");
                for (g, w) in got.iter().zip(&whole) {
                    assert!(g.span.end == w.span.end || g.span.end + 1 == w.span.end);
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let mut parser = SseParser::default();
        let events = collect(&mut parser, &[b"data: a\xFFb\n\n"]);
        assert_eq!(events[0].data, "a\u{fffd}b");
    }

    #[test]
    fn oversized_event_is_flagged_and_not_buffered() {
        let big = "x".repeat(100);
        let input = format!("data: {big}\n\ndata: small\n\n");
        for split in [1, 7, 50, 200] {
            let mut parser = SseParser::new(64);
            let chunks: Vec<&[u8]> = input.as_bytes().chunks(split).collect();
            let events = collect(&mut parser, &chunks);
            assert_eq!(events.len(), 2, "split {split}");
            assert!(events[0].oversized && events[0].data.is_empty());
            assert!(!events[1].oversized);
            assert_eq!(events[1].data, "small");
            assert!(parser.line.capacity() <= 64 + FIELD_PREFIX_KEPT + 64);
        }
        // Many lines that each fit but together do not.
        let mut parser = SseParser::new(10);
        let events = collect(
            &mut parser,
            &[b"data: 123456\ndata: 123456\n\ndata: ok\n\n"],
        );
        assert!(events[0].oversized);
        assert_eq!(events[1].data, "ok");
    }

    #[test]
    fn finish_reports_an_incomplete_event() {
        let mut parser = SseParser::default();
        collect(&mut parser, &[b"data: a\n\ndata: b"]);
        assert!(parser.finish().incomplete_event);
        let mut parser = SseParser::default();
        collect(&mut parser, &[b"data: a\n\ndata: b\n"]);
        assert!(parser.finish().incomplete_event);
        let mut parser = SseParser::default();
        collect(&mut parser, &[b"data: a\n\n"]);
        assert_eq!(
            parser.finish(),
            SseEnd {
                bytes: 9,
                incomplete_event: false
            }
        );
    }

    fn filter_all(input: &[u8], chunk_sizes: &[usize], drop_data: &str, max: usize) -> Vec<u8> {
        let mut filter = SseFilter::new(max);
        let mut out = Vec::new();
        let mut rest = input;
        let mut sizes = chunk_sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).min(rest.len());
            filter.push(&rest[..n], &mut out, |e| {
                if e.data == drop_data {
                    Disposition::Drop
                } else {
                    Disposition::Forward
                }
            });
            rest = &rest[n..];
        }
        filter.finish(&mut out);
        out
    }

    #[test]
    fn filter_drops_exactly_one_event_whatever_the_split() {
        let input = b": hi\n\ndata: keep1\n\ndata: drop\n\ndata: keep2\r\n\r\ndata: tail";
        let want = b": hi\n\ndata: keep1\n\ndata: keep2\r\n\r\ndata: tail";
        for size in 1..input.len() {
            assert_eq!(
                filter_all(input, &[size], "drop", 1024),
                want.to_vec(),
                "chunk size {size}"
            );
        }
        assert_eq!(
            filter_all(input, &[3, 1, 7], "nothing", 1024),
            input.to_vec()
        );
    }

    #[test]
    fn filter_memory_is_bounded_and_passes_what_it_cannot_hold() {
        let max = 16;
        let big = "y".repeat(10_000);
        let input = format!("data: {big}\n\ndata: drop\n\n");
        let mut filter = SseFilter::new(max);
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(10) {
            filter.push(chunk, &mut out, |e| {
                if e.data == "drop" {
                    Disposition::Drop
                } else {
                    Disposition::Forward
                }
            });
            assert!(filter.held.len() <= filter.max_held + 10);
        }
        filter.finish(&mut out);
        assert_eq!(out, format!("data: {big}\n\n").into_bytes());
    }
}
