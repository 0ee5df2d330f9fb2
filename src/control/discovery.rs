//! How the CLI finds the running supervisor of a fleet file (its state dir
//! and control socket) whatever state that file is in: valid, broken
//! (a syntax error, an alias bomb, non-UTF-8 bytes), replaced by a FIFO, or
//! deleted. The user needs the running supervisor's answer exactly then.
//!
//! Three sources, most trusted first:
//! 1. the **discovery record** a running supervisor keeps in a per-user
//!    runtime folder (`$XDG_RUNTIME_DIR/agent-supervisor/`, else
//!    `$TMPDIR/agent-supervisor-UID/`), keyed by the canonical path of its
//!    fleet file; it survives any change to the file, even its deletion, and
//!    is trusted only while its supervisor still holds the state dir's lock;
//! 2. the fleet file, when it loads;
//! 3. a line scan of the file for a top-level `state_dir:`, which survives
//!    any breakage elsewhere in the file.
//!
//! Then the default (`$STATE_DIRECTORY`, else `.supervisor` beside the file),
//! as `fleet::load` would resolve it. Must not decide anything about agents;
//! the record holds paths and a pid, never anything secret.

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

/// The live record of whichever supervisor holds `state_dir`, if it wrote one.
fn supervisor_of(state_dir: &Path) -> Option<Record> {
    let pid = crate::orphans::running_supervisor(state_dir)?;
    let wanted = std::path::absolute(state_dir).ok()?;
    std::fs::read_dir(registry_dir(false)?)
        .ok()?
        .flatten()
        .filter_map(|e| fleet::read_regular_file(&e.path(), MAX_RECORD_BYTES).ok())
        .filter_map(|b| serde_json::from_slice::<Record>(&b).ok())
        .find(|r| r.pid == pid && r.state_dir == wanted)
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

/// The per-user folder that holds discovery records, created 0700 if need
/// be; `None` (no discovery) if it is not a folder of ours that only we can
/// enter.
fn registry_dir(create: bool) -> Option<PathBuf> {
    let uid = nix::unistd::geteuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(runtime) if runtime.is_absolute() => runtime.join("agent-supervisor"),
        _ => std::env::temp_dir().join(format!("agent-supervisor-{uid}")),
    };
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
    }
    // Not followed if a link: someone else's folder (in a shared /tmp) could
    // otherwise steer the CLI to their socket.
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0).then_some(dir)
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

/// The live record for `fleet_path`: its supervisor still holds the lock of
/// the state dir it names. A record left by a killed supervisor is ignored.
pub fn lookup(fleet_path: &Path) -> Option<Record> {
    let canonical = canonical_fleet(fleet_path)?;
    let path = registry_dir(false)?.join(record_name(&canonical));
    let bytes = fleet::read_regular_file(&path, MAX_RECORD_BYTES).ok()?;
    let record: Record = serde_json::from_slice(&bytes).ok()?;
    let live = record.fleet == canonical
        && crate::orphans::running_supervisor(&record.state_dir) == Some(record.pid);
    live.then_some(record)
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
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let live = fleet::read_regular_file(&path, MAX_RECORD_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .is_some_and(|r| crate::orphans::running_supervisor(&r.state_dir) == Some(r.pid));
        if !live {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A supervisor's discovery record; removed when dropped, unless another
/// supervisor of the same fleet file has replaced it meanwhile.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
    pid: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let ours = fleet::read_regular_file(&self.path, MAX_RECORD_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .is_some_and(|r| r.pid == self.pid);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the record of this supervisor (pid, state dir, socket) for the
/// fleet at `fleet_path`, atomically and 0600. A failure only costs
/// discovery, so it is returned for a warning, never fatal.
pub fn register(
    fleet_path: &Path,
    state_dir: &Path,
    socket: &Path,
) -> Result<Registration, String> {
    let canonical = canonical_fleet(fleet_path)
        .ok_or_else(|| format!("cannot resolve the folder of `{}`", fleet_path.display()))?;
    let dir = registry_dir(true).ok_or_else(|| {
        "no private runtime folder ($XDG_RUNTIME_DIR/agent-supervisor or \
         $TMPDIR/agent-supervisor-UID, ours and mode 0700)"
            .to_owned()
    })?;
    sweep(&dir);
    let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let record = Record {
        fleet: canonical.clone(),
        state_dir: std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_owned()),
        socket: std::path::absolute(socket).unwrap_or_else(|_| socket.to_owned()),
        pid,
    };
    let path = dir.join(record_name(&canonical));
    let tmp = dir.join(format!(".{}.tmp", record_name(&canonical)));
    let written = serde_json::to_vec(&record)
        .map_err(io::Error::other)
        .and_then(|text| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&text)?;
            std::fs::rename(&tmp, &path)
        });
    match written {
        Ok(()) => Ok(Registration { path, pid }),
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
}
