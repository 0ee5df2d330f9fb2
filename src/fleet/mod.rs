//! fleet.yaml: schema, parsing with source locations, validation that collects
//! every error, defaults merging, and `diff(old, new)`. Pure apart from reading
//! the file; must not start processes or resolve secrets.
//!
//! Entry points: [`load`] (or [`load_located`] when later errors need the
//! file's positions), [`diff`] and [`non_reloadable_changes`] for reloads.

mod accounts;
mod admin;
mod alerts;
mod diff;
mod error;
mod load;
mod metering;
mod model;
mod node;
mod schema;
mod velocity;

pub use accounts::{Accounts, GroupEntry, UserEntry};
pub use diff::{FleetDiff, diff, non_reloadable_changes};
pub use error::{ConfigError, ConfigErrors};
pub use load::{
    LoadEnv, Located, MAX_FILE_BYTES, SourceMap, VERSION, check_overlay_text, load, load_located,
    overlay_path, parse_fleet, parse_fleet_with_overlay, read_regular_file, valid_agent_name,
    valid_env_name,
};
pub use model::*;
pub use node::Pos;
