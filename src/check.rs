//! `supervisor check`: validate fleet.yaml and resolve every referenced secret.

use std::path::Path;

/// Runs `check` and returns the process exit code (see `cli::exit`).
pub fn check_command(_fleet: &Path) -> u8 {
    todo!("check")
}
