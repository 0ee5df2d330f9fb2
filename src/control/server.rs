//! The control socket's listener: one JSON request line in, one JSON
//! response line out, per connection. Owns the socket file (created 0600
//! before it accepts anyone, removed on drop) and the per-connection limits
//! (request size, time, number of connections, peer uid). Must not act on a
//! command itself: each one goes to the supervisor task through a
//! [`ControlHandle`], which in-process users (the metrics endpoint) share.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind as bind_socket, listen, socket,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::protocol::{Command, PROTOCOL_VERSION, Request, Response};
use super::{SOCKET_FILE, socket_path};

/// A request is one short JSON line; anything longer is not one of ours.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Time a client has to send its request line, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on an answer: `stop` waits for the agent's grace period, so
/// this is long; the command may still complete after it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections served at once; more are answered "busy" at once.
const MAX_CONNECTIONS: usize = 16;
/// Requests queued for the supervisor task.
const QUEUE: usize = 32;

/// A command and where its answer goes.
pub type ControlRequest = (Command, oneshot::Sender<Response>);

/// Asks the supervisor task to run a command. Cheap to clone; every clone
/// reaches the same task.
#[derive(Debug, Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<ControlRequest>,
}

impl ControlHandle {
    /// A handle and the receiver the supervisor task reads commands from.
    pub fn channel() -> (Self, mpsc::Receiver<ControlRequest>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// Runs `command` in the supervisor task and waits for its answer. When
    /// the task is gone (shutting down) the answer says so.
    pub async fn request(&self, command: Command) -> Response {
        let gone = || {
            Response::error(
                "the supervisor is shutting down",
                Some("run the command again once `supervisor run` is back".to_owned()),
            )
        };
        let (reply, answer) = oneshot::channel();
        if self.tx.send((command, reply)).await.is_err() {
            return gone();
        }
        answer.await.unwrap_or_else(|_| gone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("`{path}` exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot {what} `{path}`: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl BindError {
    pub fn hint(&self) -> String {
        match self {
            BindError::NotASocket { path } => format!(
                "remove `{}`; the supervisor creates its control socket there",
                path.display()
            ),
            BindError::Io { source, .. } if source.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                "a unix socket path must be shorter than 108 bytes; use a shorter `state_dir` \
                 (or run under systemd with `RuntimeDirectory=`)"
                    .to_owned()
            }
            BindError::Io { .. } => {
                "check that the directory exists and is writable by the supervisor's user"
                    .to_owned()
            }
        }
    }
}

/// The socket file (and the link to it in `state_dir`, when it lives in the
/// runtime directory); removed when dropped so no stale socket is left.
#[derive(Debug)]
pub struct SocketFiles {
    pub socket: PathBuf,
    link: Option<PathBuf>,
    /// The discovery record naming this socket, removed with it.
    pub discovery: Option<super::discovery::Registration>,
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in std::iter::once(&self.socket).chain(&self.link) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Removes what a dead supervisor left at `path` (a socket, or our link to
/// one). The state dir lock guarantees no live supervisor owns it; anything
/// else at that path is not ours to delete.
fn remove_stale(path: &Path) -> Result<(), BindError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BindError::Io {
            what: "inspect",
            path: path.to_owned(),
            source,
        }),
        Ok(meta) if meta.file_type().is_socket() || meta.file_type().is_symlink() => {
            fs::remove_file(path).map_err(|source| BindError::Io {
                what: "remove the stale socket",
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => Err(BindError::NotASocket {
            path: path.to_owned(),
        }),
    }
}

/// Creates the control socket for a fleet, mode 0600 before it listens (so
/// nobody can connect in between), replacing a stale one. Under systemd the
/// socket lives in the runtime directory and `state_dir/control.sock` links
/// to it, so a CLI started outside the unit finds it too. Must be called
/// within a tokio runtime, with the state dir lock held.
pub fn bind(
    state_dir: &Path,
    runtime_dir: Option<&Path>,
) -> Result<(UnixListener, SocketFiles), BindError> {
    let path = socket_path(state_dir, runtime_dir);
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| BindError::Io { what, path, source }
    };
    remove_stale(&path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_err("create a socket for", &path)(e.into()))?;
    let addr = UnixAddr::new(&path).map_err(|e| io_err("bind", &path)(e.into()))?;
    bind_socket(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
        .map_err(|e| io_err("bind", &path)(e.into()))?;
    // From here on, a failure removes what was created.
    let mut files = SocketFiles {
        socket: path.clone(),
        link: None,
        discovery: None,
    };
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(io_err("restrict the permissions of", &path))?;
    let backlog = Backlog::new(64).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|e| io_err("listen on", &path)(e.into()))?;
    let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
        .map_err(io_err("listen on", &path))?;
    if runtime_dir.is_some() {
        let link = state_dir.join(SOCKET_FILE);
        let linked = remove_stale(&link).and_then(|()| {
            std::os::unix::fs::symlink(&path, &link).map_err(io_err("create the link", &link))
        });
        match linked {
            Ok(()) => files.link = Some(link),
            Err(err) => tracing::warn!(
                "{err}; a CLI without `$RUNTIME_DIRECTORY` will not find the control socket"
            ),
        }
    }
    Ok((listener, files))
}

/// Only the supervisor's own user, or root, may control its agents. The
/// socket's mode already says so; this holds even if the mode is changed.
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

/// Accepts connections until `shutdown` turns true (or its sender is gone);
/// connections in progress are dropped then, and their clients see the
/// connection close.
pub async fn serve(
    listener: UnixListener,
    handle: ControlHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            Some(_) = connections.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            connections.spawn(async move {
                                let _slot = slot;
                                connection(stream, &handle, own_uid).await;
                            });
                        }
                        Err(_) => {
                            connections.spawn(async move {
                                let busy = Response::error(
                                    "the supervisor is busy with other control connections",
                                    Some("try again in a moment".to_owned()),
                                );
                                let _ = answer(stream, &busy).await;
                            });
                        }
                    }
                }
                Err(err) => {
                    // Out of file descriptors, most likely: back off rather than spin.
                    tracing::warn!("control socket: cannot accept a connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves one connection: check the peer, read one request line, run it,
/// write one response line.
async fn connection(stream: UnixStream, handle: &ControlHandle, own_uid: u32) {
    let response = match stream.peer_cred() {
        Ok(cred) if peer_allowed(cred.uid(), own_uid) => None,
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "control socket: refused a connection from another user"
            );
            Some(Response::error(
                format!(
                    "permission denied: only uid {own_uid} (the supervisor's user) or root may use the control socket"
                ),
                None,
            ))
        }
        Err(err) => Some(Response::error(
            format!("cannot identify the peer of the control connection: {err}"),
            None,
        )),
    };
    let (read, mut write) = stream.into_split();
    let response = match response {
        Some(refusal) => refusal,
        None => match tokio::time::timeout(IO_TIMEOUT, read_request(read)).await {
            Err(_) => Response::error(
                format!(
                    "no request line within {}",
                    humantime::format_duration(IO_TIMEOUT)
                ),
                None,
            ),
            Ok(Err(refusal)) => refusal,
            Ok(Ok(command)) => {
                if matches!(command, Command::FlushLedger | Command::Status) {
                    // Read-only, and sent by every `usage` and `status` (and
                    // by scripts polling them): not news in the log.
                    tracing::debug!(command = ?command, "control request");
                } else {
                    tracing::info!(command = ?command, "control request");
                }
                match tokio::time::timeout(REPLY_TIMEOUT, handle.request(command)).await {
                    Ok(response) => response,
                    Err(_) => Response::error(
                        format!(
                            "the supervisor did not answer within {}",
                            humantime::format_duration(REPLY_TIMEOUT)
                        ),
                        Some("the command may still complete; see `supervisor status`".to_owned()),
                    ),
                }
            }
        },
    };
    let _ = write_line(&mut write, &response).await;
}

async fn answer(stream: UnixStream, response: &Response) -> io::Result<()> {
    let (_, mut write) = stream.into_split();
    write_line(&mut write, response).await
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    tokio::time::timeout(IO_TIMEOUT, async {
        write.write_all(&line).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Reads and decodes one request line of at most [`MAX_REQUEST_BYTES`].
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Command, Response> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES + 1));
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| Response::error(format!("cannot read the request: {e}"), None))?;
    decode_request(&line)
}

/// Decodes one request line; pure, for the tests.
pub fn decode_request(line: &[u8]) -> Result<Command, Response> {
    if line.len() as u64 > MAX_REQUEST_BYTES {
        return Err(Response::error(
            format!("the request is larger than {MAX_REQUEST_BYTES} bytes"),
            None,
        ));
    }
    // The version is checked before the command, so that a newer CLI with a
    // command this supervisor does not know hears about the version.
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Response::error(format!("the request is not valid JSON: {e}"), None))?;
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(PROTOCOL_VERSION)) {
        let theirs = version.map_or_else(|| "none".to_owned(), |v| v.to_string());
        return Err(Response::error(
            format!(
                "control protocol version {theirs} is not supported (this supervisor speaks version {PROTOCOL_VERSION})"
            ),
            Some("use the `supervisor` binary the running supervisor was started from".to_owned()),
        ));
    }
    serde_json::from_value::<Request>(value)
        .map(|r| r.command)
        .map_err(|e| Response::error(format!("the request is not understood: {e}"), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_message(r: Result<Command, Response>) -> String {
        match r {
            Err(Response::Error { message, .. }) => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn decodes_requests() {
        let ok = [
            (
                r#"{"version":1,"command":{"command":"status"}}"#,
                Command::Status,
            ),
            (
                "{\"version\":1,\"command\":{\"command\":\"restart\",\"agent\":\"a\"}}\n",
                Command::Restart { agent: "a".into() },
            ),
        ];
        for (line, want) in ok {
            assert_eq!(decode_request(line.as_bytes()), Ok(want), "{line}");
        }
    }

    #[test]
    fn refuses_bad_requests_with_a_reason() {
        let cases = [
            ("", "not valid JSON"),
            ("{", "not valid JSON"),
            (
                r#"{"command":{"command":"status"}}"#,
                "version none is not supported",
            ),
            (
                r#"{"version":2,"command":{"command":"status"}}"#,
                "version 2 is not supported (this supervisor speaks version 1)",
            ),
            (
                r#"{"version":1,"command":{"command":"explode"}}"#,
                "not understood",
            ),
            (
                r#"{"version":1,"command":{"command":"stop"}}"#,
                "not understood",
            ),
        ];
        for (line, want) in cases {
            let message = error_message(decode_request(line.as_bytes()));
            assert!(message.contains(want), "{line:?}: {message}");
        }
        let huge = vec![b' '; MAX_REQUEST_BYTES as usize + 1];
        assert!(error_message(decode_request(&huge)).contains("larger than"));
    }

    #[test]
    fn only_the_same_user_or_root_may_connect() {
        let cases = [
            (1000, 1000, true),
            (0, 1000, true),
            (0, 0, true),
            (1001, 1000, false),
            (1000, 0, false),
        ];
        for (peer, own, want) in cases {
            assert_eq!(peer_allowed(peer, own), want, "peer {peer}, own {own}");
        }
    }

    #[tokio::test]
    async fn a_request_round_trips_and_the_socket_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, files) = bind(dir.path(), None).unwrap();
        let mode = fs::metadata(&files.socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (handle, mut rx) = ControlHandle::channel();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, handle, shutdown));
        let owner = tokio::spawn(async move {
            while let Some((command, reply)) = rx.recv().await {
                let _ = reply.send(Response::Ok {
                    message: format!("{command:?}"),
                });
            }
        });
        let mut stream = UnixStream::connect(&files.socket).await.unwrap();
        stream
            .write_all(b"{\"version\":1,\"command\":{\"command\":\"stop\",\"agent\":\"a\"}}\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let response: Response = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(
            response,
            Response::Ok {
                message: "Stop { agent: \"a\" }".into()
            }
        );
        assert!(text.ends_with('\n'));
        let _ = stop.send(true);
        server.await.unwrap();
        owner.abort();
        let path = files.socket.clone();
        drop(files);
        assert!(!path.exists(), "the socket file is removed on drop");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let stale = std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET_FILE)).unwrap();
        drop(stale);
        let (_listener, files) = bind(dir.path(), None).unwrap();
        drop(files);
        fs::write(dir.path().join(SOCKET_FILE), "mine").unwrap();
        let err = bind(dir.path(), None).unwrap_err();
        assert!(matches!(err, BindError::NotASocket { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join(SOCKET_FILE)).unwrap(),
            "mine"
        );
    }

    #[tokio::test]
    async fn in_the_runtime_dir_the_state_dir_links_to_it() {
        let state = tempfile::tempdir().unwrap();
        let runtime = tempfile::tempdir().unwrap();
        let (_listener, files) = bind(state.path(), Some(runtime.path())).unwrap();
        assert_eq!(files.socket, runtime.path().join(SOCKET_FILE));
        let link = state.path().join(SOCKET_FILE);
        assert_eq!(fs::read_link(&link).unwrap(), files.socket);
        std::os::unix::net::UnixStream::connect(&link).unwrap();
        drop(files);
        assert!(
            fs::symlink_metadata(&link).is_err(),
            "the link is removed too"
        );
    }

    #[tokio::test]
    async fn a_handle_without_a_supervisor_says_it_is_shutting_down() {
        let (handle, rx) = ControlHandle::channel();
        drop(rx);
        match handle.request(Command::Status).await {
            Response::Error { message, .. } => assert!(message.contains("shutting down")),
            other => panic!("{other:?}"),
        }
    }
}
