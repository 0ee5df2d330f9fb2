//! The body of a metered answer as served to the agent. hyper polls it; it
//! polls the upstream body (or the simulated answer) directly, feeds each
//! chunk to the usage tap, and settles the request exactly once: when the
//! answer ends, when it breaks or stalls, or when hyper drops it because the
//! client left (or stopped reading, see `client_io`). No task or channel sits
//! between upstream and client, so a chunk crosses no thread on its way.
//!
//! Must not: decide what is charged (that is `Pending::settle` in `server`),
//! or hold an answer back: every chunk is forwarded as soon as it is read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::server::Pending;
use super::usage::{ApiKind, Forward, TapReport, UsageTap, parse_answer};

/// Largest non-streamed answer kept whole for usage parsing (it is still
/// forwarded as it arrives); past this the answer is charged at its reservation.
const MAX_JSON_ANSWER: usize = 16 << 20;

/// Where an answer's bytes come from.
pub enum Source {
    Upstream(reqwest::Body),
    Simulated(SimulatedStream),
}

/// The simulated provider's answer, chunk by chunk (`Sync`, as hyper's boxed
/// body wants).
pub type SimulatedStream = Pin<Box<dyn Stream<Item = Bytes> + Send + Sync>>;

/// How usage is read from the answer.
pub enum Reader {
    /// An event stream, read event by event as it passes.
    Sse(Box<UsageTap>),
    /// A JSON answer, kept whole (up to `MAX_JSON_ANSWER`) and parsed at its end.
    Json {
        kind: ApiKind,
        whole: Vec<u8>,
        too_big: bool,
    },
}

impl Reader {
    pub fn json(kind: ApiKind, expected_len: Option<u64>) -> Self {
        let capacity = expected_len
            .and_then(|n| usize::try_from(n).ok())
            .map_or(0, |n| n.min(MAX_JSON_ANSWER));
        Reader::Json {
            kind,
            whole: Vec::with_capacity(capacity),
            too_big: false,
        }
    }

    /// Reads `chunk` and says what to forward (`None`: nothing this time).
    fn read(&mut self, chunk: Bytes) -> Option<Bytes> {
        match self {
            Reader::Sse(tap) => match tap.push(&chunk) {
                Forward::Unchanged => Some(chunk),
                Forward::Bytes([]) => None,
                Forward::Bytes(b) => Some(Bytes::copy_from_slice(b)),
            },
            Reader::Json { whole, too_big, .. } => {
                if whole.len() + chunk.len() <= MAX_JSON_ANSWER {
                    whole.extend_from_slice(&chunk);
                } else {
                    *too_big = true;
                }
                Some(chunk)
            }
        }
    }
}

/// How the answer ended, as far as the body could see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Upstream sent all of it.
    Complete,
    /// Upstream broke off or stalled.
    Broken,
    /// The client left (the body was dropped before the end).
    ClientLeft,
}

pub struct AnswerBody {
    source: Source,
    reader: Option<Reader>,
    /// `Some` until the request is settled.
    pending: Option<Pending>,
    status: u16,
    /// Bytes still due when `content-length` was forwarded: the answer is
    /// complete when they have passed (hyper stops polling at that point).
    remaining: Option<u64>,
    /// Longest wait for the next upstream chunk.
    idle: Duration,
    /// Created on the first wait only; the fast path never touches a timer.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// The tap's last bytes, sent after the source has ended.
    tail: Option<Bytes>,
    done: bool,
    /// The whole answer's usage when it is known before it is sent (the
    /// simulated provider): charged even if the answer is cut short.
    known: Option<TapReport>,
}

impl AnswerBody {
    pub fn new(
        source: Source,
        reader: Reader,
        pending: Pending,
        status: u16,
        content_length: Option<u64>,
        idle: Duration,
    ) -> Self {
        Self {
            source,
            reader: Some(reader),
            pending: Some(pending),
            status,
            remaining: content_length,
            idle,
            timer: None,
            armed: false,
            tail: None,
            done: false,
            known: None,
        }
    }

    /// Charges `report` however the answer ends: for an answer whose usage
    /// is known up front, a client that leaves (or a supervisor that stops)
    /// mid-answer costs what the answer reports, not the reservation.
    pub fn with_known_usage(mut self, report: TapReport) -> Self {
        self.known = Some(report);
        self
    }

    /// Settles the request, once; returns the tap's last bytes, if any.
    fn finish(&mut self, end: End) -> Option<Bytes> {
        self.done = true;
        let (Some(pending), Some(reader)) = (self.pending.take(), self.reader.take()) else {
            return None;
        };
        let mut tail = None;
        // Cut short, an answer whose usage was known up front costs that usage.
        let known = self.known.take().filter(|_| end != End::Complete);
        let report = match (known, reader) {
            (Some(known), _) => known,
            (None, Reader::Sse(mut tap)) => {
                if end == End::Complete {
                    let rest = tap.end();
                    if !rest.is_empty() {
                        tail = Some(Bytes::copy_from_slice(rest));
                    }
                }
                tap.report()
            }
            (
                None,
                Reader::Json {
                    kind,
                    whole,
                    too_big,
                },
            ) if end == End::Complete && !too_big => match parse_answer(kind, &whole) {
                Ok(report) => report,
                Err(err) => {
                    tracing::warn!(agent = %pending.agent(), "{err}");
                    TapReport::cut()
                }
            },
            (None, Reader::Json { .. }) => TapReport::cut(),
        };
        if end == End::ClientLeft {
            tracing::info!(agent = %pending.agent(), "client left before the answer ended");
        }
        pending.settle(self.status, &report);
        tail
    }

    fn poll_source(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, io::Error>>> {
        match &mut self.source {
            Source::Upstream(body) => loop {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => return Poll::Ready(Some(Ok(data))),
                        // Trailers: nothing to forward over HTTP/1.1 chunked here.
                        Err(_) => continue,
                    },
                    Poll::Ready(Some(Err(err))) => {
                        return Poll::Ready(Some(Err(io::Error::other(err))));
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            },
            Source::Simulated(stream) => stream.as_mut().poll_next(cx).map(|c| c.map(Ok)),
        }
    }

    /// `Ready` once upstream has kept the answer waiting for `idle`.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            let deadline = Instant::now() + self.idle;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        match self.timer.as_mut() {
            Some(timer) => timer.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(this.tail.take().map(|t| Ok(Frame::data(t))));
            }
            match this.poll_source(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.armed = false;
                    let len = chunk.len() as u64;
                    let out = match this.reader.as_mut() {
                        Some(reader) => reader.read(chunk),
                        None => Some(chunk),
                    };
                    if let Some(remaining) = &mut this.remaining {
                        *remaining = remaining.saturating_sub(len);
                        if *remaining == 0 {
                            this.tail = this.finish(End::Complete);
                        }
                    }
                    match out {
                        Some(bytes) if !bytes.is_empty() => {
                            return Poll::Ready(Some(Ok(Frame::data(bytes))));
                        }
                        _ => continue,
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    if let Some(pending) = &this.pending {
                        tracing::warn!(agent = %pending.agent(), "upstream answer broke off: {err}");
                    }
                    this.finish(End::Broken);
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(None) => {
                    this.tail = this.finish(End::Complete);
                }
                Poll::Pending => {
                    if this.poll_stall(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let idle = this.idle;
                    if let Some(pending) = &this.pending {
                        tracing::warn!(agent = %pending.agent(), "upstream answer stalled for {}; cutting it", humantime::format_duration(idle));
                    }
                    this.finish(End::Broken);
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "upstream sent nothing for {}",
                            humantime::format_duration(idle)
                        ),
                    ))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.tail.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) if !self.done => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        if self.pending.is_some() {
            self.finish(End::ClientLeft);
        }
    }
}

/// What the simulated provider's whole answer (`chunks`) reports, read as the
/// tap would read it: its usage is known before the first byte is sent.
pub fn simulated_usage(kind: ApiKind, sse: bool, chunks: &[String]) -> TapReport {
    if sse {
        let mut tap = UsageTap::new(kind, super::usage::TapOptions::default());
        for chunk in chunks {
            let _ = tap.push(chunk.as_bytes());
        }
        let _ = tap.end();
        tap.report()
    } else {
        parse_answer(kind, chunks.concat().as_bytes()).unwrap_or_else(|_| TapReport::cut())
    }
}

/// The simulated provider's chunks, paced like a model: `latency` before the
/// first, a fraction of it between the others.
pub fn simulated(chunks: Vec<String>, latency: Duration) -> SimulatedStream {
    let pause = latency / (chunks.len().max(1) as u32 * 4);
    let chunks = chunks.into_iter().map(Bytes::from);
    if latency.is_zero() {
        return Box::pin(futures_util::stream::iter(chunks));
    }
    Box::pin(futures_util::stream::unfold(
        (chunks, true),
        move |(mut chunks, first)| async move {
            let next = chunks.next()?;
            tokio::time::sleep(if first { latency } else { pause }).await;
            Some((next, (chunks, false)))
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;

    use super::*;
    use crate::budget::Month;
    use crate::fleet::BudgetSpec;
    use crate::ledger::{self, Ledger};
    use crate::proxy::meter::AgentMeter;
    use crate::proxy::usage::TapOptions;

    const WORST: u64 = 1000;
    const JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":14,"output_tokens":9}}"#;
    const SSE: [&str; 3] = [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":14,\"output_tokens\":1}}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ];

    struct Fixture {
        dir: tempfile::TempDir,
        meter: Arc<AgentMeter>,
        ledger: Arc<Ledger>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
            let meter = Arc::new(AgentMeter::new(
                "sparkles",
                &BudgetSpec::default(),
                Default::default(),
                Vec::new(),
                Month::current(),
                None,
            ));
            Self { dir, meter, ledger }
        }

        fn body(&self, source: Source, reader: Reader, length: Option<u64>) -> AnswerBody {
            let pending = Pending::for_tests(self.meter.clone(), self.ledger.clone(), WORST);
            AnswerBody::new(
                source,
                reader,
                pending,
                200,
                length,
                Duration::from_millis(200),
            )
        }

        /// What the month's ceiling counts now (settled or held).
        fn counted(&self) -> u64 {
            let usage = self.meter.budget.usage(Month::current());
            usage.committed.tokens + usage.reserved.tokens
        }

        async fn ledger_row(&self) -> ledger::AgentMonthUsage {
            self.ledger.flush().await;
            ledger::month_usage(self.dir.path(), Month::current())
                .unwrap()
                .remove(0)
        }
    }

    fn sse_reader() -> Reader {
        Reader::Sse(Box::new(UsageTap::new(
            ApiKind::Anthropic,
            TapOptions::default(),
        )))
    }

    fn chunks(parts: &[&str]) -> Source {
        Source::Simulated(simulated(
            parts.iter().map(|p| p.to_string()).collect(),
            Duration::ZERO,
        ))
    }

    #[tokio::test]
    async fn a_complete_stream_is_forwarded_whole_and_charged_exactly() {
        let f = Fixture::new();
        let body = f.body(chunks(&SSE), sse_reader(), None);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, SSE.concat());
        assert_eq!(
            f.counted(),
            23,
            "settled to the real usage, reservation gone"
        );
        let row = f.ledger_row().await;
        assert_eq!((row.charged_tokens, row.unsettled), (23, 0));
    }

    #[tokio::test]
    async fn a_json_answer_with_a_length_settles_on_its_last_byte() {
        let f = Fixture::new();
        let source = Source::Upstream(reqwest::Body::from(JSON));
        let mut body = f.body(
            source,
            Reader::json(ApiKind::Anthropic, None),
            Some(JSON.len() as u64),
        );
        assert_eq!(body.size_hint().exact(), Some(JSON.len() as u64));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), JSON);
        // hyper stops polling once the announced length has passed.
        assert!(body.is_end_stream());
        assert_eq!(f.counted(), 23);
        drop(body);
        assert_eq!(
            f.counted(),
            23,
            "dropping a settled body settles nothing again"
        );
        assert_eq!(f.ledger_row().await.charged_tokens, 23);
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_stream_is_charged_at_the_reservation() {
        let f = Fixture::new();
        let source = Source::Simulated(simulated(
            SSE.iter().map(|p| p.to_string()).collect(),
            Duration::from_millis(1),
        ));
        let mut body = f.body(source, sse_reader(), None);
        body.frame().await.unwrap().unwrap();
        assert_eq!(f.counted(), WORST, "still held while the answer flows");
        drop(body);
        assert_eq!(f.counted(), WORST, "cut: charged at the reservation");
        let row = f.ledger_row().await;
        assert_eq!((row.charged_tokens, row.unsettled), (WORST, 0));
    }

    #[tokio::test]
    async fn a_stalled_upstream_is_cut_and_the_client_sees_an_error() {
        let f = Fixture::new();
        use futures_util::StreamExt;
        let stalled = futures_util::stream::iter([Bytes::from(SSE[0])])
            .chain(futures_util::stream::pending());
        let mut body = f.body(Source::Simulated(Box::pin(stalled)), sse_reader(), None);
        body.frame().await.unwrap().unwrap();
        let err = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("the idle limit fires eventually")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(f.counted(), WORST);
        assert!(body.frame().await.is_none(), "nothing after the error");
        assert_eq!(f.ledger_row().await.charged_tokens, WORST);
    }

    #[tokio::test]
    async fn a_broken_upstream_body_is_an_error_not_a_clean_end() {
        let f = Fixture::new();
        let upstream = reqwest::Body::wrap_stream(futures_util::stream::iter([
            Ok(Bytes::from(SSE[0])),
            Err(io::Error::other("connection reset")),
        ]));
        let mut body = f.body(Source::Upstream(upstream), sse_reader(), None);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), SSE[0]);
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(f.counted(), WORST);
    }
}
