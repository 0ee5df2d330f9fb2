//! Masking of secret values in text the supervisor logs, persists or sends:
//! agents' output lines, alert payloads, quarantine reasons and evidence.
//! Owns the matcher (every value the supervisor holds — raw `secrets:`, real
//! LLM keys, scoped tokens — as one leftmost-longest automaton) and the
//! shared, swappable snapshot of it. Must not log, return or format a pattern
//! it holds, and must not decide which values are secret: callers hand them in.

use std::borrow::Cow;
use std::sync::{Arc, PoisonError, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};

use crate::check::ResolvedSecrets;
use crate::vault::Secret;

/// What a masked value is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Secrets shorter than this are still masked, but are likely to occur in
/// ordinary text too; `check` and `run` warn about them.
pub const SHORT_SECRET: usize = 8;

/// A fixed set of secret values and a matcher over them. Cheap to share
/// behind an `Arc`; rebuilt (never mutated) when the set changes.
pub struct Redactor {
    /// Sorted and deduplicated; empty values are left out (they would match
    /// everywhere).
    secrets: Vec<Secret>,
    matcher: Matcher,
    longest: usize,
}

enum Matcher {
    None,
    Automaton(AhoCorasick),
    /// Only if the automaton cannot be built (absurdly many or long values):
    /// slow, but a value is never left unmasked.
    Scan,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .field("longest", &self.longest)
            .finish()
    }
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new(std::iter::empty::<&Secret>())
    }
}

impl Redactor {
    /// A redactor masking every non-empty value in `secrets`.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> Self {
        let mut values: Vec<Secret> = secrets
            .into_iter()
            .filter(|s| !s.expose().is_empty())
            .cloned()
            .collect();
        values.sort_by(|a, b| a.expose().cmp(b.expose()));
        values.dedup();
        let longest = values.iter().map(|s| s.expose().len()).max().unwrap_or(0);
        let matcher = if values.is_empty() {
            Matcher::None
        } else {
            match AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(values.iter().map(Secret::expose))
            {
                Ok(automaton) => Matcher::Automaton(automaton),
                Err(err) => {
                    tracing::warn!(
                        "cannot build the secret matcher ({err}); masking secrets in logs with a slower scan"
                    );
                    Matcher::Scan
                }
            }
        };
        Self {
            secrets: values,
            matcher,
            longest,
        }
    }

    /// How many distinct values are masked.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Length in bytes of the longest value, for callers that cut text into
    /// pieces and must not cut through one.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// True when `secret` is masked (an empty value counts as masked).
    pub fn covers(&self, secret: &Secret) -> bool {
        secret.expose().is_empty()
            || self
                .secrets
                .binary_search_by(|s| s.expose().cmp(secret.expose()))
                .is_ok()
    }

    /// Byte ranges of the values in `haystack`: leftmost-longest, not overlapping.
    pub fn find(&self, haystack: &[u8]) -> Vec<(usize, usize)> {
        match &self.matcher {
            Matcher::None => Vec::new(),
            Matcher::Automaton(ac) => ac
                .find_iter(haystack)
                .map(|m| (m.start(), m.end()))
                .collect(),
            Matcher::Scan => scan(&self.secrets, haystack),
        }
    }

    /// `haystack` with every value replaced by [`MASK`]; borrowed when there was none.
    pub fn redact_bytes<'t>(&self, haystack: &'t [u8]) -> Cow<'t, [u8]> {
        let found = self.find(haystack);
        if found.is_empty() {
            return Cow::Borrowed(haystack);
        }
        let mut out = Vec::with_capacity(haystack.len());
        let mut at = 0;
        for (start, end) in found {
            out.extend_from_slice(&haystack[at..start]);
            out.extend_from_slice(MASK.as_bytes());
            at = end;
        }
        out.extend_from_slice(&haystack[at..]);
        Cow::Owned(out)
    }

    /// `text` with every value replaced by [`MASK`]; borrowed when there was none.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Values are whole UTF-8 strings, so a match in UTF-8 text starts
            // and ends on character boundaries; lossy is only a fallback.
            Cow::Owned(bytes) => Cow::Owned(match String::from_utf8(bytes) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }),
        }
    }

    /// Every string inside `value` redacted (object keys included).
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::String(s) => {
                if let Cow::Owned(masked) = self.redact(s) {
                    *s = masked;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (key, mut v) in entries {
                    self.redact_json(&mut v);
                    map.insert(self.redact(&key).into_owned(), v);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

/// Leftmost-longest matching without an automaton.
fn scan(secrets: &[Secret], haystack: &[u8]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at < haystack.len() {
        let longest = secrets
            .iter()
            .map(|s| s.expose().as_bytes())
            .filter(|p| haystack[at..].starts_with(p))
            .map(<[u8]>::len)
            .max();
        match longest {
            Some(len) => {
                found.push((at, at + len));
                at += len;
            }
            None => at += 1,
        }
    }
    found
}

/// The current [`Redactor`], shared by the supervisor (which replaces it on
/// launch, reload and rotation) and every reader (output pumps, alerts, the
/// proxy). Readers take a snapshot and drop the lock before any work.
#[derive(Clone, Default)]
pub struct Redaction(Arc<RwLock<Arc<Redactor>>>);

impl std::fmt::Debug for Redaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Redaction").field(&self.current()).finish()
    }
}

impl Redaction {
    pub fn new(redactor: Redactor) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(redactor))))
    }

    /// The redactor in force now. The lock is held only to clone the `Arc`.
    pub fn current(&self) -> Arc<Redactor> {
        // A poisoned lock still holds a complete redactor: it is only ever
        // replaced whole.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `redactor` in force for every reader's next snapshot.
    pub fn replace(&self, redactor: Redactor) {
        let redactor = Arc::new(redactor);
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = redactor;
    }

    /// Adds whichever of `secrets` are not masked yet. A backstop for the
    /// invariant "a child never starts with a value its output would not be
    /// masked for", whatever order its launch and the rebuild happen in.
    pub fn ensure<'a>(&self, secrets: impl IntoIterator<Item = &'a Secret>) {
        let current = self.current();
        let missing: Vec<&Secret> = secrets.into_iter().filter(|s| !current.covers(s)).collect();
        if missing.is_empty() {
            return;
        }
        let mut guard = self.0.write().unwrap_or_else(PoisonError::into_inner);
        // Rebuilt from what is in force under the lock, so a concurrent
        // `replace` or `ensure` is not undone.
        let merged = Redactor::new(guard.secrets.iter().chain(missing));
        *guard = Arc::new(merged);
    }

    /// Shorthand for `current().redact(text)`, owned.
    pub fn redact(&self, text: &str) -> String {
        self.current().redact(text).into_owned()
    }
}

/// One warning per secret shorter than [`SHORT_SECRET`] bytes, naming the
/// agent and where it goes (never the value): such a value is masked wherever
/// it occurs, also in unrelated text.
pub fn short_secret_warnings(
    fleet: &crate::fleet::Fleet,
    secrets: &ResolvedSecrets,
) -> Vec<String> {
    let mut out = Vec::new();
    for (agent, resolved) in secrets {
        for (var, value) in &resolved.env {
            if value.expose().len() < SHORT_SECRET {
                out.push(format!(
                    "agent `{agent}`: the secret in `{var}` is shorter than {SHORT_SECRET} bytes; it is masked as {MASK} wherever it appears in the agent's output, which may hide ordinary text"
                ));
            }
        }
        let llm = fleet
            .agents
            .get(agent)
            .map(|a| a.llm.as_slice())
            .unwrap_or_default();
        for (i, key) in resolved.llm_keys.iter().enumerate() {
            if let Some(key) = key
                && key.expose().len() < SHORT_SECRET
            {
                let env = llm.get(i).map_or("the key", |l| l.key_env.as_str());
                out.push(format!(
                    "agent `{agent}`: the key of `llm[{i}]` (`{env}`) is shorter than {SHORT_SECRET} bytes; it is masked as {MASK} wherever it appears in the agent's output, which may hide ordinary text"
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(values: &[&str]) -> Redactor {
        let secrets: Vec<Secret> = values.iter().map(|v| Secret::new(v.to_string())).collect();
        Redactor::new(&secrets)
    }

    #[test]
    fn masking_table() {
        // (what, values, text, expected)
        let cases: &[(&str, &[&str], &str, &str)] = &[
            ("nothing to mask", &["hunter22"], "all quiet", "all quiet"),
            ("no values", &[], "hunter22", "hunter22"),
            ("one value", &["hunter22"], "pw=hunter22.", "pw=[REDACTED]."),
            (
                "every occurrence",
                &["hunter22"],
                "hunter22hunter22 hunter22",
                "[REDACTED][REDACTED] [REDACTED]",
            ),
            (
                "longest wins over a prefix",
                &["sk-abc", "sk-abcdef"],
                "key sk-abcdefg",
                "key [REDACTED]g",
            ),
            (
                "overlapping values: leftmost first",
                &["abcd1234", "1234wxyz"],
                "abcd1234wxyz",
                "[REDACTED]wxyz",
            ),
            (
                "empty value ignored",
                &["", "hunter22"],
                "a hunter22",
                "a [REDACTED]",
            ),
            ("short values still masked", &["42"], "x42y", "x[REDACTED]y"),
            ("case matters", &["Hunter22"], "hunter22", "hunter22"),
            ("non-ascii", &["pässwörd"], "«pässwörd»", "«[REDACTED]»"),
            (
                "duplicates",
                &["aaaa1111", "aaaa1111"],
                "aaaa1111",
                "[REDACTED]",
            ),
        ];
        for (what, values, text, want) in cases {
            let r = redactor(values);
            assert_eq!(r.redact(text), *want, "{what}");
            assert_eq!(
                r.redact_bytes(text.as_bytes()).as_ref(),
                want.as_bytes(),
                "{what} (bytes)"
            );
        }
    }

    #[test]
    fn unchanged_text_is_borrowed() {
        let r = redactor(&["hunter22"]);
        assert!(matches!(r.redact("fine"), Cow::Borrowed(_)));
        assert!(matches!(r.redact("hunter22"), Cow::Owned(_)));
    }

    #[test]
    fn debug_shows_no_value() {
        let r = redactor(&["hunter22-secret"]);
        let shown = format!("{r:?} {:?}", Redaction::new(redactor(&["hunter22-secret"])));
        assert!(!shown.contains("hunter22"), "{shown}");
        assert!(shown.contains("secrets: 1"), "{shown}");
    }

    #[test]
    fn covers_and_longest() {
        let r = redactor(&["abcdefgh", "xyz", ""]);
        assert_eq!(r.len(), 2);
        assert_eq!(r.longest(), 8);
        assert!(r.covers(&Secret::new("xyz".into())));
        assert!(r.covers(&Secret::new(String::new())));
        assert!(!r.covers(&Secret::new("abcdefg".into())));
    }

    #[test]
    fn scan_agrees_with_the_automaton() {
        let values = ["ab", "abc", "bcd", "cdab", "dd", "abcdab"];
        let secrets: Vec<Secret> = values.iter().map(|v| Secret::new(v.to_string())).collect();
        let r = Redactor::new(&secrets);
        // Every string over {a,b,c,d} up to length 7.
        let mut texts = vec![String::new()];
        for _ in 0..7 {
            let next: Vec<String> = texts
                .iter()
                .flat_map(|t| ['a', 'b', 'c', 'd'].map(|c| format!("{t}{c}")))
                .collect();
            for t in &next {
                assert_eq!(scan(&r.secrets, t.as_bytes()), r.find(t.as_bytes()), "{t}");
            }
            texts = next;
        }
    }

    #[test]
    fn json_strings_and_keys_are_masked() {
        let r = redactor(&["hunter22"]);
        let mut v = serde_json::json!({
            "reason": "saw hunter22",
            "steps": [{"failure": "hunter22 rejected", "n": 3}],
            "hunter22": true,
        });
        r.redact_json(&mut v);
        let text = v.to_string();
        assert!(!text.contains("hunter22"), "{text}");
        assert_eq!(v["steps"][0]["n"], 3);
        assert_eq!(v["reason"], "saw [REDACTED]");
        assert_eq!(v["[REDACTED]"], true);
    }

    #[test]
    fn replace_and_ensure() {
        let shared = Redaction::default();
        assert_eq!(shared.redact("hunter22"), "hunter22");
        shared.replace(redactor(&["hunter22"]));
        let snapshot = shared.current();
        assert_eq!(shared.redact("hunter22 swordfish"), "[REDACTED] swordfish");
        let fish = Secret::new("swordfish".into());
        shared.ensure([&fish]);
        assert_eq!(shared.redact("hunter22 swordfish"), "[REDACTED] [REDACTED]");
        // A snapshot taken earlier is unaffected: readers never see a half-built set.
        assert_eq!(snapshot.redact("swordfish"), "swordfish");
        // Nothing missing: the redactor in force is kept as it is.
        let before = shared.current();
        shared.ensure([&fish]);
        assert!(Arc::ptr_eq(&before, &shared.current()));
        // A rebuild drops what it is not given.
        shared.replace(redactor(&["swordfish"]));
        assert_eq!(shared.redact("hunter22 swordfish"), "hunter22 [REDACTED]");
    }
}
