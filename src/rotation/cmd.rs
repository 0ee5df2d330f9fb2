//! `supervisor rotate AGENT [SECRET]` and `supervisor rotate --history`: say
//! which of an agent's secrets have a new version in the vault (by
//! fingerprint, against the versions the ledger has seen) and ask the running
//! supervisor to pick them up — the same reload as SIGHUP, which swaps
//! proxied keys in place and restarts agents whose environment changed, one
//! at a time. Never prints a value.

use std::path::Path;

use crate::check::{AgentSecrets, load_resolved};
use crate::cli::exit;
use crate::fleet::{AgentSpec, Delivery};
use crate::ledger::rotation::{self as rotation_ledger, RotationRecord};

use super::SecretUse;

/// One of an agent's secrets as resolved now: its fingerprint, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentVersion {
    pub secret: String,
    /// The environment variable, or `llm[i]`.
    pub slot: String,
    pub used_as: SecretUse,
    pub fingerprint: String,
}

/// An agent's secrets as resolved now, `llm:` keys first (slot `llm[i]`),
/// then `secrets:` (slot = variable).
pub fn current_versions(spec: &AgentSpec, secrets: &AgentSecrets) -> Vec<CurrentVersion> {
    let mut out = Vec::new();
    for (i, llm) in spec.llm.iter().enumerate() {
        let (Some(name), Some(Some(value))) = (&llm.key, secrets.llm_keys.get(i)) else {
            continue;
        };
        let used_as = match llm.delivery {
            Delivery::Proxy => SecretUse::Proxied,
            Delivery::Direct => SecretUse::Direct,
        };
        out.push(CurrentVersion {
            secret: name.to_string(),
            slot: format!("llm[{i}]"),
            used_as,
            fingerprint: value.fingerprint(),
        });
    }
    for (var, value) in &secrets.env {
        if let Some(name) = spec.secrets.get(var) {
            out.push(CurrentVersion {
                secret: name.to_string(),
                slot: var.clone(),
                used_as: SecretUse::Env,
                fingerprint: value.fingerprint(),
            });
        }
    }
    out
}

fn what_happens(used_as: SecretUse) -> &'static str {
    match used_as {
        SecretUse::Proxied => "the proxy swaps it in place, no restart",
        SecretUse::Direct | SecretUse::Env => "the agent restarts with it",
    }
}

/// `supervisor rotate AGENT [SECRET]`.
pub fn rotate_command(fleet_path: &Path, agent: &str, secret: Option<&str>) -> u8 {
    // Before the vault is read: with `env`, reading it here would fail or
    // mislead (this shell's variables are not the supervisor's).
    if let Ok(fleet) = crate::fleet::load(fleet_path)
        && fleet.vault == crate::fleet::VaultConfig::Env
    {
        // This command would fingerprint its own shell's variables, and the
        // supervisor's environment cannot change while it runs: a rotation
        // here could only ever report something untrue.
        eprintln!(
            "error: cannot rotate secrets with the `env` vault backend: they are the supervisor's own \
             `SUPERVISOR_SECRET_*` environment variables, fixed when it started"
        );
        eprintln!(
            "hint: restart the supervisor with the new values, or use the `dir` or `systemd-creds` \
             backend, whose new versions are picked up while it runs"
        );
        return exit::FAILURE;
    }
    let (fleet, resolved) = match load_resolved(fleet_path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprint!("{}", errors.report());
            eprintln!(
                "hint: nothing was picked up; fix the problems above and run `supervisor rotate {agent}` again"
            );
            return exit::FAILURE;
        }
    };
    let Some(spec) = fleet.agents.get(agent) else {
        eprintln!(
            "error: agent `{agent}` is not in `{}`",
            fleet_path.display()
        );
        eprintln!("hint: `supervisor status` lists the agents");
        return exit::FAILURE;
    };
    let versions = current_versions(spec, &resolved.get(agent).cloned().unwrap_or_default());
    let chosen: Vec<_> = versions
        .iter()
        .filter(|v| secret.is_none_or(|s| s == v.secret))
        .collect();
    if let Some(secret) = secret
        && chosen.is_empty()
    {
        let names: Vec<String> = versions.iter().map(|v| format!("`{}`", v.secret)).collect();
        eprintln!("error: agent `{agent}` has no secret `{secret}`");
        if names.is_empty() {
            eprintln!("hint: it declares no secrets");
        } else {
            eprintln!("hint: its secrets are {}", names.join(", "));
        }
        return exit::FAILURE;
    }
    if chosen.is_empty() {
        // Nothing to pick up: no reload, and no claim that anything changed.
        println!(
            "agent `{agent}` declares no secrets (no `secrets:`, no LLM key): nothing to rotate"
        );
        return exit::OK;
    }
    let mut changed = 0;
    for CurrentVersion {
        secret: name,
        slot,
        used_as,
        fingerprint,
    } in chosen
    {
        let seen = rotation_ledger::latest_version(&fleet.state_dir, agent, name)
            .ok()
            .flatten();
        match seen {
            Some((old, _)) if old == *fingerprint => {
                println!(
                    "`{name}` ({slot}, {}): unchanged, version {fingerprint}",
                    used_as.as_str()
                )
            }
            Some((old, _)) => {
                changed += 1;
                println!(
                    "`{name}` ({slot}, {}): new version {old} -> {fingerprint}; {}",
                    used_as.as_str(),
                    what_happens(*used_as)
                )
            }
            None => {
                changed += 1;
                println!(
                    "`{name}` ({slot}, {}): version {fingerprint}, not seen by a supervisor yet",
                    used_as.as_str()
                )
            }
        }
    }
    let applied = if changed == 0 {
        "no new version to pick up; the agents keep running as they were"
    } else {
        "new versions are picked up; `supervisor status` shows what each agent runs with"
    };
    crate::control::client::ask_reload(fleet_path, &fleet.state_dir).report(
        applied,
        "the next `supervisor run` uses these versions",
        false,
    )
}

fn when(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One line per rotation attempt.
pub fn history_lines(records: &[RotationRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let fp = |f: &Option<String>| f.clone().unwrap_or_else(|| "-".into());
            let mut line = format!(
                "{}  {}/{}  {}  {} -> {}",
                when(r.at_ms),
                r.agent,
                r.secret,
                r.outcome.as_str(),
                fp(&r.old_fingerprint),
                fp(&r.new_fingerprint)
            );
            if !r.message.is_empty() {
                line.push_str(&format!("  ({})", r.message));
            }
            line
        })
        .collect()
}

/// `supervisor rotate --history [AGENT] [--json]`.
///
/// From the ledger, also while the fleet file does not load.
pub fn history_command(fleet_path: &Path, agent: Option<&str>, json: bool) -> u8 {
    let found = crate::control::discovery::find(fleet_path);
    if let Some(note) = found.broken_note() {
        eprintln!("{note}");
    }
    let records = match rotation_ledger::rotations(&found.state_dir) {
        Ok(r) => r,
        Err(err) => {
            eprintln!(
                "error: cannot read the rotation history in `{}`",
                found.state_dir.display()
            );
            for cause in err.chain() {
                eprintln!("caused by: {cause}");
            }
            eprintln!(
                "hint: {}",
                crate::ledger::failure_hint(&err, &found.state_dir)
            );
            return exit::FAILURE;
        }
    };
    let records: Vec<RotationRecord> = records
        .into_iter()
        .filter(|r| agent.is_none_or(|a| a == r.agent))
        .collect();
    if json {
        let rows: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "agent": r.agent,
                    "secret": r.secret,
                    "time": when(r.at_ms),
                    "old_fingerprint": r.old_fingerprint,
                    "new_fingerprint": r.new_fingerprint,
                    "outcome": r.outcome,
                    "message": r.message,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
        );
    } else if records.is_empty() {
        println!("no rotation recorded");
    } else {
        for line in history_lines(&records) {
            println!("{line}");
        }
    }
    exit::OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::rotation::RotationOutcome;

    #[test]
    fn history_reads_as_lines() {
        let records = [
            RotationRecord {
                agent: "a".into(),
                secret: "k".into(),
                at_ms: 1_773_500_966_000,
                old_fingerprint: Some("aaa".into()),
                new_fingerprint: Some("bbb".into()),
                outcome: RotationOutcome::Rotated,
                message: String::new(),
            },
            RotationRecord {
                agent: "a".into(),
                secret: "k".into(),
                at_ms: 1_773_500_966_000,
                old_fingerprint: Some("bbb".into()),
                new_fingerprint: None,
                outcome: RotationOutcome::Failed,
                message: "the issuer `sh` exited with code 3".into(),
            },
        ];
        assert_eq!(
            history_lines(&records),
            [
                "2026-03-14T15:09:26Z  a/k  rotated  aaa -> bbb",
                "2026-03-14T15:09:26Z  a/k  failed  bbb -> -  (the issuer `sh` exited with code 3)",
            ]
        );
    }
}
