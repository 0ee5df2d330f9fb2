//! agent-supervisor: runs a fleet of LLM agents so that one runaway agent costs
//! one agent, never the fleet. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod agent;
pub mod alert;
pub mod budget;
pub mod check;
pub mod cli;
pub mod control;
pub mod fdlimit;
pub mod fleet;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod orphans;
pub mod pricing;
pub mod proxy;
pub mod quarantine_cmd;
pub mod redact;
pub mod rotation;
pub mod runaway;
pub mod sd_notify;
pub mod supervisor;
pub mod text_table;
pub mod tune;
pub mod usage_report;
pub mod vault;
