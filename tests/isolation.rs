//! README "Isolation": each agent sees only its own secrets and an allow-listed
//! environment; no secret is ever in argv or in the supervisor's log.

mod common;

use common::*;
use nix::sys::signal::Signal;

const AGENTS: [&str; 3] = ["alpha", "bravo", "charlie"];

fn secret_for(agent: &str, which: &str) -> String {
    format!("s3cr3t-{which}-of-{agent}-7f1c9a")
}

#[test]
fn each_agent_gets_only_its_own_environment() {
    let fleet = FleetDir::new();
    let mut yaml = String::from(
        "version: 1\nvault: { backend: dir, path: secrets }\n\
         defaults:\n  env: { SHARED_SETTING: from-defaults }\nagents:\n",
    );
    for agent in AGENTS {
        fleet.write_secret(agent, "api_key", &secret_for(agent, "api"));
        fleet.write_secret(agent, "db.password", &secret_for(agent, "db"));
        yaml.push_str(&format!(
            "  {agent}:\n    command: [sh, -c, 'env > {agent}.env; echo $$ > {agent}.pid; exec sleep 1000']\n    \
             env: {{ OWN_SETTING: {agent}-value }}\n    \
             secrets: {{ API_KEY: api_key, DB_PASSWORD: db.password }}\n"
        ));
    }
    fleet.write_fleet(&yaml);

    let mut sup = fleet.run(&[
        ("SUPERVISOR_ONLY_VARIABLE", "must-not-leak"),
        ("LC_ALL", "C"),
        ("TZ", "UTC"),
    ]);
    for agent in AGENTS {
        fleet.wait_pid(agent);
    }

    for agent in AGENTS {
        let env = fleet.read(&format!("{agent}.env")).expect("env dump");
        let vars: std::collections::BTreeMap<&str, &str> =
            env.lines().filter_map(|l| l.split_once('=')).collect();
        assert_eq!(vars.get("SUPERVISOR_AGENT"), Some(&agent), "{env}");
        assert_eq!(
            vars.get("API_KEY").copied(),
            Some(secret_for(agent, "api").as_str())
        );
        assert_eq!(
            vars.get("DB_PASSWORD").copied(),
            Some(secret_for(agent, "db").as_str())
        );
        assert_eq!(vars.get("SHARED_SETTING"), Some(&"from-defaults"));
        assert_eq!(
            vars.get("OWN_SETTING").copied(),
            Some(format!("{agent}-value").as_str())
        );
        assert_eq!(vars.get("PYTHONUNBUFFERED"), Some(&"1"));
        assert_eq!(vars.get("LC_ALL"), Some(&"C"), "LC_* is allow-listed");
        assert_eq!(vars.get("TZ"), Some(&"UTC"));
        assert!(!vars.contains_key("SUPERVISOR_ONLY_VARIABLE"), "{env}");
        let allowed = [
            "PATH",
            "HOME",
            "USER",
            "LANG",
            "TZ",
            "TMPDIR",
            "SUPERVISOR_AGENT",
            "API_KEY",
            "DB_PASSWORD",
            "SHARED_SETTING",
            "OWN_SETTING",
            "PYTHONUNBUFFERED",
            // set by sh itself
            "PWD",
            "SHLVL",
            "_",
            "OLDPWD",
        ];
        for name in vars.keys() {
            assert!(
                allowed.contains(name) || name.starts_with("LC_"),
                "agent {agent} got unexpected variable {name}"
            );
        }
        for other in AGENTS.iter().filter(|o| **o != agent) {
            assert!(
                !env.contains(&secret_for(other, "api")),
                "{agent} saw {other}'s secret"
            );
            assert!(
                !env.contains(&secret_for(other, "db")),
                "{agent} saw {other}'s secret"
            );
        }
    }

    let cmdlines = all_cmdlines().join("\n");
    for agent in AGENTS {
        for which in ["api", "db"] {
            assert!(
                !cmdlines.contains(&secret_for(agent, which)),
                "secret in some argv"
            );
        }
    }

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    let log = sup.log();
    assert!(log.contains("alpha"), "log names the agents:\n{log}");
    for agent in AGENTS {
        for which in ["api", "db"] {
            assert!(
                !log.contains(&secret_for(agent, which)),
                "secret in the log:\n{log}"
            );
        }
    }
}

#[test]
fn agent_output_is_prefixed_with_its_name() {
    let fleet = FleetDir::new();
    fleet.write_fleet(
        "version: 1\nagents:\n  talker:\n    command: [sh, -c, 'echo hello from talker; echo oops >&2; echo $$ > talker.pid; exec sleep 1000']\n",
    );
    let mut sup = fleet.run(&[]);
    fleet.wait_pid("talker");
    sup.wait_log("talker | hello from talker");
    sup.wait_log("talker | oops");
    sup.signal(Signal::SIGINT);
    assert!(sup.wait_exit().success());
}
