//! The `env` backend, for development: `SUPERVISOR_SECRET_<agent>__<name>` from
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

/// `SUPERVISOR_SECRET_<agent>__<name>`: each part keeps its letters and digits
/// as written (case included) and writes every other character as `_` and its
/// two-digit hex code (`_` → `_5F`, `-` → `_2D`, `.` → `_2E`). An encoded part
/// never holds `__`, so the first `__` splits agent from name and no two
/// (agent, secret) pairs share a variable — a plain `_` for `-`, `.` and `_`
/// would let agent `a` and agent `a_b` name each other's secrets. Only
/// `[A-Za-z0-9_]` is produced, so the name can be typed in any shell.
pub fn env_var_name(agent: &str, name: &SecretName) -> String {
    let mut var = String::from("SUPERVISOR_SECRET_");
    escape_into(&mut var, agent);
    var.push_str("__");
    escape_into(&mut var, name.as_str());
    var
}

fn escape_into(out: &mut String, part: &str) {
    for c in part.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            // Agent and secret names are ASCII (validated); escape anything else
            // too so the encoding stays injective whatever reaches it.
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("_{byte:02X}"));
            }
        }
    }
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
                "SUPERVISOR_SECRET_sparkles__llm_5Fapi_5Fkey",
            ),
            (
                "sound-wave",
                "gmail.token",
                "SUPERVISOR_SECRET_sound_2Dwave__gmail_2Etoken",
            ),
            ("a1", "Key-2", "SUPERVISOR_SECRET_a1__Key_2D2"),
            ("a_", "_b", "SUPERVISOR_SECRET_a_5F___5Fb"),
        ];
        for (agent, secret, want) in cases {
            assert_eq!(env_var_name(agent, &name(secret)), want);
        }
    }

    /// The variables of two different (agent, secret) pairs never coincide:
    /// one agent must not be able to read another's by a lucky name.
    #[test]
    fn variable_names_never_collide() {
        let pairs = [
            (("a", "b_key"), ("a_b", "key")),
            (("a", "b-key"), ("a-b", "key")),
            (("a", "key"), ("a", "KEY")),
            (("a", "b.c"), ("a", "b_c")),
            (("a", "_b"), ("a_", "b")),
        ];
        for ((a1, n1), (a2, n2)) in pairs {
            assert_ne!(
                env_var_name(a1, &name(n1)),
                env_var_name(a2, &name(n2)),
                "{a1}/{n1} vs {a2}/{n2}"
            );
        }

        // Exhaustively over short names built from every kind of character.
        fn words(alphabet: &[char], max: usize) -> Vec<String> {
            let mut all = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|w| alphabet.iter().map(move |c| format!("{w}{c}")))
                    .collect();
                all.extend(last.iter().cloned());
            }
            all
        }
        let agents: Vec<String> = words(&['a', '0', '_', '-'], 3)
            .into_iter()
            .filter(|a| crate::fleet::valid_agent_name(a))
            .collect();
        let names: Vec<SecretName> = words(&['a', 'A', '1', '_', '-', '.'], 3)
            .iter()
            .filter_map(|n| SecretName::parse(n).ok())
            .collect();
        let mut seen = std::collections::HashMap::new();
        for agent in &agents {
            for n in &names {
                let var = env_var_name(agent, n);
                assert!(
                    var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "{var} is not a portable variable name"
                );
                if let Some(other) = seen.insert(var.clone(), (agent.clone(), n.clone())) {
                    panic!("{var}: {agent}/{n} and {}/{}", other.0, other.1);
                }
            }
        }
        assert!(seen.len() > 1000, "{}", seen.len());
    }

    #[test]
    fn reads_own_variable_only() {
        let vars: BTreeMap<&str, &str> = [
            ("SUPERVISOR_SECRET_a__key", "sk-env"),
            ("SUPERVISOR_SECRET_a__empty", ""),
            ("SUPERVISOR_SECRET_b__key", "sk-b"),
            // What the old, colliding scheme read: no longer a match.
            ("SUPERVISOR_SECRET_A_OLD", "sk-old"),
        ]
        .into();
        let store = EnvStore::new(move |v| vars.get(v).map(OsString::from));
        assert_eq!(
            store.get_secret("a", &name("key")).unwrap().expose(),
            "sk-env"
        );
        assert!(store.get_secret("a", &name("old")).is_err());
        assert_eq!(
            store
                .get_secret("a", &name("nope"))
                .unwrap_err()
                .to_string(),
            "secret `nope` not found: environment variable `SUPERVISOR_SECRET_a__nope` does not exist"
        );
        assert_eq!(
            store
                .get_secret("a", &name("empty"))
                .unwrap_err()
                .to_string(),
            "secret `empty`: environment variable `SUPERVISOR_SECRET_a__empty` is unusable: it is empty"
        );
    }
}
