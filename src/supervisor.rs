//! `supervisor run`: owns the agent actors, applies fleet diffs, handles signals.

use std::path::Path;

use crate::cli::LogFormat;

/// Runs the fleet in the foreground and returns the process exit code.
pub fn run_command(_fleet: &Path, _log_format: LogFormat) -> u8 {
    todo!("run")
}
