//! Failure-text normalisation, the "reads as an error" heuristic, and the
//! 64-bit fingerprints the detector compares. Pure functions over strings and
//! JSON values; must not keep state, allocate per call beyond the output, or
//! ever return raw text longer than an excerpt.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::Value;

/// Longest excerpt of a failure text kept as evidence, in characters.
pub const EXCERPT_CHARS: usize = 200;

/// A 64-bit digest. Only compared inside one supervisor process, never
/// persisted, so the std hasher (fixed keys, fast) is enough.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub u64);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Fingerprint {
    pub fn of_str(s: &str) -> Self {
        let mut h = DefaultHasher::new();
        s.hash(&mut h);
        Self(h.finish())
    }

    /// Chains `self` with `next`; used for prefix hashes and composite keys.
    pub fn combine(self, next: Fingerprint) -> Self {
        let mut h = DefaultHasher::new();
        self.0.hash(&mut h);
        next.0.hash(&mut h);
        Self(h.finish())
    }

    /// Digest of a JSON value in document order, plus a rough size in bytes
    /// (string and key lengths) for token estimates. One walk, no allocation.
    pub fn of_value(v: &Value) -> (Self, u64) {
        let mut h = DefaultHasher::new();
        let mut size = 0u64;
        hash_value(v, &mut h, &mut size, false);
        (Self(h.finish()), size)
    }

    /// Like [`Fingerprint::of_value`] but independent of object key order, for
    /// tool arguments that an agent may serialise differently each time.
    pub fn of_value_canonical(v: &Value) -> Self {
        let mut h = DefaultHasher::new();
        let mut size = 0u64;
        hash_value(v, &mut h, &mut size, true);
        Self(h.finish())
    }
}

fn hash_value(v: &Value, h: &mut DefaultHasher, size: &mut u64, sort_keys: bool) {
    match v {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => {
            1u8.hash(h);
            b.hash(h);
        }
        Value::Number(n) => {
            2u8.hash(h);
            *size += 4;
            if let Some(i) = n.as_i64() {
                i.hash(h);
            } else if let Some(u) = n.as_u64() {
                u.hash(h);
            } else if let Some(f) = n.as_f64() {
                f.to_bits().hash(h);
            }
        }
        Value::String(s) => {
            3u8.hash(h);
            *size += s.len() as u64 + 2;
            s.hash(h);
        }
        Value::Array(items) => {
            4u8.hash(h);
            items.len().hash(h);
            for item in items {
                hash_value(item, h, size, sort_keys);
            }
        }
        Value::Object(map) => {
            5u8.hash(h);
            map.len().hash(h);
            if sort_keys {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (k, v) in entries {
                    k.hash(h);
                    hash_value(v, h, size, sort_keys);
                }
            } else {
                for (k, v) in map {
                    *size += k.len() as u64 + 4;
                    k.hash(h);
                    hash_value(v, h, size, sort_keys);
                }
            }
        }
    }
}

/// Lower-cases `text`, replaces volatile tokens (numbers, ids with digits,
/// hex runs, uuids, timestamps) with `#`, and collapses whitespace, so two
/// reports of the same failure from different attempts compare equal.
///
/// A "word" is a run of alphanumerics and `_`; a word holding a digit is an
/// id or a number. Runs of `#` joined by one separator (`12:34:56.789`,
/// `2024-05-01T12:00Z`, uuids) collapse into one `#`.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(4096));
    let mut rest = text;
    let mut pending_space = false;
    while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        if is_word_char(c) {
            let end = rest
                .char_indices()
                .find(|&(_, ch)| !is_word_char(ch))
                .map_or(rest.len(), |(i, _)| i);
            let word = &rest[..end];
            if is_volatile(word) {
                push_hash(&mut out);
            } else {
                out.extend(word.chars().flat_map(char::to_lowercase));
            }
            rest = &rest[end..];
        } else {
            out.extend(c.to_lowercase());
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Numbers, ids carrying digits, and long hex runs without digits.
fn is_volatile(word: &str) -> bool {
    word.bytes().any(|b| b.is_ascii_digit())
        || (word.len() >= 8 && word.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Emits `#`, merging it with a preceding `#` or `#<separator>`.
fn push_hash(out: &mut String) {
    let bytes = out.as_bytes();
    let n = bytes.len();
    if n >= 1 && bytes[n - 1] == b'#' {
        return;
    }
    if n >= 2 && bytes[n - 2] == b'#' && matches!(bytes[n - 1], b'.' | b':' | b'-' | b'/' | b'+') {
        out.pop();
        return;
    }
    out.push('#');
}

/// The first `max_chars` characters of an already normalised text.
pub fn excerpt(normalized: &str, max_chars: usize) -> String {
    match normalized.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &normalized[..i]),
        None => normalized.to_owned(),
    }
}

/// How much of a long text is scanned for error words: its head and tail,
/// where exceptions, status lines and error summaries sit.
const SCAN_BYTES: usize = 8 * 1024;

/// Whether a tool result or user text reads as a failure report: an
/// exception or traceback, an HTTP error page or status line, or words like
/// "malformed", "failed", "invalid", "error" — unless negated ("0 errors",
/// `"error": null`, "no failures").
pub fn reads_as_error(text: &str) -> bool {
    if text.len() <= 2 * SCAN_BYTES {
        return scan_for_error(&text.to_ascii_lowercase());
    }
    let head = &text[..floor_char_boundary(text, SCAN_BYTES)];
    let tail = &text[floor_char_boundary(text, text.len() - SCAN_BYTES)..];
    scan_for_error(&head.to_ascii_lowercase()) || scan_for_error(&tail.to_ascii_lowercase())
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Phrases that report a failure on their own.
const PHRASES: &[&str] = &[
    "traceback (most recent call last)",
    "internal server error",
    "bad gateway",
    "service unavailable",
    "gateway timeout",
    "bad request",
    "unprocessable entity",
    "too many requests",
    "permission denied",
    "connection refused",
    "connection reset",
    "timed out",
    "no such file or directory",
    "unexpected token",
    "unexpected end of",
    "could not parse",
    "unable to parse",
    "cannot parse",
    "not valid json",
    "segmentation fault",
    "panicked at",
];

/// Words that report a failure unless negated around them.
const WORDS: &[&str] = &[
    "error",
    "exception",
    "malformed",
    "failed",
    "failure",
    "invalid",
    "fatal",
];

/// Text right before a word that negates it ("0 errors", "no failures").
const NEGATING_BEFORE: &[&str] = &["0 ", "no ", "zero ", "without ", "non-", "\"0 "];

/// Text right after a word (and its plural/suffix) that negates it.
const NEGATING_AFTER: &[&str] = &[
    ": 0",
    ":0",
    "=0",
    "= 0",
    "\": 0",
    "\":0",
    "\": null",
    "\":null",
    "\": []",
    "\":[]",
    "\": \"\"",
    "\": false",
    "\":false",
    ": none",
    ": null",
    ": false",
    "\": {}",
];

fn scan_for_error(lower: &str) -> bool {
    if PHRASES.iter().any(|p| lower.contains(p)) {
        return true;
    }
    WORDS.iter().any(|word| {
        lower.match_indices(word).any(|(at, _)| {
            let before = &lower[..at];
            let mut after = &lower[at + word.len()..];
            // Skip a plural or a suffix like `_count` / `s` to see what follows.
            let skip = after
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            after = &after[skip..];
            !NEGATING_BEFORE.iter().any(|n| before.ends_with(n))
                && !NEGATING_AFTER.iter().any(|n| after.starts_with(n))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_volatile_tokens() {
        let table = [
            ("  Hello   World \n", "hello world"),
            ("error at 12:34:56.789", "error at #"),
            ("at 2024-05-01T12:34:56Z failed", "at # failed"),
            ("id 550e8400-e29b-41d4-a716-446655440000 gone", "id # gone"),
            ("tool toolu_01A09q90qw90lq917835lq9 bad", "tool # bad"),
            ("sha deadbeefcafebabe ok", "sha # ok"),
            ("bytes 1,024 of 2,048", "bytes #,# of #,#"),
            (
                "HTTP/1.1 500 Internal Server Error",
                "http/# # internal server error",
            ),
            (
                "JSONDecodeError: line 1 column 523",
                "jsondecodeerror: line # column #",
            ),
            ("café ÉCOLE", "café école"),
            ("", ""),
        ];
        for (input, want) in table {
            assert_eq!(normalize(input), want, "input {input:?}");
        }
    }

    #[test]
    fn fingerprints_are_stable_across_volatile_details() {
        let a = "Error: request req_8f3a2c91 failed at 2025-03-02T10:00:01Z (attempt 3)";
        let b = "error:  request req_11aa22bb failed at 2025-03-02T10:07:59Z (attempt 4)";
        let c = "Error: request req_8f3a2c91 succeeded at 2025-03-02T10:00:01Z";
        assert_eq!(
            Fingerprint::of_str(&normalize(a)),
            Fingerprint::of_str(&normalize(b))
        );
        assert_ne!(
            Fingerprint::of_str(&normalize(a)),
            Fingerprint::of_str(&normalize(c))
        );
        // Same input, same fingerprint, every time.
        assert_eq!(
            Fingerprint::of_str(&normalize(a)),
            Fingerprint::of_str(&normalize(a))
        );
    }

    #[test]
    fn canonical_value_fingerprint_ignores_key_order_only() {
        let a: Value = serde_json::from_str(r#"{"path":"notes.md","limit":10}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "limit": 10, "path": "notes.md" }"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"path":"notes.md","limit":11}"#).unwrap();
        assert_eq!(
            Fingerprint::of_value_canonical(&a),
            Fingerprint::of_value_canonical(&b)
        );
        assert_ne!(
            Fingerprint::of_value_canonical(&a),
            Fingerprint::of_value_canonical(&c)
        );
        let (fa, size) = Fingerprint::of_value(&a);
        assert!(size > 0);
        assert_ne!(fa, Fingerprint::of_value(&c).0);
    }

    #[test]
    fn excerpt_is_bounded_and_char_safe() {
        let long = "é".repeat(500);
        let e = excerpt(&long, EXCERPT_CHARS);
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert_eq!(excerpt("short", EXCERPT_CHARS), "short");
    }

    #[test]
    fn reads_as_error_table() {
        let errors = [
            "Traceback (most recent call last):\n  File \"x.py\", line 3\nValueError: bad",
            "<html><title>502 Bad Gateway</title></html>",
            "HTTP/1.1 500 Internal Server Error",
            "Malformed tool output: expected JSON object",
            "request failed with status 503",
            "Invalid argument `path`",
            "Error: ENOENT",
            "{\"error\": {\"message\": \"rate limited\"}}",
            "10 passed, 3 failed",
            "json.decoder.JSONDecodeError: Expecting ',' delimiter",
            "upstream timed out after 30s",
        ];
        for text in errors {
            assert!(reads_as_error(text), "should read as error: {text:?}");
        }
        let healthy = [
            "Found 3 notes about the roadmap.",
            "12 passed, 0 failed",
            "{\"status\": \"ok\", \"error\": null, \"items\": [1, 2]}",
            "{\"errors\": [], \"count\": 4}",
            "Build finished with no errors.",
            "job 42 running: 60% done",
            "error_count: 0",
            "",
        ];
        for text in healthy {
            assert!(!reads_as_error(text), "should read as healthy: {text:?}");
        }
    }

    #[test]
    fn reads_as_error_scans_head_and_tail_of_long_texts() {
        let mut text = "ok ".repeat(20_000);
        assert!(!reads_as_error(&text));
        text.push_str("\nValueError: malformed record");
        assert!(reads_as_error(&text));
    }
}
