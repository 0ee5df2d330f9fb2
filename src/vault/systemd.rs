//! The `systemd-creds` backend: `$CREDENTIALS_DIRECTORY/<agent>.<name>`, the
//! files systemd provides for `LoadCredential=` / `LoadCredentialEncrypted=`.
//! systemd owns that directory's permissions, so none are checked here.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::{Secret, SecretName, SecretStore, VaultError, check_agent, text};

#[derive(Debug, Clone)]
pub struct SystemdCredsStore {
    /// `None` when the supervisor does not run under systemd with credentials.
    dir: Option<PathBuf>,
}

impl SystemdCredsStore {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// Reads `$CREDENTIALS_DIRECTORY` (an empty value counts as unset).
    pub fn from_process() -> Self {
        Self::new(
            std::env::var_os("CREDENTIALS_DIRECTORY")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        )
    }
}

impl SecretStore for SystemdCredsStore {
    fn get_secret(&self, agent: &str, name: &SecretName) -> Result<Secret, VaultError> {
        check_agent(agent)?;
        let credential = format!("{agent}.{name}");
        let Some(dir) = &self.dir else {
            return Err(VaultError::Other(format!(
                "secret `{name}`: `$CREDENTIALS_DIRECTORY` is not set, so credential `{credential}` cannot be read; \
                 run the supervisor under systemd with `LoadCredential={credential}:/path/to/file` \
                 (or `LoadCredentialEncrypted=`), or choose another `vault.backend`"
            )));
        };
        let path = dir.join(&credential);
        let location = format!("`{}`", path.display());
        // Non-blocking, so a FIFO or device planted there cannot hang the open;
        // `read_file` then refuses anything that is not a regular file.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    VaultError::NotFound {
                        agent: agent.to_owned(),
                        name: name.to_string(),
                        location: format!("credential `{credential}` ({location})"),
                    }
                } else {
                    VaultError::Io {
                        agent: agent.to_owned(),
                        name: name.to_string(),
                        location: location.clone(),
                        source,
                    }
                }
            })?;
        text::read_file(file, agent, name.as_str(), &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> SecretName {
        SecretName::parse(n).unwrap()
    }

    #[test]
    fn reads_agent_dot_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sparkles.llm_api_key"), b"sk-cred\n").unwrap();
        let store = SystemdCredsStore::new(Some(dir.path().to_owned()));
        assert_eq!(
            store
                .get_secret("sparkles", &name("llm_api_key"))
                .unwrap()
                .expose(),
            "sk-cred"
        );

        let err = store.get_secret("sparkles", &name("other")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "secret `other` not found: credential `sparkles.other` (`{}`) does not exist",
                dir.path().join("sparkles.other").display()
            )
        );
        // Another agent's credential is out of reach: the agent is part of the name.
        assert!(store.get_secret("soundwave", &name("llm_api_key")).is_err());
    }

    #[test]
    fn unset_credentials_directory_says_how_to_fix() {
        let err = SystemdCredsStore::new(None)
            .get_secret("a", &name("k"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "secret `k`: `$CREDENTIALS_DIRECTORY` is not set, so credential `a.k` cannot be read; run the \
             supervisor under systemd with `LoadCredential=a.k:/path/to/file` (or `LoadCredentialEncrypted=`), \
             or choose another `vault.backend`"
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pipe");
        nix::unistd::mkfifo(
            &path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let store = SystemdCredsStore::new(Some(dir.path().to_owned()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(store.get_secret("a", &name("pipe")).map(|_| ()));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("reading the credential blocked")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "secret `pipe`: `{}` is unusable: it is not a regular file",
                path.display()
            )
        );
    }
}
