//! Key rotation: the decisions (is a secret due, which agents run on a stale
//! version) as plain functions over plain data, and the small shells around
//! them — the vault watcher, the `issuer`/`revoke` hooks, the atomic write
//! into the `dir` backend and the `supervisor rotate` command.
//!
//! Owns nothing of the running fleet: the supervisor calls in and applies the
//! result through its own reload path. Must never log, format or store a
//! secret value — only fingerprints (`Secret::fingerprint`) leave here.

pub mod cmd;
pub mod hooks;
pub mod schedule;
pub mod store;
pub mod watch;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::control::protocol::SecretVersion;

/// How an agent receives one of its secrets, which decides what a new
/// version costs: a proxied key swaps in place, the others restart the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretUse {
    /// An `llm:` key the proxy holds; the agent never sees it.
    Proxied,
    /// An `llm:` key with `delivery: direct`, in the agent's environment.
    Direct,
    /// A `secrets:` entry, in the agent's environment.
    Env,
}

impl SecretUse {
    /// Whether the agent's process holds the value, so a new one needs a restart.
    pub fn in_process(self) -> bool {
        !matches!(self, Self::Proxied)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxied => "proxied",
            Self::Direct => "direct",
            Self::Env => "env",
        }
    }
}

/// One secret of an agent as the vault holds it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultVersion {
    /// The secret's name in the vault.
    pub secret: String,
    /// Where it goes: the environment variable, or `llm[i]`.
    pub slot: String,
    pub used_as: SecretUse,
    pub fingerprint: String,
    /// When this fingerprint was first seen (Unix ms, from the ledger).
    pub first_seen_ms: i64,
}

/// Joins the vault's versions with what the running process was launched
/// with (`slot` → fingerprint; `None` when the agent is not running).
pub fn secret_versions(
    vault: &[VaultVersion],
    launched: Option<&std::collections::BTreeMap<String, String>>,
    now_ms: i64,
) -> Vec<SecretVersion> {
    // The transfer type of `supervisor status`.
    vault
        .iter()
        .map(|v| {
            let running = if v.used_as.in_process() {
                launched.and_then(|l| l.get(&v.slot)).cloned()
            } else {
                None
            };
            let stale = running.as_ref().is_some_and(|r| *r != v.fingerprint);
            SecretVersion {
                name: v.secret.clone(),
                slot: v.slot.clone(),
                used_as: v.used_as.as_str().to_owned(),
                fingerprint: v.fingerprint.clone(),
                age_secs: u64::try_from(now_ms.saturating_sub(v.first_seen_ms) / 1000).unwrap_or(0),
                running_fingerprint: running,
                stale,
            }
        })
        .collect()
}

/// When a secret renewed at `last_renewed_ms` is next due (Unix ms).
pub fn due_at(last_renewed_ms: i64, every: Duration) -> i64 {
    let every = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
    last_renewed_ms.saturating_add(every)
}

/// Whether a rotation should start now: due, and not held back by a recent
/// failure (`retry_after_ms`). A secret never seen is not due: it has no
/// version to replace yet.
pub fn should_rotate(
    last_renewed_ms: Option<i64>,
    every: Duration,
    retry_after_ms: Option<i64>,
    now_ms: i64,
) -> bool {
    let Some(last) = last_renewed_ms else {
        return false;
    };
    now_ms >= due_at(last, every) && retry_after_ms.is_none_or(|t| now_ms >= t)
}

/// After a failed attempt, the next one waits this long (or `every`, if shorter).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15 * 60);

pub fn retry_delay(every: Duration) -> Duration {
    every.min(RETRY_AFTER_FAILURE)
}

/// An age for people: `3d 4h`, `5m`, `12s`.
pub fn format_age(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn version(slot: &str, used_as: SecretUse, fp: &str) -> VaultVersion {
        VaultVersion {
            secret: format!("s_{slot}"),
            slot: slot.into(),
            used_as,
            fingerprint: fp.into(),
            first_seen_ms: 1_000,
        }
    }

    #[test]
    fn stale_only_when_the_process_holds_an_older_version() {
        let vault = [
            version("TOKEN", SecretUse::Env, "new"),
            version("llm[0]", SecretUse::Proxied, "new"),
            version("llm[1]", SecretUse::Direct, "same"),
        ];
        let launched: BTreeMap<String, String> = [
            ("TOKEN".to_owned(), "old".to_owned()),
            ("llm[1]".to_owned(), "same".to_owned()),
        ]
        .into();
        let rows = secret_versions(&vault, Some(&launched), 61_000);
        let got: Vec<(&str, Option<&str>, bool, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.slot.as_str(),
                    r.running_fingerprint.as_deref(),
                    r.stale,
                    r.age_secs,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("TOKEN", Some("old"), true, 60),
                // The proxy always uses the vault's version: never stale.
                ("llm[0]", None, false, 60),
                ("llm[1]", Some("same"), false, 60),
            ]
        );
        // Not running: nothing to be stale.
        assert!(
            secret_versions(&vault, None, 61_000)
                .iter()
                .all(|r| !r.stale)
        );
    }

    #[test]
    fn due_times() {
        let day = Duration::from_secs(86_400);
        let d = |n: i64| n * 86_400_000;
        let cases: &[(Option<i64>, Option<i64>, i64, bool)] = &[
            (None, None, d(1000), false),
            (Some(0), None, d(89), false),
            (Some(0), None, d(90), true),
            (Some(0), None, d(91), true),
            (Some(0), Some(d(92)), d(91), false),
            (Some(0), Some(d(92)), d(92), true),
            (Some(d(10)), None, d(99), false),
            (Some(d(10)), None, d(100), true),
        ];
        for &(last, retry, now, want) in cases {
            assert_eq!(
                should_rotate(last, day * 90, retry, now),
                want,
                "{last:?} {retry:?} {now}"
            );
        }
        assert_eq!(due_at(i64::MAX - 1, day), i64::MAX);
        assert_eq!(retry_delay(day), RETRY_AFTER_FAILURE);
        assert_eq!(
            retry_delay(Duration::from_secs(60)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn ages_read_naturally() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (3600, "1h"),
            (3660, "1h 1m"),
            (86_400, "1d"),
            (86_400 * 90 + 7200 + 60, "90d 2h"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_age(secs), want, "{secs}");
        }
    }
}
