//! The `env` backend, for development: `SUPERVISOR_SECRET_<AGENT>_<NAME>` from
//! the supervisor's own environment. Warns once per process, because a secret
//! in the supervisor's environment is visible to anything that can read it.
//! Must not modify the environment.

use std::ffi::OsString;
use std::sync::Once;

use super::{Secret, SecretName, SecretStore, VaultError, check_agent, text};

type Lookup = Box<dyn Fn(&str) -> Option<OsString> + Send + Sync>;

pub struct EnvStore {
    lookup: Lookup,
}

impl std::fmt::Debug for EnvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnvStore")
    }
}

static WARNED: Once = Once::new();

impl EnvStore {
    /// Looks variables up with `lookup` (tests pass a map; nothing is global).
    pub fn new(lookup: impl Fn(&str) -> Option<OsString> + Send + Sync + 'static) -> Self {
        Self {
            lookup: Box::new(lookup),
        }
    }

    /// Reads the supervisor's own environment.
    pub fn from_process() -> Self {
        WARNED.call_once(|| {
            tracing::warn!(
                "vault backend `env` reads secrets from the supervisor's environment; use it for development only, \
                 `dir` or `systemd-creds` in production"
            );
        });
        Self::new(|var| std::env::var_os(var))
    }
}

/// `SUPERVISOR_SECRET_<AGENT>_<NAME>`, upper-cased, `-` and `.` as `_`.
pub fn env_var_name(agent: &str, name: &SecretName) -> String {
    format!("SUPERVISOR_SECRET_{agent}_{name}")
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

impl SecretStore for EnvStore {
    fn get_secret(&self, agent: &str, name: &SecretName) -> Result<Secret, VaultError> {
        check_agent(agent)?;
        let var = env_var_name(agent, name);
        let location = format!("environment variable `{var}`");
        let Some(value) = (self.lookup)(&var) else {
            return Err(VaultError::NotFound {
                agent: agent.to_owned(),
                name: name.to_string(),
                location,
            });
        };
        // Values are taken as they are: only files get a newline added by editors.
        let bytes = value.into_encoded_bytes();
        if bytes.is_empty() {
            return Err(VaultError::Unusable {
                agent: agent.to_owned(),
                name: name.to_string(),
                location,
                problem: "it is empty".to_owned(),
            });
        }
        text::decode(bytes).map_err(|problem| VaultError::Unusable {
            agent: agent.to_owned(),
            name: name.to_string(),
            location,
            problem: problem.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn name(n: &str) -> SecretName {
        SecretName::parse(n).unwrap()
    }

    #[test]
    fn variable_names() {
        let cases = [
            (
                "sparkles",
                "llm_api_key",
                "SUPERVISOR_SECRET_SPARKLES_LLM_API_KEY",
            ),
            (
                "sound-wave",
                "gmail.token",
                "SUPERVISOR_SECRET_SOUND_WAVE_GMAIL_TOKEN",
            ),
            ("a1", "Key-2", "SUPERVISOR_SECRET_A1_KEY_2"),
        ];
        for (agent, secret, want) in cases {
            assert_eq!(env_var_name(agent, &name(secret)), want);
        }
    }

    #[test]
    fn reads_own_variable_only() {
        let vars: BTreeMap<&str, &str> = [
            ("SUPERVISOR_SECRET_A_KEY", "sk-env"),
            ("SUPERVISOR_SECRET_A_EMPTY", ""),
            ("SUPERVISOR_SECRET_B_KEY", "sk-b"),
        ]
        .into();
        let store = EnvStore::new(move |v| vars.get(v).map(OsString::from));
        assert_eq!(
            store.get_secret("a", &name("key")).unwrap().expose(),
            "sk-env"
        );
        assert_eq!(
            store
                .get_secret("a", &name("nope"))
                .unwrap_err()
                .to_string(),
            "secret `nope` not found: environment variable `SUPERVISOR_SECRET_A_NOPE` does not exist"
        );
        assert_eq!(
            store
                .get_secret("a", &name("empty"))
                .unwrap_err()
                .to_string(),
            "secret `empty`: environment variable `SUPERVISOR_SECRET_A_EMPTY` is unusable: it is empty"
        );
    }
}
