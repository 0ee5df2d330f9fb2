//! `supervisor quarantine` and `supervisor release AGENT`: read and clear the
//! quarantine records in the ledger. Work without a running supervisor; when
//! one runs, `release` asks it to reload, which starts the agent.
//! Must not print secrets: records hold normalised, truncated evidence only.

use std::path::Path;

use serde_json::Value;

use crate::cli::exit;
use crate::fleet;
use crate::ledger::{self, QuarantineRecord};

fn since(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One line per evidence step: sizes, growth, the failure excerpt.
pub fn evidence_lines(evidence: &Value) -> Vec<String> {
    let Some(steps) = evidence.get("steps").and_then(Value::as_array) else {
        return Vec::new();
    };
    steps
        .iter()
        .map(|s| {
            let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
            let mut line = format!(
                "step {}: {} messages (+{}), ~{} input tokens",
                n("step"),
                n("messages"),
                n("appended"),
                n("estimated_input_tokens")
            );
            if let Some(growth) = s.get("growth").and_then(Value::as_i64) {
                line.push_str(&format!(" ({growth:+})"));
            }
            if let Some(status) = s.get("status").and_then(Value::as_u64) {
                line.push_str(&format!(", answer {status}"));
            }
            if let Some(tools) = s.get("tools").and_then(Value::as_array)
                && !tools.is_empty()
            {
                let names: Vec<&str> = tools.iter().filter_map(Value::as_str).collect();
                line.push_str(&format!(", tools {}", names.join(",")));
            }
            if let Some(failure) = s.get("failure").and_then(Value::as_str) {
                line.push_str(&format!(", failure: \"{failure}\""));
            }
            line
        })
        .collect()
}

fn state_dir(fleet_path: &Path) -> Result<std::path::PathBuf, u8> {
    match fleet::load(fleet_path) {
        Ok(f) => Ok(f.state_dir),
        Err(errors) => {
            eprint!("{}", errors.report());
            Err(exit::FAILURE)
        }
    }
}

fn read_records(dir: &Path) -> Result<Vec<QuarantineRecord>, u8> {
    ledger::quarantined(dir).map_err(|err| {
        eprintln!(
            "error: cannot read quarantine records in `{}`",
            dir.display()
        );
        for cause in err.chain() {
            eprintln!("caused by: {cause}");
        }
        exit::FAILURE
    })
}

/// Why `release AGENT` released nothing, and what to do: an agent the fleet
/// does not have is unknown (`known`: the fleet's agents, when it loads),
/// one it has is simply not quarantined.
pub fn not_released(
    agent: &str,
    known: Option<&[String]>,
    quarantined: &[String],
) -> (String, String) {
    let list = |names: &[String]| {
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let quarantined_hint = if quarantined.is_empty() {
        "no agent is quarantined".to_owned()
    } else {
        format!("quarantined: {}", list(quarantined))
    };
    match known {
        Some(known) if !known.iter().any(|k| k == agent) => (
            format!("unknown agent \"{agent}\": the fleet has no agent of that name"),
            if known.is_empty() {
                format!("the fleet has no agents; {quarantined_hint}")
            } else {
                format!("the fleet's agents are {}; {quarantined_hint}", list(known))
            },
        ),
        _ => (
            format!("agent \"{agent}\" is not quarantined"),
            format!("{quarantined_hint} (`supervisor quarantine` shows why)"),
        ),
    }
}

/// `supervisor quarantine [--json]`.
pub fn quarantine_command(fleet_path: &Path, json: bool) -> u8 {
    let records = match state_dir(fleet_path).and_then(|d| read_records(&d)) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if json {
        let rows: Vec<Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "agent": r.agent,
                    "since": since(r.since_ms),
                    "reason": r.reason,
                    "evidence": r.evidence,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
        );
        return exit::OK;
    }
    if records.is_empty() {
        println!("no agent is quarantined");
        return exit::OK;
    }
    for r in &records {
        println!("{}  since {}", r.agent, since(r.since_ms));
        println!("  reason: {}", r.reason);
        for line in evidence_lines(&r.evidence) {
            println!("  {line}");
        }
        println!("  release with: supervisor release {}", r.agent);
    }
    exit::OK
}

/// `supervisor release AGENT`.
pub fn release_command(fleet_path: &Path, agent: &str) -> u8 {
    // A fleet file that does not load could not start the agent anyway.
    let dir = match state_dir(fleet_path) {
        Ok(d) => d,
        Err(code) => {
            eprintln!(
                "hint: nothing was released; fix the file, then run `supervisor release {agent}` again"
            );
            return code;
        }
    };
    match ledger::release_quarantine(&dir, agent) {
        Ok(true) => {}
        Ok(false) => {
            let known = fleet::load(fleet_path)
                .ok()
                .map(|f| f.agents.keys().cloned().collect::<Vec<_>>());
            let quarantined: Vec<String> = ledger::quarantined(&dir)
                .map(|r| r.into_iter().map(|q| q.agent).collect())
                .unwrap_or_default();
            let (error, hint) = not_released(agent, known.as_deref(), &quarantined);
            eprintln!("error: {error}");
            eprintln!("hint: {hint}");
            return exit::FAILURE;
        }
        Err(err) => {
            eprintln!("error: cannot release agent \"{agent}\"");
            for cause in err.chain() {
                eprintln!("caused by: {cause}");
            }
            return exit::FAILURE;
        }
    }
    println!("released agent \"{agent}\"");
    crate::control::client::ask_reload(fleet_path, &dir).report(
        &format!("\"{agent}\" starts again"),
        "it starts with the next `supervisor run`",
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_reads_as_lines() {
        let evidence = serde_json::json!({"reason": "failing_retries", "count": 4, "steps": [
            {"step": 3, "messages": 7, "appended": 2, "estimated_input_tokens": 1200, "growth": 180,
             "status": 200, "tools": ["fetch_notes"], "failure": "malformed response at line #"}
        ]});
        assert_eq!(
            evidence_lines(&evidence),
            vec![
                "step 3: 7 messages (+2), ~1200 input tokens (+180), answer 200, tools fetch_notes, failure: \"malformed response at line #\""
            ]
        );
        assert!(evidence_lines(&Value::Null).is_empty());
    }
}
