//! The control socket: the CLI's way into a running supervisor.
pub mod protocol;
