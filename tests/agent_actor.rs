//! The agent actor against real child processes (`sh -c`): environment
//! isolation, stopping whole process groups, restart policies and backoff,
//! spawn failures, and verbs arriving while a stop or a backoff is under way.
//! Timeouts here are only upper bounds for "eventually"; lower bounds are the
//! ones the actor guarantees (a delay never ends early).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_supervisor::agent::{
    AgentHandle, AgentLaunch, AgentState, AgentStatus, Exit, become_subreaper, child_env,
    spawn_orphan_reaper,
};
use agent_supervisor::fleet::{AgentSpec, RestartPolicy, RestartSpec, StopSpec};
use agent_supervisor::vault::Secret;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Upper bound for anything that should happen "soon" on a loaded machine.
const EVENTUALLY: Duration = Duration::from_secs(20);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn spec(name: &str, script: &str, cwd: &Path) -> AgentSpec {
    AgentSpec {
        name: name.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        cwd: cwd.to_path_buf(),
        env: BTreeMap::new(),
        secrets: BTreeMap::new(),
        restart: RestartSpec {
            policy: RestartPolicy::OnFailure,
            backoff_initial: ms(20),
            backoff_max: ms(200),
            reset_after: Duration::from_secs(60),
        },
        stop: StopSpec {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(5),
        },
        llm: Vec::new(),
        budget: Default::default(),
        runaway: Default::default(),
        run_as: None,
    }
}

fn launch(spec: AgentSpec) -> AgentLaunch {
    AgentLaunch {
        spec,
        secret_env: Vec::new(),
    }
}

fn setup() -> tempfile::TempDir {
    become_subreaper().expect("PR_SET_CHILD_SUBREAPER");
    tempfile::tempdir().expect("tempdir")
}

async fn wait_status(
    handle: &AgentHandle,
    what: &str,
    pred: impl FnMut(&AgentStatus) -> bool,
) -> AgentStatus {
    let mut rx = handle.subscribe();
    match tokio::time::timeout(EVENTUALLY, rx.wait_for(pred)).await {
        Ok(Ok(status)) => status.clone(),
        Ok(Err(_)) => panic!("{what}: actor ended; last status {:?}", handle.status()),
        Err(_) => panic!("{what}: timed out; last status {:?}", handle.status()),
    }
}

async fn running_pid(handle: &AgentHandle) -> u32 {
    let status = wait_status(handle, "running", |s| {
        matches!(s.state, AgentState::Running { .. })
    })
    .await;
    status.pid.expect("a running agent has a pid")
}

/// Polls until `path` holds at least `n` lines; returns them.
async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, want {n}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(ms(10)).await;
    }
}

async fn read_pid(path: &Path) -> i32 {
    let lines = wait_lines(path, 1).await;
    lines[0].trim().parse().expect("a pid")
}

fn group_gone(pgid: u32) -> bool {
    kill(Pid::from_raw(-(pgid as i32)), None) == Err(Errno::ESRCH)
}

fn pid_gone(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
}

fn nanos(line: &str) -> u128 {
    line.trim().parse().expect("date +%s%N output")
}

#[test]
fn child_env_keeps_only_the_allow_list_and_the_agents_own_values() {
    let mut s = spec("alpha", "true", Path::new("/"));
    s.env.insert("LOG_LEVEL".into(), "debug".into());
    let secrets = vec![("ALPHA_TOKEN".to_string(), Secret::new("tok-alpha".into()))];
    let host: Vec<(OsString, OsString)> = [
        ("PATH", "/usr/bin"),
        ("LC_CTYPE", "C.UTF-8"),
        ("ANTHROPIC_API_KEY", "sk-shared"),
        ("SUPERVISOR_SECRET_BETA_TOKEN", "tok-beta"),
    ]
    .iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    let env = child_env(&s, &secrets, host);
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.to_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "ALPHA_TOKEN",
            "LC_CTYPE",
            "LOG_LEVEL",
            "PATH",
            "PYTHONUNBUFFERED",
            "SUPERVISOR_AGENT"
        ]
    );
}

/// Two real agents dump their environment: each sees its own secret and
/// name, not the other's, and nothing of the test process's environment
/// beyond the allow-list; secrets never appear in argv.
#[tokio::test]
async fn spawned_agents_see_only_their_own_environment() {
    let dir = setup();
    let cargo_var = std::env::var_os("CARGO_MANIFEST_DIR");
    assert!(
        cargo_var.is_some(),
        "cargo sets this for tests; used as a canary"
    );

    let mut handles = Vec::new();
    for (name, token) in [("alpha", "tok-alpha-111"), ("beta", "tok-beta-222")] {
        let out = dir.path().join(format!("{name}.env"));
        let script = format!(
            "env > {}.tmp && mv {0}.tmp {0} && exec sleep 1000",
            out.display()
        );
        let mut s = spec(name, &script, dir.path());
        s.env.insert("LOG_LEVEL".into(), "info".into());
        let handle = AgentHandle::spawn(AgentLaunch {
            spec: s,
            secret_env: vec![("AGENT_TOKEN".into(), Secret::new(token.into()))],
        });
        handles.push((name, token, out, handle));
    }

    let allowed_host = ["PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR"];
    // Set by the shell itself, not inherited.
    let shell_made = ["PWD", "OLDPWD", "SHLVL", "_"];
    for (name, token, out, handle) in &handles {
        let pid = running_pid(handle).await;
        let text = wait_lines(out, 1).await.join("\n");
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        assert_eq!(vars.get("SUPERVISOR_AGENT"), Some(name), "{text}");
        assert_eq!(vars.get("AGENT_TOKEN"), Some(token), "{text}");
        assert_eq!(vars.get("LOG_LEVEL"), Some(&"info"));
        assert_eq!(vars.get("PYTHONUNBUFFERED"), Some(&"1"));
        for key in vars.keys() {
            let ok = allowed_host.contains(key)
                || key.starts_with("LC_")
                || shell_made.contains(key)
                || [
                    "SUPERVISOR_AGENT",
                    "AGENT_TOKEN",
                    "LOG_LEVEL",
                    "PYTHONUNBUFFERED",
                ]
                .contains(key);
            assert!(ok, "agent {name} got `{key}` from outside its spec");
        }
        for (other, other_token, _, _) in &handles {
            if other != name {
                assert!(!text.contains(other_token), "{name} sees {other}'s secret");
            }
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(token),
            "secret in argv"
        );
    }
    for (_, _, _, handle) in handles {
        handle.shutdown().await;
    }
}

/// Child output reaches the log under target `agent` with the agent's name
/// and stream, and a secret handed to the agent is not logged by the actor.
#[tokio::test(flavor = "current_thread")]
async fn output_lines_are_logged_with_name_and_stream() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // current_thread: the actor and its pumps run on this thread, under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = setup();
    let mut s = spec(
        "chatty",
        "echo hello out; echo oops err >&2; printf 'no newline'; exit 7",
        dir.path(),
    );
    s.restart.policy = RestartPolicy::Never;
    let handle = AgentHandle::spawn(AgentLaunch {
        spec: s,
        secret_env: vec![("KEY".into(), Secret::new("sk-do-not-log".into()))],
    });
    let status = wait_status(&handle, "exited", |s| {
        matches!(s.state, AgentState::Exited { .. })
    })
    .await;
    assert_eq!(
        status.state,
        AgentState::Exited {
            exit: Exit::Code(7)
        }
    );
    handle.shutdown().await;
    // The pumps may finish just after the exit is seen.
    let deadline = Instant::now() + EVENTUALLY;
    let log = loop {
        let log = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        if log.contains("no newline") || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(ms(10)).await;
    };
    let line_with = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle:?} in:\n{log}"))
            .to_owned()
    };
    let out = line_with("hello out");
    assert!(
        out.contains(" agent:")
            && out.contains("agent=chatty")
            && out.contains("stream=\"stdout\""),
        "{out}"
    );
    let err = line_with("oops err");
    assert!(err.contains("stream=\"stderr\""), "{err}");
    line_with("no newline");
    assert!(line_with("agent started").contains("pid="));
    assert!(line_with("not restarting").contains("exit code 7"));
    assert!(!log.contains("sk-do-not-log"), "secret in log:\n{log}");
}

/// The leader waits on a grandchild; after `stop` the whole group is gone,
/// the grandchild included, by the time `stop` resolves.
#[tokio::test]
async fn stop_removes_the_whole_group_including_grandchildren() {
    let dir = setup();
    let gc = dir.path().join("gc.pid");
    let script = format!("sleep 1000 & echo $! > {}; wait", gc.display());
    let handle = AgentHandle::spawn(launch(spec("parent", &script, dir.path())));
    let pgid = running_pid(&handle).await;
    let grandchild = read_pid(&gc).await;
    assert!(!pid_gone(grandchild));

    let t0 = Instant::now();
    tokio::time::timeout(EVENTUALLY, handle.stop())
        .await
        .expect("stop resolves");
    assert!(t0.elapsed() < Duration::from_secs(5) + EVENTUALLY);
    assert!(group_gone(pgid), "group {pgid} still has members");
    assert!(pid_gone(grandchild), "grandchild {grandchild} survived");
    let status = handle.status();
    assert_eq!(status.state, AgentState::Stopped);
    assert_eq!(status.pid, None);
    assert_eq!(
        status.last_exit.map(|e| e.exit),
        Some(Exit::Signal(Signal::SIGTERM))
    );
    handle.shutdown().await;
}

/// The leader ignores SIGTERM (and so does its grandchild, which inherits the
/// disposition): only SIGKILL after the grace period ends them.
#[tokio::test]
async fn stop_escalates_to_sigkill_after_grace() {
    let dir = setup();
    let gc = dir.path().join("gc.pid");
    let script = format!(
        "trap '' TERM; sleep 1000 & echo $! > {}; wait",
        gc.display()
    );
    let mut s = spec("stubborn", &script, dir.path());
    let grace = ms(400);
    s.stop.grace = grace;
    let handle = AgentHandle::spawn(launch(s));
    let pgid = running_pid(&handle).await;
    let grandchild = read_pid(&gc).await;

    let t0 = Instant::now();
    tokio::time::timeout(EVENTUALLY, handle.stop())
        .await
        .expect("stop resolves");
    let took = t0.elapsed();
    assert!(
        took >= grace,
        "stopped after {took:?}, before the grace ended"
    );
    assert!(took < grace + EVENTUALLY);
    assert!(group_gone(pgid));
    assert!(pid_gone(grandchild));
    assert_eq!(
        handle.status().last_exit.map(|e| e.exit),
        Some(Exit::Signal(Signal::SIGKILL))
    );
    handle.shutdown().await;
}

/// `kill` during a long grace period escalates at once; the pending `stop`
/// resolves too.
#[tokio::test]
async fn kill_cuts_a_grace_period_short() {
    let dir = setup();
    let mut s = spec("stubborn", "trap '' TERM; sleep 1000 & wait", dir.path());
    s.stop.grace = Duration::from_secs(3600);
    let handle = AgentHandle::spawn(launch(s));
    let pgid = running_pid(&handle).await;

    let stopper = handle.clone();
    let stop = tokio::spawn(async move { stopper.stop().await });
    wait_status(&handle, "stopping", |s| {
        matches!(s.state, AgentState::Stopping { .. })
    })
    .await;
    tokio::time::timeout(EVENTUALLY, handle.kill())
        .await
        .expect("kill resolves");
    assert!(group_gone(pgid));
    tokio::time::timeout(EVENTUALLY, stop)
        .await
        .expect("stop resolves after the kill")
        .expect("stop task");
    assert_eq!(handle.status().state, AgentState::Stopped);
    handle.shutdown().await;
}

/// A leader that exits by itself while its grandchild lingers: the rest of
/// the group is stopped before the agent counts as exited.
#[tokio::test]
async fn leftovers_of_an_exited_leader_are_stopped() {
    let dir = setup();
    let gc = dir.path().join("gc.pid");
    let script = format!("sleep 1000 & echo $! > {}; exit 0", gc.display());
    let mut s = spec("leaver", &script, dir.path());
    s.restart.policy = RestartPolicy::Never;
    let handle = AgentHandle::spawn(launch(s));
    let status = wait_status(&handle, "exited", |s| {
        matches!(s.state, AgentState::Exited { .. })
    })
    .await;
    assert_eq!(
        status.state,
        AgentState::Exited {
            exit: Exit::Code(0)
        }
    );
    let grandchild = read_pid(&gc).await;
    assert!(
        pid_gone(grandchild),
        "grandchild {grandchild} outlived its agent"
    );
    assert_eq!(status.pid, None);
    handle.shutdown().await;
}

/// `ran_for` is how long the leader ran: the grace period spent afterwards on
/// what it left in its group is cleanup, not running time (backoff resets on it).
#[tokio::test]
async fn ran_for_ends_when_the_leader_exits() {
    let dir = setup();
    // The grandchild ignores SIGTERM, so cleanup lasts the whole grace period.
    let script = "trap '' TERM; sleep 1000 & exit 0";
    let mut s = spec("brief", script, dir.path());
    s.restart.policy = RestartPolicy::Never;
    let grace = s.stop.grace;
    let started = Instant::now();
    let handle = AgentHandle::spawn(launch(s));
    let status = wait_status(&handle, "exited", |s| {
        matches!(s.state, AgentState::Exited { .. })
    })
    .await;
    // The lower bound the actor guarantees: SIGKILL only after the grace period.
    assert!(started.elapsed() >= grace);
    let ran_for = status.last_exit.expect("an exit is recorded").ran_for;
    assert!(
        ran_for < grace,
        "ran_for {ran_for:?} includes the {grace:?} spent stopping leftovers"
    );
    handle.shutdown().await;
}

/// A process that leaves the agent's group (`setsid`) is re-parented to the
/// subreaper when the agent exits; no actor reaps it, so without the orphan
/// reaper a crash loop leaves one zombie per run behind.
#[tokio::test]
async fn orphans_that_left_the_group_are_reaped() {
    let dir = setup();
    let reaper = spawn_orphan_reaper().expect("orphan reaper");
    let pids = dir.path().join("escaped.pids");
    // The leader waits until the escapee has left the group (it writes its pid
    // after `setsid`), so the group stop cannot catch it first, then crashes.
    let script = format!(
        "f={}; n=$(cat $f 2>/dev/null | wc -l); \
         setsid sh -c \"echo \\$\\$ >> $f; exec sleep 0.3\" & \
         while [ $(cat $f 2>/dev/null | wc -l) -le $n ]; do sleep 0.01; done; exit 1",
        pids.display()
    );
    let handle = AgentHandle::spawn(launch(spec("daemonizer", &script, dir.path())));
    wait_status(&handle, "a few crashes", |s| s.restarts >= 5).await;
    handle.stop().await;
    let escaped = wait_lines(&pids, 5).await;
    let deadline = Instant::now() + EVENTUALLY;
    for pid in escaped {
        let pid: i32 = pid.trim().parse().expect("a pid");
        // A zombie still answers `kill(pid, 0)`: only reaping makes it go.
        while !pid_gone(pid) {
            assert!(
                Instant::now() < deadline,
                "escaped process {pid} is still there (a zombie nobody reaps)"
            );
            tokio::time::sleep(ms(20)).await;
        }
    }
    handle.shutdown().await;
    reaper.abort();
}

/// Each restart of a crashing agent waits at least the doubled delay.
#[tokio::test]
async fn crashing_agent_restarts_with_growing_delays() {
    let dir = setup();
    let starts = dir.path().join("starts");
    let script = format!("date +%s%N >> {}; exit 1", starts.display());
    let mut s = spec("crasher", &script, dir.path());
    s.restart.backoff_initial = ms(100);
    s.restart.backoff_max = Duration::from_secs(10);
    let handle = AgentHandle::spawn(launch(s));

    let lines = wait_lines(&starts, 5).await;
    let times: Vec<u128> = lines.iter().map(|l| nanos(l)).collect();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    for (i, (gap, min)) in gaps.iter().zip([100u128, 200, 400, 800]).enumerate() {
        assert!(
            *gap >= min,
            "gap {i} was {gap}ms, want >= {min}ms: {gaps:?}"
        );
    }
    assert!(gaps[3] > gaps[0], "gaps do not grow: {gaps:?}");

    let status = wait_status(
        &handle,
        "in backoff",
        |s| matches!(s.state, AgentState::Backoff { attempt, .. } if attempt >= 5),
    )
    .await;
    assert!(status.restarts >= 4, "{status:?}");
    assert_eq!(status.last_exit.map(|e| e.exit), Some(Exit::Code(1)));

    // `stop` during the backoff wait cancels the pending restart.
    handle.stop().await;
    assert_eq!(handle.status().state, AgentState::Stopped);
    let count = std::fs::read_to_string(&starts).unwrap().lines().count();
    tokio::time::sleep(Duration::from_secs(2)).await; // > the 1.6s pending delay
    let after = std::fs::read_to_string(&starts).unwrap().lines().count();
    assert_eq!(count, after, "restarted after stop");
    handle.shutdown().await;
}

#[tokio::test]
async fn never_policy_is_not_restarted() {
    let dir = setup();
    let starts = dir.path().join("starts");
    let mut s = spec(
        "once",
        &format!("echo x >> {}; exit 3", starts.display()),
        dir.path(),
    );
    s.restart.policy = RestartPolicy::Never;
    let handle = AgentHandle::spawn(launch(s));
    let status = wait_status(&handle, "exited", |s| {
        matches!(s.state, AgentState::Exited { .. })
    })
    .await;
    assert_eq!(
        status.state,
        AgentState::Exited {
            exit: Exit::Code(3)
        }
    );
    assert_eq!(status.restarts, 0);
    // Longer than the 20ms backoff would have been.
    tokio::time::sleep(ms(300)).await;
    assert_eq!(wait_lines(&starts, 1).await.len(), 1);
    assert_eq!(handle.status().restarts, 0);

    // `start` brings it back by hand.
    handle.start().await;
    assert_eq!(wait_lines(&starts, 2).await.len(), 2);
    handle.shutdown().await;
}

#[tokio::test]
async fn always_policy_restarts_after_a_clean_exit() {
    let dir = setup();
    let starts = dir.path().join("starts");
    let mut s = spec(
        "loop",
        &format!("echo x >> {}; exit 0", starts.display()),
        dir.path(),
    );
    s.restart.policy = RestartPolicy::Always;
    let handle = AgentHandle::spawn(launch(s));
    wait_lines(&starts, 3).await;
    let status = wait_status(&handle, "restarted twice", |s| s.restarts >= 2).await;
    assert_eq!(status.last_exit.map(|e| e.exit), Some(Exit::Code(0)));
    handle.shutdown().await;

    // The same clean exit under on-failure stays exited.
    let starts = dir.path().join("starts2");
    let s = spec(
        "done",
        &format!("echo x >> {}; exit 0", starts.display()),
        dir.path(),
    );
    let handle = AgentHandle::spawn(launch(s));
    let status = wait_status(&handle, "exited", |s| {
        matches!(s.state, AgentState::Exited { .. })
    })
    .await;
    assert_eq!(
        status.state,
        AgentState::Exited {
            exit: Exit::Code(0)
        }
    );
    handle.shutdown().await;
}

/// Runs longer than `reset_after` start the backoff over: every wait is the
/// first one (attempt 1), where crashes without healthy runs would count up.
#[tokio::test]
async fn backoff_resets_after_healthy_running() {
    let dir = setup();
    let starts = dir.path().join("starts");
    let script = format!("echo x >> {}; sleep 0.3; exit 1", starts.display());
    let mut s = spec("healthy-ish", &script, dir.path());
    s.restart.backoff_initial = ms(50);
    s.restart.reset_after = ms(200);
    let handle = AgentHandle::spawn(launch(s));

    let mut rx = handle.subscribe();
    let mut attempts = Vec::new();
    let watch = async {
        while attempts.len() < 3 {
            if rx.changed().await.is_err() {
                break;
            }
            if let AgentState::Backoff { attempt, .. } = rx.borrow_and_update().state {
                attempts.push(attempt);
            }
        }
    };
    tokio::time::timeout(EVENTUALLY, watch)
        .await
        .expect("three backoffs");
    assert_eq!(attempts, [1, 1, 1]);
    handle.shutdown().await;
}

/// A missing binary and a missing working directory are agent failures that
/// go through backoff; the handle keeps working and a fixed launch runs.
#[tokio::test]
async fn spawn_failures_back_off_and_the_handle_still_works() {
    let dir = setup();
    let mut missing = spec("ghost", "", dir.path());
    missing.command = vec!["/nonexistent/agent-binary".into(), "--flag".into()];
    let handle = AgentHandle::spawn(launch(missing));
    let status = wait_status(&handle, "retried", |s| {
        s.restarts >= 2 && matches!(s.state, AgentState::Backoff { .. })
    })
    .await;
    match status.last_exit.map(|e| e.exit) {
        Some(Exit::SpawnFailed(why)) => {
            assert!(why.contains("`/nonexistent/agent-binary`"), "{why}");
            assert!(why.contains("No such file"), "{why}");
        }
        other => panic!("want a spawn failure, got {other:?}"),
    }
    assert_eq!(status.pid, None);

    // Fix it with a new launch: restart resets backoff and runs it.
    let fixed = spec("ghost", "exec sleep 1000", dir.path());
    handle.restart(Some(launch(fixed))).await;
    let pgid = running_pid(&handle).await;
    handle.stop().await;
    assert!(group_gone(pgid));
    handle.shutdown().await;

    let bad_cwd = spec("lost", "true", &PathBuf::from("/nonexistent/dir"));
    let handle = AgentHandle::spawn(launch(bad_cwd));
    let status = wait_status(&handle, "backoff", |s| {
        matches!(s.state, AgentState::Backoff { .. }) && s.last_exit.is_some()
    })
    .await;
    match status.last_exit.map(|e| e.exit) {
        Some(Exit::SpawnFailed(why)) => {
            assert!(
                why.contains("working directory `/nonexistent/dir`"),
                "{why}"
            )
        }
        other => panic!("want a spawn failure, got {other:?}"),
    }
    handle.stop().await;
    assert_eq!(handle.status().state, AgentState::Stopped);
    handle.shutdown().await;
}

/// `restart` stops the old group before the new one starts, with the new
/// spec; `stop` then `start` brings a stopped agent back.
#[tokio::test]
async fn restart_and_start_after_stop() {
    let dir = setup();
    let out = dir.path().join("who");
    let script = format!("echo $VERSION >> {}; exec sleep 1000", out.display());
    let mut s = spec("svc", &script, dir.path());
    s.env.insert("VERSION".into(), "v1".into());
    let handle = AgentHandle::spawn(launch(s.clone()));
    let first = running_pid(&handle).await;
    // Let the first run write its line before it is replaced.
    wait_lines(&out, 1).await;

    s.env.insert("VERSION".into(), "v2".into());
    tokio::time::timeout(EVENTUALLY, handle.restart(Some(launch(s))))
        .await
        .expect("restart resolves");
    assert!(group_gone(first), "old group still alive after restart");
    let second = running_pid(&handle).await;
    assert_ne!(first, second);
    assert_eq!(wait_lines(&out, 2).await, ["v1", "v2"]);
    // The new run is left alone once the old one is gone (a regression: the
    // old leader's exit once sent the stop signal to its successor).
    tokio::time::sleep(ms(300)).await;
    let status = handle.status();
    assert!(
        matches!(status.state, AgentState::Running { .. }),
        "{status:?}"
    );
    assert_eq!((status.pid, status.restarts), (Some(second), 1));

    handle.stop().await;
    assert!(group_gone(second));
    assert_eq!(handle.status().state, AgentState::Stopped);
    handle.start().await;
    let third = running_pid(&handle).await;
    assert_ne!(third, second);
    assert_eq!(handle.status().restarts, 2);

    // A second handle's shutdown while this one holds a clone: both finish.
    let other = handle.clone();
    handle.shutdown().await;
    assert!(group_gone(third));
    tokio::time::timeout(EVENTUALLY, other.stop())
        .await
        .expect("verbs after shutdown return");
}
