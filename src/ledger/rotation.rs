//! Secret versions and rotations in the ledger: which fingerprint of each
//! agent's secret was first seen when (so `status` can show a version's age
//! and the rotation scheduler knows when one is due), and one row per
//! rotation attempt with its outcome (`supervisor rotate --history`).
//! Holds fingerprints only, never a secret value.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{LEDGER_FILE, open_connection};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS secret_versions (
    agent          TEXT    NOT NULL,
    secret         TEXT    NOT NULL,
    fingerprint    TEXT    NOT NULL,
    first_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (agent, secret, fingerprint)
);
CREATE TABLE IF NOT EXISTS rotations (
    id               INTEGER PRIMARY KEY,
    agent            TEXT    NOT NULL,
    secret           TEXT    NOT NULL,
    at_ms            INTEGER NOT NULL,
    old_fingerprint  TEXT,
    new_fingerprint  TEXT,
    outcome          TEXT    NOT NULL,
    message          TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS rotations_by_secret ON rotations (agent, secret, at_ms);
";

fn open(state_dir: &Path) -> Result<Connection> {
    let path = state_dir.join(LEDGER_FILE);
    let conn = open_connection(&path)?;
    conn.execute_batch(SCHEMA)
        .with_context(|| format!("cannot create the rotation tables in `{}`", path.display()))?;
    Ok(conn)
}

/// Records that `agent`'s `secret` has version `fingerprint`, seen at
/// `now_ms` unless it was seen before; returns when it was first seen.
pub fn observe_version(
    state_dir: &Path,
    agent: &str,
    secret: &str,
    fingerprint: &str,
    now_ms: i64,
) -> Result<i64> {
    let conn = open(state_dir)?;
    observe_on(&conn, agent, secret, fingerprint, now_ms)
}

fn observe_on(
    conn: &Connection,
    agent: &str,
    secret: &str,
    fingerprint: &str,
    now_ms: i64,
) -> Result<i64> {
    conn.execute(
        "INSERT OR IGNORE INTO secret_versions (agent, secret, fingerprint, first_seen_ms)
         VALUES (?1, ?2, ?3, ?4)",
        params![agent, secret, fingerprint, now_ms],
    )
    .context("cannot record a secret version")?;
    conn.query_row(
        "SELECT first_seen_ms FROM secret_versions WHERE agent = ?1 AND secret = ?2 AND fingerprint = ?3",
        params![agent, secret, fingerprint],
        |r| r.get(0),
    )
    .context("cannot read a secret version")
}

/// Records every `(agent, secret, fingerprint)` in one transaction; returns
/// each one's first-seen time, in the same order.
pub fn observe_versions(
    state_dir: &Path,
    versions: &[(String, String, String)],
    now_ms: i64,
) -> Result<Vec<i64>> {
    let mut conn = open(state_dir)?;
    let tx = conn.transaction()?;
    let mut out = Vec::with_capacity(versions.len());
    for (agent, secret, fingerprint) in versions {
        out.push(observe_on(&tx, agent, secret, fingerprint, now_ms)?);
    }
    tx.commit().context("cannot record secret versions")?;
    Ok(out)
}

/// The most recent version of `agent`'s `secret` seen: `(fingerprint, first_seen_ms)`.
pub fn latest_version(
    state_dir: &Path,
    agent: &str,
    secret: &str,
) -> Result<Option<(String, i64)>> {
    if !state_dir.join(LEDGER_FILE).exists() {
        return Ok(None);
    }
    let conn = open(state_dir)?;
    conn.query_row(
        "SELECT fingerprint, first_seen_ms FROM secret_versions
         WHERE agent = ?1 AND secret = ?2 ORDER BY first_seen_ms DESC, rowid DESC LIMIT 1",
        params![agent, secret],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .context("cannot read secret versions")
}

/// How a rotation attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationOutcome {
    /// The new version is written and swapped in; the old one awaits revocation.
    Rotated,
    /// The old version was revoked after the grace window.
    Revoked,
    /// Nothing changed: the issuer or the write failed; the old key keeps working.
    Failed,
    /// The new version is live but revoking the old one failed.
    RevokeFailed,
}

impl RotationOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotated => "rotated",
            Self::Revoked => "revoked",
            Self::Failed => "failed",
            Self::RevokeFailed => "revoke_failed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "rotated" => Self::Rotated,
            "revoked" => Self::Revoked,
            "revoke_failed" => Self::RevokeFailed,
            _ => Self::Failed,
        }
    }
}

/// One row of `rotations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RotationRecord {
    pub agent: String,
    pub secret: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub old_fingerprint: Option<String>,
    pub new_fingerprint: Option<String>,
    pub outcome: RotationOutcome,
    /// Why it failed; empty on success. Never holds a secret or hook output.
    pub message: String,
}

pub fn record_rotation(state_dir: &Path, record: &RotationRecord) -> Result<()> {
    let conn = open(state_dir)?;
    conn.execute(
        "INSERT INTO rotations (agent, secret, at_ms, old_fingerprint, new_fingerprint, outcome, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            record.agent,
            record.secret,
            record.at_ms,
            record.old_fingerprint,
            record.new_fingerprint,
            record.outcome.as_str(),
            record.message
        ],
    )
    .context("cannot record the rotation")?;
    Ok(())
}

/// Every rotation attempt, oldest first; empty when there is no ledger yet.
pub fn rotations(state_dir: &Path) -> Result<Vec<RotationRecord>> {
    if !state_dir.join(LEDGER_FILE).exists() {
        return Ok(Vec::new());
    }
    let conn = open(state_dir)?;
    let mut stmt = conn.prepare(
        "SELECT agent, secret, at_ms, old_fingerprint, new_fingerprint, outcome, message
         FROM rotations ORDER BY at_ms, id",
    )?;
    let rows = stmt.query_map([], |r| {
        let outcome: String = r.get(5)?;
        Ok(RotationRecord {
            agent: r.get(0)?,
            secret: r.get(1)?,
            at_ms: r.get(2)?,
            old_fingerprint: r.get(3)?,
            new_fingerprint: r.get(4)?,
            outcome: RotationOutcome::parse(&outcome),
            message: r.get(6)?,
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// When `agent`'s `secret` last got a new version: its latest successful
/// rotation, else the first time its current version was seen.
pub fn last_renewed_ms(state_dir: &Path, agent: &str, secret: &str) -> Result<Option<i64>> {
    if !state_dir.join(LEDGER_FILE).exists() {
        return Ok(None);
    }
    let conn = open(state_dir)?;
    let rotated: Option<i64> = conn
        .query_row(
            "SELECT MAX(at_ms) FROM rotations WHERE agent = ?1 AND secret = ?2 AND outcome = 'rotated'",
            params![agent, secret],
            |r| r.get(0),
        )
        .context("cannot read rotations")?;
    let seen = latest_version(state_dir, agent, secret)?.map(|(_, ms)| ms);
    Ok(rotated.into_iter().chain(seen).max())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_keep_their_first_sighting() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest_version(dir.path(), "a", "k").unwrap(), None);
        assert_eq!(
            observe_version(dir.path(), "a", "k", "fp1", 100).unwrap(),
            100
        );
        assert_eq!(
            observe_version(dir.path(), "a", "k", "fp1", 200).unwrap(),
            100
        );
        let got = observe_versions(
            dir.path(),
            &[
                ("a".into(), "k".into(), "fp2".into()),
                ("b".into(), "k".into(), "fp1".into()),
            ],
            300,
        )
        .unwrap();
        assert_eq!(got, [300, 300]);
        assert_eq!(
            latest_version(dir.path(), "a", "k").unwrap(),
            Some(("fp2".into(), 300))
        );
        assert_eq!(last_renewed_ms(dir.path(), "a", "k").unwrap(), Some(300));
    }

    #[test]
    fn rotations_round_trip_and_renew_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        assert!(rotations(dir.path()).unwrap().is_empty());
        observe_version(dir.path(), "a", "k", "fp1", 100).unwrap();
        let rotated = RotationRecord {
            agent: "a".into(),
            secret: "k".into(),
            at_ms: 500,
            old_fingerprint: Some("fp1".into()),
            new_fingerprint: Some("fp2".into()),
            outcome: RotationOutcome::Rotated,
            message: String::new(),
        };
        let failed = RotationRecord {
            at_ms: 900,
            new_fingerprint: None,
            outcome: RotationOutcome::Failed,
            message: "issuer exited with code 3".into(),
            ..rotated.clone()
        };
        record_rotation(dir.path(), &rotated).unwrap();
        record_rotation(dir.path(), &failed).unwrap();
        assert_eq!(rotations(dir.path()).unwrap(), [rotated, failed]);
        // A failed attempt does not count as a renewal.
        assert_eq!(last_renewed_ms(dir.path(), "a", "k").unwrap(), Some(500));
        assert_eq!(last_renewed_ms(dir.path(), "a", "other").unwrap(), None);
    }
}
