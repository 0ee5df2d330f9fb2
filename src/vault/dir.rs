//! The `dir` backend: `<root>/<agent>/<name>`, one file per secret. Like ssh,
//! it refuses files and agent folders that group or others can read, and
//! symlinks that resolve outside the root. Must not create or chmod anything:
//! fixing permissions is the operator's decision.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{Secret, SecretName, SecretStore, VaultError, check_agent, text};

/// Permission bits for group and others.
const GROUP_OTHER: u32 = 0o077;

#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where `agent`'s secret `name` lives (it may not exist).
    pub fn path_of(&self, agent: &str, name: &SecretName) -> PathBuf {
        self.root.join(agent).join(name.as_str())
    }
}

impl SecretStore for DirStore {
    fn get_secret(&self, agent: &str, name: &SecretName) -> Result<Secret, VaultError> {
        check_agent(agent)?;
        let folder = self.root.join(agent);
        let path = folder.join(name.as_str());
        let location = format!("`{}`", path.display());
        let io_error = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                VaultError::NotFound {
                    agent: agent.to_owned(),
                    name: name.to_string(),
                    location: location.clone(),
                }
            } else {
                VaultError::Io {
                    agent: agent.to_owned(),
                    name: name.to_string(),
                    location: location.clone(),
                    source,
                }
            }
        };

        // Where the name really leads, symlinks followed: it must stay in the root.
        let real_root = fs::canonicalize(&self.root).map_err(io_error)?;
        let real = fs::canonicalize(&path).map_err(io_error)?;
        if !real.starts_with(&real_root) {
            return Err(VaultError::OutsideVault {
                agent: agent.to_owned(),
                name: name.to_string(),
                path,
                root: self.root.clone(),
            });
        }

        let folder_mode = fs::metadata(&folder)
            .map_err(io_error)?
            .permissions()
            .mode();
        insecure(agent, name, &folder, folder_mode, 0o700)?;

        // Check the mode of what was opened, not of what a path named earlier.
        let file = File::open(&real).map_err(io_error)?;
        let mode = file.metadata().map_err(io_error)?.permissions().mode();
        insecure(agent, name, &path, mode, 0o600)?;
        text::read_file(file, agent, name.as_str(), &path)
    }
}

fn insecure(
    agent: &str,
    name: &SecretName,
    path: &Path,
    mode: u32,
    fix: u32,
) -> Result<(), VaultError> {
    if mode & GROUP_OTHER == 0 {
        return Ok(());
    }
    Err(VaultError::Insecure {
        agent: agent.to_owned(),
        name: name.to_string(),
        path: path.to_owned(),
        mode: mode & 0o7777,
        fix,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Vault {
        dir: tempfile::TempDir,
    }

    impl Vault {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn root(&self) -> PathBuf {
            self.dir.path().join("secrets")
        }
        fn folder(&self, agent: &str, mode: u32) -> PathBuf {
            let folder = self.root().join(agent);
            fs::create_dir_all(&folder).unwrap();
            fs::set_permissions(&folder, fs::Permissions::from_mode(mode)).unwrap();
            folder
        }
        fn file(&self, agent: &str, name: &str, body: &[u8], mode: u32) -> PathBuf {
            let path = self.folder(agent, 0o700).join(name);
            fs::write(&path, body).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            path
        }
        fn get(&self, agent: &str, name: &str) -> Result<Secret, VaultError> {
            DirStore::new(self.root()).get_secret(agent, &SecretName::parse(name).unwrap())
        }
    }

    #[test]
    fn reads_and_trims_one_newline() {
        let v = Vault::new();
        v.file("sparkles", "llm_api_key", b"sk-one\n", 0o600);
        v.file("sparkles", "crlf", b"sk-two\r\n", 0o400);
        assert_eq!(v.get("sparkles", "llm_api_key").unwrap().expose(), "sk-one");
        assert_eq!(v.get("sparkles", "crlf").unwrap().expose(), "sk-two");
    }

    #[test]
    fn missing_secret_names_the_path() {
        let v = Vault::new();
        v.folder("sparkles", 0o700);
        let err = v.get("sparkles", "nope").unwrap_err();
        let path = v.root().join("sparkles/nope");
        assert_eq!(
            err.to_string(),
            format!(
                "secret `nope` not found: `{}` does not exist",
                path.display()
            )
        );
        // No vault at all, or no agent folder: the same answer.
        assert!(matches!(
            v.get("other", "nope"),
            Err(VaultError::NotFound { .. })
        ));
        assert!(matches!(
            DirStore::new(v.dir.path().join("absent"))
                .get_secret("a", &SecretName::parse("k").unwrap()),
            Err(VaultError::NotFound { .. })
        ));
    }

    #[test]
    fn refuses_group_or_world_accessible_files_with_the_chmod_fix() {
        let v = Vault::new();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601] {
            let path = v.file("a", "k", b"sk-secret-value", mode);
            let err = v.get("a", "k").unwrap_err();
            let p = path.display();
            assert_eq!(
                err.to_string(),
                format!(
                    "secret `k`: `{p}` is accessible by group or others (mode 0{mode:o}); run `chmod 600 {p}`"
                )
            );
            assert!(!format!("{err} {err:?}").contains("sk-secret-value"));
        }
    }

    #[test]
    fn refuses_group_or_world_accessible_agent_folders() {
        let v = Vault::new();
        v.file("a", "k", b"v", 0o600);
        for mode in [0o755, 0o750, 0o705] {
            let folder = v.folder("a", mode);
            let f = folder.display();
            assert_eq!(
                v.get("a", "k").unwrap_err().to_string(),
                format!(
                    "secret `k`: `{f}` is accessible by group or others (mode 0{mode:o}); run `chmod 700 {f}`"
                )
            );
        }
        v.folder("a", 0o700);
        assert!(v.get("a", "k").is_ok());
    }

    #[test]
    fn symlinks_inside_the_root_are_followed_outside_refused() {
        let v = Vault::new();
        let shared = v.file("shared", "key", b"inside", 0o600);
        symlink(&shared, v.folder("a", 0o700).join("inside")).unwrap();
        assert_eq!(v.get("a", "inside").unwrap().expose(), "inside");

        let outside = v.dir.path().join("outside");
        fs::write(&outside, b"outside-value").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&outside, v.folder("a", 0o700).join("escape")).unwrap();
        let err = v.get("a", "escape").unwrap_err();
        assert!(matches!(err, VaultError::OutsideVault { .. }), "{err}");
        assert!(err.to_string().contains("leads outside the vault"), "{err}");
        assert!(!err.to_string().contains("outside-value"));

        // An agent folder that is itself a link out of the vault.
        let elsewhere = v.dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(elsewhere.join("k"), b"v").unwrap();
        fs::set_permissions(elsewhere.join("k"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink(&elsewhere, v.root().join("b")).unwrap();
        assert!(matches!(
            v.get("b", "k"),
            Err(VaultError::OutsideVault { .. })
        ));
    }

    #[test]
    fn refuses_empty_non_utf8_and_non_files() {
        let v = Vault::new();
        v.file("a", "empty", b"\n", 0o600);
        v.file("a", "binary", b"\xff\xfe\xfd", 0o600);
        fs::create_dir(v.root().join("a/folder")).unwrap();
        let problem = |name: &str| v.get("a", name).unwrap_err().to_string();
        let p = |name: &str| v.root().join("a").join(name).display().to_string();
        assert_eq!(
            problem("empty"),
            format!("secret `empty`: `{}` is unusable: it is empty", p("empty"))
        );
        assert_eq!(
            problem("binary"),
            format!(
                "secret `binary`: `{}` is unusable: it is not UTF-8 text",
                p("binary")
            )
        );
        // A folder is refused for its mode (0755 from create_dir) or for not being a file.
        fs::set_permissions(v.root().join("a/folder"), fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            problem("folder"),
            format!(
                "secret `folder`: `{}` is unusable: it is not a regular file",
                p("folder")
            )
        );
    }
}
