//! Failure-text normalisation (volatile tokens, digit-free random ids
//! included), the "reads as an error" heuristic, and the 64-bit fingerprints
//! the detector compares — including the canonical form of a message that
//! ignores cache markers, provider ids and reasoning blobs. Pure functions
//! over strings and JSON values; must not keep state, allocate per call
//! beyond the output (and the parse of tool arguments sent as JSON text), or
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

    /// Digest of a message or item in its canonical form, plus its rough
    /// size (as [`Fingerprint::of_value`]). The canonical form drops what
    /// frameworks and providers move or reassign without changing meaning:
    /// `cache_control` markers, provider-assigned ids (`id`, `tool_use_id`,
    /// `tool_call_id`, `call_id`), `signature` / `encrypted_content` blobs,
    /// `status`, thinking / redacted-thinking / reasoning blocks, whitespace
    /// differences in strings and the order of object keys; a string
    /// `content` equals one text block. Tool arguments (`input`, `arguments`)
    /// are compared as data, whatever their key order or JSON spacing.
    pub fn of_message(v: &Value) -> (Self, u64) {
        let mut h = DefaultHasher::new();
        let mut size = 0u64;
        hash_canonical(v, &mut h, &mut size);
        (Self(h.finish()), size)
    }
}

/// Keys that carry no meaning for "is this the same conversation".
const VOLATILE_KEYS: &[&str] = &[
    "cache_control",
    "id",
    "tool_use_id",
    "tool_call_id",
    "call_id",
    "signature",
    "encrypted_content",
    "status",
];

/// Block and item types that hold only opaque reasoning state, which
/// frameworks drop from older turns (and providers ignore there).
const OPAQUE_TYPES: &[&str] = &["thinking", "redacted_thinking", "reasoning"];

/// Whether a content block or input item is reasoning state only.
pub fn is_opaque_block(v: &Value) -> bool {
    v.get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| OPAQUE_TYPES.contains(&t))
}

fn hash_canonical(v: &Value, h: &mut DefaultHasher, size: &mut u64) {
    match v {
        Value::String(s) => {
            *size += s.len() as u64 + 2;
            hash_words(s, h);
        }
        Value::Array(items) => {
            4u8.hash(h);
            for item in items.iter().filter(|i| !is_opaque_block(i)) {
                hash_canonical(item, h, size);
            }
            6u8.hash(h);
        }
        Value::Object(map) => {
            5u8.hash(h);
            // serde_json's map iterates in key order.
            for (k, v) in map {
                *size += k.len() as u64 + 4;
                if VOLATILE_KEYS.contains(&k.as_str()) {
                    let mut ignored = DefaultHasher::new();
                    hash_value(v, &mut ignored, size, false);
                    continue;
                }
                8u8.hash(h);
                k.hash(h);
                match (k.as_str(), v) {
                    ("content", Value::String(s)) => {
                        // `"content": "x"` ≡ `[{"type": "text", "text": "x"}]`.
                        *size += s.len() as u64 + 2;
                        4u8.hash(h);
                        5u8.hash(h);
                        8u8.hash(h);
                        "text".hash(h);
                        hash_words(s, h);
                        8u8.hash(h);
                        "type".hash(h);
                        hash_words("text", h);
                        7u8.hash(h);
                        6u8.hash(h);
                    }
                    ("input" | "arguments", Value::String(s)) => {
                        *size += s.len() as u64 + 2;
                        match serde_json::from_str::<Value>(s) {
                            Ok(parsed) => hash_value(&parsed, h, &mut 0, true),
                            Err(_) => hash_words(s, h),
                        }
                    }
                    ("input" | "arguments", data) => hash_value(data, h, size, true),
                    _ => hash_canonical(v, h, size),
                }
            }
            7u8.hash(h);
        }
        other => hash_value(other, h, size, false),
    }
}

/// A string as its whitespace-separated words.
fn hash_words(s: &str, h: &mut DefaultHasher) {
    3u8.hash(h);
    for word in s.split_whitespace() {
        word.hash(h);
    }
    9u8.hash(h);
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

/// Lower-cases `text`, replaces volatile tokens with `#`, and collapses
/// whitespace, so two reports of the same failure from different attempts
/// compare equal.
///
/// Volatile: a "word" (a run of alphanumerics and `_`) holding a digit, a hex
/// run of 8+, a `_`-separated part that reads as random letters (a base32 /
/// base62 id without digits, see [`looks_random`]), a Python `tempfile` name
/// (`tmp_hod_zdo`), the name after `tmp.` (`mktemp`), the entry right below a
/// temp directory (`/tmp/…`, `/var/folders/…`), a uuid or any chain of 3+ hex
/// groups joined by `-` (digit-free groups included), and a month or weekday
/// name next to a number (`Wed, 02 Dec 2026`). Runs of `#` joined by one
/// separator (`12:34:56.789`, `2024-05-01T12:00Z`) collapse into one `#`.
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
        if c == '/'
            && let Some(dir) = TEMP_DIRS.iter().find(|d| rest.starts_with(**d))
        {
            // The entry right below a temp directory is random by design.
            out.push_str(dir);
            rest = &rest[dir.len()..];
            let end = rest
                .find(|ch: char| ch == '/' || ch.is_whitespace() || "'\"`:;,()[]{}<>".contains(ch))
                .unwrap_or(rest.len());
            if end > 0 {
                push_hash(&mut out);
                rest = &rest[end..];
            }
            continue;
        }
        if c.is_ascii_hexdigit()
            && let Some(len) = hex_chain_len(rest)
        {
            push_hash(&mut out);
            rest = &rest[len..];
            continue;
        }
        if is_word_char(c) {
            let end = rest
                .char_indices()
                .find(|&(_, ch)| !is_word_char(ch))
                .map_or(rest.len(), |(i, _)| i);
            let word = &rest[..end];
            let after_mktemp = out.ends_with("tmp.") && word.len() >= 6;
            if after_mktemp || is_volatile(word) || is_date_name(word, &out, &rest[end..]) {
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

/// Directories whose entries are named at random (`mkdtemp`, `mktemp`,
/// macOS per-user temp dirs).
const TEMP_DIRS: &[&str] = &[
    "/tmp/",
    "/var/tmp/",
    "/private/tmp/",
    "/var/folders/",
    "/private/var/folders/",
    "/dev/shm/",
];

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Numbers, random-looking ids carrying digits, long hex runs, temp names
/// and random-looking letter runs. Identifiers with a short digit suffix or
/// infix (`test_case_2`, `v2`, `http2`, `py311`, `x86_64`, `utf8mb4`) stay:
/// they name things, and two failures naming different things differ.
fn is_volatile(word: &str) -> bool {
    let bytes = word.as_bytes();
    if bytes.iter().all(u8::is_ascii_digit)
        || (word.len() >= 8 && bytes.iter().all(u8::is_ascii_hexdigit))
    {
        return true;
    }
    // Python's tempfile: `tmp` + 8 of [a-z0-9_].
    if word.len() >= 9
        && word.starts_with("tmp")
        && bytes[3..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
    {
        return true;
    }
    let has_letter_part = word
        .split('_')
        .any(|part| part.bytes().any(|b| b.is_ascii_alphabetic()));
    word.split('_').any(|part| {
        (part.len() >= 8 && part.bytes().all(|b| b.is_ascii_hexdigit()))
            || digits_look_random(part, has_letter_part)
            || looks_random(part)
    })
}

/// Whether a `_`-separated part holding digits is a number or an id rather
/// than a name: a digit-only part unless it is a short index of a named
/// identifier (`case_2`), a part starting with a digit (`01T12`, `30s`,
/// `8f3a2c91`), or one with more than two digit runs or four digits
/// (`a1b2c3`, `build20240501`).
fn digits_look_random(part: &str, has_letter_part: bool) -> bool {
    let bytes = part.as_bytes();
    let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return false;
    }
    if digits == bytes.len() {
        return !has_letter_part || digits > 3;
    }
    let runs = bytes
        .iter()
        .zip(std::iter::once(&b'_').chain(bytes.iter()))
        .filter(|(b, prev)| b.is_ascii_digit() && !prev.is_ascii_digit())
        .count();
    let letters: String = part.chars().filter(char::is_ascii_alphabetic).collect();
    // One letter before a counter (`a100`, an IMAP tag) is a counter too.
    bytes[0].is_ascii_digit()
        || runs > 2
        || digits > 4
        || (letters.len() == 1 && digits >= 3)
        || looks_random(&letters)
}

/// The length of a uuid-like chain at the start of `s`: 3+ groups of hex
/// digits joined by `-`, 16+ hex digits in all, not glued to a word.
fn hex_chain_len(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let (mut i, mut groups, mut hex) = (0, 0, 0);
    loop {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        groups += 1;
        hex += i - start;
        if i < bytes.len()
            && bytes[i] == b'-'
            && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
        {
            i += 1;
            continue;
        }
        break;
    }
    let glued = bytes
        .get(i)
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    (groups >= 3 && hex >= 16 && !glued).then_some(i)
}

const DATE_NAMES: &[&str] = &[
    "mon",
    "tue",
    "wed",
    "thu",
    "fri",
    "sat",
    "sun",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "january",
    "february",
    "march",
    "april",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

/// A month or weekday name is part of a timestamp when a number sits right
/// before or after it (`Wed, 02 Dec 2026 05:57:11`, `Dec  2 05:57`).
fn is_date_name(word: &str, before: &str, after: &str) -> bool {
    if word.len() > 9 || !DATE_NAMES.iter().any(|n| n.eq_ignore_ascii_case(word)) {
        return false;
    }
    let before = before.trim_end_matches([' ', ',']);
    let after = after.trim_start_matches([' ', ',', '\t']);
    before.ends_with('#')
        || after.as_bytes().first().is_some_and(u8::is_ascii_digit)
        || after
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .is_some_and(|next| DATE_NAMES.iter().any(|n| n.eq_ignore_ascii_case(next)))
}

/// Letter pairs common inside English words and code identifiers (the top
/// 98.5% of pairs inside camel-case humps of a large corpus of docs and
/// source). Random ids are full of the other pairs.
const COMMON_PAIRS: &str = "ab ac ad af ag ai ak al am an ap ar as at au av aw ax ay ba be bi bj bl bo br bs bu by ca cc ce \
ch ci ck cl co cp cr cs ct cu cy da dd de di dl do dr ds du dy ea eb ec ed ee ef eg ei el em en \
eo ep eq er es et ev ew ex ey fa fe ff fi fl fo fr ft fu ga ge gg gh gi gl gn gp gr gs gu ha he \
hi ho hr ht hu ia ib ic id ie if ig il im in io ip ir is it iv ix iz je js ke ki ks kw la ld le \
lf li ll lo ls lt lu ly ma mb me mi mm mo mp ms mu na nc nd ne nf ng ni nk nl nm nn no np ns nt \
nu nv ny oa ob oc od of og oi oj ok ol om on oo op or os ot ou ov ow pa pd pe pi pl po pp pr ps \
pt pu py qu ra rb rc rd re rg ri rk rl rm rn ro rr rs rt ru rv ry sa sc se sh si sk sl so sp ss \
st su sy ta tc te tf th ti tl to tp tr ts tt tu ty ua ub uc ud ue ug ui ul um un up ur us ut va \
ve vi wa we wh wi wn wo wr ws xc xe xi xp xt yn yo yp ys yt za ze \
bm eu gb kz lc my ql sq tg";

/// `COMMON_PAIRS` as a bit table: bit `b` of row `a` is set for pair `ab`.
static PAIRS: [u32; 26] = pair_table();

const fn pair_table() -> [u32; 26] {
    let mut rows = [0u32; 26];
    let s = COMMON_PAIRS.as_bytes();
    let mut i = 0;
    while i + 1 < s.len() {
        if s[i].is_ascii_lowercase() && s[i + 1].is_ascii_lowercase() {
            rows[(s[i] - b'a') as usize] |= 1 << (s[i + 1] - b'a');
            i += 3;
        } else {
            i += 1;
        }
    }
    rows
}

/// Whether a run of 8+ ASCII letters reads as a random id rather than a word
/// or identifier. Split into camel-case humps (`getElementById` → get,
/// Element, By, Id; `XMLHttpRequest` → XML, Http, Request): random mixed case
/// makes 3+ humps of one or two letters; otherwise the letter pairs decide,
/// acronym humps (all capitals, ≤ 5, inside a longer word) left out: more
/// than half the pairs uncommon in words, 3 at least. Library and product
/// names (`sqlalchemy`, `werkzeug`, `postgresql`, `lightgbm`, `LLVMContext`)
/// stay words; about 1 in 100 random 16-letter ids of one case slips through
/// (measured by the unit test), which only makes a comparison a little
/// finer, never merges two failures.
pub fn looks_random(part: &str) -> bool {
    let bytes = part.as_bytes();
    if bytes.len() < 8 || !bytes.iter().all(u8::is_ascii_alphabetic) {
        return false;
    }
    let (mut uncommon, mut pairs, mut short_humps) = (0u32, 0u32, 0u32);
    let mut i = 0;
    while i < bytes.len() {
        // A hump: one or more capitals then lower case, or a run of capitals
        // not followed by lower case (an acronym), or lower case alone.
        let start = i;
        let caps = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_uppercase())
            .count();
        let lows = bytes[i + caps..]
            .iter()
            .take_while(|b| b.is_ascii_lowercase())
            .count();
        let end = if caps > 1 && lows > 0 {
            i + caps - 1 // `JSONDecode`: the last capital starts the next hump
        } else {
            i + caps + lows
        };
        let hump = &bytes[start..end];
        if hump.len() <= 2 {
            short_humps += 1;
        }
        // An acronym reads as one only before a real hump: `HTMLParser`.
        let next_lows = bytes[end..]
            .iter()
            .skip(1)
            .take_while(|b| b.is_ascii_lowercase())
            .count();
        let acronym = hump.len() <= 5
            && hump.iter().all(u8::is_ascii_uppercase)
            && ((caps == hump.len() + 1 && next_lows >= 3)
                || (end == bytes.len() && start >= 3 && bytes[start - 1].is_ascii_lowercase()));
        if !acronym {
            for pair in hump.windows(2) {
                let (a, b) = (pair[0].to_ascii_lowercase(), pair[1].to_ascii_lowercase());
                pairs += 1;
                if PAIRS[usize::from(a - b'a')] & (1 << (b - b'a')) == 0 {
                    uncommon += 1;
                }
            }
        }
        i = end;
    }
    let mixed_case =
        bytes.iter().any(u8::is_ascii_uppercase) && bytes.iter().any(u8::is_ascii_lowercase);
    (mixed_case && uncommon + short_humps >= 3) || (uncommon >= 3 && 4 * uncommon > pairs)
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
    fn normalize_strips_digit_free_random_tokens() {
        let table = [
            // uuid4 with digit-free groups, in any case
            (
                "job deadbeef-cafe-4abc-beef-facefeedbead done",
                "job # done",
            ),
            (
                "job DEADBEEF-CAFE-ABCD-BEEF-FACEFEEDBEAD done",
                "job # done",
            ),
            ("job {abcdefab-cdef-abcd-efab-cdefabcdefab}", "job {#}"),
            // Python tempfile and mktemp names, temp dirs
            (
                "wrote /tmp/tmp_hod_zdo/orders.csv",
                "wrote /tmp/#/orders.csv",
            ),
            ("scratch tmpkqzwxjvb ready", "scratch # ready"),
            ("dir /tmp/tmp.AbCdEfGhIj gone", "dir /tmp/# gone"),
            ("dir ./tmp.QwErTyUiOp gone", "dir ./tmp.# gone"),
            ("in /var/folders/zz/T/ok", "in /var/folders/#/t/ok"),
            // base62 / base32 ids without digits
            (
                "request req_KqPzXwLmNbVcRtYu rejected",
                "request # rejected",
            ),
            ("trace qxzvbnmlkjhgfdsw end", "trace # end"),
            // timestamps with names
            ("at Wed, 02 Dec 2026 05:57:11 GMT", "at #, # # # # gmt"),
            ("at Thu, 03 Dec 2026 17:01:09 GMT", "at #, # # # # gmt"),
            ("Wed Dec  2 05:57:11 UTC 2026", "# # # # utc #"),
            // words and identifiers stay
            (
                "JSONDecodeError in getElementById",
                "jsondecodeerror in getelementbyid",
            ),
            (
                "AssertionError: expected dictionary",
                "assertionerror: expected dictionary",
            ),
            ("you may retry in March", "you may retry in march"),
            // named identifiers with short digit parts stay
            (
                "tests/test_api.py::test_case_2 FAILED",
                "tests/test_api.py::test_case_2 failed",
            ),
            (
                "http2 v2 py311 x86_64 utf8mb4 sha256",
                "http2 v2 py311 x86_64 utf8mb4 sha256",
            ),
            (
                "No module named 'sqlalchemy'",
                "no module named 'sqlalchemy'",
            ),
            ("timed out after 30s (500ms)", "timed out after # (#)"),
            ("call call_Xy7kLmpQrZ9 failed", "call # failed"),
            ("build_20240501 id a1b2c3 run_7 x", "# id # run_7 x"),
        ];
        for (input, want) in table {
            assert_eq!(normalize(input), want, "input {input:?}");
        }
    }

    #[test]
    fn random_ids_rarely_pass_as_words() {
        // A fixed xorshift stream: no flakiness, many samples.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let letters = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut escaped = 0;
        for _ in 0..2_000 {
            let id: String = (0..16)
                .map(|_| char::from(letters[(next() % 52) as usize]))
                .collect();
            escaped += usize::from(!looks_random(&id));
        }
        assert!(
            escaped <= 4,
            "{escaped} of 2000 16-letter ids read as words"
        );
        // One case only (lower-case base32-style, upper-case ids): the pairs decide.
        for (upper, len, bound) in [(false, 16, 30), (true, 16, 30), (false, 12, 120)] {
            let mut escaped = 0;
            for _ in 0..2_000 {
                let id: String = (0..len)
                    .map(|_| {
                        char::from(letters[(next() % 26) as usize + if upper { 26 } else { 0 }])
                    })
                    .collect();
                escaped += usize::from(!looks_random(&id));
            }
            assert!(
                escaped <= bound,
                "{escaped} of 2000 {len}-letter one-case ids read as words (bound {bound})"
            );
        }
        for word in [
            "deadline",
            "Exception",
            "unexpected",
            "permission",
            "connection",
            "ValueError",
            "NotFoundError",
            "TimeoutError",
            "configuration",
            "directory",
            "summarize",
            "sqlalchemy",
            "werkzeug",
            "postgresql",
            "lightgbm",
            "HTMLParser",
            "XMLHttpRequest",
            "LLVMContext",
            "getElementById",
            "ModuleNotFoundError",
            "pydantic",
            "kubernetes",
            "tensorflow",
            "onnxruntime",
            "matplotlib",
            "psycopg",
            "requests",
            "websocket",
            "UnicodeDecodeError",
            "ECONNREFUSED",
            "EADDRINUSE",
            "IntegrityError",
            "localhost",
            "github",
            "typescript",
            "webpack",
            "django",
            "javascript",
        ] {
            assert!(!looks_random(word), "{word}");
        }
    }

    #[test]
    fn message_fingerprint_ignores_what_frameworks_move() {
        let of = |v: Value| Fingerprint::of_message(&v).0;
        let plain = serde_json::json!({"role": "user", "content": "Summarise  the notes."});
        let cached = serde_json::json!({"role": "user", "content": [
            {"type": "text", "text": "Summarise the notes. ", "cache_control": {"type": "ephemeral"}}]});
        assert_eq!(of(plain.clone()), of(cached));
        let call = |id: &str, sig: &str, ws: &str| {
            serde_json::json!({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": sig},
                {"type": "text", "text": format!("Reading.{ws}")},
                {"type": "tool_use", "id": id, "name": "read", "input": {"b": 1, "a": "x"}}]})
        };
        let without_thinking = serde_json::json!({"role": "assistant", "content": [
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "toolu_other", "name": "read", "input": {"a": "x", "b": 1}}]});
        assert_eq!(
            of(call("toolu_a", "sig1", "\n")),
            of(call("toolu_b", "sig2", ""))
        );
        assert_eq!(of(call("toolu_a", "sig1", "")), of(without_thinking));
        let result = |id: &str| {
            serde_json::json!({"type": "function_call", "id": format!("fc_{id}"), "call_id": id,
                "name": "sync", "arguments": "{\"a\": 1}", "status": "completed"})
        };
        assert_eq!(of(result("call_1")), of(result("call_2")));
        // Meaning still counts: other arguments, other text.
        let mut other = result("call_1");
        other["arguments"] = Value::String("{\"a\": 2}".into());
        assert_ne!(of(result("call_1")), of(other));
        assert_ne!(
            of(plain),
            of(serde_json::json!({"role": "user", "content": "Summarise the note."}))
        );
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
