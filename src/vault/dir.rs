//! The `dir` backend: `<root>/<agent>/<name>`, one file per secret. Like ssh,
//! it trusts only files and folders owned by the supervisor's user (or root),
//! refuses a vault root others may write to, and agent folders and files others
//! may read. The path is walked from an open root descriptor with `openat` and
//! `O_NOFOLLOW`, so what is checked is what is read; a symlink is followed only
//! while it stays inside the agent's own folder. Must not create or chmod
//! anything: fixing permissions is the operator's decision.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};

use super::{Secret, SecretName, SecretStore, VaultError, check_agent, text};

/// Symlinks followed for one secret before giving up, as the kernel's `ELOOP`.
const MAX_LINKS: u32 = 40;

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
        let cx = Cx {
            agent,
            name,
            folder: self.root.join(agent),
            euid: nix::unistd::geteuid().as_raw(),
        };
        let not_found = |errno: Errno| match errno {
            Errno::ENOENT => cx.not_found(),
            errno => cx.io(&self.root, errno),
        };

        // The root is the operator's configured path: following a link there is fine.
        let root = open(
            &self.root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(not_found)?;
        cx.trust(
            Role::Root,
            &self.root,
            &fstat(&root).map_err(|e| cx.io(&self.root, e))?,
        )?;

        // The agent's folder must be a real folder: a link could make it another agent's.
        let stat = fstatat(&root, agent, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| match e {
            Errno::ENOENT => cx.not_found(),
            e => cx.io(&cx.folder, e),
        })?;
        match kind(&stat) {
            SFlag::S_IFDIR => {}
            SFlag::S_IFLNK => {
                return Err(cx.unusable(
                    &cx.folder,
                    "it is a symlink; an agent's folder must be a real folder inside the vault, \
                     so that it cannot lead to another agent's secrets",
                ));
            }
            _ => return Err(cx.unusable(&cx.folder, "it is not a folder")),
        }
        let folder =
            openat(&root, agent, dir_flags(), Mode::empty()).map_err(|e| cx.io(&cx.folder, e))?;
        cx.trust(
            Role::Folder,
            &cx.folder,
            &fstat(&folder).map_err(|e| cx.io(&cx.folder, e))?,
        )?;

        let (fd, relative) = open_beneath(&folder, name.as_str(), &cx)?;
        let path = cx.folder.join(&relative);
        let stat = fstat(&fd).map_err(|e| cx.io(&path, e))?;
        // Checked again on what was opened: the name may have been swapped since.
        if kind(&stat) != SFlag::S_IFREG {
            return Err(cx.unusable(&path, "it is not a regular file"));
        }
        cx.trust(Role::File, &path, &stat)?;
        text::read_file(File::from(fd), agent, name.as_str(), &path)
    }
}

/// Opens `name` in `folder`, following symlinks only while they resolve
/// beneath it, and returns the file with its path relative to `folder`.
/// Every component is opened with `O_NOFOLLOW` after being looked at, so a
/// name swapped for a link in between fails instead of being followed. A
/// non-regular file is refused before it is opened (a FIFO would block, a
/// device could react); the open is non-blocking anyway.
fn open_beneath(folder: &OwnedFd, name: &str, cx: &Cx) -> Result<(OwnedFd, PathBuf), VaultError> {
    // Folders opened beneath `folder`, innermost last, and their relative path.
    let mut dirs: Vec<OwnedFd> = Vec::new();
    let mut relative = PathBuf::new();
    let mut todo: VecDeque<OsString> = VecDeque::from([OsString::from(name)]);
    let mut links = 0;
    // The name itself, and the name at which a missing target means a dangling link.
    let mut via: Option<(PathBuf, OsString)> = None;
    while let Some(part) = todo.pop_front() {
        let here = dirs.last().unwrap_or(folder);
        let at = cx.folder.join(&relative).join(&part);
        if part == ".." {
            if dirs.pop().is_none() {
                return Err(cx.outside(via.map_or(at, |(link, _)| link)));
            }
            relative.pop();
            continue;
        }
        let stat = match fstatat(here, part.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => {
                return Err(match via {
                    None => cx.not_found(),
                    Some((link, target)) => cx.unusable(
                        &link,
                        &format!(
                            "it is a dangling symlink: its target `{}` does not exist",
                            Path::new(&target).display()
                        ),
                    ),
                });
            }
            Err(e) => return Err(cx.io(&at, e)),
        };
        let last = todo.is_empty();
        match kind(&stat) {
            SFlag::S_IFLNK => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(cx.unusable(&at, "it is part of a symlink loop"));
                }
                let target = readlinkat(here, part.as_os_str()).map_err(|e| cx.io(&at, e))?;
                let first = via.get_or_insert_with(|| (at.clone(), target.clone()));
                first.1 = target.clone();
                let path = Path::new(&target);
                if path.has_root() {
                    return Err(cx.outside(first.0.clone()));
                }
                for component in path.components().rev() {
                    match component {
                        Component::Normal(c) => todo.push_front(c.to_owned()),
                        Component::ParentDir => todo.push_front("..".into()),
                        Component::CurDir => {}
                        Component::RootDir | Component::Prefix(_) => {
                            return Err(cx.outside(first.0.clone()));
                        }
                    }
                }
            }
            SFlag::S_IFDIR if !last => {
                let dir = openat(here, part.as_os_str(), dir_flags(), Mode::empty())
                    .map_err(|e| cx.io(&at, e))?;
                cx.trust(
                    Role::Subfolder,
                    &at,
                    &fstat(&dir).map_err(|e| cx.io(&at, e))?,
                )?;
                dirs.push(dir);
                relative.push(&part);
            }
            SFlag::S_IFREG if last => {
                let file = openat(
                    here,
                    part.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| cx.io(&at, e))?;
                relative.push(&part);
                return Ok((file, relative));
            }
            _ if last => return Err(cx.unusable(&at, "it is not a regular file")),
            _ => return Err(cx.io(&at, Errno::ENOTDIR)),
        }
    }
    // The name ended on `.` or `..`: it names a folder.
    Err(cx.unusable(
        &via.map_or_else(|| cx.folder.join(name), |(link, _)| link),
        "it is not a regular file",
    ))
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

/// What a vault object is, for the permission rule it must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The vault root: nobody else may add, rename or replace agent folders.
    Root,
    /// An agent's folder: nobody else may list or enter it.
    Folder,
    /// A folder inside an agent's folder, reached through a link: the agent
    /// folder already keeps others out, but nobody else may write to it.
    Subfolder,
    /// A secret file: nobody else may read or write it.
    File,
}

/// Why an object may not be trusted with secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flaw {
    /// Owned by someone other than the supervisor's user or root.
    Owner { uid: u32 },
    /// Group or others may write to it (only checked on folders others may enter).
    Writable { mode: u32 },
    /// Group or others have any access to it.
    Accessible { mode: u32 },
}

/// The ssh-style rule for one object, from its owner and mode. Pure.
fn flaw(role: Role, mode: u32, uid: u32, euid: u32) -> Option<Flaw> {
    let mode = mode & 0o7777;
    if uid != euid && uid != 0 {
        return Some(Flaw::Owner { uid });
    }
    match role {
        Role::Root | Role::Subfolder if mode & 0o022 != 0 => Some(Flaw::Writable { mode }),
        Role::Folder | Role::File if mode & 0o077 != 0 => Some(Flaw::Accessible { mode }),
        _ => None,
    }
}

/// One lookup's names, for building errors.
struct Cx<'a> {
    agent: &'a str,
    name: &'a SecretName,
    folder: PathBuf,
    euid: u32,
}

impl Cx<'_> {
    fn trust(&self, role: Role, path: &Path, stat: &FileStat) -> Result<(), VaultError> {
        let Some(flaw) = flaw(role, stat.st_mode, stat.st_uid, self.euid) else {
            return Ok(());
        };
        let p = path.display();
        let (problem, fix) = match flaw {
            Flaw::Owner { uid } => (
                format!(
                    "is owned by uid {uid}, but the supervisor runs as uid {}; only its own user's and root's files are trusted",
                    self.euid
                ),
                format!("chown {} {p}", self.euid),
            ),
            Flaw::Writable { mode } => (
                format!("is writable by group or others (mode {mode:04o})"),
                format!("chmod go-w {p}"),
            ),
            Flaw::Accessible { mode } => {
                let fix = if role == Role::File { 600 } else { 700 };
                (
                    format!("is accessible by group or others (mode {mode:04o})"),
                    format!("chmod {fix} {p}"),
                )
            }
        };
        Err(VaultError::Insecure {
            agent: self.agent.to_owned(),
            name: self.name.to_string(),
            path: path.to_owned(),
            problem,
            fix,
        })
    }

    fn not_found(&self) -> VaultError {
        VaultError::NotFound {
            agent: self.agent.to_owned(),
            name: self.name.to_string(),
            location: format!("`{}`", self.folder.join(self.name.as_str()).display()),
        }
    }

    fn io(&self, path: &Path, errno: Errno) -> VaultError {
        VaultError::Io {
            agent: self.agent.to_owned(),
            name: self.name.to_string(),
            location: format!("`{}`", path.display()),
            source: io::Error::from(errno),
        }
    }

    fn unusable(&self, path: &Path, problem: &str) -> VaultError {
        VaultError::Unusable {
            agent: self.agent.to_owned(),
            name: self.name.to_string(),
            location: format!("`{}`", path.display()),
            problem: problem.to_owned(),
        }
    }

    fn outside(&self, link: PathBuf) -> VaultError {
        VaultError::OutsideFolder {
            agent: self.agent.to_owned(),
            name: self.name.to_string(),
            path: link,
            folder: self.folder.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

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
    fn links_within_the_agent_folder_are_followed() {
        let v = Vault::new();
        v.file("a", "k", b"own", 0o600);
        let folder = v.folder("a", 0o700);
        fs::create_dir(folder.join("sub")).unwrap();
        fs::write(folder.join("sub/v2"), b"versioned").unwrap();
        fs::set_permissions(folder.join("sub/v2"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("k", folder.join("alias")).unwrap();
        symlink("alias", folder.join("alias2")).unwrap();
        symlink("sub/v2", folder.join("current")).unwrap();
        symlink("./sub/../k", folder.join("roundabout")).unwrap();
        symlink("..", folder.join("sub/up")).unwrap();
        symlink("sub/up/k", folder.join("via_link_dir")).unwrap();
        for (name, want) in [
            ("alias", "own"),
            ("alias2", "own"),
            ("current", "versioned"),
            ("roundabout", "own"),
            ("via_link_dir", "own"),
        ] {
            assert_eq!(v.get("a", name).unwrap().expose(), want, "{name}");
        }
        // Modes are checked on the file reached, and reported under its real path.
        fs::set_permissions(folder.join("sub/v2"), fs::Permissions::from_mode(0o640)).unwrap();
        let real = folder.join("sub/v2");
        assert_eq!(
            v.get("a", "current").unwrap_err().to_string(),
            format!(
                "secret `current`: `{0}` is accessible by group or others (mode 0640); run `chmod 600 {0}`",
                real.display()
            )
        );
    }

    #[test]
    fn links_leaving_the_agent_folder_are_refused() {
        let v = Vault::new();
        v.file("b", "k", b"sk-LEAK-of-b", 0o600);
        v.file("shared", "key", b"sk-LEAK-shared", 0o600);
        let outside = v.dir.path().join("outside");
        fs::write(&outside, b"sk-LEAK-outside").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
        let own = v.file("a", "own", b"own", 0o600);
        let folder = v.folder("a", 0o700);
        let targets: [(&str, &Path); 6] = [
            ("other_agent", Path::new("../b/k")),
            ("shared", Path::new("../shared/key")),
            ("outside", &outside),
            // Absolute links are refused even into the agent's own folder:
            // whether they stay inside cannot be told without following them.
            ("absolute_own", &own),
            ("deep", Path::new("./x/../../b/k")),
            ("chained", Path::new("other_agent")),
        ];
        fs::create_dir(folder.join("x")).unwrap();
        for (name, target) in targets {
            symlink(target, folder.join(name)).unwrap();
        }
        for (name, _) in targets {
            let err = v.get("a", name).unwrap_err();
            // The first link named is reported, not where the chain went.
            assert_eq!(
                err.to_string(),
                format!(
                    "secret `{name}`: `{}` is a symlink that leads outside `{}`; an agent can only name \
                     its own secrets, so a link must be relative and stay inside the agent's folder",
                    folder.join(name).display(),
                    folder.display()
                ),
                "{name}"
            );
            assert!(!format!("{err:?}").contains("sk-LEAK"), "{name}");
        }
    }

    #[test]
    fn an_agent_folder_must_not_be_a_link() {
        let v = Vault::new();
        v.file("a", "k", b"sk-LEAK-of-a", 0o600);
        // `b` pointing at `a` would hand b a's secrets; a link out of the vault, anything.
        symlink("a", v.root().join("b")).unwrap();
        let elsewhere = v.dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        symlink(&elsewhere, v.root().join("c")).unwrap();
        for agent in ["b", "c"] {
            assert_eq!(
                v.get(agent, "k").unwrap_err().to_string(),
                format!(
                    "secret `k`: `{}` is unusable: it is a symlink; an agent's folder must be a real \
                     folder inside the vault, so that it cannot lead to another agent's secrets",
                    v.root().join(agent).display()
                )
            );
        }
    }

    #[test]
    fn dangling_links_and_loops_say_so() {
        let v = Vault::new();
        let folder = v.folder("a", 0o700);
        symlink("gone", folder.join("dangling")).unwrap();
        symlink("dangling", folder.join("to_dangling")).unwrap();
        symlink("loop", folder.join("loop")).unwrap();
        symlink("k/x", folder.join("through_file")).unwrap();
        v.file("a", "k", b"v", 0o600);
        let err = |name: &str| v.get("a", name).unwrap_err().to_string();
        let p = |name: &str| folder.join(name).display().to_string();
        assert_eq!(
            err("dangling"),
            format!(
                "secret `dangling`: `{}` is unusable: it is a dangling symlink: its target `gone` does not exist",
                p("dangling")
            )
        );
        assert_eq!(
            err("to_dangling"),
            format!(
                "secret `to_dangling`: `{}` is unusable: it is a dangling symlink: its target `gone` does not exist",
                p("to_dangling")
            )
        );
        assert_eq!(
            err("loop"),
            format!(
                "secret `loop`: `{}` is unusable: it is part of a symlink loop",
                p("loop")
            )
        );
        assert!(
            err("through_file").contains("Not a directory"),
            "{}",
            err("through_file")
        );
    }

    #[test]
    fn a_vault_root_others_may_write_is_refused() {
        let v = Vault::new();
        v.file("a", "k", b"v", 0o600);
        for mode in [0o777, 0o775, 0o757, 0o1777] {
            fs::set_permissions(v.root(), fs::Permissions::from_mode(mode)).unwrap();
            let r = v.root();
            let r = r.display();
            assert_eq!(
                v.get("a", "k").unwrap_err().to_string(),
                format!(
                    "secret `k`: `{r}` is writable by group or others (mode {mode:04o}); run `chmod go-w {r}`"
                )
            );
        }
        // Readable by others is fine: the agent folders keep them out.
        fs::set_permissions(v.root(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(v.get("a", "k").is_ok());
    }

    /// (role, mode, owner, supervisor's euid, expected flaw)
    type FlawCase = (Role, u32, u32, u32, Option<Flaw>);

    #[test]
    fn trust_rules_table() {
        use Role::*;
        let cases: &[FlawCase] = &[
            (File, 0o600, 1000, 1000, None),
            (File, 0o400, 0, 1000, None),
            (File, 0o100600, 1000, 1000, None),
            (
                File,
                0o640,
                1000,
                1000,
                Some(Flaw::Accessible { mode: 0o640 }),
            ),
            (
                File,
                0o604,
                1000,
                1000,
                Some(Flaw::Accessible { mode: 0o604 }),
            ),
            (File, 0o600, 1001, 1000, Some(Flaw::Owner { uid: 1001 })),
            (File, 0o600, 1001, 0, Some(Flaw::Owner { uid: 1001 })),
            // The owner is named first: a chmod would not make it trustworthy.
            (File, 0o644, 1001, 1000, Some(Flaw::Owner { uid: 1001 })),
            (Folder, 0o700, 1000, 1000, None),
            (
                Folder,
                0o710,
                1000,
                1000,
                Some(Flaw::Accessible { mode: 0o710 }),
            ),
            (Folder, 0o700, 2, 1000, Some(Flaw::Owner { uid: 2 })),
            (Root, 0o755, 1000, 1000, None),
            (Root, 0o755, 0, 1000, None),
            (
                Root,
                0o775,
                1000,
                1000,
                Some(Flaw::Writable { mode: 0o775 }),
            ),
            (Root, 0o1777, 0, 1000, Some(Flaw::Writable { mode: 0o1777 })),
            (Root, 0o755, 1001, 1000, Some(Flaw::Owner { uid: 1001 })),
            (Subfolder, 0o755, 1000, 1000, None),
            (
                Subfolder,
                0o757,
                1000,
                1000,
                Some(Flaw::Writable { mode: 0o757 }),
            ),
        ];
        for (role, mode, uid, euid, want) in cases {
            assert_eq!(
                flaw(*role, *mode, *uid, *euid),
                *want,
                "{role:?} {mode:o} uid={uid} euid={euid}"
            );
        }
    }

    #[test]
    fn files_of_other_users_are_refused() {
        // Giving a file away takes root; as another user this test checks
        // that the supervisor's own files pass (the rule itself is in the table above).
        let v = Vault::new();
        let path = v.file("a", "k", b"sk-LEAK-foreign", 0o600);
        assert!(v.get("a", "k").is_ok());
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let stranger = Some(nix::unistd::Uid::from_raw(54_321));
        nix::unistd::chown(&path, stranger, None).unwrap();
        let p = path.display();
        assert_eq!(
            v.get("a", "k").unwrap_err().to_string(),
            format!(
                "secret `k`: `{p}` is owned by uid 54321, but the supervisor runs as uid 0; only its own \
                 user's and root's files are trusted; run `chown 0 {p}`"
            )
        );
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        let folder = v.folder("a", 0o700);
        nix::unistd::chown(&folder, stranger, None).unwrap();
        assert!(
            v.get("a", "k")
                .unwrap_err()
                .to_string()
                .contains("is owned by uid 54321"),
        );
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

    /// Runs `get` on another thread and fails the test if it does not answer
    /// within a generous bound: a blocking open would hang forever.
    fn promptly(v: Vault, agent: &'static str, name: &'static str) -> Result<Secret, VaultError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(v.get(agent, name));
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("reading the secret blocked")
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let v = Vault::new();
        let path = v.folder("a", 0o700).join("pipe");
        nix::unistd::mkfifo(
            &path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let err = promptly(v, "a", "pipe").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "secret `pipe`: `{}` is unusable: it is not a regular file",
                path.display()
            )
        );
    }
}
