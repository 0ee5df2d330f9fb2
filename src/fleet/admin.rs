//! Validation of fleet.yaml's `admin:` section (the `/metrics` and `/healthz`
//! listener) into [`AdminSpec`], with locations. Pure; called by `load`. Must
//! not bind anything: whether the address is usable is the supervisor's
//! business at start-up.

use std::net::SocketAddr;

use super::load::Cx;
use super::model::AdminSpec;
use super::schema::RawAdmin;

/// `written` is whether the file has an `admin` key at all: absent means no
/// admin listener; present (even empty, `admin: {}`) means one, on loopback
/// unless `listen` says otherwise.
pub(super) fn resolve_admin(
    cx: &mut Cx,
    written: bool,
    raw: Option<RawAdmin>,
) -> Option<AdminSpec> {
    if !written {
        return None;
    }
    let mut spec = AdminSpec::default();
    if let Some(listen) = raw.and_then(|r| r.listen) {
        match listen.value.trim().parse::<SocketAddr>() {
            Ok(addr) => spec.listen = addr,
            Err(_) => cx.push(
                listen.pos,
                None,
                format!(
                    "`admin.listen`: invalid address `{}`; use IP:PORT, like `127.0.0.1:7879`",
                    listen.value
                ),
            ),
        }
    }
    Some(spec)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::load::{LoadEnv, parse_fleet};
    use super::*;

    fn parse(source: &str) -> Result<Option<AdminSpec>, Vec<String>> {
        parse_fleet(
            Path::new("fleet.yaml"),
            Path::new("/srv/fleet"),
            source,
            &LoadEnv::default(),
        )
        .map(|l| l.fleet.admin)
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect())
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn admin_section_table() {
        let ok: &[(&str, &str, Option<&str>)] = &[
            ("absent: no listener", "version: 1\nagents: {}\n", None),
            (
                "empty mapping: loopback default",
                "version: 1\nadmin: {}\nagents: {}\n",
                Some("127.0.0.1:7879"),
            ),
            (
                "null: loopback default",
                "version: 1\nadmin:\nagents: {}\n",
                Some("127.0.0.1:7879"),
            ),
            (
                "explicit",
                "version: 1\nadmin: { listen: 127.0.0.1:9100 }\nagents: {}\n",
                Some("127.0.0.1:9100"),
            ),
            (
                "ipv6 and an ephemeral port",
                "version: 1\nadmin: { listen: '[::1]:0' }\nagents: {}\n",
                Some("[::1]:0"),
            ),
            (
                "not loopback is allowed (the supervisor warns)",
                "version: 1\nadmin: { listen: 0.0.0.0:7879 }\nagents: {}\n",
                Some("0.0.0.0:7879"),
            ),
        ];
        for (what, source, want) in ok {
            assert_eq!(
                parse(source),
                Ok(want.map(addr).map(|listen| AdminSpec { listen })),
                "{what}"
            );
        }

        let bad: &[(&str, &str, &[&str])] = &[
            (
                "a host name",
                "version: 1\nadmin: { listen: localhost:7879 }\nagents: {}\n",
                &[
                    "fleet.yaml:2:18: `admin.listen`: invalid address `localhost:7879`; use IP:PORT, like `127.0.0.1:7879`",
                ],
            ),
            (
                "no port",
                "version: 1\nadmin: { listen: 127.0.0.1 }\nagents: {}\n",
                &[
                    "fleet.yaml:2:18: `admin.listen`: invalid address `127.0.0.1`; use IP:PORT, like `127.0.0.1:7879`",
                ],
            ),
            (
                "unknown field",
                "version: 1\nadmin: { listen: 127.0.0.1:1, path: /m }\nagents: {}\n",
                &["fleet.yaml:2:31: `admin`: unknown field `path`, expected `listen`"],
            ),
            (
                "a scalar",
                "version: 1\nadmin: 127.0.0.1:7879\nagents: {}\n",
                &[
                    "fleet.yaml:2:8: `admin`: invalid type: string \"127.0.0.1:7879\", expected a mapping with `listen`",
                ],
            ),
        ];
        for (what, source, want) in bad {
            assert_eq!(
                parse(source),
                Err(want.iter().map(|s| s.to_string()).collect()),
                "{what}"
            );
        }
    }
}
