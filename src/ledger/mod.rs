//! The durable ledger: one SQLite file (`ledger.db` in `state_dir`, WAL mode)
//! holding a row per metered request, plus the reservation journal that makes
//! a reservation durable before SQLite has seen it. Only this module touches
//! SQLite or the journal.
//!
//! Before a request is forwarded, `reserve` appends its reservation as one
//! JSON line to `ledger.journal` with a single `write(2)` (`O_APPEND`, no
//! fsync) from the request's own task. Once that returns, the record is in the
//! kernel's page cache: it survives a kill -9 of the supervisor, not a power
//! loss — the same guarantee the WAL with `synchronous = NORMAL` gives the
//! rows themselves. One writer thread owns the SQLite connection and folds
//! reservations and settlements into one transaction every few milliseconds
//! (group commit), so no request waits on SQLite or on another thread.
//!
//! The journal only has to hold what SQLite may lack. When it grows past
//! `JOURNAL_ROTATE_BYTES`, the writer renames it to `ledger.journal.old` and
//! opens a fresh one (under the append lock, so every record of the old file
//! is already queued), commits the queue, then deletes the old file. On open,
//! journal records missing from SQLite are inserted, and every unsettled row
//! is charged at its reserved amount; readers (`supervisor usage`) count
//! journal records SQLite lacks the same way, so a killed supervisor's usage
//! shows without a restart.
//!
//! Must not: do arithmetic on ceilings (that is `budget`), or hold secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};
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
/// The reservation journal being appended to, inside `state_dir`.
pub const JOURNAL_FILE: &str = "ledger.journal";
/// A rotated journal whose records are being committed to SQLite.
pub const JOURNAL_OLD_FILE: &str = "ledger.journal.old";

/// Past this size the writer rotates the journal (~25k reservations).
const JOURNAL_ROTATE_BYTES: u64 = 4 << 20;
/// Version of the journal's line format.
const JOURNAL_VERSION: u32 = 1;
/// How long the writer lets operations gather before committing them: one
/// transaction per linger instead of one per request, and senders do not
/// have to wake a sleeping thread for each operation.
const LINGER: Duration = Duration::from_millis(5);
/// Most operations folded into one transaction.
const MAX_BATCH: usize = 4096;

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
CREATE INDEX IF NOT EXISTS requests_by_agent_time ON requests (agent, started_at_ms);
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
    /// Settled requests charged at their reservation because their usage
    /// never arrived: cut streams, and rows a crash left unsettled.
    pub cut: u64,
}

enum Op {
    Reserve { id: i64, reservation: Reservation },
    Settle { id: i64, settlement: Settlement },
    Flush { ack: oneshot::Sender<()> },
}

/// Handle to the ledger: the journal to append reservations to, and the
/// writer thread's queue. Cheap to share behind an `Arc`; dropping it commits
/// what is queued and stops the writer.
pub struct Ledger {
    path: PathBuf,
    journal: Arc<Journal>,
    tx: Option<mpsc::Sender<Op>>,
    writer: Option<thread::JoinHandle<()>>,
    next_id: AtomicI64,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

/// Whether `err` (from opening or reading the ledger) says `ledger.db` is
/// not a SQLite database or is damaged: retrying cannot help, and the fix is
/// moving it aside, not a permission change.
pub fn is_corrupt(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
                )
        )
    })
}

/// What to do about a ledger that cannot be opened or read, for a `hint:` line.
pub fn failure_hint(err: &anyhow::Error, state_dir: &Path) -> String {
    if is_corrupt(err) {
        let dir = state_dir.display();
        format!(
            "`{dir}/{LEDGER_FILE}` is corrupt (not a SQLite database, or damaged). With the supervisor \
             stopped, move `{LEDGER_FILE}`, `{LEDGER_FILE}-wal` and `{LEDGER_FILE}-shm` aside (e.g. into \
             `{dir}/corrupt/`) and start again: a new ledger is created and `{JOURNAL_FILE}` (keep it) \
             charges the last run's reservations into it. Lost with the old file: earlier request rows \
             (this month's totals restart from what the journal holds, so ceilings allow that much again), \
             quarantine records (quarantined agents start again) and rotation history; \
             `sqlite3 OLD.db .recover` may salvage rows"
        )
    } else {
        format!(
            "the ledger is `{LEDGER_FILE}` in `{}`; check that it and its folder are readable and \
             writable by the supervisor's user",
            state_dir.display()
        )
    }
}

/// Creates the ledger file 0600 before SQLite sees it, whatever the umask:
/// SQLite gives its `-wal` and `-shm` files the database file's mode.
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => {
            Err(err).with_context(|| format!("cannot create the ledger `{}`", path.display()))
        }
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    create_private(path)?;
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open the ledger `{}`", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // WAL + NORMAL: a committed transaction survives a crash of this process
    // (kill -9); only power loss can lose the last few. The journal gives
    // reservations the same guarantee before they reach SQLite.
    conn.pragma_update(None, "journal_mode", "WAL")
        .and_then(|()| conn.pragma_update(None, "synchronous", "NORMAL"))
        .with_context(|| format!("cannot read the ledger `{}`", path.display()))?;
    Ok(conn)
}

impl Ledger {
    /// Opens (creating if needed) `state_dir/ledger.db`, inserts reservations
    /// a previous run journaled but never committed, charges rows left
    /// unsettled at their reserved amount, and starts the writer thread.
    pub fn open(state_dir: &Path) -> Result<Self> {
        Self::open_rotating_at(state_dir, JOURNAL_ROTATE_BYTES)
    }

    fn open_rotating_at(state_dir: &Path, rotate_at: u64) -> Result<Self> {
        let path = state_dir.join(LEDGER_FILE);
        let mut conn = open_connection(&path)?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the ledger schema in `{}`", path.display()))?;
        let journaled = read_journal(state_dir)?;
        if journaled.unreadable > 0 {
            tracing::warn!(
                lines = journaled.unreadable,
                "ledger: skipped unreadable journal lines (a record torn by a crash is never one that was forwarded)"
            );
        }
        let replayed = replay(&mut conn, &journaled.records).with_context(|| {
            format!(
                "cannot recover the reservation journal into `{}`",
                path.display()
            )
        })?;
        if replayed > 0 {
            tracing::warn!(
                requests = replayed,
                "ledger: recovered reservations a previous run had journaled but not committed"
            );
        }
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
        // Everything journaled is now committed; a fresh journal starts empty.
        for name in [JOURNAL_OLD_FILE, JOURNAL_FILE] {
            remove_if_present(&state_dir.join(name))?;
        }
        let max_id: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM requests", [], |r| {
            r.get(0)
        })?;
        let journal = Arc::new(Journal::create(state_dir, rotate_at)?);
        let (tx, rx) = mpsc::channel();
        let writer_journal = journal.clone();
        let writer = thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer_loop(conn, rx, &writer_journal))
            .context("cannot start the ledger writer thread")?;
        Ok(Self {
            path,
            journal,
            tx: Some(tx),
            writer: Some(writer),
            next_id: AtomicI64::new(max_id + 1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes a reservation durable (one append to the journal) and queues it
    /// for SQLite. Call this before forwarding: once it returns, a crash of
    /// the process cannot lose the reservation.
    pub fn reserve(&self, reservation: Reservation) -> Result<i64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = encode_record(id, &reservation);
        let mut appender = self.journal.lock()?;
        appender.append(&line).with_context(|| {
            format!(
                "cannot append to the reservation journal `{}`; check free space and permissions in the state dir",
                self.journal.current.display()
            )
        })?;
        // Queued while the append lock is held, so a rotation (which takes
        // the lock) knows every record of the file it retires is queued.
        self.send(Op::Reserve { id, reservation })?;
        drop(appender);
        Ok(id)
    }

    /// Records how a request ended; batched, returns at once.
    pub fn settle(&self, id: i64, settlement: Settlement) {
        if self.send(Op::Settle { id, settlement }).is_err() {
            tracing::error!(
                id,
                "ledger writer has stopped; a settlement was not recorded"
            );
        }
    }

    /// Waits until everything sent so far is committed (shutdown, tests).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.send(Op::Flush { ack }).is_ok() {
            let _ = done.await;
        }
    }

    fn send(&self, op: Op) -> Result<()> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(op).ok())
            .ok_or_else(|| anyhow::anyhow!("the ledger writer has stopped"))
    }
}

impl Drop for Ledger {
    /// Lets the writer commit what is queued (and remove the journal) before
    /// the handle is gone, so a reopen in the same process sees it all.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("ledger writer thread panicked");
        }
    }
}

/// The append side of the journal. `reserve` holds the lock for one
/// `write(2)` and one queue push; the writer holds it to swap files.
struct Journal {
    current: PathBuf,
    old: PathBuf,
    appender: Mutex<Appender>,
    /// Past this size the writer rotates the file.
    rotate_at: u64,
}

struct Appender {
    file: File,
    /// A failed or short write may have left half a line: the next record
    /// starts on a new line so it stays readable.
    torn: bool,
    len: u64,
}

impl Journal {
    fn create(state_dir: &Path, rotate_at: u64) -> Result<Self> {
        let current = state_dir.join(JOURNAL_FILE);
        let file = open_append(&current)?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            old: state_dir.join(JOURNAL_OLD_FILE),
            current,
            appender: Mutex::new(Appender {
                file,
                torn: len > 0,
                len,
            }),
            rotate_at,
        })
    }

    fn wants_rotation(&self) -> bool {
        self.lock().is_ok_and(|a| a.len >= self.rotate_at)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Appender>> {
        self.appender
            .lock()
            .map_err(|_| anyhow::anyhow!("the reservation journal's lock is poisoned"))
    }

    /// Retires the current file as `old` and starts a fresh one. Every
    /// record of the retired file is queued for SQLite when this returns.
    fn rotate(&self) -> Result<()> {
        let mut appender = self.lock()?;
        fs::rename(&self.current, &self.old).with_context(|| {
            format!(
                "cannot rotate the reservation journal `{}`",
                self.current.display()
            )
        })?;
        appender.file = open_append(&self.current)?;
        appender.torn = false;
        appender.len = 0;
        Ok(())
    }
}

impl Appender {
    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        let joined;
        let bytes = if self.torn {
            joined = [b"\n", line].concat();
            &joined[..]
        } else {
            line
        };
        // One write(2): with O_APPEND the record lands whole at the end, and
        // a kill -9 cannot split a write to a regular file.
        let result = self.file.write(bytes);
        match result {
            Ok(n) if n == bytes.len() => {
                self.torn = false;
                self.len += n as u64;
                Ok(())
            }
            Ok(n) => {
                self.torn = true;
                self.len += n as u64;
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {n} of {} bytes", bytes.len()),
                ))
            }
            Err(err) => {
                self.torn = true;
                Err(err)
            }
        }
    }
}

fn open_append(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open the reservation journal `{}` for appending",
                path.display()
            )
        })
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("cannot remove `{}`", path.display())),
    }
}

/// A journal line as written: borrowed, so `reserve` copies no strings.
#[derive(Serialize)]
struct JournalLine<'a> {
    v: u32,
    id: i64,
    agent: &'a str,
    provider: &'a str,
    model: &'a str,
    month: DisplayAsStr<Month>,
    started_at_ms: i64,
    reserved_tokens: u64,
    reserved_micro_usd: u64,
}

/// A journal line as read back.
#[derive(Debug, Deserialize)]
struct JournalRecord {
    v: u32,
    id: i64,
    agent: String,
    provider: String,
    model: String,
    month: String,
    started_at_ms: i64,
    reserved_tokens: u64,
    reserved_micro_usd: u64,
}

struct DisplayAsStr<T>(T);

impl<T: fmt::Display> Serialize for DisplayAsStr<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

fn encode_record(id: i64, r: &Reservation) -> Vec<u8> {
    let line = JournalLine {
        v: JOURNAL_VERSION,
        id,
        agent: &r.agent,
        provider: &r.provider,
        model: &r.model,
        month: DisplayAsStr(r.month),
        started_at_ms: r.started_at_ms,
        reserved_tokens: r.reserved_tokens,
        reserved_micro_usd: r.reserved_micro_usd,
    };
    let mut out = Vec::with_capacity(192);
    // Serializing plain strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &line);
    out.push(b'\n');
    out
}

#[derive(Debug, Default)]
struct Journaled {
    records: Vec<JournalRecord>,
    /// Lines that are not a whole record of this version (a torn tail).
    unreadable: usize,
}

/// Every readable record of both journal files. The current file is read
/// before the retired one: a rotation in between then only moves records
/// from the one to the other, never out of sight.
fn read_journal(state_dir: &Path) -> Result<Journaled> {
    let mut out = Journaled::default();
    for name in [JOURNAL_FILE, JOURNAL_OLD_FILE] {
        let path = state_dir.join(name);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("cannot read the reservation journal `{}`", path.display())
                });
            }
        };
        parse_journal(&bytes, &mut out);
    }
    Ok(out)
}

fn parse_journal(bytes: &[u8], out: &mut Journaled) {
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<JournalRecord>(line) {
            Ok(record) if record.v == JOURNAL_VERSION && record.month.parse::<Month>().is_ok() => {
                out.records.push(record);
            }
            _ => out.unreadable += 1,
        }
    }
}

/// Inserts journal records SQLite lacks, unsettled; returns how many.
fn replay(conn: &mut Connection, records: &[JournalRecord]) -> Result<usize> {
    if records.is_empty() {
        return Ok(0);
    }
    let tx = conn.transaction()?;
    let mut inserted = 0;
    {
        let mut insert = tx.prepare(
            "INSERT OR IGNORE INTO requests (id, agent, provider, model, month, started_at_ms,
                                             reserved_tokens, reserved_micro_usd)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for r in records {
            inserted += insert.execute(params![
                r.id,
                r.agent,
                r.provider,
                r.model,
                r.month,
                r.started_at_ms,
                to_sql(r.reserved_tokens),
                to_sql(r.reserved_micro_usd),
            ])?;
        }
    }
    tx.commit()?;
    Ok(inserted)
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Op>, journal: &Journal) {
    // After a failed commit the journal is the only copy of some records, so
    // it is never rotated away again in this run; the next open replays it.
    let mut keep_journal = false;
    while let Ok(first) = rx.recv() {
        if !matches!(first, Op::Flush { .. }) {
            thread::sleep(LINGER);
        }
        let mut batch = vec![first];
        drain(&rx, &mut batch, MAX_BATCH);
        // Flushes are answered once everything this round does is done, the
        // rotation it triggers included: a flushed reader finds no
        // half-retired journal.
        let mut acks = Vec::new();
        keep_journal |= !commit(&mut conn, batch, &mut acks);
        if !keep_journal && journal.wants_rotation() {
            if let Err(err) = journal.rotate() {
                tracing::error!("ledger: {err:#}");
                keep_journal = true;
            } else {
                let mut queued = Vec::new();
                drain(&rx, &mut queued, usize::MAX);
                if commit(&mut conn, queued, &mut acks) {
                    if let Err(err) = remove_if_present(&journal.old) {
                        tracing::warn!("ledger: {err:#}");
                    }
                } else {
                    keep_journal = true;
                }
            }
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
    // Every handle is gone and everything queued is committed.
    if !keep_journal {
        for path in [&journal.old, &journal.current] {
            if let Err(err) = remove_if_present(path) {
                tracing::warn!("ledger: {err:#}");
            }
        }
    }
}

fn drain(rx: &mpsc::Receiver<Op>, batch: &mut Vec<Op>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Commits `batch` in one transaction and moves its flushes' answers to
/// `acks`; `false` if the commit failed (logged).
fn commit(conn: &mut Connection, batch: Vec<Op>, acks: &mut Vec<oneshot::Sender<()>>) -> bool {
    if batch.is_empty() {
        return true;
    }
    let result = write_batch(conn, &batch);
    if let Err(err) = &result {
        tracing::error!(
            "ledger: cannot commit {} operations (reservations stay in the journal): {err:#}",
            batch.len()
        );
    }
    for op in batch {
        if let Op::Flush { ack } = op {
            acks.push(ack);
        }
    }
    result.is_ok()
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
                Op::Reserve { id, reservation: r } => {
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
/// Rows still unsettled, and journaled reservations SQLite lacks, count at
/// their reserved amount.
pub fn month_usage(state_dir: &Path, month: Month) -> Result<Vec<AgentMonthUsage>> {
    let path = state_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    // The journal before SQLite: a record committed in between is then found
    // in SQLite and skipped below, never missed.
    let month_text = month.to_string();
    let journaled: Vec<JournalRecord> = read_journal(state_dir)?
        .records
        .into_iter()
        .filter(|r| r.month == month_text)
        .collect();
    let mut conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the ledger `{}`", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // One read transaction, so the totals and the presence checks agree.
    let tx = conn.transaction()?;
    let mut by_agent = BTreeMap::new();
    {
        let mut stmt = tx.prepare(
            "SELECT agent, COUNT(*),
                    SUM(input_tokens), SUM(output_tokens),
                    SUM(cache_creation_input_tokens), SUM(cache_read_input_tokens),
                    SUM(CASE WHEN settled = 1 THEN charged_tokens ELSE reserved_tokens END),
                    SUM(CASE WHEN settled = 1 THEN charged_micro_usd ELSE reserved_micro_usd END),
                    SUM(CASE WHEN settled = 1 THEN 0 ELSE 1 END),
                    SUM(CASE WHEN settled = 1 AND outcome IN ('cut', 'unsettled') THEN 1 ELSE 0 END)
             FROM requests WHERE month = ?1 AND outcome != 'released'
             GROUP BY agent",
        )?;
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
                cut: from_sql(r.get(9)?),
            })
        })?;
        for row in rows {
            let row = row?;
            by_agent.insert(row.agent.clone(), row);
        }
        // Reserved before a crash (or just now) but not in SQLite yet: in
        // flight, so counted at the reservation, as an unsettled row would be.
        let mut present = tx.prepare("SELECT EXISTS (SELECT 1 FROM requests WHERE id = ?1)")?;
        for record in journaled {
            if present.query_row(params![record.id], |r| r.get::<_, bool>(0))? {
                continue;
            }
            let usage = by_agent
                .entry(record.agent.clone())
                .or_insert_with(|| AgentMonthUsage {
                    agent: record.agent.clone(),
                    month: month_text.clone(),
                    ..AgentMonthUsage::default()
                });
            usage.requests += 1;
            usage.unsettled += 1;
            usage.charged_tokens = usage.charged_tokens.saturating_add(record.reserved_tokens);
            usage.charged_micro_usd = usage
                .charged_micro_usd
                .saturating_add(record.reserved_micro_usd);
        }
    }
    Ok(by_agent.into_values().collect())
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

/// One window of an agent's settled spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpend {
    /// `started_at_ms / window_ms`.
    pub index: i64,
    pub tokens: u64,
    pub requests: u64,
}

/// One grouped read for the spend-velocity wire: every agent's settled
/// spend per window of `window_ms`, for requests started in
/// `since_ms..before_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpendQuery {
    pub since_ms: i64,
    pub before_ms: i64,
    pub window_ms: i64,
}

/// Every agent's settled spend per window, one map per query (in order),
/// read over one connection with one grouped scan per query: the wire's
/// baseline (and, with one-minute windows, its live window after a
/// restart), for all agents at once. Oldest first, windows without spend
/// left out. Spend is in weighted tokens (`runaway::velocity::weighted_tokens`,
/// computed here per row, rounded up alike) from the usage the provider
/// reported — a cut request counts what was seen of it, not its
/// reservation. Released and unsettled requests are left out. Empty maps
/// when there is no ledger yet. Blocking: call it off the main loop.
pub fn spend_by_agent(
    state_dir: &Path,
    queries: &[SpendQuery],
) -> Result<Vec<BTreeMap<String, Vec<WindowSpend>>>> {
    use crate::runaway::velocity::{CACHE_READ_WEIGHT_PCT, CACHE_WRITE_WEIGHT_PCT};
    let path = state_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(vec![BTreeMap::new(); queries.len()]);
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the ledger `{}`", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let sql = format!(
        "SELECT agent, started_at_ms / ?3 AS w,
                SUM(input_tokens + output_tokens
                    + (cache_creation_input_tokens * {CACHE_WRITE_WEIGHT_PCT}
                       + cache_read_input_tokens * {CACHE_READ_WEIGHT_PCT} + 99) / 100) AS spend,
                COUNT(*)
         FROM requests
         WHERE started_at_ms >= ?1 AND started_at_ms < ?2 AND settled = 1 AND outcome != 'released'
         GROUP BY agent, w HAVING spend > 0 ORDER BY agent, w"
    );
    let mut stmt = conn
        .prepare(&sql)
        .with_context(|| format!("cannot read spend from the ledger `{}`", path.display()))?;
    let mut out = Vec::with_capacity(queries.len());
    for q in queries {
        let rows = stmt.query_map(params![q.since_ms, q.before_ms, q.window_ms.max(1)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                WindowSpend {
                    index: r.get(1)?,
                    tokens: from_sql(r.get(2)?),
                    requests: from_sql(r.get(3)?),
                },
            ))
        })?;
        let mut by_agent: BTreeMap<String, Vec<WindowSpend>> = BTreeMap::new();
        for row in rows {
            let (agent, spend) = row?;
            by_agent.entry(agent).or_default().push(spend);
        }
        out.push(by_agent);
    }
    Ok(out)
}

/// Each agent's first request in the whole ledger (Unix milliseconds), so
/// `tune` can say how much history it has even beyond the window it reads.
/// Released requests count: the agent was running. Empty without a ledger.
pub fn first_request_ms(state_dir: &Path) -> Result<BTreeMap<String, i64>> {
    let path = state_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the ledger `{}`", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = conn.prepare("SELECT agent, MIN(started_at_ms) FROM requests GROUP BY agent")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (agent, first) = row?;
        out.insert(agent, first);
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
        let a = ledger.reserve(reservation("sparkles", 1000)).unwrap();
        let b = ledger.reserve(reservation("sparkles", 500)).unwrap();
        let _c = ledger.reserve(reservation("soundwave", 200)).unwrap();
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
    async fn spend_by_agent_sums_weighted_usage_by_window() {
        let dir = tempfile::tempdir().unwrap();
        let q = |since_ms, window_ms| SpendQuery {
            since_ms,
            before_ms: i64::MAX,
            window_ms,
        };
        assert_eq!(
            spend_by_agent(dir.path(), &[q(0, 600_000)]).unwrap(),
            vec![BTreeMap::new()]
        );
        let ledger = Ledger::open(dir.path()).unwrap();
        let w = 600_000;
        let base = 3_000 * w;
        // `(input, output, cache_write, cache_read)` seen; charged at 10x.
        let spend = |agent: &str, at: i64, seen: [u64; 4], outcome: Option<Outcome>| {
            let tokens: u64 = seen.iter().sum();
            let id = ledger
                .reserve(Reservation {
                    started_at_ms: at,
                    ..reservation(agent, tokens * 20)
                })
                .unwrap();
            if let Some(outcome) = outcome {
                ledger.settle(
                    id,
                    Settlement {
                        outcome,
                        input_tokens: seen[0],
                        output_tokens: seen[1],
                        cache_creation_input_tokens: seen[2],
                        cache_read_input_tokens: seen[3],
                        charged_tokens: if outcome == Outcome::Released {
                            0
                        } else {
                            tokens * 10
                        },
                        ..Settlement::default()
                    },
                );
            }
        };
        spend("a", base - 1, [1_000, 0, 0, 0], Some(Outcome::Ok)); // before `since`
        // 60 + 40 + 0.1 × 1,000 + 1.25 × 3 (3.75, rounded up) = 204.
        spend("a", base, [60, 40, 3, 1_000], Some(Outcome::Ok));
        // A cut answer counts what was seen of it (its charge is 10x that).
        spend("a", base + w - 1, [200, 0, 0, 0], Some(Outcome::Cut));
        spend("a", base + w, [400, 0, 0, 0], Some(Outcome::Ok));
        spend("a", base + w + 5, [50, 0, 0, 0], Some(Outcome::Released));
        spend("a", base + 3 * w, [9_000, 0, 0, 0], None); // in flight
        spend("a", base + 4 * w, [0, 0, 0, 0], Some(Outcome::Cut)); // nothing seen
        spend("b", base, [7, 0, 0, 0], Some(Outcome::Ok));
        ledger.flush().await;
        let read = spend_by_agent(
            dir.path(),
            &[
                q(base, w),
                SpendQuery {
                    before_ms: base + w,
                    ..q(0, w)
                },
            ],
        )
        .unwrap();
        let rows =
            |map: &BTreeMap<String, Vec<WindowSpend>>, agent: &str| -> Vec<(i64, u64, u64)> {
                map.get(agent)
                    .map(|v| v.iter().map(|s| (s.index, s.tokens, s.requests)).collect())
                    .unwrap_or_default()
            };
        assert_eq!(rows(&read[0], "a"), vec![(3_000, 404, 2), (3_001, 400, 1)]);
        assert_eq!(rows(&read[0], "b"), vec![(3_000, 7, 1)]);
        // The second query stops before `base + w`.
        assert_eq!(
            rows(&read[1], "a"),
            vec![(2_999, 1_000, 1), (3_000, 404, 2)]
        );
    }

    /// A kill -9: the writer never runs again and nothing is cleaned up.
    fn crash(ledger: Ledger) {
        std::mem::forget(ledger);
    }

    fn journal_of(dir: &Path) -> Vec<u8> {
        fs::read(dir.join(JOURNAL_FILE)).unwrap_or_default()
    }

    fn append_to_journal(dir: &Path, bytes: &[u8]) {
        let mut file = open_append(&dir.join(JOURNAL_FILE)).unwrap();
        file.write_all(bytes).unwrap();
    }

    fn nov() -> Month {
        Month::new(2026, 11).unwrap()
    }

    #[tokio::test]
    async fn unsettled_rows_are_charged_at_reservation_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.reserve(reservation("sparkles", 777)).unwrap();
        ledger.flush().await;
        crash(ledger);
        let reopened = Ledger::open(dir.path()).unwrap();
        let next = reopened.reserve(reservation("sparkles", 1)).unwrap();
        assert_eq!(next, 2, "ids continue after the existing rows");
        reopened.flush().await;
        let usage = month_usage(dir.path(), nov()).unwrap();
        assert_eq!(usage[0].charged_tokens, 778);
        assert_eq!(usage[0].unsettled, 1, "only the new row is still in flight");
    }

    #[tokio::test]
    async fn a_reservation_is_in_the_journal_when_reserve_returns() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let id = ledger.reserve(reservation("sparkles", 42)).unwrap();
        let mut read = Journaled::default();
        parse_journal(&journal_of(dir.path()), &mut read);
        assert_eq!(read.unreadable, 0);
        let record = read.records.iter().find(|r| r.id == id).unwrap();
        assert_eq!(
            (
                record.agent.as_str(),
                record.month.as_str(),
                record.reserved_tokens,
                record.reserved_micro_usd
            ),
            ("sparkles", "2026-11", 42, 126)
        );
    }

    #[tokio::test]
    async fn a_crash_between_journal_and_sqlite_loses_nothing_and_counts_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        // 1: committed and settled; 2: journaled, never committed (the writer
        // had not run yet); 3: torn by the crash, so never forwarded.
        let first = ledger.reserve(reservation("sparkles", 1000)).unwrap();
        ledger.settle(
            first,
            Settlement {
                input_tokens: 10,
                output_tokens: 5,
                charged_tokens: 15,
                charged_micro_usd: 45,
                ..Settlement::default()
            },
        );
        ledger.flush().await;
        crash(ledger);
        append_to_journal(dir.path(), &encode_record(2, &reservation("sparkles", 300)));
        let torn = encode_record(3, &reservation("sparkles", 9000));
        append_to_journal(dir.path(), &torn[..torn.len() / 2]);

        // `supervisor usage` right after the crash, before any restart.
        let usage = month_usage(dir.path(), nov()).unwrap();
        assert_eq!(usage.len(), 1);
        assert_eq!(
            (
                usage[0].requests,
                usage[0].charged_tokens,
                usage[0].charged_micro_usd,
                usage[0].unsettled
            ),
            (2, 15 + 300, 45 + 900, 1),
            "the journaled reservation counts at its amount, the settled one once, the torn one not at all"
        );
        assert_eq!(usage[0].input_tokens, 10);

        let reopened = Ledger::open(dir.path()).unwrap();
        assert!(
            journal_of(dir.path()).is_empty(),
            "a replayed journal starts over"
        );
        assert!(!dir.path().join(JOURNAL_OLD_FILE).exists());
        let usage = month_usage(dir.path(), nov()).unwrap();
        assert_eq!(
            (
                usage[0].requests,
                usage[0].charged_tokens,
                usage[0].unsettled
            ),
            (2, 315, 0),
            "recovered rows are settled at their reservation"
        );
        assert_eq!(reopened.reserve(reservation("sparkles", 1)).unwrap(), 3);

        // A second crash and reopen replays nothing twice.
        crash(reopened);
        drop(Ledger::open(dir.path()).unwrap());
        let usage = month_usage(dir.path(), nov()).unwrap();
        assert_eq!((usage[0].requests, usage[0].charged_tokens), (3, 316));
    }

    #[test]
    fn a_torn_line_costs_only_itself() {
        let good = |id| encode_record(id, &reservation("sparkles", 10));
        let mut bytes = good(1);
        bytes.extend_from_slice(&good(2)[..20]);
        bytes.push(b'\n'); // what `Appender` writes before the next record after a short write
        bytes.extend_from_slice(&good(3));
        bytes.extend_from_slice(b"{\"v\":99,\"id\":4}\n");
        bytes.extend_from_slice(&good(5)[..40]);
        let mut read = Journaled::default();
        parse_journal(&bytes, &mut read);
        let ids: Vec<i64> = read.records.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 3]);
        assert_eq!(read.unreadable, 3);
    }

    #[test]
    fn after_a_short_write_the_next_record_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut appender = Appender {
            file: open_append(&path).unwrap(),
            torn: false,
            len: 0,
        };
        let whole = encode_record(1, &reservation("sparkles", 10));
        appender.append(&whole[..10]).unwrap();
        appender.torn = true; // as a short write would leave it
        appender.append(&whole).unwrap();
        assert!(!appender.torn);
        let mut read = Journaled::default();
        parse_journal(&fs::read(&path).unwrap(), &mut read);
        assert_eq!(read.records.len(), 1);
        assert_eq!(read.unreadable, 1);
    }

    #[tokio::test]
    async fn rotation_keeps_every_reservation_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_rotating_at(dir.path(), 1024).unwrap();
        let line = encode_record(1, &reservation("sparkles", 10)).len() as u64;
        for round in 0..6 {
            for _ in 0..10 {
                let id = ledger.reserve(reservation("sparkles", 10)).unwrap();
                if id % 2 == 0 {
                    ledger.settle(
                        id,
                        Settlement {
                            charged_tokens: 4,
                            ..Settlement::default()
                        },
                    );
                }
            }
            // A flush is answered after the rotation its batch triggers.
            ledger.flush().await;
            assert!(
                (journal_of(dir.path()).len() as u64) < 1024 + line,
                "round {round}: the journal is rotated once past its limit"
            );
            assert!(!dir.path().join(JOURNAL_OLD_FILE).exists());
            let usage = month_usage(dir.path(), nov()).unwrap();
            let n = (round + 1) * 10;
            assert_eq!(usage[0].requests, n);
            assert_eq!(usage[0].charged_tokens, n / 2 * 10 + n / 2 * 4);
        }
        crash(ledger);
        drop(Ledger::open(dir.path()).unwrap());
        let usage = month_usage(dir.path(), nov()).unwrap();
        assert_eq!((usage[0].requests, usage[0].charged_tokens), (60, 420));
    }

    #[tokio::test]
    async fn a_clean_close_commits_everything_and_leaves_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let id = ledger.reserve(reservation("sparkles", 10)).unwrap();
        ledger.settle(
            id,
            Settlement {
                charged_tokens: 7,
                ..Settlement::default()
            },
        );
        drop(ledger);
        assert!(!dir.path().join(JOURNAL_FILE).exists());
        let usage = month_usage(dir.path(), nov()).unwrap();
        assert_eq!((usage[0].charged_tokens, usage[0].unsettled), (7, 0));
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
