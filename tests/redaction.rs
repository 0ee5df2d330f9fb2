//! README "Threat model": no secret value the supervisor holds — raw
//! `secrets:`, real LLM keys, scoped tokens — reaches its log, even when an
//! agent prints it, splits it across the long-line bound, or it was rotated
//! by a reload.

mod common;

use std::collections::BTreeMap;

use common::*;
use nix::sys::signal::Signal;

/// Unusual enough that no 8-byte piece of it occurs in a log by chance.
const GMAIL: &str = "Gm4iL-QZ7wK9-vX2pT8-hY5nR3-gmail";
const PROXIED_KEY: &str = "Kq8-proxied-upstream-key-Zr41Wd";
const DIRECT_KEY: &str = "Dj3-direct-upstream-key-Vt92Lp";

/// Every 8-byte window of `secret` that occurs in `log`.
fn pieces_in(log: &str, secret: &str) -> Vec<String> {
    secret
        .as_bytes()
        .windows(8)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .filter(|w| log.contains(w.as_str()))
        .collect()
}

fn env_of(fleet: &FleetDir, file: &str) -> BTreeMap<String, String> {
    let text = wait_for(file, || {
        fleet.read(file).filter(|t| t.contains("SUPERVISOR_AGENT="))
    });
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn agents_printing_their_credentials_leave_only_redacted_in_the_log() {
    let fleet = FleetDir::new();
    fleet.write_secret("leaky", "gmail", GMAIL);
    fleet.write_secret("leaky", "llm_key", PROXIED_KEY);
    fleet.write_secret("direct", "llm_key", DIRECT_KEY);
    // The secret lands across the 16 KiB line bound at several offsets.
    // (Inside a single-quoted YAML string: double quotes only.)
    let long_lines = "for n in 16370 16376 16380 16383 16384; do \
                      head -c $n /dev/zero | tr \"\\0\" x; printf \"%s tail\\n\" \"$GMAIL_TOKEN\"; done";
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
providers:
  claude: {{ kind: anthropic, upstream: 'http://127.0.0.1:9' }}
agents:
  leaky:
    command: [sh, -c, 'env > leaky.env; echo \"secret=$GMAIL_TOKEN token=$ANTHROPIC_API_KEY\"; \
echo \"stderr: $GMAIL_TOKEN\" >&2; {long_lines}; echo leaky done; exec sleep 1000']
    secrets: {{ GMAIL_TOKEN: gmail }}
    llm: [ {{ provider: claude, key: llm_key }} ]
  direct:
    command: [sh, -c, 'env > direct.env; echo \"key=$ANTHROPIC_API_KEY\"; echo direct done; exec sleep 1000']
    llm: [ {{ provider: claude, key: llm_key, delivery: direct }} ]
"
    ));
    let mut sup = fleet.run(&[]);
    sup.wait_log("leaky | leaky done");
    sup.wait_log("direct | direct done");

    // The agents did get the values (so they really printed them).
    let leaky = env_of(&fleet, "leaky.env");
    let token = leaky["ANTHROPIC_API_KEY"].clone();
    assert!(token.starts_with("sup-"), "a scoped token: {token}");
    assert_eq!(leaky["GMAIL_TOKEN"], GMAIL);
    assert_eq!(
        env_of(&fleet, "direct.env")["ANTHROPIC_API_KEY"],
        DIRECT_KEY
    );

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    let log = sup.log();
    assert!(
        log.contains("leaky | secret=[REDACTED] token=[REDACTED]"),
        "{log}"
    );
    assert!(log.contains("leaky | stderr: [REDACTED]"), "{log}");
    assert!(log.contains("direct | key=[REDACTED]"), "{log}");
    // Each long line's value is masked whole, in one piece or the next.
    assert_eq!(log.matches("[REDACTED] tail").count(), 5, "{log}");
    for secret in [GMAIL, PROXIED_KEY, DIRECT_KEY, token.as_str()] {
        assert_eq!(
            pieces_in(&log, secret),
            Vec::<String>::new(),
            "a piece of a secret is in the log"
        );
    }
}

#[test]
fn a_rotated_secret_is_masked_after_reload_and_the_old_one_while_it_stops() {
    const OLD: &str = "old-Wq7Rt2-value-Pz81";
    const NEW: &str = "new-Hb5Yc9-value-Lm30";
    let fleet = FleetDir::new();
    fleet.write_secret("a", "token", OLD);
    fleet.write_fleet(
        "version: 1
agents:
  a:
    command: [sh, -c, 'trap \"echo bye $TOKEN; exit 0\" TERM; echo $$ > a.pid; echo \"value=$TOKEN\"; sleep 1000 & wait']
    secrets: { TOKEN: token }
",
    );
    let mut sup = fleet.run(&[]);
    sup.wait_log("a | value=[REDACTED]");
    let first = fleet.wait_pid("a");

    fleet.write_secret("a", "token", NEW);
    sup.signal(Signal::SIGHUP);
    // Only a secret's value changed: a rotation, which restarts the agent.
    sup.wait_log("a secret it holds has a new version");
    // The old process says goodbye with the old value, the new one prints the new.
    sup.wait_log("a | bye [REDACTED]");
    wait_for("the restarted agent", || {
        let pid = fleet.read("a.pid")?.trim().parse::<i32>().ok()?;
        (pid != first && sup.log().matches("a | value=[REDACTED]").count() == 2).then_some(())
    });

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    let log = sup.log();
    for secret in [OLD, NEW] {
        assert_eq!(pieces_in(&log, secret), Vec::<String>::new(), "{log}");
    }
}

#[test]
fn check_warns_about_short_secrets_without_showing_them() {
    let fleet = FleetDir::new();
    fleet.write_secret("a", "pin", "4711");
    fleet.write_secret("a", "long", "long-enough-value-1");
    fleet.write_fleet(
        "version: 1\nagents:\n  a:\n    command: [x]\n    secrets: { PIN: pin, LONG: long }\n",
    );
    let out = std::process::Command::new(bin())
        .args(["check", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("ok — 1 agent, 2 secrets resolved"),
        "{stdout}"
    );
    assert_eq!(
        stderr,
        "warning: agent `a`: the secret in `PIN` is shorter than 8 bytes; it is masked as [REDACTED] \
         wherever it appears in the agent's output, which may hide ordinary text\n"
    );
    assert!(!stderr.contains("4711") && !stdout.contains("4711"));
}
