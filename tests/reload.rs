//! README "Live reload": SIGHUP applies only what changed in fleet.yaml; a
//! broken file leaves every agent running exactly as it was.

mod common;

use common::*;
use nix::sys::signal::Signal;

fn agent(name: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    command: [sh, -c, 'echo $$ > {name}.pid; exec sleep 1000']\n    stop: {{ grace: 2s }}\n{extra}"
    )
}

fn fleet_yaml(agents: &[String]) -> String {
    format!(
        "version: 1\nvault: {{ backend: dir, path: secrets }}\nagents:\n{}",
        agents.concat()
    )
}

/// Removes a pid file so the next write by a restarted agent can be awaited.
fn forget_pid(fleet: &FleetDir, name: &str) {
    let _ = std::fs::remove_file(fleet.file(&format!("{name}.pid")));
}

#[test]
fn reload_touches_only_what_changed() {
    let fleet = FleetDir::new();
    fleet.write_secret("keeper", "token", "first-value");
    let keeper = |extra: &str| {
        agent(
            "keeper",
            &format!("    secrets: {{ TOKEN: token }}\n{extra}"),
        )
    };
    fleet.write_fleet(&fleet_yaml(&[
        keeper(""),
        agent("changer", "    env: { MODE: one }\n"),
        agent("leaver", ""),
        agent("steady", ""),
    ]));
    let mut sup = fleet.run(&[]);
    let keeper_pid = fleet.wait_pid("keeper");
    let changer_pid = fleet.wait_pid("changer");
    let leaver_pid = fleet.wait_pid("leaver");
    let steady_pid = fleet.wait_pid("steady");

    // add `joiner`, remove `leaver`, change `changer`'s env, keep the rest.
    forget_pid(&fleet, "changer");
    fleet.write_fleet(&fleet_yaml(&[
        keeper(""),
        agent("changer", "    env: { MODE: two }\n"),
        agent("steady", ""),
        agent("joiner", ""),
    ]));
    sup.signal(Signal::SIGHUP);
    let joiner_pid = fleet.wait_pid("joiner");
    let new_changer_pid = fleet.wait_pid("changer");
    assert_ne!(new_changer_pid, changer_pid, "changed agent restarted");
    wait_gone(leaver_pid);
    assert!(!group_alive(leaver_pid), "removed agent's group is gone");
    wait_gone(changer_pid);
    sup.wait_log("reload applied");
    assert!(
        process_alive(keeper_pid) && process_alive(steady_pid),
        "unchanged agents untouched"
    );
    assert_eq!(
        fleet.read("steady.pid").unwrap().trim(),
        steady_pid.to_string()
    );

    // A changed secret value, same file: only `keeper` restarts.
    forget_pid(&fleet, "keeper");
    fleet.write_secret("keeper", "token", "second-value");
    sup.signal(Signal::SIGHUP);
    let new_keeper_pid = fleet.wait_pid("keeper");
    assert_ne!(new_keeper_pid, keeper_pid);
    wait_gone(keeper_pid);
    for pid in [steady_pid, joiner_pid, new_changer_pid] {
        assert!(
            process_alive(pid),
            "pid {pid} must be untouched by a secret change elsewhere"
        );
    }

    // A broken file: every agent keeps running with the same pid.
    fleet.write_fleet("version: 1\nagents:\n  steady:\n    comand: [true]\n  joiner: [\n");
    sup.signal(Signal::SIGHUP);
    sup.wait_log("reload rejected");
    std::thread::sleep(std::time::Duration::from_millis(300));
    for pid in [steady_pid, joiner_pid, new_changer_pid, new_keeper_pid] {
        assert!(process_alive(pid), "pid {pid} must survive a broken reload");
    }
    let log = sup.log();
    assert!(
        log.contains("fleet.yaml:"),
        "the rejection names file:line:col:\n{log}"
    );
    assert!(
        !log.contains("second-value") && !log.contains("first-value"),
        "no secret in log"
    );

    // A global that cannot change live is refused by name.
    fleet.write_fleet(&format!(
        "state_dir: elsewhere\n{}",
        fleet_yaml(&[keeper(""), agent("steady", "")])
    ));
    sup.signal(Signal::SIGHUP);
    sup.wait_log("`state_dir` cannot change");
    assert!(
        process_alive(joiner_pid),
        "a refused reload removes nothing"
    );

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
    for pid in [steady_pid, joiner_pid, new_changer_pid, new_keeper_pid] {
        assert!(!group_alive(pid), "group {pid} gone after shutdown");
    }
}

#[test]
fn invalid_fleet_at_start_exits_with_config_code() {
    let fleet = FleetDir::new();
    fleet.write_fleet("version: 1\nagents:\n  bad name:\n    command: [true]\n");
    let mut sup = fleet.run(&[]);
    let status = sup.wait_exit();
    assert_eq!(status.code(), Some(78), "log:\n{}", sup.log());
    assert!(sup.log().contains("fleet.yaml:3:3"), "log:\n{}", sup.log());
}
