//! The durable ledger: one SQLite file (`ledger.db` in `state_dir`, WAL mode)
//! holding a row per metered request. Only this module touches SQLite.
//!
//! Writes go to one writer thread that owns the connection and commits
//! whatever is queued in one transaction (group commit), so the proxy never
//! waits on SQLite for more than one batch and never holds a lock across it.
//! A reservation is committed *before* the request is forwarded (the proxy
//! awaits `reserve`), so a supervisor killed mid-request never loses usage: on
//! the next start, unsettled rows are charged at their reserved amount.
//! Settlements are fire-and-forget and batched.
//!
//! Must not: do arithmetic on ceilings (that is `budget`), or hold secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::oneshot;

pub use crate::budget::Month;

pub mod rotation;

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub fn unix_millis_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// File name of the ledger inside `state_dir`.
pub const LEDGER_FILE: &str = "ledger.db";

/// Most operations folded into one transaction.
const MAX_BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id                          INTEGER PRIMARY KEY,
    agent                       TEXT    NOT NULL,
    provider                    TEXT    NOT NULL,
    model                       TEXT    NOT NULL,
    month                       TEXT    NOT NULL,
    started_at_ms               INTEGER NOT NULL,
    reserved_tokens             INTEGER NOT NULL,
    reserved_micro_usd          INTEGER NOT NULL,
    settled                     INTEGER NOT NULL DEFAULT 0,
    outcome                     TEXT    NOT NULL DEFAULT 'in_flight',
    status                      INTEGER,
    streamed                    INTEGER NOT NULL DEFAULT 0,
    duration_ms                 INTEGER,
    input_tokens                INTEGER NOT NULL DEFAULT 0,
    output_tokens               INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens     INTEGER NOT NULL DEFAULT 0,
    charged_tokens              INTEGER NOT NULL DEFAULT 0,
    charged_micro_usd           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_by_month_agent ON requests (month, agent);
CREATE TABLE IF NOT EXISTS quarantine (
    agent     TEXT    PRIMARY KEY,
    since_ms  INTEGER NOT NULL,
    reason    TEXT    NOT NULL,
    evidence  TEXT    NOT NULL
);
PRAGMA user_version = 1;
";

/// A request about to be forwarded, with the worst case it reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub agent: String,
    pub provider: String,
    pub model: String,
    pub month: Month,
    pub started_at_ms: i64,
    pub reserved_tokens: u64,
    pub reserved_micro_usd: u64,
}

/// How a request ended. `charged_*` is what counts against the ceilings: the
/// real usage, or more for a cut stream (see `budget`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub streamed: bool,
    pub duration_ms: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub charged_tokens: u64,
    pub charged_micro_usd: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Outcome {
    /// The answer completed and its usage is exact.
    #[default]
    Ok,
    /// Upstream answered with an error; usage as reported (often zero).
    UpstreamError,
    /// The stream was cut before its usage arrived; charged conservatively.
    Cut,
    /// Nothing reached upstream (unreachable, timeout before sending); nothing charged.
    Released,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Cut => "cut",
            Outcome::Released => "released",
        }
    }
}

/// Per-agent totals for one month, as counted against ceilings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentMonthUsage {
    pub agent: String,
    pub month: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub charged_tokens: u64,
    pub charged_micro_usd: u64,
    /// Requests still in flight (or left unsettled by a crash): counted at their reservation.
    pub unsettled: u64,
}

enum Op {
    Reserve {
        id: i64,
        reservation: Reservation,
        ack: oneshot::Sender<std::result::Result<(), String>>,
    },
    Settle {
        id: i64,
        settlement: Settlement,
    },
    Flush {
        ack: oneshot::Sender<()>,
    },
}

/// Handle to the ledger's writer thread. Cheap to share behind an `Arc`.
pub struct Ledger {
    path: PathBuf,
    tx: mpsc::Sender<Op>,
    next_id: AtomicI64,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open the ledger `{}`", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // WAL + NORMAL: a committed transaction survives a crash of this process
    // (kill -9); only power loss can lose the last few, and group commit keeps
    // the writer off every request's critical path.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

impl Ledger {
    /// Opens (creating if needed) `state_dir/ledger.db`, charges rows left
    /// unsettled by a previous run at their reserved amount, and starts the
    /// writer thread.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(LEDGER_FILE);
        let conn = open_connection(&path)?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the ledger schema in `{}`", path.display()))?;
        let recovered = conn
            .execute(
                "UPDATE requests SET settled = 1, outcome = 'unsettled',
                        charged_tokens = reserved_tokens, charged_micro_usd = reserved_micro_usd
                 WHERE settled = 0",
                [],
            )
            .context("cannot recover unsettled reservations")?;
        if recovered > 0 {
            tracing::warn!(
                requests = recovered,
                "ledger: charged requests left in flight by a previous run at their reserved amount"
            );
        }
        let max_id: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM requests", [], |r| {
            r.get(0)
        })?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .context("cannot start the ledger writer thread")?;
        Ok(Self {
            path,
            tx,
            next_id: AtomicI64::new(max_id + 1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a reservation and waits until it is committed: call this before
    /// forwarding, so no request reaches upstream without a durable row.
    pub async fn reserve(&self, reservation: Reservation) -> Result<i64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Op::Reserve {
                id,
                reservation,
                ack,
            })
            .map_err(|_| anyhow::anyhow!("the ledger writer has stopped"))?;
        match done.await {
            Ok(Ok(())) => Ok(id),
            Ok(Err(message)) => Err(anyhow::anyhow!("cannot record the reservation: {message}")),
            Err(_) => Err(anyhow::anyhow!("the ledger writer has stopped")),
        }
    }

    /// Records how a request ended; batched, returns at once.
    pub fn settle(&self, id: i64, settlement: Settlement) {
        if self.tx.send(Op::Settle { id, settlement }).is_err() {
            tracing::error!(
                id,
                "ledger writer has stopped; a settlement was not recorded"
            );
        }
    }

    /// Waits until everything sent so far is committed (shutdown, tests).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Op::Flush { ack }).is_ok() {
            let _ = done.await;
        }
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = write_batch(&mut conn, &batch);
        if let Err(err) = &result {
            tracing::error!("ledger: cannot commit {} operations: {err:#}", batch.len());
        }
        for op in batch {
            match op {
                Op::Reserve { ack, .. } => {
                    let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
                }
                Op::Flush { ack } => {
                    let _ = ack.send(());
                }
                Op::Settle { .. } => {}
            }
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Op]) -> Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO requests (id, agent, provider, model, month, started_at_ms,
                                   reserved_tokens, reserved_micro_usd)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut update = tx.prepare_cached(
            "UPDATE requests SET settled = 1, outcome = ?2, status = ?3, streamed = ?4,
                 duration_ms = ?5, input_tokens = ?6, output_tokens = ?7,
                 cache_creation_input_tokens = ?8, cache_read_input_tokens = ?9,
                 charged_tokens = ?10, charged_micro_usd = ?11
             WHERE id = ?1",
        )?;
        for op in batch {
            match op {
                Op::Reserve {
                    id, reservation: r, ..
                } => {
                    insert.execute(params![
                        id,
                        r.agent,
                        r.provider,
                        r.model,
                        r.month.to_string(),
                        r.started_at_ms,
                        to_sql(r.reserved_tokens),
                        to_sql(r.reserved_micro_usd),
                    ])?;
                }
                Op::Settle { id, settlement: s } => {
                    update.execute(params![
                        id,
                        s.outcome.as_str(),
                        s.status,
                        s.streamed,
                        to_sql(s.duration_ms),
                        to_sql(s.input_tokens),
                        to_sql(s.output_tokens),
                        to_sql(s.cache_creation_input_tokens),
                        to_sql(s.cache_read_input_tokens),
                        to_sql(s.charged_tokens),
                        to_sql(s.charged_micro_usd),
                    ])?;
                }
                Op::Flush { .. } => {}
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// SQLite integers are i64; counts beyond that are saturated rather than wrapped.
fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Per-agent usage for `month`, read straight from the file (works with or
/// without a running supervisor; WAL lets readers and the writer coexist).
/// Rows still unsettled count at their reserved amount.
pub fn month_usage(state_dir: &Path, month: Month) -> Result<Vec<AgentMonthUsage>> {
    let path = state_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the ledger `{}`", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT agent, COUNT(*),
                SUM(input_tokens), SUM(output_tokens),
                SUM(cache_creation_input_tokens), SUM(cache_read_input_tokens),
                SUM(CASE WHEN settled = 1 THEN charged_tokens ELSE reserved_tokens END),
                SUM(CASE WHEN settled = 1 THEN charged_micro_usd ELSE reserved_micro_usd END),
                SUM(CASE WHEN settled = 1 THEN 0 ELSE 1 END)
         FROM requests WHERE month = ?1 AND outcome != 'released'
         GROUP BY agent ORDER BY agent",
    )?;
    let month_text = month.to_string();
    let rows = stmt.query_map(params![month_text], |r| {
        Ok(AgentMonthUsage {
            agent: r.get(0)?,
            month: month_text.clone(),
            requests: from_sql(r.get(1)?),
            input_tokens: from_sql(r.get(2)?),
            output_tokens: from_sql(r.get(3)?),
            cache_creation_input_tokens: from_sql(r.get(4)?),
            cache_read_input_tokens: from_sql(r.get(5)?),
            charged_tokens: from_sql(r.get(6)?),
            charged_micro_usd: from_sql(r.get(7)?),
            unsettled: from_sql(r.get(8)?),
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// One request's charge, as `tune` reads the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSample {
    pub agent: String,
    /// Unix milliseconds.
    pub started_at_ms: i64,
    /// Tokens counted against the ceilings (the reservation while unsettled).
    pub tokens: u64,
    pub micro_usd: u64,
}

/// Every request started at or after `since_ms` that counts as usage
/// (released ones do not; unsettled ones count at their reservation), oldest
/// first. Empty when there is no ledger yet.
pub fn usage_samples(state_dir: &Path, since_ms: i64) -> Result<Vec<UsageSample>> {
    let path = state_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the ledger `{}`", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT agent, started_at_ms,
                CASE WHEN settled = 1 THEN charged_tokens ELSE reserved_tokens END,
                CASE WHEN settled = 1 THEN charged_micro_usd ELSE reserved_micro_usd END
         FROM requests WHERE started_at_ms >= ?1 AND outcome != 'released'
         ORDER BY started_at_ms",
    )?;
    let rows = stmt.query_map(params![since_ms], |r| {
        Ok(UsageSample {
            agent: r.get(0)?,
            started_at_ms: r.get(1)?,
            tokens: from_sql(r.get(2)?),
            micro_usd: from_sql(r.get(3)?),
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// An agent stopped as a runaway, kept down until released.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuarantineRecord {
    pub agent: String,
    /// Unix milliseconds.
    pub since_ms: i64,
    pub reason: String,
    /// The detector's evidence as JSON: sizes, growth, truncated failure texts.
    pub evidence: serde_json::Value,
}

fn open_for_write(state_dir: &Path) -> Result<Connection> {
    let path = state_dir.join(LEDGER_FILE);
    let conn = open_connection(&path)?;
    conn.execute_batch(SCHEMA)
        .with_context(|| format!("cannot create the ledger schema in `{}`", path.display()))?;
    Ok(conn)
}

/// Persists a quarantine (replacing an older record of the same agent).
pub fn put_quarantine(state_dir: &Path, record: &QuarantineRecord) -> Result<()> {
    let conn = open_for_write(state_dir)?;
    conn.execute(
        "INSERT OR REPLACE INTO quarantine (agent, since_ms, reason, evidence) VALUES (?1, ?2, ?3, ?4)",
        params![
            record.agent,
            record.since_ms,
            record.reason,
            record.evidence.to_string()
        ],
    )
    .context("cannot record the quarantine")?;
    Ok(())
}

/// Every quarantined agent, oldest first. Empty when there is no ledger yet.
pub fn quarantined(state_dir: &Path) -> Result<Vec<QuarantineRecord>> {
    let path = state_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = open_for_write(state_dir)?;
    let mut stmt =
        conn.prepare("SELECT agent, since_ms, reason, evidence FROM quarantine ORDER BY since_ms")?;
    let rows = stmt.query_map([], |r| {
        let evidence: String = r.get(3)?;
        Ok(QuarantineRecord {
            agent: r.get(0)?,
            since_ms: r.get(1)?,
            reason: r.get(2)?,
            evidence: serde_json::from_str(&evidence).unwrap_or(serde_json::Value::Null),
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?);
    }
    Ok(out)
}

/// Clears an agent's quarantine; `false` if it was not quarantined.
pub fn release_quarantine(state_dir: &Path, agent: &str) -> Result<bool> {
    let path = state_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(false);
    }
    let conn = open_for_write(state_dir)?;
    let n = conn
        .execute("DELETE FROM quarantine WHERE agent = ?1", params![agent])
        .context("cannot clear the quarantine")?;
    Ok(n > 0)
}

/// Month totals by agent, used to rebuild the in-memory ceilings at start.
pub fn month_totals(state_dir: &Path, month: Month) -> Result<BTreeMap<String, AgentMonthUsage>> {
    Ok(month_usage(state_dir, month)?
        .into_iter()
        .map(|u| (u.agent.clone(), u))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reservation(agent: &str, tokens: u64) -> Reservation {
        Reservation {
            agent: agent.into(),
            provider: "anthropic".into(),
            model: "claude-sonnet-4-5".into(),
            month: Month::new(2026, 11).unwrap(),
            started_at_ms: 1_790_000_000_000,
            reserved_tokens: tokens,
            reserved_micro_usd: tokens * 3,
        }
    }

    #[tokio::test]
    async fn reserve_settle_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let a = ledger.reserve(reservation("sparkles", 1000)).await.unwrap();
        let b = ledger.reserve(reservation("sparkles", 500)).await.unwrap();
        let _c = ledger.reserve(reservation("soundwave", 200)).await.unwrap();
        assert_ne!(a, b);
        ledger.settle(
            a,
            Settlement {
                input_tokens: 300,
                output_tokens: 100,
                cache_read_input_tokens: 50,
                charged_tokens: 450,
                charged_micro_usd: 1234,
                ..Settlement::default()
            },
        );
        ledger.settle(
            b,
            Settlement {
                outcome: Outcome::Released,
                ..Settlement::default()
            },
        );
        ledger.flush().await;
        let usage = month_usage(dir.path(), Month::new(2026, 11).unwrap()).unwrap();
        assert_eq!(usage.len(), 2);
        let soundwave = &usage[0];
        assert_eq!(soundwave.agent, "soundwave");
        assert_eq!(soundwave.unsettled, 1);
        assert_eq!(
            soundwave.charged_tokens, 200,
            "in flight counts at its reservation"
        );
        let sparkles = &usage[1];
        assert_eq!(sparkles.requests, 1, "a released request is not usage");
        assert_eq!(sparkles.input_tokens, 300);
        assert_eq!(sparkles.cache_read_input_tokens, 50);
        assert_eq!(sparkles.charged_tokens, 450);
        assert_eq!(sparkles.charged_micro_usd, 1234);
        assert!(
            month_usage(dir.path(), Month::new(2026, 10).unwrap())
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn unsettled_rows_are_charged_at_reservation_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            ledger.reserve(reservation("sparkles", 777)).await.unwrap();
            // dropped without settling, as a killed supervisor would leave it
        }
        let reopened = Ledger::open(dir.path()).unwrap();
        let next = reopened.reserve(reservation("sparkles", 1)).await.unwrap();
        assert_eq!(next, 2, "ids continue after the existing rows");
        reopened.flush().await;
        let usage = month_usage(dir.path(), Month::new(2026, 11).unwrap()).unwrap();
        assert_eq!(usage[0].charged_tokens, 778);
        assert_eq!(usage[0].unsettled, 1, "only the new row is still in flight");
    }

    #[test]
    fn quarantine_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(quarantined(dir.path()).unwrap().is_empty());
        assert!(!release_quarantine(dir.path(), "x").unwrap());
        let record = QuarantineRecord {
            agent: "notes".into(),
            since_ms: 5,
            reason: "runaway: 4 failing retries".into(),
            evidence: serde_json::json!({"count": 4}),
        };
        put_quarantine(dir.path(), &record).unwrap();
        assert_eq!(quarantined(dir.path()).unwrap(), vec![record]);
        assert!(release_quarantine(dir.path(), "notes").unwrap());
        assert!(quarantined(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn usage_of_a_missing_ledger_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            month_usage(dir.path(), Month::new(2026, 1).unwrap())
                .unwrap()
                .is_empty()
        );
    }
}
