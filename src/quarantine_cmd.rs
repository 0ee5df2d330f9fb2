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
    if let Some(lines) = velocity_lines(evidence) {
        return lines;
    }
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

/// A spend-velocity trip's evidence: the window, the spend, the baseline
/// and the limit exceeded. `None` for other evidence.
fn velocity_lines(evidence: &Value) -> Option<Vec<String>> {
    use crate::runaway::velocity::{short_duration, thousands};
    if evidence.get("wire").and_then(Value::as_str) != Some("spend_velocity") {
        return None;
    }
    let n = |k: &str| evidence.get(k).and_then(Value::as_u64).unwrap_or(0);
    let exceeded = evidence.get("exceeded").unwrap_or(&Value::Null);
    let e = |k: &str| exceeded.get(k).and_then(Value::as_u64).unwrap_or(0);
    let period = short_duration(n("baseline_secs"));
    let baseline = match evidence.get("baseline_tokens").and_then(Value::as_u64) {
        Some(b) => format!(
            "baseline: {} tokens per window (p{} of {} active windows over {period})",
            thousands(b),
            crate::runaway::velocity::BASELINE_PERCENTILE,
            n("baseline_windows")
        ),
        None => format!(
            "baseline: none yet ({} active windows over {period}); only `no_baseline_tokens` applies",
            n("baseline_windows")
        ),
    };
    let rule = match exceeded.get("rule").and_then(Value::as_str) {
        Some("limit") => format!(
            "exceeded: max_tokens_per_window {}",
            thousands(e("max_tokens_per_window"))
        ),
        Some("no_baseline") => format!(
            "exceeded: no_baseline_tokens {}",
            thousands(e("no_baseline_tokens"))
        ),
        _ => format!(
            "exceeded: {} × baseline, limit {} (floor {})",
            e("multiple"),
            thousands(n("threshold_tokens")),
            thousands(e("floor_tokens"))
        ),
    };
    Some(vec![
        format!(
            "window {}: {} {} in {} requests",
            short_duration(n("window_secs")),
            thousands(n("spend_tokens")),
            // Records from before spend was weighted carry no unit.
            match evidence.get("unit").and_then(Value::as_str) {
                Some("weighted_tokens") => "weighted tokens",
                _ => "tokens",
            },
            n("requests")
        ),
        baseline,
        rule,
    ])
}

/// The state dir of a fleet that loads; `release` needs one (a fleet that
/// does not load could not start the released agent).
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
        eprintln!("hint: {}", ledger::failure_hint(&err, dir));
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

/// `supervisor quarantine [--json]`: from the ledger, also while the fleet
/// file does not load (the records do not depend on it).
pub fn quarantine_command(fleet_path: &Path, json: bool) -> u8 {
    let found = crate::control::discovery::find(fleet_path);
    if let Some(note) = found.broken_note() {
        eprintln!("{note}");
    }
    let records = match read_records(&found.state_dir) {
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
                "hint: nothing was released: a fleet file that does not load could not start the agent; \
                 fix the file, then run `supervisor release {agent}` again"
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

    #[test]
    fn velocity_evidence_reads_as_lines() {
        use crate::runaway::{VelocityConfig, VelocityWire};
        let mut wire = VelocityWire::new(VelocityConfig::default());
        let now = 1_795_000_200_000;
        let w = VelocityConfig::default().window_ms();
        wire.load_history((1..=20).map(|k| (now / w - k, 300_000)), now);
        let trip = wire
            .observe(now, 1_600_000)
            .expect("over 5 x 300k and the floor");
        let evidence = serde_json::to_value(&trip).unwrap();
        assert_eq!(
            evidence_lines(&evidence),
            vec![
                "window 10m: 1,600,000 weighted tokens in 1 requests",
                "baseline: 300,000 tokens per window (p95 of 20 active windows over 7d)",
                "exceeded: 5 × baseline, limit 1,500,000 (floor 1,000,000)",
            ]
        );
        let mut wire = VelocityWire::new(VelocityConfig {
            max_tokens_per_window: Some(100_000),
            ..VelocityConfig::default()
        });
        let trip = wire.observe(now, 150_000).unwrap();
        assert_eq!(
            evidence_lines(&serde_json::to_value(&trip).unwrap())[1..],
            [
                "baseline: none yet (0 active windows over 7d); only `no_baseline_tokens` applies",
                "exceeded: max_tokens_per_window 100,000",
            ]
        );
        let mut wire = VelocityWire::new(VelocityConfig::default());
        let trip = wire
            .observe(now, 10_000_001)
            .expect("over no_baseline_tokens");
        assert_eq!(
            evidence_lines(&serde_json::to_value(&trip).unwrap())[2..],
            ["exceeded: no_baseline_tokens 10,000,000"]
        );
        let mut old = serde_json::to_value(&trip).unwrap();
        old.as_object_mut().unwrap().remove("unit");
        assert!(evidence_lines(&old)[0].ends_with(" 10,000,001 tokens in 1 requests"));
    }
}
