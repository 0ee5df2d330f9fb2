//! agent-supervisor: runs a fleet of LLM agents so that one runaway agent costs
//! one agent, never the fleet. See ARCHITECTURE.md for the map.

pub mod agent;
pub mod check;
pub mod cli;
pub mod fleet;
pub mod logging;
pub mod orphans;
pub mod supervisor;
pub mod vault;
