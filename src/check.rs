//! `supervisor check`: validate fleet.yaml and resolve every referenced secret.
//! Prints the same report `run` logs on a refused reload; never prints, logs or
//! keeps a secret value (each one is dropped as soon as it has resolved).
//!
//! Also owns the one rule that depends on who runs the supervisor: `user:` and
//! `group:` need root. `run` refuses a fleet using them otherwise; `check` only
//! warns, since the file may well be checked as a user and run as root.

use std::collections::BTreeMap;
use std::path::Path;

use crate::cli::exit;
use crate::fleet::{self, ConfigError, ConfigErrors, Fleet, Located, Pos};
use crate::vault::{self, Secret};

/// Runs `check` and returns the process exit code (see `cli::exit`).
pub fn check_command(fleet: &Path) -> u8 {
    match check(fleet) {
        Ok(checked) => {
            for warning in &checked.warnings {
                eprintln!("warning: {warning}");
            }
            println!("{}", checked.summary);
            exit::OK
        }
        Err(errors) => {
            eprint!("{}", errors.report());
            exit::FAILURE
        }
    }
}

/// What `check` says about a valid fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// `fleet.yaml: ok — 3 agents, 4 secrets resolved`.
    pub summary: String,
    /// Things that work but deserve a look, without the `warning: ` prefix.
    pub warnings: Vec<String>,
}

/// Loads the fleet and resolves every secret it names. Returns the one-line
/// summary and any warnings, or every problem, secret problems located at the
/// `secrets:` entry that named them.
pub fn check(path: &Path) -> Result<Checked, ConfigErrors> {
    let (located, secrets) = load_located_resolved(path)?;
    let fleet = &located.fleet;
    let resolved: usize = secrets
        .values()
        .map(|s| s.env.len() + s.llm_keys.iter().flatten().count())
        .sum();
    let mut warnings: Vec<String> = privilege_problems(path, &located, nix::unistd::geteuid())
        .into_iter()
        .map(|p| p.to_string())
        .collect();
    warnings.extend(crate::redact::short_secret_warnings(fleet, &secrets));
    warnings.extend(located.warnings.iter().map(|w| w.to_string()));
    Ok(Checked {
        summary: format!(
            "{}: ok — {}, {} resolved",
            path.display(),
            count(fleet.agents.len(), "agent"),
            count(resolved, "secret")
        ),
        warnings,
    })
}

/// One problem per agent with `user:`/`group:` when the supervisor runs as
/// `euid` and that is not root: only root can start a child as another user.
pub fn privilege_problems(
    path: &Path,
    located: &Located,
    euid: nix::unistd::Uid,
) -> Vec<ConfigError> {
    if euid.is_root() {
        return Vec::new();
    }
    located
        .fleet
        .agents
        .values()
        .filter(|agent| agent.run_as.is_some())
        .map(|agent| {
            let pos = located
                .sources
                .run_as(&agent.name)
                .or_else(|| located.sources.agent(&agent.name))
                .unwrap_or(Pos::new(1, 1));
            ConfigError {
                file: path.to_owned(),
                line: pos.line,
                column: pos.column,
                agent: Some(agent.name.clone()),
                message: format!(
                    "`user`: running an agent as another user needs the supervisor to run as root, but it runs as uid {euid} (hint: run the supervisor as root, e.g. as a system service, or remove `user` and `group`)"
                ),
            }
        })
        .collect()
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
    load_located_resolved(path).map(|(located, secrets)| (located.fleet, secrets))
}

/// [`load_resolved`] for `run`: also refuses `user:`/`group:` unless the
/// supervisor runs as root (see [`privilege_problems`]).
pub fn load_resolved_to_run(path: &Path) -> Result<(Fleet, ResolvedSecrets), ConfigErrors> {
    let (located, secrets) = load_located_resolved(path)?;
    let problems = privilege_problems(path, &located, nix::unistd::geteuid());
    if !problems.is_empty() {
        return Err(ConfigErrors::invalid(path, problems));
    }
    Ok((located.fleet, secrets))
}

fn load_located_resolved(path: &Path) -> Result<(Located, ResolvedSecrets), ConfigErrors> {
    let located = fleet::load_located(path)?;
    let fleet = &located.fleet;
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
    Ok((located, resolved))
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
