//! The control socket: the CLI's way into a running supervisor. Owns where
//! the socket lives, the transfer types (`protocol`), the listener
//! (`server`), the CLI side (`client`) and how agent status is shown
//! (`status`). Must not decide anything about agents: every command is
//! forwarded to the supervisor task, which owns them.

pub mod client;
pub mod discovery;
pub mod protocol;
pub mod server;
pub mod status;

use std::path::{Path, PathBuf};

pub use server::{ControlHandle, ControlRequest};

/// The socket's file name, in the runtime directory or in `state_dir`.
pub const SOCKET_FILE: &str = "control.sock";

/// Where the control socket of a fleet lives: `$RUNTIME_DIRECTORY` when
/// systemd provides one (`RuntimeDirectory=`), else `state_dir`.
pub fn socket_path(state_dir: &Path, runtime_dir: Option<&Path>) -> PathBuf {
    runtime_dir.unwrap_or(state_dir).join(SOCKET_FILE)
}

/// The first entry of `$RUNTIME_DIRECTORY` (systemd joins several with `:`).
pub fn runtime_directory() -> Option<PathBuf> {
    parse_runtime_directory(&std::env::var_os("RUNTIME_DIRECTORY")?.to_string_lossy())
}

fn parse_runtime_directory(value: &str) -> Option<PathBuf> {
    let first = value.split(':').next().unwrap_or("").trim();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_lives_in_the_runtime_dir_when_there_is_one() {
        let state = Path::new("/var/lib/fleet");
        assert_eq!(
            socket_path(state, None),
            PathBuf::from("/var/lib/fleet/control.sock")
        );
        assert_eq!(
            socket_path(state, Some(Path::new("/run/agent-supervisor"))),
            PathBuf::from("/run/agent-supervisor/control.sock")
        );
    }

    #[test]
    fn runtime_directory_takes_the_first_entry() {
        let cases = [
            ("", None),
            (":", None),
            ("/run/a", Some("/run/a")),
            ("/run/a:/run/b", Some("/run/a")),
        ];
        for (value, want) in cases {
            assert_eq!(
                parse_runtime_directory(value),
                want.map(PathBuf::from),
                "{value:?}"
            );
        }
    }
}
