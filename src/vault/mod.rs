//! The keyvault primitive: `get_secret(agent, name)` resolves a secret in the
//! agent's own namespace of the configured backend. Owns reading secrets; must
//! never log, format or return a secret value in an error.
//!
//! Entry points: [`open`] a store for the fleet's `vault:` setting, then
//! [`resolve_agent_secrets`] for everything one agent declares.

mod dir;
mod env;
mod secret;
mod systemd;
mod text;

use std::path::PathBuf;

pub use dir::DirStore;
pub use env::{EnvStore, env_var_name};
pub use secret::{InvalidSecretName, Secret, SecretName};
pub use systemd::SystemdCredsStore;

use crate::fleet::{AgentSpec, VaultConfig};

/// Where and why a secret could not be resolved. Messages name the secret and
/// the place (file, credential or variable) and a fix, never the value; they
/// leave out the agent, which the caller's context names.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("secret `{name}` not found: {location} does not exist")]
    NotFound {
        agent: String,
        name: String,
        /// Already in backticks, e.g. `` `/srv/secrets/a/key` ``.
        location: String,
    },
    /// A vault file or folder others could read or tamper with, as ssh refuses.
    #[error("secret `{name}`: `{}` {problem}; run `{fix}`", path.display())]
    Insecure {
        agent: String,
        name: String,
        path: PathBuf,
        /// e.g. `is accessible by group or others (mode 0644)`.
        problem: String,
        /// The command that fixes it, e.g. `chmod 600 /srv/secrets/a/key`.
        fix: String,
    },
    #[error(
        "secret `{name}`: `{}` is a symlink that leads outside `{}`; an agent can only name its own \
         secrets, so a link must be relative and stay inside the agent's folder",
        path.display(), folder.display()
    )]
    OutsideFolder {
        agent: String,
        name: String,
        path: PathBuf,
        /// The agent's own folder in the vault.
        folder: PathBuf,
    },
    #[error("secret `{name}`: {location} is unusable: {problem}")]
    Unusable {
        agent: String,
        name: String,
        location: String,
        /// e.g. `it is empty`, `it is not UTF-8 text`.
        problem: String,
    },
    #[error("secret `{name}`: cannot read {location}: {source}")]
    Io {
        agent: String,
        name: String,
        location: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// A secret backend. Implementations resolve only inside `agent`'s namespace.
pub trait SecretStore: Send + Sync {
    fn get_secret(&self, agent: &str, name: &SecretName) -> Result<Secret, VaultError>;
}

/// The store for a fleet's `vault:` setting. Opening never fails: a backend
/// that cannot work (e.g. no `$CREDENTIALS_DIRECTORY`) says why on each lookup,
/// where the error can name the secret that needed it.
pub fn open(config: &VaultConfig) -> Box<dyn SecretStore> {
    match config {
        VaultConfig::Dir { path } => Box::new(DirStore::new(path.clone())),
        VaultConfig::SystemdCreds => Box::new(SystemdCredsStore::from_process()),
        VaultConfig::Env => Box::new(EnvStore::from_process()),
    }
}

/// One of an agent's `secrets:` entries that did not resolve.
#[derive(Debug)]
pub struct SecretError {
    /// The environment variable the secret was meant for.
    pub env_var: String,
    pub error: VaultError,
}

/// Resolves every secret `agent` declares, as `(environment variable, value)`
/// pairs in the order of `agent.secrets`. All failures are returned, not
/// only the first, so one report can name them all.
pub fn resolve_agent_secrets(
    store: &dyn SecretStore,
    agent: &AgentSpec,
) -> Result<Vec<(String, Secret)>, Vec<SecretError>> {
    let mut resolved = Vec::new();
    let mut errors = Vec::new();
    for (env_var, name) in &agent.secrets {
        match store.get_secret(&agent.name, name) {
            Ok(secret) => resolved.push((env_var.clone(), secret)),
            Err(error) => errors.push(SecretError {
                env_var: env_var.clone(),
                error,
            }),
        }
    }
    if errors.is_empty() {
        Ok(resolved)
    } else {
        Err(errors)
    }
}

/// Agent names reach backends from fleet.yaml (already validated) and from
/// the control socket; re-check so no name can climb out of its namespace.
fn check_agent(agent: &str) -> Result<(), VaultError> {
    if crate::fleet::valid_agent_name(agent) {
        Ok(())
    } else {
        Err(VaultError::Other(format!(
            "invalid agent name `{agent}`: use lower-case letters, digits, `_` and `-`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::fleet::{RestartSpec, StopSpec};

    struct Fake;

    impl SecretStore for Fake {
        fn get_secret(&self, agent: &str, name: &SecretName) -> Result<Secret, VaultError> {
            match name.as_str() {
                "missing" => Err(VaultError::NotFound {
                    agent: agent.to_owned(),
                    name: name.to_string(),
                    location: "`nowhere`".to_owned(),
                }),
                other => Ok(Secret::new(format!("{agent}/{other}"))),
            }
        }
    }

    fn agent(secrets: &[(&str, &str)]) -> AgentSpec {
        AgentSpec {
            name: "a".to_owned(),
            command: vec!["x".to_owned()],
            cwd: "/".into(),
            env: BTreeMap::new(),
            secrets: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), SecretName::parse(v).unwrap()))
                .collect(),
            restart: RestartSpec::default(),
            stop: StopSpec::default(),
            llm: Vec::new(),
            budget: Default::default(),
            runaway: Default::default(),
            run_as: None,
        }
    }

    #[test]
    fn resolves_all_or_reports_every_failure() {
        let ok = resolve_agent_secrets(&Fake, &agent(&[("B", "two"), ("A", "one")])).unwrap();
        let got: Vec<(&str, &str)> = ok.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
        assert_eq!(got, [("A", "a/one"), ("B", "a/two")]);

        let errs = resolve_agent_secrets(
            &Fake,
            &agent(&[("A", "missing"), ("B", "ok"), ("C", "missing")]),
        )
        .unwrap_err();
        let vars: Vec<&str> = errs.iter().map(|e| e.env_var.as_str()).collect();
        assert_eq!(vars, ["A", "C"]);
        assert_eq!(
            errs[0].error.to_string(),
            "secret `missing` not found: `nowhere` does not exist"
        );
        assert!(
            resolve_agent_secrets(&Fake, &agent(&[]))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn open_picks_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&VaultConfig::Dir {
            path: dir.path().to_owned(),
        });
        let err = store
            .get_secret("a", &SecretName::parse("k").unwrap())
            .unwrap_err();
        assert!(matches!(err, VaultError::NotFound { .. }), "{err}");
    }

    #[test]
    fn agent_names_cannot_escape() {
        for bad in ["..", "a/b", "", "A"] {
            assert!(check_agent(bad).is_err(), "{bad}");
        }
        assert!(check_agent("sparkles").is_ok());
    }
}
