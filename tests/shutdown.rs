//! README "Stopping": SIGTERM/SIGINT stops every agent's whole process group
//! gracefully and exits 0; a second signal kills at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

#[test]
fn sigterm_stops_every_group_including_grandchildren() {
    let fleet = FleetDir::new();
    fleet.write_fleet(
        "version: 1\nagents:\n  \
         parent:\n    command: [sh, -c, 'sleep 1000 & echo $! > grandchild.pid; echo $$ > parent.pid; wait']\n    stop: { grace: 3s }\n  \
         stubborn:\n    command: [sh, -c, 'trap \"\" TERM; echo $$ > stubborn.pid; while true; do sleep 0.1; done']\n    stop: { grace: 1s }\n",
    );
    let mut sup = fleet.run(&[]);
    let parent = fleet.wait_pid("parent");
    let grandchild = fleet.wait_pid("grandchild");
    let stubborn = fleet.wait_pid("stubborn");
    assert!(process_alive(grandchild));

    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit();
    assert!(status.success(), "exit 0 on SIGTERM; log:\n{}", sup.log());
    for pid in [parent, grandchild, stubborn] {
        assert!(!process_alive(pid), "pid {pid} still alive after shutdown");
    }
    for pgid in [parent, stubborn] {
        assert!(!group_alive(pgid), "group {pgid} still has members");
    }
}

#[test]
fn second_signal_kills_at_once() {
    let fleet = FleetDir::new();
    fleet.write_fleet(
        "version: 1\nagents:\n  stubborn:\n    command: [sh, -c, 'trap \"\" TERM INT; echo $$ > stubborn.pid; while true; do sleep 0.1; done']\n    stop: { grace: 10m }\n",
    );
    let mut sup = fleet.run(&[]);
    let stubborn = fleet.wait_pid("stubborn");
    sup.signal(Signal::SIGTERM);
    sup.wait_log("shutting down");
    let start = Instant::now();
    sup.signal(Signal::SIGINT);
    let status = sup.wait_exit();
    assert!(status.success(), "log:\n{}", sup.log());
    // The grace was ten minutes; PATIENCE bounds wait_exit far below that.
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(!group_alive(stubborn));
}

#[test]
fn a_simulated_request_in_flight_at_ctrl_c_is_charged_its_known_usage() {
    let fleet = FleetDir::new();
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0' }}
providers:
  sim: {{ kind: simulated, latency: 60s }}
agents:
  worker:
    command: [python3, '{script}']
    env: {{ MODE: gate, MAX_TOKENS: '100000' }}
    llm: [ {{ provider: sim }} ]
",
        script = repo_file("tests/sdk/plain_agent.py").display(),
    ));
    let mut sup = fleet.run(&[]);
    // The one call waits out the simulated latency: in flight, held at its
    // reservation (100,000 output tokens' worth).
    wait_for("the request in flight", || {
        let out = std::process::Command::new(bin())
            .args(["usage", "--json", "-f"])
            .arg(fleet.file("fleet.yaml"))
            .output()
            .ok()?;
        let usage: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (usage[0]["unsettled_requests"] == 1).then_some(())
    });
    sup.signal(Signal::SIGINT);
    assert!(sup.wait_exit().success(), "log:\n{}", sup.log());
    let usage = usage_json(&fleet);
    let row = &usage[0];
    assert_eq!(row["unsettled_requests"], 0, "{row}");
    let metered = row["input_tokens"].as_u64().unwrap() + row["output_tokens"].as_u64().unwrap();
    assert!(metered > 0, "{row}");
    assert_eq!(
        row["charged_tokens"].as_u64().unwrap(),
        metered,
        "the simulated answer's own usage, not the reservation: {row}"
    );
}
