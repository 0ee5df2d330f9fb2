//! Agents left behind by a supervisor that died without stopping them (kill -9,
//! OOM killer, power cut of the supervisor alone). Owns three things in
//! `state_dir`: the `supervisor.lock` that makes one supervisor the owner of a
//! state dir, one record per running agent in `agents/<name>.json`, and the
//! reaping of recorded groups at start, before the fleet starts.
//!
//! Must never kill a process it cannot prove is one of our agents: a recorded
//! pid may have been reused. A record names its leader by (boot id, pid, start
//! time in clock ticks since boot), which no other process can share; the
//! rules are in [`judge`], a pure function over a `/proc` snapshot. Must not
//! touch the agents of a live supervisor: the lock is taken before any record
//! is read.
//!
//! The one place outside `agent/` that signals processes, and only groups a
//! previous supervisor left, through [`ProcessGroup`]. Those are not our
//! children, so their zombies are not ours to reap: a group is judged gone
//! from `/proc` (a group of zombies only is gone), not by `kill(-pgid, 0)`.
//!
//! An agent is recorded by a watcher a moment after its start; a supervisor
//! SIGKILLed within that moment leaves that one start unrecorded.
//!
//! One file per agent (not one shared file) because each agent's watcher then
//! rewrites only its own record, atomically, with no read-modify-write between
//! watchers, and a torn or corrupt file costs one record, not all of them.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::agent::{AgentHandle, AgentStatus, ProcessGroup};

/// The lock file a running supervisor holds for its whole life.
pub const LOCK_FILE: &str = "supervisor.lock";

/// The pid of the supervisor that holds `state_dir`'s lock, if one runs: the
/// lock file names its holder, and a lock we cannot take proves it is held.
pub fn running_supervisor(state_dir: &Path) -> Option<i32> {
    use nix::fcntl::{Flock, FlockArg};
    let path = state_dir.join(LOCK_FILE);
    let file = std::fs::File::open(&path).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_free) => None,
        Err(_) => std::fs::read_to_string(&path).ok()?.trim().parse().ok(),
    }
}

/// The folder of per-agent records, inside `state_dir`.
pub const RECORDS_DIR: &str = "agents";
/// The record format written by this version.
pub const RECORD_VERSION: u32 = 1;

/// How long an orphaned group gets between SIGTERM and SIGKILL. Short on
/// purpose: its supervisor is gone, nobody waits for a clean exit, and the new
/// fleet waits for this.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// Upper bound on waiting for a SIGKILLed group to empty (a process stuck in
/// uninterruptible sleep can outlive SIGKILL for a while).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a signalled group is checked; there is no event for "the last
/// process of a group is gone".
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Plain data

/// What a supervisor writes about one running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub version: u32,
    pub agent: String,
    /// The group leader's pid when it was recorded.
    pub pid: i32,
    pub pgid: i32,
    /// The leader's session: a stranger that joined the pgid number later
    /// would almost always live in another session.
    pub sid: i32,
    /// `/proc/<pid>/stat` field 22 of the leader: clock ticks since boot.
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` when it was recorded: start times
    /// only compare within one boot.
    pub boot_id: String,
    pub supervisor_pid: i32,
    pub supervisor_start_time: u64,
}

/// The fields of `/proc/<pid>/stat` the decisions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub start_time: u64,
    /// Zombie (`Z`) or dead (`X`): still listed, but runs nothing. A group
    /// made only of these is gone for our purposes — their parent (pid 1,
    /// after the supervisor died) may never reap them.
    pub dead: bool,
}

/// What to do with one record, given the processes that exist now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The recorded group still runs and is provably the agent's: kill it.
    Reap,
    /// No process of the group runs any more: drop the record.
    Gone,
    /// Written during an earlier boot: everything it names is gone.
    PreviousBoot,
    /// The group runs and so does the supervisor that wrote the record
    /// (someone bypassed the lock): leave both alone.
    LiveSupervisor,
    /// The recorded pid now belongs to a process started at `start_time`:
    /// the agent's group is gone (the kernel does not reuse a pid while a
    /// group of that id exists). Drop, never kill.
    PidReused { start_time: u64 },
    /// The group's leader is gone and `pid` in that group cannot be shown to
    /// descend from it (it started earlier, or in another session). Drop,
    /// never kill.
    Stranger { pid: i32 },
}

/// Decides about one record. `procs` must hold at least the processes with
/// pid `record.pid`, pid `record.supervisor_pid` and pgid `record.pgid`
/// (a full `/proc` snapshot does).
///
/// The rules, in order:
/// 1. another boot id: every process of that boot is gone;
/// 2. the leader pid exists with another start time: reused, so the group is gone;
/// 3. no live (non-zombie) member in the group: gone;
/// 4. the recording supervisor still runs (same pid and start time): hands off;
/// 5. the leader exists (maybe as a zombie) with the recorded start time and
///    still leads the group: it is ours, reap;
/// 6. the leader is gone but members remain (grandchildren): reap only if
///    every live member started no earlier than the leader and shares its
///    session — what a descendant of the leader looks like. Otherwise a
///    stranger's group now holds that number (the pid wrapped, a new process
///    led a group and left): drop it untouched. A stranger passing both tests
///    would need the pid to wrap onto a group id, in the same session, while
///    no supervisor ran; we accept that remaining risk.
pub fn judge(record: &AgentRecord, boot_id: &str, procs: &[ProcStat]) -> Verdict {
    if record.boot_id != boot_id {
        return Verdict::PreviousBoot;
    }
    let leader = procs.iter().find(|p| p.pid == record.pid);
    if let Some(leader) = leader
        && leader.start_time != record.start_time
    {
        return Verdict::PidReused {
            start_time: leader.start_time,
        };
    }
    let mut members = procs.iter().filter(|p| p.pgid == record.pgid && !p.dead);
    let Some(first) = members.next() else {
        return Verdict::Gone;
    };
    let supervisor_runs = procs.iter().any(|p| {
        p.pid == record.supervisor_pid && !p.dead && p.start_time == record.supervisor_start_time
    });
    if supervisor_runs {
        return Verdict::LiveSupervisor;
    }
    if leader.is_some_and(|l| l.pgid == record.pgid) {
        return Verdict::Reap;
    }
    let descends = |p: &ProcStat| p.start_time >= record.start_time && p.sid == record.sid;
    match std::iter::once(first).chain(members).find(|p| !descends(p)) {
        Some(stranger) => Verdict::Stranger { pid: stranger.pid },
        None => Verdict::Reap,
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name is in parentheses
/// and may itself hold spaces and parentheses, so fields are counted after
/// the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let (pid, _comm) = head.split_once(" (")?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // `rest` starts at field 3 (state); field N is at index N - 3.
    let field = |n: usize| fields.get(n - 3).copied();
    let state = field(3)?;
    Some(ProcStat {
        pid: pid.trim().parse().ok()?,
        pgid: field(5)?.parse().ok()?,
        sid: field(6)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
        dead: matches!(state, "Z" | "X" | "x"),
    })
}

// ---------------------------------------------------------------------------
// The state dir lock

/// Exclusive ownership of a state dir, held until dropped (and released by
/// the kernel if the process dies, however it dies).
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another supervisor{} is already running on state dir `{}`: it holds `{}`\nhint: stop that supervisor first, or give this fleet its own `state_dir`",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        state_dir.display(),
        lock.display()
    )]
    Held {
        state_dir: PathBuf,
        lock: PathBuf,
        pid: Option<i32>,
    },
    #[error("cannot {what} `{}`: {source}\nhint: check that the supervisor's user owns `state_dir`", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Creates `state_dir` (mode 0700) if missing and takes its lock, writing our
/// pid into the lock file so a second supervisor can name us.
pub fn lock_state_dir(state_dir: &Path) -> Result<StateLock, LockError> {
    let io_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| LockError::Io { what, path, source }
    };
    create_private_dir(state_dir).map_err(io_err("create the state dir", state_dir))?;
    let path = state_dir.join(LOCK_FILE);
    // No truncation on open: until we hold the lock, the pid in it is the holder's.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("open the lock file", &path))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(LockError::Held {
                state_dir: state_dir.to_owned(),
                lock: path,
                pid,
            });
        }
        Err((_, errno)) => return Err(io_err("lock", &path)(errno.into())),
    };
    let write_pid = |file: &mut File| {
        file.set_len(0)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
    };
    write_pid(&mut lock).map_err(io_err("write our pid into the lock file", &path))?;
    Ok(StateLock { _lock: lock, path })
}

fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

// ---------------------------------------------------------------------------
// Reaping at start

/// What [`reap_orphans`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Agents whose orphaned group was killed: (agent, leader pid).
    pub reaped: Vec<(String, i32)>,
    /// Records dropped without killing anything (gone, reused pid, stranger,
    /// earlier boot, unreadable).
    pub dropped: Vec<String>,
    /// Records kept: their group could not be killed in time, or their
    /// supervisor still runs. The next start tries again.
    pub kept: Vec<String>,
}

/// Kills the agent groups a dead supervisor left behind, as recorded in
/// `state_dir`, and drops their records. Call while holding the state dir's
/// [`StateLock`] and before starting any agent. Problems are logged and never
/// stop the start: a record that cannot be acted on is dropped or kept, as
/// the report says.
pub fn reap_orphans(state_dir: &Path) -> Report {
    let mut report = Report::default();
    let dir = state_dir.join(RECORDS_DIR);
    let records = read_records(&dir, &mut report);
    if records.is_empty() {
        return report;
    }
    let boot_id = match read_boot_id() {
        Ok(id) => id,
        Err(err) => {
            tracing::error!(
                "cannot read `/proc/sys/kernel/random/boot_id` ({err}); orphaned agents from a previous supervisor are not reaped"
            );
            report
                .kept
                .extend(records.into_iter().map(|(_, r)| r.agent));
            return report;
        }
    };

    let procs = snapshot();
    let mut targets = Vec::new();
    for (path, record) in records {
        let verdict = judge(&record, &boot_id, &procs);
        let (agent, pid) = (&record.agent, record.pid);
        match verdict {
            Verdict::Reap => {
                targets.push((path, record));
                continue;
            }
            Verdict::LiveSupervisor => {
                tracing::warn!(
                    "left the record of agent \"{agent}\" (pid {pid}) alone: supervisor pid {} that wrote it is still running without holding `{}`",
                    record.supervisor_pid,
                    state_dir.join(LOCK_FILE).display()
                );
                park(&path, &record);
                report.kept.push(record.agent);
                continue;
            }
            Verdict::Gone => tracing::info!(
                "dropped the record of agent \"{agent}\" (pid {pid}): its process group is gone"
            ),
            Verdict::PreviousBoot => tracing::info!(
                "dropped the record of agent \"{agent}\" (pid {pid}): it was written before the last boot"
            ),
            Verdict::PidReused { start_time } => tracing::warn!(
                "dropped the record of agent \"{agent}\" (pid {pid}) without killing anything: that pid now belongs to another process (started at tick {start_time}, the agent at tick {})",
                record.start_time
            ),
            Verdict::Stranger { pid: stranger } => tracing::warn!(
                "dropped the record of agent \"{agent}\" (pid {pid}) without killing anything: its leader is gone and pid {stranger} in process group {} does not descend from it",
                record.pgid
            ),
        }
        remove_file(&path);
        report.dropped.push(record.agent);
    }

    let (reaped, stuck) = kill_groups(targets, &boot_id);
    for (path, record) in reaped {
        tracing::warn!(
            "reaped orphaned agent \"{}\" (pid {}) left by a previous supervisor",
            record.agent,
            record.pid
        );
        remove_file(&path);
        report.reaped.push((record.agent, record.pid));
    }
    for (path, record) in stuck {
        park(&path, &record);
        tracing::error!(
            "orphaned agent \"{}\" (process group {}) left by a previous supervisor survived SIGKILL for {}; its record is kept and the next start tries again",
            record.agent,
            record.pgid,
            humantime::format_duration(KILL_WAIT)
        );
        report.kept.push(record.agent);
    }
    report
}

type Target = (PathBuf, AgentRecord);

/// Moves a record that must outlive this start to `<agent>.<pgid>.json`, out
/// of the way of the record this supervisor's own watcher will write for the
/// agent. A `.` never occurs in an agent name, so the two cannot collide.
fn park(path: &Path, record: &AgentRecord) {
    let parked = path.with_file_name(format!("{}.{}.json", record.agent, record.pgid));
    if parked != path
        && let Err(err) = fs::rename(path, &parked)
    {
        tracing::warn!(
            "cannot move the agent record `{}` to `{}`: {err}",
            path.display(),
            parked.display()
        );
    }
}

/// SIGTERM to every target group at once, SIGKILL to what is left after the
/// grace. Every signal is preceded by a fresh [`judge`], so a group that
/// emptied (and whose number could be reused) is never signalled again.
/// Returns (gone, still running).
fn kill_groups(targets: Vec<Target>, boot_id: &str) -> (Vec<Target>, Vec<Target>) {
    let mut gone = Vec::new();
    let mut pending = targets;
    for (signal, wait) in [
        (Signal::SIGTERM, ORPHAN_GRACE),
        (Signal::SIGKILL, KILL_WAIT),
    ] {
        pending = settle(pending, boot_id, &mut gone);
        for (_, record) in &pending {
            if let Some(group) = ProcessGroup::from_leader(record.pgid.unsigned_abs())
                && let Err(err) = group.signal(signal)
            {
                tracing::warn!(
                    "cannot send {signal} to orphaned agent \"{}\" (process group {}): {err}",
                    record.agent,
                    record.pgid
                );
            }
        }
        let deadline = Instant::now() + wait;
        loop {
            pending = settle(pending, boot_id, &mut gone);
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
    }
    (gone, pending)
}

/// Moves every target that is no longer [`Verdict::Reap`] into `gone`.
fn settle(pending: Vec<Target>, boot_id: &str, gone: &mut Vec<Target>) -> Vec<Target> {
    if pending.is_empty() {
        return pending;
    }
    let procs = snapshot();
    let (still, done): (Vec<_>, Vec<_>) = pending
        .into_iter()
        .partition(|(_, r)| judge(r, boot_id, &procs) == Verdict::Reap);
    gone.extend(done);
    still
}

/// Every parseable record in `dir`; unreadable ones are removed (nothing
/// could ever act on them) and leftover temp files cleaned up.
fn read_records(dir: &Path, report: &mut Report) -> Vec<(PathBuf, AgentRecord)> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            tracing::error!(
                "cannot list agent records in `{}` ({err}); orphaned agents from a previous supervisor are not reaped",
                dir.display()
            );
            return Vec::new();
        }
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    let mut records = Vec::new();
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            // A write interrupted by the crash; the record it replaced (if any) is intact.
            remove_file(&path);
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let parsed = fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<AgentRecord>(&text).map_err(|e| e.to_string()))
            .and_then(|record| {
                if record.pgid > 1 && record.pid > 1 {
                    Ok(record)
                } else {
                    Err(format!(
                        "pid {} / process group {} cannot be an agent's",
                        record.pid, record.pgid
                    ))
                }
            });
        match parsed {
            Ok(record) => records.push((path, record)),
            Err(err) => {
                tracing::warn!(
                    "dropped the unreadable agent record `{}`: {err}",
                    path.display()
                );
                remove_file(&path);
                report
                    .dropped
                    .push(name.trim_end_matches(".json").to_owned());
            }
        }
    }
    records
}

fn remove_file(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => tracing::warn!("cannot remove `{}`: {err}", path.display()),
    }
}

// ---------------------------------------------------------------------------
// /proc

/// Every process on the host, as far as `/proc` shows it now. Processes that
/// vanish while it is read are simply absent.
pub fn snapshot() -> Vec<ProcStat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|text| parse_stat(&text))
        .collect()
}

/// One process's stat, `None` if it does not exist (any more).
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| parse_stat(&text))
}

pub fn read_boot_id() -> io::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

// ---------------------------------------------------------------------------
// Recording while running

/// Who writes the records: this supervisor, in this boot.
#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    boot_id: String,
    supervisor_pid: i32,
    supervisor_start_time: u64,
}

/// Keeps `state_dir/agents/<name>.json` in step with each agent's process
/// group: written when a leader starts, removed when its group is gone. One
/// watcher task per agent follows the actor's status channel. The default
/// records nothing.
#[derive(Debug, Default)]
pub struct Recorder {
    writer: Option<Arc<Writer>>,
    watchers: JoinSet<()>,
}

impl Recorder {
    /// A recorder for `state_dir` (which [`lock_state_dir`] created). If this
    /// host cannot say who we are (no `/proc`), it warns once and records
    /// nothing: the fleet still runs, only orphans would go unreaped.
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join(RECORDS_DIR);
        let writer = (|| {
            create_private_dir(&dir)
                .map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
            let boot_id = read_boot_id()
                .map_err(|e| format!("cannot read `/proc/sys/kernel/random/boot_id`: {e}"))?;
            let me = i32::try_from(std::process::id()).map_err(|e| e.to_string())?;
            let start = proc_stat(me).ok_or("cannot read our own `/proc/<pid>/stat`")?;
            Ok::<_, String>(Writer {
                dir: dir.clone(),
                boot_id,
                supervisor_pid: me,
                supervisor_start_time: start.start_time,
            })
        })();
        let writer = match writer {
            Ok(writer) => Some(Arc::new(writer)),
            Err(err) => {
                tracing::warn!(
                    "{err}; agents are not recorded, so if this supervisor is killed with SIGKILL the next one cannot stop what it leaves behind"
                );
                None
            }
        };
        Self {
            writer,
            watchers: JoinSet::new(),
        }
    }

    /// Follows `handle`'s agent until its actor ends. Must be called from
    /// within a tokio runtime.
    pub fn watch(&mut self, handle: &AgentHandle) {
        if let Some(writer) = &self.writer {
            let writer = writer.clone();
            let name = handle.name().to_owned();
            self.watchers
                .spawn(follow(handle.subscribe(), name, writer));
        }
    }

    /// Waits until every watcher has seen its actor end and removed its
    /// record, so a clean shutdown leaves no record behind.
    pub async fn finish(mut self) {
        while self.watchers.join_next().await.is_some() {}
    }
}

async fn follow(mut status: watch::Receiver<AgentStatus>, name: String, writer: Arc<Writer>) {
    let mut recorded: Option<u32> = None;
    let mut closed = false;
    loop {
        let pid = status.borrow_and_update().pid;
        if pid != recorded {
            let (w, agent) = (writer.clone(), name.clone());
            let done = tokio::task::spawn_blocking(move || match pid {
                Some(pid) => w.record(&agent, pid),
                None => w.forget(&agent),
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(agent = %name, "{err}"),
                Err(err) => {
                    tracing::warn!(agent = %name, "recording the agent's pid failed: {err}")
                }
            }
            recorded = pid;
        }
        if closed {
            return;
        }
        // An error means the actor ended; its last status is still read above.
        closed = status.changed().await.is_err();
    }
}

impl Writer {
    fn path(&self, agent: &str) -> PathBuf {
        self.dir.join(format!("{agent}.json"))
    }

    /// Records the group led by `pid`. If the leader is already gone, the
    /// group's earliest live member stands in for it (its start time is no
    /// earlier than the leader's, which keeps [`judge`]'s rule 6 sound); an
    /// empty group needs no record.
    fn record(&self, agent: &str, pid: u32) -> Result<(), String> {
        let pgid = i32::try_from(pid).map_err(|e| e.to_string())?;
        let leader = proc_stat(pgid).filter(|p| p.pgid == pgid).or_else(|| {
            snapshot()
                .into_iter()
                .filter(|p| p.pgid == pgid && !p.dead)
                .min_by_key(|p| p.start_time)
        });
        let Some(leader) = leader else {
            return self.forget(agent);
        };
        let record = AgentRecord {
            version: RECORD_VERSION,
            agent: agent.to_owned(),
            pid: pgid,
            pgid,
            sid: leader.sid,
            start_time: leader.start_time,
            boot_id: self.boot_id.clone(),
            supervisor_pid: self.supervisor_pid,
            supervisor_start_time: self.supervisor_start_time,
        };
        let path = self.path(agent);
        let tmp = self.dir.join(format!(".{agent}.json.tmp"));
        let write = || -> io::Result<()> {
            let text = serde_json::to_string_pretty(&record).map_err(io::Error::other)?;
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.write_all(b"\n")?;
            // No fsync: the record must survive the supervisor's death, which
            // the page cache does; after a power loss the boot id voids it anyway.
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            format!(
                "cannot record the agent's pid in `{}`: {e}; if this supervisor is killed with SIGKILL the next one cannot stop this agent",
                path.display()
            )
        })
    }

    fn forget(&self, agent: &str) -> Result<(), String> {
        let path = self.path(agent);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!(
                "cannot remove the agent record `{}`: {e}",
                path.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    const BOOT: &str = "boot-a";

    fn record() -> AgentRecord {
        AgentRecord {
            version: RECORD_VERSION,
            agent: "worker".into(),
            pid: 500,
            pgid: 500,
            sid: 40,
            start_time: 1000,
            boot_id: BOOT.into(),
            supervisor_pid: 400,
            supervisor_start_time: 900,
        }
    }

    fn proc(pid: i32, pgid: i32, sid: i32, start_time: u64) -> ProcStat {
        ProcStat {
            pid,
            pgid,
            sid,
            start_time,
            dead: false,
        }
    }

    fn zombie(p: ProcStat) -> ProcStat {
        ProcStat { dead: true, ..p }
    }

    #[test]
    fn judge_table() {
        let leader = proc(500, 500, 40, 1000);
        let grandchild = proc(620, 500, 40, 1500);
        let cases: Vec<(&str, &str, Vec<ProcStat>, Verdict)> = vec![
            ("leader runs", BOOT, vec![leader], Verdict::Reap),
            (
                "leader and grandchild run",
                BOOT,
                vec![leader, grandchild],
                Verdict::Reap,
            ),
            ("nothing left", BOOT, vec![], Verdict::Gone),
            (
                "zombie leader only",
                BOOT,
                vec![zombie(leader)],
                Verdict::Gone,
            ),
            (
                "only zombies",
                BOOT,
                vec![zombie(leader), zombie(grandchild)],
                Verdict::Gone,
            ),
            (
                "zombie leader, live grandchild",
                BOOT,
                vec![zombie(leader), grandchild],
                Verdict::Reap,
            ),
            (
                "leader reaped, grandchild runs",
                BOOT,
                vec![grandchild],
                Verdict::Reap,
            ),
            (
                "grandchild started in the same tick as the leader",
                BOOT,
                vec![proc(620, 500, 40, 1000)],
                Verdict::Reap,
            ),
            (
                "another boot",
                "boot-b",
                vec![leader],
                Verdict::PreviousBoot,
            ),
            (
                "supervisor still runs",
                BOOT,
                vec![leader, proc(400, 400, 40, 900)],
                Verdict::LiveSupervisor,
            ),
            (
                "supervisor still runs, its agent is gone",
                BOOT,
                vec![proc(400, 400, 40, 900)],
                Verdict::Gone,
            ),
            (
                "supervisor pid reused by another process",
                BOOT,
                vec![leader, proc(400, 400, 40, 2000)],
                Verdict::Reap,
            ),
            (
                "supervisor is a zombie (killed, not yet waited for)",
                BOOT,
                vec![leader, zombie(proc(400, 400, 40, 900))],
                Verdict::Reap,
            ),
            (
                "leader pid reused",
                BOOT,
                vec![proc(500, 500, 77, 5000)],
                Verdict::PidReused { start_time: 5000 },
            ),
            (
                "leader pid reused by a process in another group",
                BOOT,
                vec![proc(500, 12, 77, 5000)],
                Verdict::PidReused { start_time: 5000 },
            ),
            (
                "leader gone, member older than the leader",
                BOOT,
                vec![proc(620, 500, 40, 999)],
                Verdict::Stranger { pid: 620 },
            ),
            (
                "leader gone, member in another session",
                BOOT,
                vec![grandchild, proc(621, 500, 41, 1600)],
                Verdict::Stranger { pid: 621 },
            ),
            (
                "leader left its group, members remain",
                BOOT,
                vec![proc(500, 501, 40, 1000), grandchild],
                Verdict::Reap,
            ),
            (
                "unrelated processes only",
                BOOT,
                vec![proc(7, 7, 7, 10), proc(501, 501, 40, 1200)],
                Verdict::Gone,
            ),
        ];
        for (what, boot, procs, want) in cases {
            assert_eq!(judge(&record(), boot, &procs), want, "{what}");
        }
    }

    #[test]
    fn parse_stat_table() {
        // Fields 7..=21, then 22 (starttime), then the rest.
        let tail = "0 0 0 0 0 0 0 0 0 0 0 20 0 1 0 123456 1000 10";
        let cases: Vec<(String, Option<ProcStat>)> = vec![
            (
                format!("42 (sleep) S 1 42 40 {tail}\n"),
                Some(proc(42, 42, 40, 123456)),
            ),
            (
                format!("42 (my (odd) name) R 1 41 40 {tail}"),
                Some(proc(42, 41, 40, 123456)),
            ),
            (
                format!("42 (a b) Z 1 42 40 {tail}"),
                Some(zombie(proc(42, 42, 40, 123456))),
            ),
            (
                format!("42 (a) X 1 42 40 {tail}"),
                Some(zombie(proc(42, 42, 40, 123456))),
            ),
            ("42 (sleep) S 1 42 40 0 0".into(), None),
            ("no parens at all".into(), None),
            (format!("x (sleep) S 1 42 40 {tail}"), None),
            ("".into(), None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_stat(&text), want, "{text:?}");
        }
    }

    #[test]
    fn parse_stat_reads_our_own_process() {
        let me = i32::try_from(std::process::id()).unwrap();
        let stat = proc_stat(me).unwrap();
        assert_eq!(stat.pid, me);
        assert!(!stat.dead);
        assert!(stat.start_time > 0);
    }

    #[test]
    fn the_state_dir_lock_is_exclusive_and_names_its_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("deep/state");
        let lock = lock_state_dir(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        assert_eq!(lock.path(), state.join(LOCK_FILE));

        // flock belongs to the open file, so a second open in this process conflicts.
        let err = lock_state_dir(&state).unwrap_err();
        let me = std::process::id();
        assert_eq!(
            err.to_string(),
            format!(
                "another supervisor (pid {me}) is already running on state dir `{}`: it holds `{}`\nhint: stop that supervisor first, or give this fleet its own `state_dir`",
                state.display(),
                state.join(LOCK_FILE).display()
            )
        );
        drop(lock);
        let again = lock_state_dir(&state).unwrap();
        assert_eq!(fs::read_to_string(again.path()).unwrap(), format!("{me}\n"));
    }

    /// A `sleep` leading its own group, as an agent would.
    fn group_leader() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    fn writer(state: &Path) -> Writer {
        let dir = state.join(RECORDS_DIR);
        create_private_dir(&dir).unwrap();
        Writer {
            dir,
            boot_id: read_boot_id().unwrap(),
            // Our pid with a start time we never had: a supervisor that is gone.
            supervisor_pid: i32::try_from(std::process::id()).unwrap(),
            supervisor_start_time: 1,
        }
    }

    fn stored(state: &Path, agent: &str) -> Option<AgentRecord> {
        let text =
            fs::read_to_string(state.join(RECORDS_DIR).join(format!("{agent}.json"))).ok()?;
        Some(serde_json::from_str(&text).unwrap())
    }

    #[test]
    fn a_recorded_orphan_group_is_reaped_and_its_record_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = group_leader();
        let pid = child.id();
        writer(tmp.path()).record("worker", pid).unwrap();
        let rec = stored(tmp.path(), "worker").unwrap();
        let leader = proc_stat(rec.pid).unwrap();
        assert_eq!(
            (rec.pgid, rec.start_time, rec.sid),
            (leader.pid, leader.start_time, leader.sid)
        );

        let report = reap_orphans(tmp.path());
        assert_eq!(report.reaped, vec![("worker".to_owned(), rec.pid)]);
        // Our child stays a zombie until we wait: reaping judged it gone anyway.
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(15)
        );
        assert_eq!(stored(tmp.path(), "worker"), None);
    }

    #[test]
    fn grandchildren_of_a_vanished_leader_are_reaped() {
        use std::io::BufRead as _;
        let tmp = tempfile::tempdir().unwrap();
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & echo $!; read _"])
            .process_group(0)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(leader.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        // The leader waits on stdin, so it is certainly alive while recorded.
        writer(tmp.path()).record("worker", leader.id()).unwrap();
        drop(leader.stdin.take());
        leader.wait().unwrap();
        assert!(proc_stat(grandchild).is_some_and(|p| !p.dead));

        let report = reap_orphans(tmp.path());
        assert_eq!(report.reaped.len(), 1, "{report:?}");
        assert!(proc_stat(grandchild).is_none_or(|p| p.dead));
    }

    #[test]
    fn a_record_whose_pid_was_reused_is_dropped_and_nothing_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = group_leader();
        let w = writer(tmp.path());
        w.record("worker", child.id()).unwrap();
        let mut rec = stored(tmp.path(), "worker").unwrap();
        rec.start_time -= 1;
        fs::write(w.path("worker"), serde_json::to_string(&rec).unwrap()).unwrap();

        let report = reap_orphans(tmp.path());
        assert_eq!(report.reaped, vec![]);
        assert_eq!(report.dropped, vec!["worker".to_owned()]);
        assert_eq!(child.try_wait().unwrap(), None, "the process must live");
        assert_eq!(stored(tmp.path(), "worker"), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_agents_of_a_live_supervisor_are_left_alone_and_their_record_parked() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = group_leader();
        let mut w = writer(tmp.path());
        // This test process, as it really is: a supervisor that still runs.
        w.supervisor_start_time = proc_stat(w.supervisor_pid).unwrap().start_time;
        w.record("worker", child.id()).unwrap();

        let report = reap_orphans(tmp.path());
        assert_eq!(report.kept, vec!["worker".to_owned()]);
        assert_eq!(child.try_wait().unwrap(), None, "the agent must live");
        let pgid = child.id();
        assert_eq!(stored(tmp.path(), "worker"), None);
        let parked = stored(tmp.path(), &format!("worker.{pgid}")).unwrap();
        assert_eq!(parked.agent, "worker");

        // Once that group is gone, the parked record goes at the next start.
        child.kill().unwrap();
        child.wait().unwrap();
        let report = reap_orphans(tmp.path());
        assert_eq!(report.kept, Vec::<String>::new());
        assert_eq!(report.dropped, vec!["worker".to_owned()]);
        assert_eq!(stored(tmp.path(), &format!("worker.{pgid}")), None);
    }

    #[test]
    fn unreadable_records_and_temp_files_are_cleaned_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(RECORDS_DIR);
        create_private_dir(&dir).unwrap();
        fs::write(dir.join("broken.json"), "{not json").unwrap();
        fs::write(dir.join(".worker.json.tmp"), "{").unwrap();
        let mut bad = record();
        bad.pgid = 1;
        fs::write(dir.join("init.json"), serde_json::to_string(&bad).unwrap()).unwrap();
        let report = reap_orphans(tmp.path());
        assert_eq!(report.dropped, vec!["broken".to_owned(), "init".to_owned()]);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn forgetting_removes_the_record_and_tolerates_its_absence() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = group_leader();
        let w = writer(tmp.path());
        w.record("worker", child.id()).unwrap();
        assert!(stored(tmp.path(), "worker").is_some());
        w.forget("worker").unwrap();
        w.forget("worker").unwrap();
        assert_eq!(stored(tmp.path(), "worker"), None);
        child.kill().unwrap();
        child.wait().unwrap();
        // A group that is already empty is not recorded at all.
        w.record("worker", child.id()).unwrap();
        assert_eq!(stored(tmp.path(), "worker"), None);
    }
}
