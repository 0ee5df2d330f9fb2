//! `supervisor usage`: per-agent usage for a month, read straight from the
//! ledger (no running supervisor needed), shown against the ceilings in
//! fleet.yaml — or, while that file does not load, the running supervisor's
//! ceilings, or none, saying which. Owns the table and JSON shapes; must not
//! write anything.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::budget::{Month, group_thousands as group};
use crate::cli::exit;
use crate::fleet;
use crate::ledger::{self, AgentMonthUsage};

/// One row of `supervisor usage --json`. Field names are a contract for scripts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    pub agent: String,
    pub month: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Tokens counted against the ceiling (exact usage, or the reservation
    /// for answers cut before their usage arrived).
    pub charged_tokens: u64,
    pub cost_usd: f64,
    pub monthly_tokens_ceiling: Option<u64>,
    pub monthly_usd_ceiling: Option<f64>,
    /// Requests in flight (or left unsettled by a crash), counted at their reservation.
    pub unsettled_requests: u64,
    /// Where the ceilings come from: `fleet` (the file), `running_supervisor`
    /// (the file does not load; what the running fleet enforces) or
    /// `unavailable` (the file does not load and no supervisor answers: the
    /// ceilings are null because they are unknown, not because they are unset).
    pub ceilings_from: CeilingsFrom,
    /// Requests charged at their reservation because their usage never
    /// arrived (cut streams, rows a crash left unsettled).
    pub cut_requests: u64,
}

/// Where the ceilings shown next to the usage come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CeilingsFrom {
    Fleet,
    RunningSupervisor,
    Unavailable,
}

/// Each agent's monthly ceilings, `(tokens, micro-USD)`, and their source.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceilings {
    pub from: CeilingsFrom,
    pub agents: BTreeMap<String, (Option<u64>, Option<u64>)>,
}

impl Ceilings {
    pub fn of_fleet(fleet: &fleet::Fleet) -> Self {
        Self {
            from: CeilingsFrom::Fleet,
            agents: fleet
                .agents
                .iter()
                .map(|(name, a)| {
                    (
                        name.clone(),
                        (a.budget.monthly_tokens, a.budget.monthly_micro_usd),
                    )
                })
                .collect(),
        }
    }

    /// From the running supervisor's status rows (dollars back to micro-USD).
    pub fn of_running(rows: &[crate::control::protocol::AgentStatusRow]) -> Self {
        Self {
            from: CeilingsFrom::RunningSupervisor,
            agents: rows
                .iter()
                .map(|r| {
                    let usd = r
                        .monthly_usd_ceiling
                        .map(|d| (d * 1e6).round().max(0.0) as u64);
                    (r.agent.clone(), (r.monthly_tokens_ceiling, usd))
                })
                .collect(),
        }
    }

    pub fn unavailable() -> Self {
        Self {
            from: CeilingsFrom::Unavailable,
            agents: BTreeMap::new(),
        }
    }
}

fn usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

/// Rows for every agent the ceilings name, plus any agent the ledger knows
/// that they do not.
pub fn rows(ceilings: &Ceilings, month: Month, usage: Vec<AgentMonthUsage>) -> Vec<UsageRow> {
    let mut by_agent: BTreeMap<String, AgentMonthUsage> =
        usage.into_iter().map(|u| (u.agent.clone(), u)).collect();
    for name in ceilings.agents.keys() {
        by_agent
            .entry(name.clone())
            .or_insert_with(|| AgentMonthUsage {
                agent: name.clone(),
                month: month.to_string(),
                ..AgentMonthUsage::default()
            });
    }
    by_agent
        .into_values()
        .map(|u| {
            let (tokens, micro_usd) = ceilings.agents.get(&u.agent).copied().unwrap_or_default();
            UsageRow {
                month: month.to_string(),
                requests: u.requests,
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
                cache_creation_input_tokens: u.cache_creation_input_tokens,
                cache_read_input_tokens: u.cache_read_input_tokens,
                charged_tokens: u.charged_tokens,
                cost_usd: usd(u.charged_micro_usd),
                monthly_tokens_ceiling: tokens,
                monthly_usd_ceiling: micro_usd.map(usd),
                unsettled_requests: u.unsettled,
                ceilings_from: ceilings.from,
                cut_requests: u.cut,
                agent: u.agent,
            }
        })
        .collect()
}

fn of(used: String, ceiling: Option<String>) -> String {
    match ceiling {
        Some(c) => format!("{used} / {c}"),
        None => used,
    }
}

/// The table `supervisor usage` prints.
pub fn table(rows: &[UsageRow]) -> String {
    let header = [
        "AGENT",
        "MONTH",
        "REQUESTS",
        "INPUT",
        "OUTPUT",
        "CACHE WRITE",
        "CACHE READ",
        "TOKENS",
        "COST",
        "UNSETTLED",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        lines.push(vec![
            r.agent.clone(),
            r.month.clone(),
            group(r.requests),
            group(r.input_tokens),
            group(r.output_tokens),
            group(r.cache_creation_input_tokens),
            group(r.cache_read_input_tokens),
            of(group(r.charged_tokens), r.monthly_tokens_ceiling.map(group)),
            of(
                format!("${:.2}", r.cost_usd),
                r.monthly_usd_ceiling.map(|c| format!("${c:.2}")),
            ),
            group(r.unsettled_requests + r.cut_requests),
        ]);
    }
    let mut out = String::new();
    for line in crate::text_table::align(&lines, |i| i >= 2) {
        out.push_str(&line);
        out.push('\n');
    }
    if rows
        .iter()
        .any(|r| r.unsettled_requests + r.cut_requests > 0)
    {
        out.push_str(
            "UNSETTLED: requests whose usage is not known (in flight, or cut before it arrived), \
             charged at their full reservation; TOKENS and COST include those reservations, \
             so TOKENS can exceed INPUT + OUTPUT + CACHE\n",
        );
    }
    out
}

/// Runs `supervisor usage` and returns the exit code.
pub fn usage_command(fleet_path: &Path, month: Option<Month>, json: bool) -> u8 {
    let found = crate::control::discovery::find(fleet_path);
    let month = month.unwrap_or_else(Month::current);
    if let Err(err) = crate::control::client::flush_ledger(fleet_path, &found.socket) {
        eprintln!(
            "warning: cannot ask the running supervisor to commit its ledger: {err}; \
             requests that ended in the last moments may still show as in flight"
        );
    }
    let ceilings = match &found.fleet {
        Ok(fleet) => Ceilings::of_fleet(fleet),
        Err(_) => {
            if let Some(note) = found.broken_note() {
                eprintln!("{note}");
            }
            match crate::control::client::running_rows(fleet_path, &found) {
                Some(rows) => {
                    eprintln!(
                        "note: the ceilings shown are the running supervisor's, not the file's"
                    );
                    Ceilings::of_running(&rows)
                }
                None => {
                    eprintln!(
                        "note: ceilings are unavailable (no supervisor answers and the file does not load); \
                         usage is complete"
                    );
                    Ceilings::unavailable()
                }
            }
        }
    };
    let state_dir = &found.state_dir;
    let usage = match ledger::month_usage(state_dir, month) {
        Ok(u) => u,
        Err(err) => {
            eprintln!("error: cannot read the ledger in `{}`", state_dir.display());
            for cause in err.chain() {
                eprintln!("caused by: {cause}");
            }
            eprintln!("hint: {}", ledger::failure_hint(&err, state_dir));
            return exit::FAILURE;
        }
    };
    let rows = rows(&ceilings, month, usage);
    if json {
        match serde_json::to_string_pretty(&rows) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("error: cannot encode usage as JSON: {err}");
                return exit::FAILURE;
            }
        }
    } else {
        print!("{}", table(&rows));
    }
    exit::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_shows_ceilings() {
        let rows = vec![UsageRow {
            agent: "sparkles".into(),
            month: "2026-11".into(),
            requests: 12,
            input_tokens: 1200,
            output_tokens: 300,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 50,
            charged_tokens: 1550,
            cost_usd: 0.0123,
            monthly_tokens_ceiling: Some(40_000_000),
            monthly_usd_ceiling: Some(150.0),
            unsettled_requests: 0,
            ceilings_from: CeilingsFrom::Fleet,
            cut_requests: 0,
        }];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("AGENT     MONTH"));
        assert!(lines[1].contains("1,550 / 40,000,000"), "{text}");
        assert!(lines[1].contains("$0.01 / $150.00"), "{text}");
    }
}
