//! README "Restart policy": crashing agents come back with growing delays
//! (CrashLoopBackOff), `never` stays down, a missing command never takes the
//! supervisor down.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Start times (ms since the epoch) an agent appended to `NAME.starts`.
fn starts(fleet: &FleetDir, name: &str) -> Vec<u128> {
    fleet
        .read(&format!("{name}.starts"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn crash_loop_backs_off_and_never_stays_down() {
    let fleet = FleetDir::new();
    // `date +%s%3N` is GNU; python3 is a documented requirement anyway.
    let stamp = "python3 -c \"import time; print(int(time.time()*1000))\"";
    fleet.write_fleet(&format!(
        "version: 1\nagents:\n  \
         crasher:\n    command: [sh, -c, '{stamp} >> crasher.starts; exit 3']\n    \
         restart: {{ policy: on-failure, backoff_initial: 200ms, backoff_max: 10s }}\n  \
         once:\n    command: [sh, -c, '{stamp} >> once.starts; exit 3']\n    \
         restart: {{ policy: never }}\n  \
         missing:\n    command: [./no-such-agent]\n    \
         restart: {{ backoff_initial: 100ms }}\n  \
         steady:\n    command: [sh, -c, 'echo $$ > steady.pid; exec sleep 1000']\n"
    ));
    let mut sup = fleet.run(&[]);
    let steady = fleet.wait_pid("steady");
    let times = wait_for("four starts of crasher", || {
        let s = starts(&fleet, "crasher");
        (s.len() >= 4).then_some(s)
    });
    let gaps: Vec<u128> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // 200ms, 400ms, 800ms: each at least its delay, and growing.
    for (gap, min) in gaps.iter().zip([200u128, 400, 800]) {
        assert!(
            *gap >= min,
            "gap {gap}ms shorter than backoff {min}ms: {gaps:?}"
        );
    }
    assert!(gaps[2] > gaps[0], "delays grow: {gaps:?}");

    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(starts(&fleet, "once").len(), 1, "`never` is not restarted");
    sup.wait_log("no-such-agent");
    assert!(
        process_alive(steady),
        "a crash loop elsewhere leaves others alone"
    );
    assert!(
        sup.child.try_wait().unwrap().is_none(),
        "supervisor still running"
    );

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}
