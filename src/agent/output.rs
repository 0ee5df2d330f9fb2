//! An agent's stdout and stderr, turned into log lines. Owns the bound on how
//! much of one line is held in memory, so a child printing without newlines
//! cannot make the supervisor buffer without limit, and the escaping of
//! control characters so an agent cannot drive the operator's terminal. Must
//! not otherwise interpret the output: lines are logged as they are (lossy
//! UTF-8). Secret values are masked in each line's raw bytes before it is
//! decoded or logged, and a long line is never cut through one.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::redact::{Redaction, Redactor};

/// A longer line is logged in pieces of at most this many bytes.
pub const MAX_LINE: usize = 16 * 1024;

/// Which pipe a line came from; the log field `stream` carries its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Splits a byte stream into lines: at `\n` (a `\r` before it is dropped), or
/// at `max` bytes, backing off so a UTF-8 character is not cut in two and
/// holding back a tail that could begin a secret value (see [`cut_point`]).
/// Each line comes out with the redactor's values masked.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(4),
        }
    }

    /// Feeds a chunk; returns the lines it completed, masked by `redactor`.
    pub fn push(&mut self, mut chunk: &[u8], redactor: &Redactor) -> Vec<String> {
        let mut lines = Vec::new();
        while !chunk.is_empty() {
            let room = self.max - self.buf.len();
            let take = chunk.len().min(room);
            match chunk[..take].iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.buf.extend_from_slice(&chunk[..nl]);
                    chunk = &chunk[nl + 1..];
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                    lines.push(decode(&redactor.redact_bytes(&self.buf)));
                    self.buf.clear();
                }
                None => {
                    self.buf.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if self.buf.len() >= self.max {
                        let cut = cut_point(&self.buf, redactor);
                        lines.push(decode(&redactor.redact_bytes(&self.buf[..cut])));
                        self.buf.drain(..cut);
                    }
                }
            }
        }
        lines
    }

    /// The last line if the stream ended without a newline, masked by `redactor`.
    pub fn finish(&mut self, redactor: &Redactor) -> Option<String> {
        if self.buf.is_empty() {
            return None;
        }
        let line = decode(&redactor.redact_bytes(&self.buf));
        self.buf.clear();
        Some(line)
    }
}

/// Lossy UTF-8, with control characters other than tab written out as
/// `\x1b` (or `\u{9b}` beyond ASCII): raw, an escape sequence or a `\r` from
/// an agent would act on the operator's terminal, e.g. overwrite the
/// `name |` prefix so one agent's line passes for another's.
fn decode(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.into_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Where to cut a full buffer so that no secret value is split between two
/// pieces: the last `longest - 1` bytes stay behind (they may begin a value
/// whose rest has not been read yet; any value starting earlier ends inside
/// the buffer, as none is longer), a value found across that point is kept
/// whole in the first piece, and a UTF-8 character is not cut. The tail held
/// back is at most half the buffer, so a value longer than half the line
/// bound can still be split; the pieces always make progress.
fn cut_point(buf: &[u8], redactor: &Redactor) -> usize {
    let hold = redactor.longest().saturating_sub(1).min(buf.len() / 2);
    let mut cut = buf.len() - hold;
    for (start, end) in redactor.find(buf) {
        if start >= cut {
            break;
        }
        if end > cut {
            // Matches do not overlap, so none crosses the new point either.
            cut = end;
            break;
        }
    }
    // Backing off over an incomplete character never enters a value: a value
    // holding that character would have crossed the point and moved it.
    char_boundary(&buf[..cut])
}

/// Where to cut a full buffer: before an incomplete UTF-8 character at its
/// end, if there is one, else at the end. Never at 0, so a buffer holding only
/// broken bytes still goes out (lossy) instead of stalling.
fn char_boundary(buf: &[u8]) -> usize {
    let Some(lead) = buf.iter().rposition(|&b| b & 0xC0 != 0x80) else {
        return buf.len();
    };
    let needed = match buf[lead] {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    };
    if lead > 0 && buf.len() - lead < needed {
        lead
    } else {
        buf.len()
    }
}

/// Reads `reader` to its end, logging each line with the agent's name under
/// the `agent` target, which the supervisor's log layer renders as
/// `name | line`, with the values of `redaction` (as it stands when each
/// chunk arrives) masked. A read error ends the pump quietly: it only happens
/// when the pipe breaks, and the process's exit is reported elsewhere.
pub async fn pump(
    mut reader: impl AsyncRead + Unpin,
    agent: Arc<str>,
    stream: Stream,
    redaction: Redaction,
) {
    let mut splitter = LineSplitter::new(MAX_LINE);
    let mut chunk = vec![0u8; 8 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let redactor = redaction.current();
                for line in splitter.push(&chunk[..n], &redactor) {
                    emit(&agent, stream, &line);
                }
            }
        }
    }
    if let Some(line) = splitter.finish(&redaction.current()) {
        emit(&agent, stream, &line);
    }
}

fn emit(agent: &str, stream: Stream, line: &str) {
    tracing::info!(target: "agent", agent = %agent, stream = stream.as_str(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::MASK;
    use crate::vault::Secret;

    fn feed(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        feed_masked(max, chunks, &Redactor::default())
    }

    fn feed_masked(max: usize, chunks: &[&[u8]], redactor: &Redactor) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out: Vec<String> = chunks.iter().flat_map(|c| s.push(c, redactor)).collect();
        out.extend(s.finish(redactor));
        out
    }

    fn redactor(values: &[&str]) -> Redactor {
        let secrets: Vec<Secret> = values.iter().map(|v| Secret::new(v.to_string())).collect();
        Redactor::new(&secrets)
    }

    /// (what, bound, chunks fed, lines expected)
    type Case = (
        &'static str,
        usize,
        &'static [&'static [u8]],
        &'static [&'static str],
    );

    #[test]
    fn splitting_table() {
        let cases: &[Case] = &[
            ("one line", 16, &[b"hello\n"], &["hello"]),
            ("no newline at end", 16, &[b"a\nb"], &["a", "b"]),
            ("crlf", 16, &[b"a\r\nb\r\n"], &["a", "b"]),
            ("empty lines kept", 16, &[b"\n\nx\n"], &["", "", "x"]),
            (
                "line across chunks",
                16,
                &[b"ab", b"cd\ne", b"f\n"],
                &["abcd", "ef"],
            ),
            (
                "long line split at bound",
                4,
                &[b"abcdefghij\n"],
                &["abcd", "efgh", "ij"],
            ),
            ("exactly the bound", 4, &[b"abcd\n"], &["abcd", ""]),
            (
                "bound across chunks",
                4,
                &[b"ab", b"cdef", b"\n"],
                &["abcd", "ef"],
            ),
            (
                "invalid utf-8 is lossy",
                16,
                &[b"a\xffb\n"],
                &["a\u{fffd}b"],
            ),
            ("nothing", 16, &[], &[]),
            // A terminal must not act on what an agent prints: an escape or a
            // carriage return could clear the screen or overwrite the `name |` prefix.
            (
                "control characters escaped",
                64,
                &[b"\x1b[2J\x1b[31mred\rfake | ok\x07\n"],
                &["\\x1b[2J\\x1b[31mred\\x0dfake | ok\\x07"],
            ),
            ("tab kept", 16, &[b"a\tb\n"], &["a\tb"]),
            ("del and nul", 16, &[b"a\x7f\x00b\n"], &["a\\x7f\\x00b"]),
            ("c1 csi", 16, &[b"a\xc2\x9b2Jb\n"], &["a\\u{9b}2Jb"]),
            ("lone cr at end", 16, &[b"a\r"], &["a\\x0d"]),
        ];
        for (what, max, chunks, want) in cases {
            assert_eq!(feed(*max, chunks), *want, "{what}");
        }
    }

    #[test]
    fn bound_does_not_cut_a_character() {
        // 'é' is 2 bytes and would straddle a 4-byte bound after "aaa".
        let got = feed(4, &["aaaé\n".as_bytes()]);
        assert_eq!(got, ["aaa", "é"]);
        // A 4-byte character at a bound of 6 after 3 ASCII bytes.
        let got = feed(6, &["abc😀xyz\n".as_bytes()]);
        assert_eq!(got, ["abc", "😀xy", "z"]);
    }

    #[test]
    fn memory_stays_bounded_without_newlines() {
        let none = Redactor::default();
        let mut s = LineSplitter::new(MAX_LINE);
        let big = vec![b'x'; MAX_LINE * 3 + 10];
        let lines = s.push(&big, &none);
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert!(s.buf.len() <= MAX_LINE);
        assert_eq!(s.finish(&none).map(|l| l.len()), Some(10));

        // With values to hold back for, still bounded and still progressing.
        let r = redactor(&["a-rather-long-secret-value"]);
        let mut s = LineSplitter::new(MAX_LINE);
        let mut total = 0;
        for _ in 0..10 {
            let lines = s.push(&big, &r);
            assert!(s.buf.len() <= MAX_LINE);
            assert!(lines.iter().all(|l| !l.is_empty() && l.len() <= MAX_LINE));
            total += lines.iter().map(String::len).sum::<usize>();
        }
        total += s.finish(&r).map_or(0, |l| l.len());
        assert_eq!(total, big.len() * 10);
    }

    #[test]
    fn lines_are_masked() {
        let r = redactor(&["hunter22", "sup-0123456789abcdef"]);
        let got = feed_masked(
            64,
            &[
                b"pw hunter22\r\ntoken=sup-0123",
                b"456789abcdef ok\nlast hunter22",
            ],
            &r,
        );
        assert_eq!(
            got,
            ["pw [REDACTED]", "token=[REDACTED] ok", "last [REDACTED]"]
        );
        // Masked before control characters are escaped: a value holding one
        // is still found.
        let r = redactor(&["tab\x1bsecret"]);
        assert_eq!(
            feed_masked(64, &[b"x tab\x1bsecret\n"], &r),
            ["x [REDACTED]"]
        );
    }

    /// A value at every offset around the bound, fed in every chunking of
    /// two, with other text and values nearby: it is never split, nothing of
    /// it is left in any piece, and the rest of the text passes unchanged.
    #[test]
    fn a_value_across_the_bound_is_never_split() {
        let max = 32;
        let secret = "S3CRET-VALUE-1234";
        let r = redactor(&[secret, "abc", "S3CRET"]);
        for offset in 0..(2 * max) {
            let text = format!("{}{secret}{}\n", "x".repeat(offset), "y".repeat(max));
            let bytes = text.as_bytes();
            for split in [0, 1, offset, offset + 5, bytes.len() / 2, bytes.len()] {
                let split = split.min(bytes.len());
                let lines = feed_masked(max, &[&bytes[..split], &bytes[split..]], &r);
                let joined = lines.concat();
                assert_eq!(
                    joined,
                    format!("{}[REDACTED]{}", "x".repeat(offset), "y".repeat(max)),
                    "offset {offset}, split {split}: {lines:?}"
                );
                assert!(lines.iter().all(|l| l.len() <= max + MASK.len()));
                for line in &lines {
                    for part in ["S3C", "RET", "1234", "VALUE"] {
                        assert!(!line.contains(part), "offset {offset}: {lines:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn holding_back_does_not_cut_a_character() {
        let r = redactor(&["0123456789"]);
        // 'é' (2 bytes) lands where the held-back tail begins.
        for pad in 0..8 {
            let text = format!("{}ééééééééééééé\n", "a".repeat(pad));
            let got = feed_masked(16, &[text.as_bytes()], &r);
            assert_eq!(got.concat(), text.trim_end(), "pad {pad}: {got:?}");
            assert!(got.iter().all(|l| !l.contains('\u{fffd}')), "{got:?}");
        }
    }

    #[test]
    fn cut_points() {
        let none = Redactor::default();
        assert_eq!(cut_point(b"abcdefgh", &none), 8);
        let r = redactor(&["wxyz"]);
        // Three bytes may begin "wxyz": held back.
        assert_eq!(cut_point(b"abcdefgh", &r), 5);
        // A value across the point is kept whole in the first piece.
        assert_eq!(cut_point(b"abcdwxyz", &r), 8);
        assert_eq!(cut_point(b"abcwxyzh", &r), 7);
        // The tail held back is at most half the buffer.
        let long = redactor(&["a-very-long-value"]);
        assert_eq!(cut_point(b"abcdefgh", &long), 4);
    }

    #[test]
    fn char_boundary_cases() {
        assert_eq!(char_boundary(b"abcd"), 4);
        assert_eq!(char_boundary("abé".as_bytes()), 4);
        assert_eq!(char_boundary(&"abcé".as_bytes()[..4]), 3);
        // Only an incomplete lead byte: emitted lossy rather than looping.
        assert_eq!(char_boundary(&[0xE2, 0x82]), 2);
        // Garbage earlier plus an incomplete tail.
        assert_eq!(char_boundary(&[0xFF, b'a', b'b', 0xE2, 0x82]), 3);
    }
}
