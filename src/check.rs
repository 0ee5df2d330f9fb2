//! `supervisor check`: validate fleet.yaml and resolve every referenced secret.
//! Prints the same report `run` logs on a refused reload; never prints, logs or
//! keeps a secret value (each one is dropped as soon as it has resolved).

use std::collections::BTreeMap;
use std::path::Path;

use crate::cli::exit;
use crate::fleet::{self, ConfigError, ConfigErrors, Fleet, Pos};
use crate::vault::{self, Secret};

/// Runs `check` and returns the process exit code (see `cli::exit`).
pub fn check_command(fleet: &Path) -> u8 {
    match check(fleet) {
        Ok(summary) => {
            println!("{summary}");
            exit::OK
        }
        Err(errors) => {
            eprint!("{}", errors.report());
            exit::FAILURE
        }
    }
}

/// Loads the fleet and resolves every secret it names. Returns the one-line
/// summary (`fleet.yaml: ok — 3 agents, 4 secrets resolved`), followed by a
/// `warning: ` line per warning (e.g. from the budget overlay), or every
/// problem, secret problems located at the `secrets:` entry that named them.
pub fn check(path: &Path) -> Result<String, ConfigErrors> {
    let located = fleet::load_located(path)?;
    let warnings: Vec<String> = located
        .warnings
        .iter()
        .map(|w| format!("\nwarning: {w}"))
        .collect();
    let (fleet, secrets) = resolve_located(path, located)?;
    let resolved: usize = secrets
        .values()
        .map(|s| s.env.len() + s.llm_keys.iter().flatten().count())
        .sum();
    Ok(format!(
        "{}: ok — {}, {} resolved{}",
        path.display(),
        count(fleet.agents.len(), "agent"),
        count(resolved, "secret"),
        warnings.concat()
    ))
}

/// One agent's resolved secrets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentSecrets {
    /// `secrets:` as `(environment variable, value)` pairs.
    pub env: Vec<(String, Secret)>,
    /// The real key of each `llm:` entry, by index (`None` for a simulated provider).
    pub llm_keys: Vec<Option<Secret>>,
}

/// Every agent's resolved secrets, by agent name.
pub type ResolvedSecrets = BTreeMap<String, AgentSecrets>;

/// Loads and validates the fleet, then resolves every agent's secrets. This
/// is what `check` verifies and what `run` starts from (and re-does on every
/// reload), so the two can never disagree about whether a fleet is valid.
pub fn load_resolved(path: &Path) -> Result<(Fleet, ResolvedSecrets), ConfigErrors> {
    resolve_located(path, fleet::load_located(path)?)
}

fn resolve_located(
    path: &Path,
    located: fleet::Located,
) -> Result<(Fleet, ResolvedSecrets), ConfigErrors> {
    let fleet = located.fleet;
    let store = vault::open(&fleet.vault);
    let mut errors = Vec::new();
    let mut resolved = BTreeMap::new();
    for agent in fleet.agents.values() {
        let mut llm_keys = Vec::new();
        for (i, llm) in agent.llm.iter().enumerate() {
            let Some(name) = &llm.key else {
                llm_keys.push(None);
                continue;
            };
            match store.get_secret(&agent.name, name) {
                Ok(secret) => llm_keys.push(Some(secret)),
                Err(error) => {
                    let pos = located
                        .sources
                        .llm_key(&agent.name, i)
                        .or_else(|| located.sources.agent(&agent.name))
                        .unwrap_or(Pos::new(1, 1));
                    errors.push(ConfigError {
                        file: path.to_owned(),
                        line: pos.line,
                        column: pos.column,
                        agent: Some(agent.name.clone()),
                        message: format!("`llm[{i}].key`: {error}"),
                    });
                }
            }
        }
        match vault::resolve_agent_secrets(store.as_ref(), agent) {
            Ok(env) => {
                resolved.insert(agent.name.clone(), AgentSecrets { env, llm_keys });
            }
            Err(failures) => {
                for failure in failures {
                    let pos = located
                        .sources
                        .secret(&agent.name, &failure.env_var)
                        .or_else(|| located.sources.agent(&agent.name))
                        .unwrap_or(Pos::new(1, 1));
                    errors.push(ConfigError {
                        file: path.to_owned(),
                        line: pos.line,
                        column: pos.column,
                        agent: Some(agent.name.clone()),
                        message: failure.error.to_string(),
                    });
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors::invalid(path, errors));
    }
    Ok((fleet, resolved))
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_naturally() {
        assert_eq!(count(0, "agent"), "0 agents");
        assert_eq!(count(1, "agent"), "1 agent");
        assert_eq!(count(4, "secret"), "4 secrets");
    }
}
