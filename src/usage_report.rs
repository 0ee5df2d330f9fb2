//! `supervisor usage`: per-agent usage for a month, read straight from the
//! ledger (no running supervisor needed), shown against the ceilings in
//! fleet.yaml. Owns the table and JSON shapes; must not write anything.

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
    /// Requests charged at their reservation because their usage never
    /// arrived (cut streams, rows a crash left unsettled).
    pub cut_requests: u64,
}

fn usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

/// Rows for every agent in the fleet, plus any agent the ledger knows that the
/// fleet no longer lists.
pub fn rows(fleet: &fleet::Fleet, month: Month, usage: Vec<AgentMonthUsage>) -> Vec<UsageRow> {
    let mut by_agent: BTreeMap<String, AgentMonthUsage> =
        usage.into_iter().map(|u| (u.agent.clone(), u)).collect();
    for name in fleet.agents.keys() {
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
            let budget = fleet
                .agents
                .get(&u.agent)
                .map(|a| a.budget)
                .unwrap_or_default();
            UsageRow {
                month: month.to_string(),
                requests: u.requests,
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
                cache_creation_input_tokens: u.cache_creation_input_tokens,
                cache_read_input_tokens: u.cache_read_input_tokens,
                charged_tokens: u.charged_tokens,
                cost_usd: usd(u.charged_micro_usd),
                monthly_tokens_ceiling: budget.monthly_tokens,
                monthly_usd_ceiling: budget.monthly_micro_usd.map(usd),
                unsettled_requests: u.unsettled,
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
    let fleet = match fleet::load(fleet_path) {
        Ok(f) => f,
        Err(errors) => {
            eprint!("{}", errors.report());
            return exit::FAILURE;
        }
    };
    let month = month.unwrap_or_else(Month::current);
    if let Err(err) = crate::control::client::flush_ledger(fleet_path, &fleet.state_dir) {
        eprintln!(
            "warning: cannot ask the running supervisor to commit its ledger: {err}; \
             requests that ended in the last moments may still show as in flight"
        );
    }
    let usage = match ledger::month_usage(&fleet.state_dir, month) {
        Ok(u) => u,
        Err(err) => {
            eprintln!(
                "error: cannot read the ledger in `{}`",
                fleet.state_dir.display()
            );
            for cause in err.chain() {
                eprintln!("caused by: {cause}");
            }
            eprintln!("hint: the ledger is `ledger.db` in `state_dir`; check its permissions");
            return exit::FAILURE;
        }
    };
    let rows = rows(&fleet, month, usage);
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
            cut_requests: 0,
        }];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("AGENT     MONTH"));
        assert!(lines[1].contains("1,550 / 40,000,000"), "{text}");
        assert!(lines[1].contains("$0.01 / $150.00"), "{text}");
    }
}
