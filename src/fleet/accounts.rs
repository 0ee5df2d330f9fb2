//! `user:`/`group:` as written → the account an agent runs as ([`RunAs`]).
//! Owns the lookups in the host's user database, behind [`Accounts`] so that
//! `parse_fleet` can be fed a fixed table and stay testable. Must not change
//! any process's credentials (that is `agent::launch`), and must not decide
//! whether the supervisor may use them (that is `check`, which knows who runs it).

use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User, getgrouplist};

use super::model::RunAs;

/// A user as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub uid: u32,
    /// The user's primary group.
    pub gid: u32,
    pub home: PathBuf,
}

/// A group as the database has it, with its listed members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Where `user:`/`group:` are looked up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Accounts {
    /// The host's user database (`/etc/passwd`, `/etc/group`, or whatever
    /// NSS is configured with).
    #[default]
    System,
    /// A fixed table, for tests.
    Fixed {
        users: Vec<UserEntry>,
        groups: Vec<GroupEntry>,
    },
}

/// A name, or a numeric id when it is all digits (`1001`, or written as a
/// YAML number).
fn numeric(written: &str) -> Option<Result<u32, String>> {
    if !written.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        written
            .parse::<u32>()
            .map_err(|_| format!("`{written}` is not a valid numeric id")),
    )
}

impl Accounts {
    /// The user named `written`, or with that numeric uid.
    pub fn user(&self, written: &str) -> Result<UserEntry, String> {
        let id = numeric(written).transpose()?;
        let missing = || match id {
            Some(uid) => format!(
                "no user with uid {uid} on this host (hint: give an existing user's name or id)"
            ),
            None => format!(
                "no user `{written}` on this host (hint: create it, e.g. `useradd --system --no-create-home {written}`, or fix the name)"
            ),
        };
        match self {
            Self::System => {
                let found = match id {
                    Some(uid) => User::from_uid(Uid::from_raw(uid)),
                    None => User::from_name(written),
                }
                .map_err(|e| format!("cannot look up user `{written}`: {e}"))?;
                let user = found.ok_or_else(missing)?;
                Ok(UserEntry {
                    name: user.name,
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                    home: user.dir,
                })
            }
            Self::Fixed { users, .. } => users
                .iter()
                .find(|u| match id {
                    Some(uid) => u.uid == uid,
                    None => u.name == written,
                })
                .cloned()
                .ok_or_else(missing),
        }
    }

    /// The group named `written`, or with that numeric gid.
    pub fn group(&self, written: &str) -> Result<GroupEntry, String> {
        let id = numeric(written).transpose()?;
        let missing = || match id {
            Some(gid) => format!(
                "no group with gid {gid} on this host (hint: give an existing group's name or id)"
            ),
            None => format!(
                "no group `{written}` on this host (hint: create it, e.g. `groupadd --system {written}`, or fix the name)"
            ),
        };
        match self {
            Self::System => {
                let found = match id {
                    Some(gid) => Group::from_gid(Gid::from_raw(gid)),
                    None => Group::from_name(written),
                }
                .map_err(|e| format!("cannot look up group `{written}`: {e}"))?;
                let group = found.ok_or_else(missing)?;
                Ok(GroupEntry {
                    name: group.name,
                    gid: group.gid.as_raw(),
                    members: group.mem,
                })
            }
            Self::Fixed { groups, .. } => groups
                .iter()
                .find(|g| match id {
                    Some(gid) => g.gid == gid,
                    None => g.name == written,
                })
                .cloned()
                .ok_or_else(missing),
        }
    }

    /// The supplementary groups `initgroups(user, gid)` would set: `gid` and
    /// every group listing the user as a member; sorted, without repeats.
    fn groups_of(&self, user: &UserEntry, gid: u32) -> Result<Vec<u32>, String> {
        let mut ids = match self {
            Self::System => {
                let name = CString::new(user.name.as_str())
                    .map_err(|_| format!("user name `{}` contains a NUL byte", user.name))?;
                getgrouplist(&name, Gid::from_raw(gid))
                    .map_err(|e| format!("cannot list the groups of user `{}`: {e}", user.name))?
                    .into_iter()
                    .map(Gid::as_raw)
                    .collect()
            }
            Self::Fixed { groups, .. } => groups
                .iter()
                .filter(|g| g.members.contains(&user.name))
                .map(|g| g.gid)
                .chain([gid])
                .collect::<Vec<u32>>(),
        };
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// The account for `user:` and optional `group:` as written. Errors are
    /// tagged with the field they are about (`"user"` or `"group"`).
    pub fn resolve(
        &self,
        user: &str,
        group: Option<&str>,
    ) -> Result<RunAs, (&'static str, String)> {
        let entry = self.user(user).map_err(|e| ("user", e))?;
        let gid = match group {
            Some(written) => self.group(written).map_err(|e| ("group", e))?.gid,
            None => entry.gid,
        };
        let groups = self.groups_of(&entry, gid).map_err(|e| ("user", e))?;
        Ok(RunAs {
            user: entry.name,
            uid: entry.uid,
            gid,
            groups,
            home: entry.home,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Accounts {
        Accounts::Fixed {
            users: vec![
                UserEntry {
                    name: "alice".into(),
                    uid: 1001,
                    gid: 1001,
                    home: "/home/alice".into(),
                },
                UserEntry {
                    name: "bob".into(),
                    uid: 1002,
                    gid: 100,
                    home: "/srv/bob".into(),
                },
            ],
            groups: vec![
                GroupEntry {
                    name: "alice".into(),
                    gid: 1001,
                    members: vec![],
                },
                GroupEntry {
                    name: "users".into(),
                    gid: 100,
                    members: vec![],
                },
                GroupEntry {
                    name: "agents".into(),
                    gid: 2000,
                    members: vec!["alice".into(), "bob".into()],
                },
                GroupEntry {
                    name: "audio".into(),
                    gid: 29,
                    members: vec!["alice".into()],
                },
            ],
        }
    }

    #[test]
    fn resolution_table() {
        // (user, group, expected (user, uid, gid, groups, home) or error (field, message))
        type Want = Result<
            (&'static str, u32, u32, &'static [u32], &'static str),
            (&'static str, &'static str),
        >;
        let cases: &[(&str, Option<&str>, Want)] = &[
            (
                "alice",
                None,
                Ok(("alice", 1001, 1001, &[29, 1001, 2000], "/home/alice")),
            ),
            (
                "1001",
                None,
                Ok(("alice", 1001, 1001, &[29, 1001, 2000], "/home/alice")),
            ),
            (
                "bob",
                Some("agents"),
                Ok(("bob", 1002, 2000, &[2000], "/srv/bob")),
            ),
            (
                "bob",
                Some("29"),
                Ok(("bob", 1002, 29, &[29, 2000], "/srv/bob")),
            ),
            (
                "carol",
                None,
                Err((
                    "user",
                    "no user `carol` on this host (hint: create it, e.g. `useradd --system --no-create-home carol`, or fix the name)",
                )),
            ),
            (
                "4242",
                None,
                Err((
                    "user",
                    "no user with uid 4242 on this host (hint: give an existing user's name or id)",
                )),
            ),
            (
                "99999999999",
                None,
                Err(("user", "`99999999999` is not a valid numeric id")),
            ),
            (
                "alice",
                Some("wheel"),
                Err((
                    "group",
                    "no group `wheel` on this host (hint: create it, e.g. `groupadd --system wheel`, or fix the name)",
                )),
            ),
            (
                "alice",
                Some("7"),
                Err((
                    "group",
                    "no group with gid 7 on this host (hint: give an existing group's name or id)",
                )),
            ),
        ];
        let accounts = table();
        for (user, group, want) in cases {
            let got = accounts.resolve(user, *group);
            match (got, want) {
                (Ok(run_as), Ok((name, uid, gid, groups, home))) => {
                    assert_eq!(run_as.user, *name, "{user}");
                    assert_eq!((run_as.uid, run_as.gid), (*uid, *gid), "{user}");
                    assert_eq!(run_as.groups, *groups, "{user} {group:?}");
                    assert_eq!(run_as.home, PathBuf::from(home), "{user}");
                }
                (Err((field, message)), Err((want_field, want_message))) => {
                    assert_eq!((field, message.as_str()), (*want_field, *want_message));
                }
                (got, want) => panic!("{user} {group:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// The host's database has root everywhere this runs.
    #[test]
    fn the_system_database_knows_root() {
        let root = Accounts::System
            .resolve("root", None)
            .expect("root resolves");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        let by_id = Accounts::System
            .resolve("0", Some("0"))
            .expect("uid 0 resolves");
        assert_eq!(by_id.user, "root");
        assert!(Accounts::System.user("no-such-user-4f1c").is_err());
    }
}
