//! Secret values and secret names. A `Secret` never prints its value: Debug and
//! Display show `[REDACTED]`, the memory is zeroized on drop (via `secrecy`).
//! Code that needs the bytes calls `expose()`, and only to hand them to a child
//! environment or an upstream header.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// A secret value held by the supervisor.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(SecretString::from(value))
    }

    /// The raw value. Never format it into a log line, error, or status output.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// A short, non-reversible fingerprint (first 12 hex digits of SHA-256) that
    /// identifies a version of the secret without revealing it.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0.expose_secret().as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for Secret {
    /// Constant-time so that comparing secrets leaks no timing information.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.expose().as_bytes(), other.expose().as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// A validated secret name: `[A-Za-z0-9_.-]+`, not `.` or `..`, no `/`.
/// Because a name can never leave its agent's namespace, an agent can only
/// ever name its own secrets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid secret name `{0}`: use letters, digits, `_`, `.` and `-` only (no `/`, not `.` or `..`)"
)]
pub struct InvalidSecretName(pub String);

impl SecretName {
    pub fn parse(name: &str) -> Result<Self, InvalidSecretName> {
        let ok_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if name.is_empty() || !ok_chars || name == "." || name == ".." || name.contains("..") {
            return Err(InvalidSecretName(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_and_display_redact() {
        let s = Secret::new("sk-very-secret".into());
        assert_eq!(format!("{s:?}"), "[REDACTED]");
        assert_eq!(format!("{s}"), "[REDACTED]");
        assert_eq!(s.expose(), "sk-very-secret");
        assert_eq!(s.fingerprint().len(), 12);
        assert!(!s.fingerprint().contains("secret"));
    }

    #[test]
    fn secret_names() {
        for ok in ["llm_api_key", "a.b-c_9", "X"] {
            assert!(SecretName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a..b", "a b", "ключ", "a\0b"] {
            assert!(SecretName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
