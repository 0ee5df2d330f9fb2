//! How the CLI finds the running supervisor of a fleet file (its state dir
//! and control socket) whatever state that file is in: valid, broken
//! (a syntax error, an alias bomb, non-UTF-8 bytes), replaced by a FIFO, or
//! deleted. The user needs the running supervisor's answer exactly then.
//!
//! Three sources, most trusted first:
//! 1. the **discovery record** a running supervisor keeps in a per-user
//!    runtime folder (`$XDG_RUNTIME_DIR/agent-supervisor/`, else
//!    `$TMPDIR/agent-supervisor-UID/`) and, under systemd, in its
//!    `$RUNTIME_DIRECTORY` too (the unit's `/run/agent-supervisor`, which a
//!    host shell sees where it cannot see the service's private /tmp), keyed
//!    by the canonical path of its fleet file; it survives any change to the
//!    file, even its deletion, and is trusted only while its supervisor still
//!    holds the state dir's lock, and only from folders and files owned by
//!    root or the caller (root also reads other users' per-user folders);
//! 2. the fleet file, when it loads;
//! 3. a line scan of the file for a top-level `state_dir:`, which survives
//!    any breakage elsewhere in the file.
//!
//! Then the default (`$STATE_DIRECTORY`, else `.supervisor` beside the file),
//! as `fleet::load` would resolve it; when no supervisor holds that one and
//! the file names no state dir of its own, the shipped unit's
//! `StateDirectory` (`/var/lib/agent-supervisor`) if a supervisor holds it.
//! Must not decide anything about agents; the record holds paths and a pid,
//! never anything secret.

use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{runtime_directory, socket_path};
use crate::fleet::{self, ConfigErrors, Fleet, LoadEnv};

/// Larger than any record; bounds what a confused file costs the CLI.
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// What a running supervisor writes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The canonical path of the fleet file it runs.
    pub fleet: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub pid: i32,
}

/// Where a fleet's state dir was found, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The running supervisor's discovery record.
    Record,
    /// The fleet file, which loads.
    FleetFile,
    /// The `state_dir:` line of a fleet file that does not load.
    StateDirLine,
    /// Nothing said where: the default state dir.
    Default,
    /// Nothing said where and no supervisor holds the default, but one
    /// holds the shipped unit's `StateDirectory`.
    UnitStateDir,
}

/// A fleet's state dir and control socket, and the fleet file as it loads now.
#[derive(Debug)]
pub struct Found {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub source: Source,
    /// The running supervisor's pid, when its record was found.
    pub pid: Option<i32>,
    pub fleet: Result<Fleet, ConfigErrors>,
    /// The fleet file of a supervisor that holds this state dir but runs
    /// another file than the one named (`-f other/fleet.yaml`): it answers
    /// for its own file, which the user should know.
    pub runs_other: Option<PathBuf>,
}

impl Found {
    /// A warning line when the supervisor found runs another fleet file.
    pub fn other_note(&self, fleet_path: &Path) -> Option<String> {
        let other = self.runs_other.as_ref()?;
        Some(format!(
            "warning: the supervisor using `{}` runs `{}`, not `{}`; it answers for its own file",
            self.state_dir.display(),
            other.display(),
            fleet_path.display()
        ))
    }

    /// One line for stderr when the fleet file does not load, saying where
    /// the state dir came from; `None` when it loads.
    pub fn broken_note(&self) -> Option<String> {
        let errors = self.fleet.as_ref().err()?;
        let from = match self.source {
            Source::Record => format!(
                "using the running supervisor's (pid {}) state dir `{}`",
                self.pid.unwrap_or(0),
                self.state_dir.display()
            ),
            Source::StateDirLine => format!(
                "using the state dir its `state_dir:` line names, `{}`",
                self.state_dir.display()
            ),
            Source::UnitStateDir => format!(
                "using the state dir of the agent-supervisor service, `{}`",
                self.state_dir.display()
            ),
            Source::Default | Source::FleetFile => {
                format!("using the default state dir `{}`", self.state_dir.display())
            }
        };
        Some(format!(
            "warning: {}: {}; {from}",
            errors.headline(),
            first_problem(errors)
        ))
    }
}

/// The first problem of a report, to keep one-line notes short.
fn first_problem(errors: &ConfigErrors) -> String {
    match (&errors.unreadable, errors.errors.first()) {
        (Some(cause), _) => cause.to_string(),
        (None, Some(first)) => first.to_string(),
        (None, None) => "no details".to_owned(),
    }
}

/// Finds the state dir and control socket of the fleet at `fleet_path`.
pub fn find(fleet_path: &Path) -> Found {
    let fleet = fleet::load(fleet_path);
    let record = lookup(fleet_path);
    let env = LoadEnv::from_process();
    let (state_dir, source) = match (&record, &fleet) {
        (Some(r), _) => (r.state_dir.clone(), Source::Record),
        (None, Ok(f)) => (f.state_dir.clone(), Source::FleetFile),
        (None, Err(_)) => match fleet::read_regular_file(fleet_path, fleet::MAX_FILE_BYTES)
            .ok()
            .and_then(|bytes| scan_state_dir(&bytes))
        {
            Some(dir) => (base_dir(fleet_path).join(dir), Source::StateDirLine),
            None => (default_state_dir(fleet_path, &env), Source::Default),
        },
    };
    let names_none = match (&source, &fleet) {
        (Source::Default, _) => true,
        (Source::FleetFile, Ok(f)) => f.state_dir == default_state_dir(fleet_path, &env),
        _ => false,
    };
    let unit = (names_none && crate::orphans::running_supervisor(&state_dir).is_none())
        .then(unit_state_dir)
        .flatten();
    let (state_dir, source) = match unit {
        Some(dir) => (dir, Source::UnitStateDir),
        None => (state_dir, source),
    };
    let socket = match (runtime_directory(), &record) {
        (Some(dir), _) => socket_path(Path::new(""), Some(&dir)),
        (None, Some(r)) => r.socket.clone(),
        (None, None) => socket_path(&state_dir, None),
    };
    let runs_other = match record {
        Some(_) => None,
        None => supervisor_of(&state_dir).map(|r| r.fleet),
    };
    Found {
        state_dir,
        socket,
        source,
        pid: record.map(|r| r.pid),
        fleet,
        runs_other,
    }
}

/// The shipped unit's state dir, when a supervisor holds it and `me` may
/// trust it (the checks of a service's runtime folder).
fn unit_state_dir() -> Option<PathBuf> {
    let me = nix::unistd::geteuid().as_raw();
    let place = Place {
        dir: unit_dir(UNIT_STATE_DIR_ENV, UNIT_STATE_DIR),
        kind: Kind::Service,
    };
    open_place(&place, me)?;
    crate::orphans::running_supervisor(&place.dir).map(|_| place.dir)
}

/// The live record of whichever supervisor holds `state_dir`, if it wrote one.
fn supervisor_of(state_dir: &Path) -> Option<Record> {
    let pid = crate::orphans::running_supervisor(state_dir)?;
    let wanted = std::path::absolute(state_dir).ok()?;
    records().find(|r| r.pid == pid && r.state_dir == wanted)
}

/// The control socket of the supervisor holding `state_dir` (known from a
/// fleet that loads): `$RUNTIME_DIRECTORY`, else its record, else `state_dir`.
pub fn socket_for(fleet_path: &Path, state_dir: &Path) -> PathBuf {
    if let Some(dir) = runtime_directory() {
        return socket_path(Path::new(""), Some(&dir));
    }
    match lookup(fleet_path) {
        Some(r) if r.state_dir == state_dir => r.socket,
        _ => socket_path(state_dir, None),
    }
}

fn base_dir(fleet_path: &Path) -> PathBuf {
    let parent = match fleet_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::path::absolute(parent).unwrap_or_else(|_| parent.to_owned())
}

/// `fleet::load`'s default: `$STATE_DIRECTORY`, else `.supervisor` beside the file.
fn default_state_dir(fleet_path: &Path, env: &LoadEnv) -> PathBuf {
    match &env.state_directory {
        Some(dir) => dir.clone(),
        None => base_dir(fleet_path).join(".supervisor"),
    }
}

/// The value of a top-level `state_dir:` line, read without parsing YAML,
/// so that a syntax error, an alias bomb or bytes that are not UTF-8
/// anywhere else in the file cannot hide it. `None` when there is no such
/// line, when it is not a plain or quoted one-line value, or when two lines
/// disagree (the file is then ambiguous, and a guess could find the wrong
/// supervisor).
pub fn scan_state_dir(bytes: &[u8]) -> Option<String> {
    let mut found: Option<String> = None;
    for line in bytes.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(rest) = line.strip_prefix(b"state_dir") else {
            continue;
        };
        let rest = trim_start(rest);
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        if !rest.is_empty() && !rest[0].is_ascii_whitespace() {
            continue;
        }
        let value = one_line_scalar(trim_start(rest))?;
        match &found {
            Some(earlier) if *earlier != value => return None,
            _ => found = Some(value),
        }
    }
    found
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// A plain, `'single'` or `"double"` quoted scalar with an optional trailing
/// comment; anything fancier (escapes, block scalars, anchors, tags, flow
/// collections) is `None`.
fn one_line_scalar(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let (inner, after) = match text.chars().next()? {
        quote @ ('"' | '\'') => {
            let body = &text[1..];
            let end = body.find(quote)?;
            let inner = &body[..end];
            if inner.contains('\\') || body[end + 1..].starts_with(quote) {
                return None;
            }
            (inner, body[end + 1..].trim_start())
        }
        '|' | '>' | '&' | '*' | '!' | '{' | '[' | '#' | '@' | '`' | '%' => return None,
        _ => {
            let end = text
                .char_indices()
                .find(|&(i, c)| c == '#' && text[..i].ends_with([' ', '\t']))
                .map_or(text.len(), |(i, _)| i);
            (text[..end].trim_end(), "")
        }
    };
    if !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    (!inner.trim().is_empty()).then(|| inner.to_owned())
}

/// The shipped unit's `RuntimeDirectory=agent-supervisor`
/// (systemd/agent-supervisor.service): where a host shell finds the record
/// of the service, whose own /tmp is private.
pub const UNIT_RUNTIME_DIR: &str = "/run/agent-supervisor";
/// The shipped unit's `StateDirectory=agent-supervisor`: the state dir of a
/// service whose fleet file names none (it relies on `$STATE_DIRECTORY`).
pub const UNIT_STATE_DIR: &str = "/var/lib/agent-supervisor";
/// Replace [`UNIT_RUNTIME_DIR`] / [`UNIT_STATE_DIR`] for the CLI. Meant for
/// tests (which cannot run systemd) and for packagers whose unit uses other
/// names; a user setting them only changes where their own CLI looks, and
/// the same ownership checks apply.
pub const UNIT_RUNTIME_DIR_ENV: &str = "SUPERVISOR_UNIT_RUNTIME_DIR";
pub const UNIT_STATE_DIR_ENV: &str = "SUPERVISOR_UNIT_STATE_DIR";

fn unit_dir(env: &str, default: &str) -> PathBuf {
    match std::env::var_os(env).map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => PathBuf::from(default),
    }
}

/// Who made a folder of records, which decides whose records it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The caller's own per-user folder.
    Own,
    /// A runtime folder systemd made for the service (`$RUNTIME_DIRECTORY`,
    /// the unit's well-known one).
    Service,
    /// Another user's per-user folder, read by root only.
    OtherUser(u32),
}

/// What the trust rules look at in a file or folder (`lstat`, never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    uid: u32,
    mode: u32,
    dir: bool,
    file: bool,
}

impl Stat {
    fn of(path: &Path) -> Option<Stat> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(Stat::from_meta(&meta))
    }

    fn from_meta(meta: &std::fs::Metadata) -> Stat {
        Stat {
            uid: meta.uid(),
            mode: meta.mode(),
            dir: meta.file_type().is_dir(),
            file: meta.file_type().is_file(),
        }
    }

    fn others_may_write(self) -> bool {
        self.mode & 0o022 != 0
    }
}

/// Whether `me` may read records in a folder of `kind` (`dir`, whose parent
/// is `parent`), and if so whose records it holds besides root's and ours.
/// A link, or a folder someone else could write in, could steer the CLI to
/// another user's socket.
fn folder_owner(kind: Kind, dir: Stat, parent: Option<Stat>, me: u32) -> Option<u32> {
    if !dir.dir || dir.others_may_write() {
        return None;
    }
    match kind {
        Kind::Own => (dir.uid == me && dir.mode & 0o077 == 0).then_some(me),
        Kind::Service if dir.uid == me || dir.uid == 0 => Some(dir.uid),
        // A unit's `User=` owns its runtime folder; only root (systemd)
        // can have made it in a folder only root may write in.
        Kind::Service => {
            let made_by_root = parent.is_some_and(|p| p.uid == 0 && !p.others_may_write());
            (me == 0 && made_by_root).then_some(dir.uid)
        }
        Kind::OtherUser(uid) => (me == 0 && dir.uid == uid && dir.mode & 0o077 == 0).then_some(uid),
    }
}

/// Whether a record file in a folder whose records belong to `owner` may be
/// believed by `me`: a regular file of root, ours or the folder's owner,
/// that no one else could have written.
fn record_file_trusted(file: Stat, owner: u32, me: u32) -> bool {
    file.file && !file.others_may_write() && (file.uid == 0 || file.uid == me || file.uid == owner)
}

/// What a record owned by another user (`writer`, neither root nor `me`)
/// must hold for root to believe it: every path it names is the writer's,
/// and, outside a folder systemd made for the service, so is the fleet file
/// or its folder, so a user cannot claim someone else's fleet file.
fn foreign_claims_hold(
    kind: Kind,
    writer: u32,
    me: u32,
    state_dir: Option<u32>,
    socket: Option<u32>,
    fleet: [Option<u32>; 2],
) -> bool {
    if writer == 0 || writer == me {
        return true;
    }
    let theirs = |uid: Option<u32>| uid == Some(writer);
    theirs(state_dir) && theirs(socket) && (kind == Kind::Service || fleet.into_iter().any(theirs))
}

/// A folder that may hold records, in the order they are searched.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    dir: PathBuf,
    kind: Kind,
}

/// The caller's own per-user folder: `$XDG_RUNTIME_DIR/agent-supervisor`,
/// else `$TMPDIR/agent-supervisor-UID`.
fn own_dir(uid: u32) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(runtime) if runtime.is_absolute() => runtime.join("agent-supervisor"),
        _ => std::env::temp_dir().join(format!("agent-supervisor-{uid}")),
    }
}

/// Every folder the CLI searches for records: its own, the service's
/// runtime folders, and for root every user's per-user folder (a
/// supervisor run by hand as another user).
fn places() -> Vec<Place> {
    let me = nix::unistd::geteuid().as_raw();
    let mut places = vec![Place {
        dir: own_dir(me),
        kind: Kind::Own,
    }];
    if let Some(dir) = runtime_directory() {
        places.push(Place {
            dir,
            kind: Kind::Service,
        });
    }
    places.push(Place {
        dir: unit_dir(UNIT_RUNTIME_DIR_ENV, UNIT_RUNTIME_DIR),
        kind: Kind::Service,
    });
    if me == 0 {
        places.extend(other_users_places(
            Path::new("/run/user"),
            &std::env::temp_dir(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    places.retain(|p| seen.insert(p.dir.clone()));
    places
}

/// Bounds what a huge /tmp costs root's CLI.
const MAX_SCANNED_ENTRIES: usize = 10_000;

/// `/run/user/UID/agent-supervisor` and `$TMPDIR/agent-supervisor-UID` of
/// every user but root.
fn other_users_places(run_user: &Path, tmp: &Path) -> Vec<Place> {
    let uids_in = |dir: &Path, parse: &dyn Fn(&str) -> Option<u32>| -> Vec<u32> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .take(MAX_SCANNED_ENTRIES)
                    .flatten()
                    .filter_map(|e| parse(e.file_name().to_str()?))
                    .filter(|uid| *uid != 0)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut places: Vec<Place> = uids_in(run_user, &|name| name.parse().ok())
        .into_iter()
        .map(|uid| Place {
            dir: run_user.join(uid.to_string()).join("agent-supervisor"),
            kind: Kind::OtherUser(uid),
        })
        .collect();
    let from_tmp = uids_in(tmp, &|name| {
        name.strip_prefix("agent-supervisor-")?.parse().ok()
    });
    places.extend(from_tmp.into_iter().map(|uid| Place {
        dir: tmp.join(format!("agent-supervisor-{uid}")),
        kind: Kind::OtherUser(uid),
    }));
    places.sort_by(|a, b| a.dir.cmp(&b.dir));
    places
}

/// `place`'s folder, if `me` may read records there, with whose they may be.
fn open_place(place: &Place, me: u32) -> Option<u32> {
    let dir = Stat::of(&place.dir)?;
    let parent = place.dir.parent().and_then(Stat::of);
    folder_owner(place.kind, dir, parent, me)
}

/// Reads the record at `path` (never through a link, never blocking),
/// if the trust rules let `me` believe it.
fn read_record(place: &Place, owner: u32, path: &Path, me: u32) -> Option<Record> {
    use std::io::Read as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    let stat = Stat::from_meta(&file.metadata().ok()?);
    if !record_file_trusted(stat, owner, me) {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES).read_to_end(&mut bytes).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    let uid = |p: &Path| Stat::of(p).map(|s| s.uid);
    let fleet_folder = record.fleet.parent().and_then(uid);
    foreign_claims_hold(
        place.kind,
        stat.uid,
        me,
        uid(&record.state_dir),
        uid(&record.socket),
        [uid(&record.fleet), fleet_folder],
    )
    .then_some(record)
}

/// Every record the caller may believe, in search order.
fn records() -> impl Iterator<Item = Record> {
    let me = nix::unistd::geteuid().as_raw();
    places().into_iter().flat_map(move |place| {
        let Some(owner) = open_place(&place, me) else {
            return Vec::new();
        };
        std::fs::read_dir(&place.dir)
            .map(|entries| {
                entries
                    .take(MAX_SCANNED_ENTRIES)
                    .flatten()
                    .filter(|e| is_record_name(&e.file_name()))
                    .filter_map(|e| read_record(&place, owner, &e.path(), me))
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The per-user folder that holds this supervisor's records, created 0700
/// if need be; `None` if it is not a folder of ours that only we can enter.
fn registry_dir(create: bool) -> Option<PathBuf> {
    let uid = nix::unistd::geteuid().as_raw();
    let dir = own_dir(uid);
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
    }
    let place = Place {
        dir,
        kind: Kind::Own,
    };
    open_place(&place, uid).map(|_| place.dir)
}

/// The fleet file's identity: its folder's canonical path and its name, so
/// `-f fleet.yaml` and `-f /abs/path/fleet.yaml` agree, and a deleted file
/// still has one.
fn canonical_fleet(fleet_path: &Path) -> Option<PathBuf> {
    let folder = std::fs::canonicalize(base_dir(fleet_path)).ok()?;
    Some(folder.join(fleet_path.file_name()?))
}

fn record_name(canonical: &Path) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let digest = Sha256::digest(canonical.as_os_str().as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

/// Whether a file name is one [`record_name`] makes: the sweep and the
/// search touch nothing else in a folder (a `$RUNTIME_DIRECTORY` may hold
/// other files).
fn is_record_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.strip_suffix(".json"))
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `record` is for `canonical` and its supervisor is alive: it
/// still holds the lock of the state dir the record names. A record left
/// by a killed supervisor is ignored.
fn is_live(record: &Record) -> bool {
    crate::orphans::running_supervisor(&record.state_dir) == Some(record.pid)
}

/// The live record for `fleet_path`, from the first folder that has one.
pub fn lookup(fleet_path: &Path) -> Option<Record> {
    let canonical = canonical_fleet(fleet_path)?;
    let name = record_name(&canonical);
    let me = nix::unistd::geteuid().as_raw();
    places().into_iter().find_map(|place| {
        let owner = open_place(&place, me)?;
        let record = read_record(&place, owner, &place.dir.join(&name), me)?;
        (record.fleet == canonical && is_live(&record)).then_some(record)
    })
}

/// Removes the records of supervisors that are gone (killed before they
/// could remove their own), so the folder does not grow with every fleet
/// ever killed. A record is written only once its supervisor holds its
/// state dir's lock, so a live one is never taken for stale.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !is_record_name(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        let live = fleet::read_regular_file(&path, MAX_RECORD_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .is_some_and(|r| is_live(&r));
        if !live {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A supervisor's discovery records; removed when dropped, unless another
/// supervisor of the same fleet file has replaced them meanwhile.
#[derive(Debug)]
pub struct Registration {
    paths: Vec<PathBuf>,
    pid: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        for path in &self.paths {
            let ours = fleet::read_regular_file(path, MAX_RECORD_BYTES)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                .is_some_and(|r| r.pid == self.pid);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Registration {
    /// Whether any record was written.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// Writes the record of this supervisor (pid, state dir, socket) for the
/// fleet at `fleet_path`, atomically and 0600, in its per-user folder and,
/// under systemd, in `$RUNTIME_DIRECTORY` (which a host shell can see when
/// the service's /tmp is private). A failure only costs discovery from
/// that folder, so each is returned for a warning, never fatal.
pub fn register(fleet_path: &Path, state_dir: &Path, socket: &Path) -> (Registration, Vec<String>) {
    let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let mut registration = Registration {
        paths: Vec::new(),
        pid,
    };
    let Some(canonical) = canonical_fleet(fleet_path) else {
        let err = format!("cannot resolve the folder of `{}`", fleet_path.display());
        return (registration, vec![err]);
    };
    let record = Record {
        fleet: canonical.clone(),
        state_dir: std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_owned()),
        socket: std::path::absolute(socket).unwrap_or_else(|_| socket.to_owned()),
        pid,
    };
    let mut failures = Vec::new();
    let mut dirs = Vec::new();
    match registry_dir(true) {
        Some(dir) => dirs.push(dir),
        None => failures.push(
            "no private runtime folder ($XDG_RUNTIME_DIR/agent-supervisor or \
             $TMPDIR/agent-supervisor-UID, ours and mode 0700)"
                .to_owned(),
        ),
    }
    if let Some(dir) = runtime_directory() {
        dirs.push(dir);
    }
    for dir in dirs {
        sweep(&dir);
        match write_record(&dir, &record_name(&canonical), &record) {
            Ok(path) => registration.paths.push(path),
            Err(err) => failures.push(err),
        }
    }
    (registration, failures)
}

fn write_record(dir: &Path, name: &str, record: &Record) -> Result<PathBuf, String> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = serde_json::to_vec(record)
        .map_err(io::Error::other)
        .and_then(|text| {
            let _ = std::fs::remove_file(&tmp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&text)?;
            std::fs::rename(&tmp, &path)
        });
    match written {
        Ok(()) => Ok(path),
        Err(err) => {
            let _ = std::fs::remove_file(&tmp);
            Err(format!("cannot write `{}`: {err}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_dir_line_is_found_whatever_else_is_broken() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"state_dir: st\n", Some("st")),
            (
                b"version: 1\nstate_dir:   /var/lib/x   # where\n",
                Some("/var/lib/x"),
            ),
            (b"state_dir: 'my dir'\n", Some("my dir")),
            (b"state_dir: \"a#b\"  # c\n", Some("a#b")),
            (b"state_dir: a#b\n", Some("a#b")),
            (b"state_dir : st\r\nagents: [\n", Some("st")),
            // Broken elsewhere: syntax, aliases, bytes that are not UTF-8.
            (b"agents: [\nstate_dir: st\n  - : :\n", Some("st")),
            (b"a: &a [x, x]\nb: &b [*a, *a]\nstate_dir: st\n", Some("st")),
            (b"agents:\n  \xff\xfe: {}\nstate_dir: st\n", Some("st")),
            // Not a top-level one-line value, or ambiguous.
            (b"  state_dir: nested\n", None),
            (b"state_dirs: x\n", None),
            (b"state_dir:x\n", None),
            (b"state_dir:\n", None),
            (b"state_dir: ''\n", None),
            (b"state_dir: |\n  x\n", None),
            (b"state_dir: *a\n", None),
            (b"state_dir: \"a\\tb\"\n", None),
            (b"state_dir: 'it''s'\n", None),
            (b"state_dir: \xff\n", None),
            (b"state_dir: a\nstate_dir: b\n", None),
            (b"state_dir: a\nstate_dir: a\n", Some("a")),
            (b"# state_dir: a\n", None),
            (b"", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                scan_state_dir(text).as_deref(),
                *want,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn records_are_keyed_by_the_canonical_fleet_path() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        let here = canonical_fleet(&dir.path().join("fleet.yaml")).unwrap();
        assert_eq!(here, canonical.join("fleet.yaml"));
        // A deleted file still has an identity; `a/../fleet.yaml` is the same one.
        std::fs::create_dir(dir.path().join("a")).unwrap();
        assert_eq!(
            canonical_fleet(&dir.path().join("a/../fleet.yaml")).unwrap(),
            here
        );
        assert_eq!(
            record_name(&here),
            record_name(&canonical.join("fleet.yaml"))
        );
        assert_ne!(
            record_name(&here),
            record_name(&canonical.join("other.yaml"))
        );
        assert!(record_name(&here).ends_with(".json") && record_name(&here).len() == 37);
    }

    fn stat(uid: u32, mode: u32, dir: bool) -> Stat {
        Stat {
            uid,
            mode,
            dir,
            file: !dir,
        }
    }

    #[test]
    fn record_folders_are_trusted_by_owner_and_mode() {
        let root_parent = Some(stat(0, 0o755, true));
        let tmp_parent = Some(stat(0, 0o1777, true));
        let user_parent = Some(stat(1000, 0o700, true));
        // (kind, folder, parent, me, whose records it may hold)
        let cases = [
            // Our own per-user folder: ours and 0700 only.
            (
                Kind::Own,
                stat(1000, 0o700, true),
                tmp_parent,
                1000,
                Some(1000),
            ),
            (Kind::Own, stat(1000, 0o750, true), tmp_parent, 1000, None),
            (Kind::Own, stat(1001, 0o700, true), tmp_parent, 1000, None),
            (Kind::Own, stat(1000, 0o700, false), tmp_parent, 1000, None),
            // A service's runtime folder: root's or ours, nobody else may write.
            (
                Kind::Service,
                stat(0, 0o700, true),
                root_parent,
                1000,
                Some(0),
            ),
            (
                Kind::Service,
                stat(0, 0o755, true),
                root_parent,
                1000,
                Some(0),
            ),
            (
                Kind::Service,
                stat(1000, 0o700, true),
                root_parent,
                1000,
                Some(1000),
            ),
            (Kind::Service, stat(0, 0o775, true), root_parent, 0, None),
            (Kind::Service, stat(0, 0o757, true), root_parent, 0, None),
            (
                Kind::Service,
                stat(1001, 0o700, true),
                root_parent,
                1000,
                None,
            ),
            // Root trusts a `User=` service's folder made by root (systemd)...
            (
                Kind::Service,
                stat(1001, 0o700, true),
                root_parent,
                0,
                Some(1001),
            ),
            // ...not one anybody could have made, or a user's.
            (Kind::Service, stat(1001, 0o700, true), tmp_parent, 0, None),
            (Kind::Service, stat(1001, 0o700, true), user_parent, 0, None),
            (Kind::Service, stat(1001, 0o700, true), None, 0, None),
            // Another user's per-user folder: root only, owner as named.
            (
                Kind::OtherUser(1000),
                stat(1000, 0o700, true),
                tmp_parent,
                0,
                Some(1000),
            ),
            (
                Kind::OtherUser(1000),
                stat(1001, 0o700, true),
                tmp_parent,
                0,
                None,
            ),
            (
                Kind::OtherUser(1000),
                stat(1000, 0o755, true),
                tmp_parent,
                0,
                None,
            ),
            (
                Kind::OtherUser(1000),
                stat(1000, 0o700, true),
                tmp_parent,
                1001,
                None,
            ),
        ];
        for (kind, dir, parent, me, want) in cases {
            assert_eq!(
                folder_owner(kind, dir, parent, me),
                want,
                "{kind:?} {dir:?} parent {parent:?} me {me}"
            );
        }
    }

    #[test]
    fn record_files_are_trusted_by_owner_and_mode() {
        // (file, folder's owner, me, trusted)
        let cases = [
            (stat(1000, 0o600, false), 1000, 1000, true),
            (stat(0, 0o644, false), 1000, 1000, true),
            (stat(1001, 0o600, false), 0, 0, false),
            (stat(1001, 0o600, false), 1001, 0, true),
            (stat(1000, 0o620, false), 1000, 1000, false),
            (stat(1000, 0o602, false), 1000, 1000, false),
            (stat(1001, 0o600, false), 1000, 1000, false),
            (stat(1000, 0o700, true), 1000, 1000, false),
        ];
        for (file, owner, me, want) in cases {
            assert_eq!(
                record_file_trusted(file, owner, me),
                want,
                "{file:?} owner {owner} me {me}"
            );
        }
    }

    #[test]
    fn another_users_record_must_name_only_their_own_things() {
        let u = Some(1000);
        let other = Some(1001);
        // (kind, writer, me, state dir, socket, [fleet file, its folder], believed)
        let cases = [
            // Root's and our own records need nothing more.
            (Kind::Own, 0, 0, None, None, [None, None], true),
            (Kind::Own, 1000, 1000, other, other, [other, other], true),
            // A user's record, read by root: all theirs.
            (Kind::OtherUser(1000), 1000, 0, u, u, [u, Some(0)], true),
            (Kind::OtherUser(1000), 1000, 0, u, u, [None, u], true),
            (
                Kind::OtherUser(1000),
                1000,
                0,
                u,
                u,
                [Some(0), Some(0)],
                false,
            ),
            (Kind::OtherUser(1000), 1000, 0, other, u, [u, u], false),
            (Kind::OtherUser(1000), 1000, 0, u, Some(0), [u, u], false),
            (Kind::OtherUser(1000), 1000, 0, u, None, [u, u], false),
            // A `User=` service's record names a fleet file root owns.
            (Kind::Service, 1000, 0, u, u, [Some(0), Some(0)], true),
            (Kind::Service, 1000, 0, u, other, [Some(0), Some(0)], false),
        ];
        for (kind, writer, me, state, socket, fleet, want) in cases {
            assert_eq!(
                foreign_claims_hold(kind, writer, me, state, socket, fleet),
                want,
                "{kind:?} writer {writer} me {me} {state:?} {socket:?} {fleet:?}"
            );
        }
    }

    #[test]
    fn only_record_names_are_searched_or_swept() {
        let name = record_name(Path::new("/etc/agent-supervisor/fleet.yaml"));
        assert!(is_record_name(std::ffi::OsStr::new(&name)));
        for other in ["control.sock", "x.json", ".0123.json.tmp", "fleet.json"] {
            assert!(!is_record_name(std::ffi::OsStr::new(other)), "{other}");
        }
    }

    #[test]
    fn root_searches_every_users_folder_but_its_own() {
        let run_user = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for name in ["0", "1000", "gdm"] {
            std::fs::create_dir(run_user.path().join(name)).unwrap();
        }
        for name in [
            "agent-supervisor-0",
            "agent-supervisor-1001",
            "agent-supervisor-x",
            "other",
        ] {
            std::fs::create_dir(tmp.path().join(name)).unwrap();
        }
        let places = other_users_places(run_user.path(), tmp.path());
        let want = [
            (
                run_user.path().join("1000/agent-supervisor"),
                Kind::OtherUser(1000),
            ),
            (
                tmp.path().join("agent-supervisor-1001"),
                Kind::OtherUser(1001),
            ),
        ];
        let mut got: Vec<_> = places.into_iter().map(|p| (p.dir, p.kind)).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want = want.to_vec();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
    }

    /// The consts name what the shipped unit sets up; a rename in one place
    /// only would send the CLI looking in the wrong folder.
    #[test]
    fn the_unit_file_and_the_well_known_dirs_agree() {
        let unit = include_str!("../../systemd/agent-supervisor.service");
        let setting = |key: &str| -> Vec<&str> {
            unit.lines()
                .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .collect()
        };
        assert_eq!(
            setting("RuntimeDirectory")
                .iter()
                .map(|d| format!("/run/{d}"))
                .collect::<Vec<_>>(),
            [UNIT_RUNTIME_DIR]
        );
        assert_eq!(
            setting("StateDirectory")
                .iter()
                .map(|d| format!("/var/lib/{d}"))
                .collect::<Vec<_>>(),
            [UNIT_STATE_DIR]
        );
        // The unit runs as root unless `User=` is set: then root's CLI
        // relies on the `User=` rules above.
        assert!(setting("User").is_empty() && setting("DynamicUser").is_empty());
    }
}
