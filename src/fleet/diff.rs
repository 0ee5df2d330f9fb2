//! What a reload changes: agents added, removed, changed or untouched (by
//! name), and global settings that a running supervisor cannot take on. Pure;
//! must not decide what to do about a change (that is the supervisor's job).

use std::collections::BTreeMap;
use std::fmt::Display;

use super::model::{Fleet, VaultConfig};

/// Agents by name, each list sorted. A reload starts `added`, stops `removed`,
/// restarts `changed` and leaves `unchanged` running as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl FleetDiff {
    /// True when applying the diff would touch no agent.
    pub fn is_noop(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares two fleets agent by agent. Generic over what is compared so that
/// the supervisor can compare an `AgentSpec` together with its resolved secret
/// values: a new secret value is a change even when fleet.yaml is not.
pub fn diff<T: PartialEq>(old: &BTreeMap<String, T>, new: &BTreeMap<String, T>) -> FleetDiff {
    let mut out = FleetDiff::default();
    for (name, before) in old {
        match new.get(name) {
            None => out.removed.push(name.clone()),
            Some(after) if after == before => out.unchanged.push(name.clone()),
            Some(_) => out.changed.push(name.clone()),
        }
    }
    out.added = new
        .keys()
        .filter(|name| !old.contains_key(*name))
        .cloned()
        .collect();
    out
}

/// Global settings that differ between `old` and `new` but cannot change in a
/// running supervisor, one message each. Empty means the reload may proceed.
pub fn non_reloadable_changes(old: &Fleet, new: &Fleet) -> Vec<String> {
    let mut out = Vec::new();
    if old.state_dir != new.state_dir {
        out.push(refusal(
            "state_dir",
            old.state_dir.display(),
            new.state_dir.display(),
        ));
    }
    if old.vault != new.vault {
        out.push(refusal(
            "vault",
            describe_vault(&old.vault),
            describe_vault(&new.vault),
        ));
    }
    let (was, now) = (&old.proxy, &new.proxy);
    if was.listen != now.listen {
        out.push(refusal("proxy.listen", was.listen, now.listen));
    }
    if was.max_body != now.max_body {
        out.push(refusal("proxy.max_body", was.max_body, now.max_body));
    }
    if was.upstream_timeout != now.upstream_timeout {
        out.push(refusal(
            "proxy.upstream_timeout",
            humantime::format_duration(was.upstream_timeout),
            humantime::format_duration(now.upstream_timeout),
        ));
    }
    let or_derived = |n: Option<u64>| n.map_or_else(|| "derived".to_owned(), |n| n.to_string());
    let usize_caps = [
        (
            "proxy.max_connections",
            was.max_connections,
            now.max_connections,
        ),
        (
            "proxy.max_unidentified_connections",
            was.max_unidentified_connections,
            now.max_unidentified_connections,
        ),
        (
            "proxy.max_connections_per_agent",
            was.max_connections_per_agent,
            now.max_connections_per_agent,
        ),
    ];
    for (field, was, now) in usize_caps {
        if was != now {
            let as_u64 = |n: Option<usize>| n.map(|n| n as u64);
            out.push(refusal(
                field,
                or_derived(as_u64(was)),
                or_derived(as_u64(now)),
            ));
        }
    }
    let byte_caps = [
        (
            "proxy.max_body_in_flight",
            was.max_body_in_flight,
            now.max_body_in_flight,
        ),
        (
            "proxy.max_body_in_flight_per_agent",
            was.max_body_in_flight_per_agent,
            now.max_body_in_flight_per_agent,
        ),
    ];
    for (field, was, now) in byte_caps {
        if was != now {
            out.push(refusal(field, or_derived(was), or_derived(now)));
        }
    }
    if was.header_timeout != now.header_timeout {
        out.push(refusal(
            "proxy.header_timeout",
            humantime::format_duration(was.header_timeout),
            humantime::format_duration(now.header_timeout),
        ));
    }
    let admin_listen = |fleet: &Fleet| {
        fleet
            .admin
            .map_or_else(|| "none".to_owned(), |a| a.listen.to_string())
    };
    if old.admin != new.admin {
        out.push(refusal(
            "admin.listen",
            admin_listen(old),
            admin_listen(new),
        ));
    }
    out
}

fn refusal(field: &str, was: impl Display, now: impl Display) -> String {
    format!(
        "`{field}` cannot change while running (was `{was}`, now `{now}`); restart the supervisor to apply it"
    )
}

fn describe_vault(vault: &VaultConfig) -> String {
    match vault {
        VaultConfig::Dir { path } => format!("dir {}", path.display()),
        VaultConfig::SystemdCreds => "systemd-creds".to_owned(),
        VaultConfig::Env => "env".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn map(items: &[(&str, u32)]) -> BTreeMap<String, u32> {
        items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn diff_by_name() {
        struct Case {
            what: &'static str,
            old: &'static [(&'static str, u32)],
            new: &'static [(&'static str, u32)],
            added: &'static [&'static str],
            removed: &'static [&'static str],
            changed: &'static [&'static str],
            unchanged: &'static [&'static str],
        }
        let cases = [
            Case {
                what: "both empty",
                old: &[],
                new: &[],
                added: &[],
                removed: &[],
                changed: &[],
                unchanged: &[],
            },
            Case {
                what: "first start",
                old: &[],
                new: &[("a", 1), ("b", 1)],
                added: &["a", "b"],
                removed: &[],
                changed: &[],
                unchanged: &[],
            },
            Case {
                what: "all removed",
                old: &[("a", 1)],
                new: &[],
                added: &[],
                removed: &["a"],
                changed: &[],
                unchanged: &[],
            },
            Case {
                what: "identical",
                old: &[("a", 1), ("b", 2)],
                new: &[("a", 1), ("b", 2)],
                added: &[],
                removed: &[],
                changed: &[],
                unchanged: &["a", "b"],
            },
            Case {
                what: "one changed",
                old: &[("a", 1), ("b", 2)],
                new: &[("a", 1), ("b", 3)],
                added: &[],
                removed: &[],
                changed: &["b"],
                unchanged: &["a"],
            },
            Case {
                what: "everything at once",
                old: &[("gone", 1), ("same", 1), ("edited", 1)],
                new: &[("edited", 2), ("new", 1), ("same", 1)],
                added: &["new"],
                removed: &["gone"],
                changed: &["edited"],
                unchanged: &["same"],
            },
            Case {
                what: "rename is remove + add",
                old: &[("old", 1)],
                new: &[("new", 1)],
                added: &["new"],
                removed: &["old"],
                changed: &[],
                unchanged: &[],
            },
        ];
        for c in cases {
            let got = diff(&map(c.old), &map(c.new));
            let want = FleetDiff {
                added: names(c.added),
                removed: names(c.removed),
                changed: names(c.changed),
                unchanged: names(c.unchanged),
            };
            assert_eq!(got, want, "{}", c.what);
            assert_eq!(
                got.is_noop(),
                c.added.is_empty() && c.removed.is_empty() && c.changed.is_empty()
            );
        }
    }

    fn fleet(state_dir: &str, vault: VaultConfig) -> Fleet {
        Fleet {
            file: "fleet.yaml".into(),
            base_dir: "/srv".into(),
            version: 1,
            state_dir: PathBuf::from(state_dir),
            vault,
            proxy: Default::default(),
            admin: None,
            providers: BTreeMap::new(),
            alerts: Default::default(),
            agents: BTreeMap::new(),
            rotation: BTreeMap::new(),
        }
    }

    #[test]
    fn non_reloadable_globals() {
        let dir = |p: &str| VaultConfig::Dir { path: p.into() };
        let cases: Vec<(&str, Fleet, Fleet, Vec<&str>)> = vec![
            (
                "nothing changed",
                fleet("/s", dir("/v")),
                fleet("/s", dir("/v")),
                vec![],
            ),
            (
                "state_dir",
                fleet("/s", dir("/v")),
                fleet("/t", dir("/v")),
                vec![
                    "`state_dir` cannot change while running (was `/s`, now `/t`); restart the supervisor to apply it",
                ],
            ),
            (
                "vault path",
                fleet("/s", dir("/v")),
                fleet("/s", dir("/w")),
                vec![
                    "`vault` cannot change while running (was `dir /v`, now `dir /w`); restart the supervisor to apply it",
                ],
            ),
            (
                "vault backend and state_dir",
                fleet("/s", VaultConfig::Env),
                fleet("/t", VaultConfig::SystemdCreds),
                vec![
                    "`state_dir` cannot change while running (was `/s`, now `/t`); restart the supervisor to apply it",
                    "`vault` cannot change while running (was `env`, now `systemd-creds`); restart the supervisor to apply it",
                ],
            ),
        ];
        for (what, old, new, want) in cases {
            assert_eq!(non_reloadable_changes(&old, &new), want, "{what}");
        }
    }

    #[test]
    fn admin_listen_is_not_reloadable() {
        let with = |listen: Option<&str>| {
            let mut f = fleet("/s", VaultConfig::Env);
            f.admin = listen.map(|l| crate::fleet::AdminSpec {
                listen: l.parse().unwrap(),
            });
            f
        };
        let cases = [
            ("same", Some("127.0.0.1:7879"), Some("127.0.0.1:7879"), None),
            ("both absent", None, None, None),
            (
                "moved",
                Some("127.0.0.1:7879"),
                Some("127.0.0.1:9100"),
                Some(
                    "`admin.listen` cannot change while running (was `127.0.0.1:7879`, now `127.0.0.1:9100`); restart the supervisor to apply it",
                ),
            ),
            (
                "added",
                None,
                Some("127.0.0.1:7879"),
                Some(
                    "`admin.listen` cannot change while running (was `none`, now `127.0.0.1:7879`); restart the supervisor to apply it",
                ),
            ),
            (
                "removed",
                Some("127.0.0.1:7879"),
                None,
                Some(
                    "`admin.listen` cannot change while running (was `127.0.0.1:7879`, now `none`); restart the supervisor to apply it",
                ),
            ),
        ];
        for (what, old, new, want) in cases {
            let got = non_reloadable_changes(&with(old), &with(new));
            let want: Vec<String> = want.into_iter().map(str::to_owned).collect();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn agent_changes_are_reloadable() {
        let old = fleet("/s", VaultConfig::Env);
        let mut new = old.clone();
        new.file = "other.yaml".into();
        assert!(non_reloadable_changes(&old, &new).is_empty());
    }
}
