//! The CLI side of the control socket: `supervisor status|reload|start|stop|
//! restart`. Finds the socket of a fleet, sends one request, prints the
//! answer and turns it into an exit code. Blocking I/O on purpose: the CLI
//! sends one line and reads one line. Must not decide anything itself.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::discovery::{self, Found};
use super::protocol::{
    AgentStatusRow, Command, HostStatus, PROTOCOL_VERSION, ReloadReport, Request, Response,
};
use super::server::{MAX_REQUEST_BYTES, REPLY_TIMEOUT};
use super::status;
use crate::cli::exit;

/// Answers are a few KiB per agent; this bounds a confused peer.
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `usage` waits for the supervisor to commit its ledger writes.
const FLUSH_PATIENCE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket, or nothing listening on it.
    #[error("no supervisor is running for `{fleet}` ({why})")]
    NotRunning { fleet: PathBuf, why: String },
    #[error("cannot {what} the control socket `{socket}`: {source}")]
    Io {
        what: &'static str,
        socket: PathBuf,
        source: io::Error,
    },
    #[error("the supervisor sent an answer this CLI does not understand: {0}")]
    BadAnswer(String),
}

impl ClientError {
    pub fn hint(&self) -> String {
        match self {
            ClientError::NotRunning { .. } => "start one with `supervisor run`".to_owned(),
            ClientError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                "run the command as the user the supervisor runs as (or as root)".to_owned()
            }
            ClientError::Io { .. } => {
                "see whether the supervisor is still running, e.g. in its log".to_owned()
            }
            ClientError::BadAnswer(_) => {
                "use the `supervisor` binary the running supervisor was started from".to_owned()
            }
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotRunning { .. } => exit::NOT_RUNNING,
            _ => exit::FAILURE,
        }
    }
}

/// Sends one command to the supervisor listening at `socket` and waits for
/// its answer.
pub fn request(
    fleet_path: &Path,
    socket: &Path,
    command: Command,
) -> Result<Response, ClientError> {
    request_within(fleet_path, socket, command, REPLY_TIMEOUT + WRITE_TIMEOUT)
}

/// [`request`], giving up on the answer after `patience`.
fn request_within(
    fleet_path: &Path,
    socket: &Path,
    command: Command,
    patience: Duration,
) -> Result<Response, ClientError> {
    let io_err = |what| {
        move |source| ClientError::Io {
            what,
            socket: socket.to_owned(),
            source,
        }
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ClientError::NotRunning {
                fleet: fleet_path.to_owned(),
                why: format!("no control socket at `{}`", socket.display()),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(ClientError::NotRunning {
                fleet: fleet_path.to_owned(),
                why: format!("nothing listens on `{}`", socket.display()),
            });
        }
        Err(e) => return Err(io_err("connect to")(e)),
    };
    let mut line = serde_json::to_vec(&Request {
        version: PROTOCOL_VERSION,
        command,
    })
    .map_err(|e| io_err("encode a request for")(io::Error::other(e)))?;
    debug_assert!((line.len() as u64) < MAX_REQUEST_BYTES);
    line.push(b'\n');
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(patience)))
        .map_err(io_err("configure"))?;
    // A refusal (another user, too many connections) is answered and closed
    // without reading the request, so the write may fail; the answer is
    // still waiting in our receive queue and says why.
    let write_failed = match stream.write_all(&line) {
        Ok(()) => None,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            Some(e)
        }
        Err(e) => return Err(io_err("write to")(e)),
    };
    let mut answer = Vec::new();
    let read = BufReader::new((&stream).take(MAX_RESPONSE_BYTES)).read_until(b'\n', &mut answer);
    match (read, write_failed) {
        (Ok(_), Some(e)) if answer.is_empty() => return Err(io_err("write to")(e)),
        (Err(_), Some(e)) => return Err(io_err("write to")(e)),
        (Err(e), None) => return Err(io_err("read from")(e)),
        (Ok(_), _) => {}
    }
    if answer.is_empty() {
        return Err(io_err("read from")(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the supervisor closed the connection without answering (is it shutting down?)",
        )));
    }
    serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer(e.to_string()))
}

/// What asking a running supervisor to re-read its fleet led to.
#[derive(Debug)]
pub enum ReloadAsked {
    /// No supervisor holds the state dir: the next `supervisor run` picks
    /// the change up.
    NotRunning,
    /// Applied; what changed, as `supervisor reload` prints it.
    Applied { summary: String },
    /// The file was rejected; the running fleet is unchanged.
    Rejected { errors: Vec<String> },
    /// The control socket could not be used (`why`), so the supervisor was
    /// sent SIGHUP, which has no answer: the outcome is in its log.
    Signalled { pid: i32, why: String },
    /// Neither the socket nor the signal reached it.
    Failed { pid: i32, why: String },
}

/// Asks the supervisor holding `state_dir` (if one does) to reload, and
/// waits for the outcome: the way `release`, `rotate` and `tune --apply`
/// hand their change to it, so a rejected file is reported, not lost.
pub fn ask_reload(fleet_path: &Path, state_dir: &Path) -> ReloadAsked {
    let Some(pid) = crate::orphans::running_supervisor(state_dir) else {
        return ReloadAsked::NotRunning;
    };
    let socket = discovery::socket_for(fleet_path, state_dir);
    let why = match request(fleet_path, &socket, Command::Reload) {
        Ok(Response::Reloaded(report)) => {
            return ReloadAsked::Applied {
                summary: reload_summary(fleet_path, &report),
            };
        }
        Ok(Response::Rejected { errors }) => return ReloadAsked::Rejected { errors },
        Ok(Response::Error { message, .. }) => message,
        Ok(other) => format!("unexpected answer {other:?}"),
        Err(err) => err.to_string(),
    };
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    ) {
        Ok(()) => ReloadAsked::Signalled { pid, why },
        Err(err) => ReloadAsked::Failed {
            pid,
            why: format!("{why}; SIGHUP: {err}"),
        },
    }
}

impl ReloadAsked {
    /// Prints the outcome: `applied` (what the change now does) on success,
    /// `pending` (what waits for the next start) when nothing runs; with
    /// `stdout_is_data` (a `--json` report on stdout) the informational
    /// lines go to stderr. Returns the exit code: a rejected or failed
    /// reload fails the command, since its change has not taken effect.
    pub fn report(&self, applied: &str, pending: &str, stdout_is_data: bool) -> u8 {
        let say = |line: String| {
            if stdout_is_data {
                eprint!("{line}");
            } else {
                print!("{line}");
            }
        };
        match self {
            ReloadAsked::NotRunning => {
                say(format!("no supervisor is running; {pending}\n"));
                exit::OK
            }
            ReloadAsked::Applied { summary } => {
                say(format!(
                    "the running supervisor reloaded: {applied}\n{summary}"
                ));
                exit::OK
            }
            ReloadAsked::Rejected { errors } => {
                eprintln!(
                    "error: the running supervisor rejected the reload, so this has not taken effect yet; the running fleet is unchanged"
                );
                for line in errors {
                    eprintln!("{line}");
                }
                eprintln!(
                    "hint: fix each problem (`supervisor check` shows the same report), then run `supervisor reload`"
                );
                exit::FAILURE
            }
            ReloadAsked::Signalled { pid, why } => {
                say(format!(
                    "sent SIGHUP to the running supervisor (pid {pid}); its log shows whether the reload was applied\n"
                ));
                eprintln!("warning: the control socket could not be used: {why}");
                exit::OK
            }
            ReloadAsked::Failed { pid, why } => {
                eprintln!("error: cannot ask the running supervisor (pid {pid}) to reload: {why}");
                eprintln!(
                    "hint: run `supervisor reload` as the supervisor's user (or root), or restart it"
                );
                exit::FAILURE
            }
        }
    }
}

/// Asks the supervisor running the fleet whose state is in `state_dir`, if
/// there is one, to commit the ledger writes it has queued, so that a read
/// of `ledger.db` right after sees every request that has already ended (the
/// writer batches for a few milliseconds). No supervisor is not an error:
/// then nothing is queued.
pub fn flush_ledger(fleet_path: &Path, socket: &Path) -> Result<(), ClientError> {
    // The loop answers between its other work; a reload stuck on a slow
    // vault must not stall a read of the ledger for minutes.
    match request_within(fleet_path, socket, Command::FlushLedger, FLUSH_PATIENCE) {
        Ok(Response::Ok { .. }) | Err(ClientError::NotRunning { .. }) => Ok(()),
        Ok(other) => Err(ClientError::BadAnswer(format!("{other:?}"))),
        Err(err) => Err(err),
    }
}

/// Finds the socket (whatever state the fleet file is in), sends `command`,
/// and hands the answer to `on_answer` (which prints it and returns the
/// exit code); prints failures. `note_broken`: say on stderr when the fleet
/// file does not load (what is shown is then the running fleet, not the file).
fn run(
    fleet_path: &Path,
    command: Command,
    note_broken: bool,
    on_answer: impl FnOnce(Response) -> u8,
) -> u8 {
    let found = discovery::find(fleet_path);
    if note_broken && let Some(note) = found.broken_note() {
        eprintln!("{note}");
    }
    if let Some(note) = found.other_note(fleet_path) {
        eprintln!("{note}");
    }
    match request(fleet_path, &found.socket, command) {
        Ok(Response::Error { message, hint }) => {
            eprintln!("error: {message}");
            if let Some(hint) = hint {
                eprintln!("hint: {hint}");
            }
            exit::FAILURE
        }
        Ok(response) => on_answer(response),
        Err(err) => {
            eprintln!("error: {err}");
            if let (ClientError::NotRunning { .. }, Err(errors)) = (&err, &found.fleet) {
                // Nobody to ask, and the file would not start one either.
                eprint!("{}", errors.report());
            } else {
                eprintln!("hint: {}", err.hint());
            }
            err.exit_code()
        }
    }
}

/// The running supervisor's agent rows, if one answers at `found.socket`.
pub fn running_rows(fleet_path: &Path, found: &Found) -> Option<Vec<AgentStatusRow>> {
    match request_within(fleet_path, &found.socket, Command::Status, FLUSH_PATIENCE) {
        Ok(Response::Status { agents, .. }) => Some(agents),
        _ => None,
    }
}

fn unexpected(response: &Response) -> u8 {
    eprintln!("error: the supervisor sent an unexpected answer: {response:?}");
    exit::FAILURE
}

/// `supervisor status [--json]`.
pub fn status_command(fleet_path: &Path, json: bool) -> u8 {
    run(
        fleet_path,
        Command::Status,
        true,
        |response| match response {
            Response::Status { agents, host } => print_status(&agents, host.as_ref(), json),
            other => unexpected(&other),
        },
    )
}

fn print_status(agents: &[AgentStatusRow], host: Option<&HostStatus>, json: bool) -> u8 {
    if !json {
        if let Some(host) = host {
            print!("{}", status::host_header(host));
        }
        print!("{}", status::table(agents));
        return exit::OK;
    }
    match serde_json::to_string_pretty(agents) {
        Ok(text) => {
            println!("{text}");
            exit::OK
        }
        Err(err) => {
            eprintln!("error: cannot encode the status as JSON: {err}");
            exit::FAILURE
        }
    }
}

/// `supervisor reload`: the applied diff, or the errors (exit 1).
pub fn reload_command(fleet_path: &Path) -> u8 {
    run(
        fleet_path,
        Command::Reload,
        false,
        |response| match response {
            Response::Reloaded(report) => {
                print!("{}", reload_summary(fleet_path, &report));
                exit::OK
            }
            Response::Rejected { errors } => {
                eprintln!("error: reload rejected; the running fleet is unchanged");
                for line in errors {
                    eprintln!("{line}");
                }
                eprintln!(
                    "hint: fix each problem (`supervisor check` shows the same report), then run `supervisor reload` again"
                );
                exit::FAILURE
            }
            other => unexpected(&other),
        },
    )
}

/// What a reload did, one line per kind of change, so that every agent of
/// the fleet appears in exactly one: `added`, `released`, `removed`,
/// `changed` (restarted, or staying stopped), `changed live (what)`,
/// `held (quarantined)`, `unchanged`.
pub fn reload_summary(fleet_path: &Path, report: &ReloadReport) -> String {
    let ReloadReport {
        added,
        removed,
        changed,
        unchanged,
        released,
        changed_live,
        held,
        changed_stopped,
    } = report;
    let mut out = format!("reloaded `{}`\n", fleet_path.display());
    let mut line = |label: &str, names: &[String]| {
        if !names.is_empty() {
            out.push_str(&format!("{label}: {}\n", names.join(", ")));
        }
    };
    line("added (started)", added);
    line("released (started)", released);
    line("removed (stopped)", removed);
    line("changed (restarted)", changed);
    line("changed (stays stopped)", changed_stopped);
    // Grouped by what changed: `changed live (budget): a, b`.
    let mut live: Vec<(String, Vec<String>)> = Vec::new();
    for change in changed_live {
        let what = change.what.join(", ");
        match live.iter_mut().find(|(w, _)| *w == what) {
            Some((_, names)) => names.push(change.agent.clone()),
            None => live.push((what, vec![change.agent.clone()])),
        }
    }
    for (what, names) in &live {
        line(&format!("changed live ({what})"), names);
    }
    line("held (quarantined)", held);
    let agents = if *unchanged == 1 { "agent" } else { "agents" };
    out.push_str(&format!("unchanged: {unchanged} {agents}\n"));
    out
}

/// `supervisor start|stop|restart AGENT`.
pub fn agent_command(fleet_path: &Path, command: Command) -> u8 {
    run(fleet_path, command, true, |response| match response {
        Response::Ok { message } => {
            println!("{message}");
            exit::OK
        }
        other => unexpected(&other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that did not take effect fails the command; one that did, or
    /// that waits for the next start, does not.
    #[test]
    fn a_reload_that_did_not_take_effect_fails_the_command() {
        let cases = [
            (ReloadAsked::NotRunning, exit::OK),
            (
                ReloadAsked::Applied {
                    summary: "reloaded `fleet.yaml`\nunchanged: 1 agent\n".into(),
                },
                exit::OK,
            ),
            (
                ReloadAsked::Signalled {
                    pid: 1,
                    why: "no control socket".into(),
                },
                exit::OK,
            ),
            (
                ReloadAsked::Rejected {
                    errors: vec!["fleet.yaml:3:1: unknown field `bogus`".into()],
                },
                exit::FAILURE,
            ),
            (
                ReloadAsked::Failed {
                    pid: 1,
                    why: "EPERM".into(),
                },
                exit::FAILURE,
            ),
        ];
        for (asked, code) in cases {
            assert_eq!(asked.report("done", "later", true), code, "{asked:?}");
        }
    }

    #[test]
    fn reload_summary_lists_every_agent_once() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let live = |agent: &str, what: &[&str]| crate::control::protocol::LiveChange {
            agent: agent.into(),
            what: s(what),
        };
        let reloaded = ReloadReport {
            added: s(&["j"]),
            removed: s(&["l"]),
            changed: s(&["c", "d"]),
            unchanged: 2,
            released: s(&["r"]),
            changed_live: vec![
                live("b1", &["budget"]),
                live("br", &["budget", "runaway"]),
                live("b2", &["budget"]),
            ],
            held: s(&["q"]),
            changed_stopped: s(&["st"]),
        };
        assert_eq!(
            reload_summary(Path::new("fleet.yaml"), &reloaded),
            "reloaded `fleet.yaml`\n\
             added (started): j\n\
             released (started): r\n\
             removed (stopped): l\n\
             changed (restarted): c, d\n\
             changed (stays stopped): st\n\
             changed live (budget): b1, b2\n\
             changed live (budget, runaway): br\n\
             held (quarantined): q\n\
             unchanged: 2 agents\n"
        );
        let quiet = ReloadReport {
            added: vec![],
            removed: vec![],
            changed: vec![],
            unchanged: 1,
            released: vec![],
            changed_live: vec![],
            held: vec![],
            changed_stopped: vec![],
        };
        assert_eq!(
            reload_summary(Path::new("f.yaml"), &quiet),
            "reloaded `f.yaml`\nunchanged: 1 agent\n"
        );
    }

    #[test]
    fn no_socket_means_no_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let err = request(Path::new("fleet.yaml"), &socket, Command::Status).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no supervisor is running for `fleet.yaml` (no control socket at `{}`)",
                socket.display()
            )
        );
        assert_eq!(err.exit_code(), exit::NOT_RUNNING);
        // A socket file nobody listens on (a supervisor killed with -9).
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let err = request(Path::new("fleet.yaml"), &socket, Command::Status).unwrap_err();
        assert!(err.to_string().contains("nothing listens on"), "{err}");
        assert_eq!(err.exit_code(), exit::NOT_RUNNING);
    }
}
