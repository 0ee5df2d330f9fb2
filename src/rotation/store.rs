//! Writing a new secret version into the `dir` backend atomically: a 0600
//! temporary file in the agent's own folder, fsynced, renamed over the old
//! name, then the folder fsynced — so a reader (the supervisor, an operator's
//! `cat`) sees the old value or the new one, never half of either, and a
//! crash leaves one of them on disk. Must not touch anything outside
//! `<root>/<agent>/`, and never puts the value in an error.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::vault::{Secret, SecretName};

/// Replaces `<root>/<agent>/<name>` with `value`; returns the path written.
pub fn write_version(
    root: &Path,
    agent: &str,
    name: &SecretName,
    value: &Secret,
) -> Result<PathBuf> {
    if !crate::fleet::valid_agent_name(agent) {
        bail!("invalid agent name `{agent}`");
    }
    let folder = root.join(agent);
    let target = folder.join(name.as_str());
    let tmp = folder.join(format!(
        ".{}.rotating-{}-{}",
        name.as_str(),
        std::process::id(),
        crate::ledger::unix_millis_now()
    ));
    let result = (|| -> Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| format!("cannot create `{}`", tmp.display()))?;
        file.write_all(value.expose().as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write `{}`", tmp.display()))?;
        std::fs::rename(&tmp, &target).with_context(|| {
            format!(
                "cannot rename `{}` to `{}`",
                tmp.display(),
                target.display()
            )
        })?;
        File::open(&folder)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync the folder `{}`", folder.display()))?;
        Ok(())
    })();
    if result.is_err() {
        // Leave no half-written copy of a key behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| target)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::vault::{DirStore, SecretStore};

    #[test]
    fn replaces_the_file_readably_and_privately() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("a");
        std::fs::create_dir(&folder).unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700)).unwrap();
        let name = SecretName::parse("key").unwrap();
        std::fs::write(folder.join("key"), "old\n").unwrap();
        std::fs::set_permissions(folder.join("key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();

        let path =
            write_version(root.path(), "a", &name, &Secret::new("new-value".into())).unwrap();
        assert_eq!(path, folder.join("key"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let store = DirStore::new(root.path().to_owned());
        assert_eq!(store.get_secret("a", &name).unwrap().expose(), "new-value");
        // Only the secret itself is left in the folder.
        let names: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key"]);
    }

    #[test]
    fn a_missing_folder_fails_without_leftovers() {
        let root = tempfile::tempdir().unwrap();
        let name = SecretName::parse("key").unwrap();
        let err = write_version(root.path(), "a", &name, &Secret::new("v".into())).unwrap_err();
        assert!(format!("{err:#}").starts_with("cannot create `"), "{err:#}");
        assert!(write_version(root.path(), "../x", &name, &Secret::new("v".into())).is_err());
    }
}
