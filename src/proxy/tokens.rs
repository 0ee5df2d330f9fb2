//! Scoped tokens: the per-launch credentials agents present to the proxy
//! instead of the real provider key. Owns the token → (agent, llm entry) map.
//!
//! The map is keyed by the SHA-256 of the token, so a lookup's timing depends
//! only on a digest, and the stored token is then compared in constant time.
//! Tokens are minted per launch and revoked when the launch ends, so a token
//! leaked from a dead process is worthless. Must not log a token.

use std::collections::HashMap;
use std::sync::RwLock;

use sha2::{Digest, Sha256};

use crate::vault::Secret;

/// What a valid token grants: which agent, through which `llm:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub agent: String,
    /// Index into the agent's `llm:` list.
    pub entry: usize,
    /// Identifies the launch that minted it, so a restart revokes exactly the old ones.
    pub launch: u64,
}

struct Stored {
    token: Secret,
    grant: Grant,
}

/// Token registry shared by the proxy (readers) and the supervisor (minting
/// on launch, revoking on exit). Reads vastly outnumber writes.
#[derive(Default)]
pub struct TokenTable {
    by_digest: RwLock<HashMap<[u8; 32], Stored>>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenTable { .. }")
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token: `sup-` + 64 hex digits (256 bits from the OS).
pub fn mint() -> std::io::Result<Secret> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let mut text = String::with_capacity(4 + 64);
    text.push_str("sup-");
    for b in bytes {
        text.push_str(&format!("{b:02x}"));
    }
    Ok(Secret::new(text))
}

/// Equality whose timing does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `token` (minted, or a real key for `delivery: direct`).
    pub fn insert(&self, token: Secret, grant: Grant) {
        let key = digest(token.expose());
        if let Ok(mut map) = self.by_digest.write() {
            map.insert(key, Stored { token, grant });
        }
    }

    /// Forgets every token of `agent`'s launch `launch`.
    pub fn revoke_launch(&self, agent: &str, launch: u64) {
        if let Ok(mut map) = self.by_digest.write() {
            map.retain(|_, s| !(s.grant.agent == agent && s.grant.launch == launch));
        }
    }

    /// Forgets every token of `agent`.
    pub fn revoke_agent(&self, agent: &str) {
        if let Ok(mut map) = self.by_digest.write() {
            map.retain(|_, s| s.grant.agent != agent);
        }
    }

    /// The grant for a presented token, if it is current.
    pub fn lookup(&self, presented: &str) -> Option<Grant> {
        let key = digest(presented);
        let map = self.by_digest.read().ok()?;
        let stored = map.get(&key)?;
        constant_time_eq(stored.token.expose().as_bytes(), presented.as_bytes())
            .then(|| stored.grant.clone())
    }

    /// Every current token, for the log redactor (which must mask them) only.
    pub fn secrets(&self) -> Vec<Secret> {
        self.by_digest
            .read()
            .map(|map| map.values().map(|s| s.token.clone()).collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.by_digest.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(agent: &str, launch: u64) -> Grant {
        Grant {
            agent: agent.into(),
            entry: 0,
            launch,
        }
    }

    #[test]
    fn minted_tokens_are_unique_and_well_formed() {
        let a = mint().unwrap();
        let b = mint().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("sup-"));
        assert_eq!(a.expose().len(), 68);
        assert_eq!(format!("{a:?}"), "[REDACTED]");
    }

    #[test]
    fn lookup_insert_revoke() {
        let table = TokenTable::new();
        let t1 = mint().unwrap();
        let t2 = mint().unwrap();
        let t3 = mint().unwrap();
        table.insert(t1.clone(), grant("sparkles", 1));
        table.insert(t2.clone(), grant("sparkles", 2));
        table.insert(t3.clone(), grant("soundwave", 1));
        assert_eq!(table.lookup(t1.expose()), Some(grant("sparkles", 1)));
        assert_eq!(table.lookup("sup-nope"), None);
        assert_eq!(table.lookup(""), None);
        table.revoke_launch("sparkles", 1);
        assert_eq!(
            table.lookup(t1.expose()),
            None,
            "old launch's token is dead"
        );
        assert_eq!(table.lookup(t2.expose()), Some(grant("sparkles", 2)));
        table.revoke_agent("sparkles");
        assert_eq!(table.lookup(t2.expose()), None);
        assert_eq!(table.lookup(t3.expose()), Some(grant("soundwave", 1)));
        assert_eq!(table.len(), 1);
        assert_eq!(table.secrets(), vec![t3]);
    }
}
