//! README "Live control" and "Commands": every CLI command gives the right
//! answer while fleet.yaml is broken — a YAML syntax error, an alias bomb,
//! bytes that are not UTF-8, the file deleted, the file replaced by a FIFO —
//! against a running supervisor whose `state_dir` is not the default. Also:
//! reading a FIFO never blocks (`check`, `run`, a reload, the budget
//! overlay), a corrupt `ledger.db` stops `run` with exit 65, and what the
//! supervisor creates is private whatever the umask. Real binary, real files.

mod common;

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use agent_supervisor::ledger::{QuarantineRecord, put_quarantine};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const GOOD: &str = "version: 1
state_dir: state
vault: { backend: dir, path: secrets }
agents:
  a:
    command: [sh, -c, 'echo $$ > a.pid; exec sleep 1000']
    stop: { grace: 2s }
    budget: { monthly_tokens: 5M, monthly_usd: 20 }
";

fn alias_bomb() -> String {
    let mut text = String::from("version: 1\nstate_dir: state\n");
    text.push_str("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("agents: { a: { command: [sleep, '1'] } }\n");
    text
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Breakage {
    Syntax,
    AliasBomb,
    NotUtf8,
    Deleted,
    Fifo,
}

impl Breakage {
    const ALL: [Breakage; 5] = [
        Breakage::Syntax,
        Breakage::AliasBomb,
        Breakage::NotUtf8,
        Breakage::Deleted,
        Breakage::Fifo,
    ];

    fn apply(self, fleet: &FleetDir) {
        let path = fleet.file("fleet.yaml");
        let _ = std::fs::remove_file(&path);
        match self {
            Breakage::Syntax => {
                fleet.write_fleet("version: 1\nstate_dir: state\nagents:\n  a: [\n    - : :\n")
            }
            Breakage::AliasBomb => fleet.write_fleet(&alias_bomb()),
            Breakage::NotUtf8 => std::fs::write(
                &path,
                b"version: 1\nstate_dir: state\nagents:\n  a\xff:\n    command: [sleep, '1']\n",
            )
            .unwrap(),
            Breakage::Deleted => {}
            Breakage::Fifo => mkfifo(&path),
        }
    }

    /// What the running supervisor's rejection says, and whether it has a
    /// `file:line:col` location.
    fn rejection(self) -> (&'static str, bool) {
        match self {
            Breakage::Syntax => ("invalid YAML", true),
            Breakage::AliasBomb => ("too large or too complex", true),
            Breakage::NotUtf8 => ("not UTF-8", true),
            Breakage::Deleted => ("No such file", false),
            Breakage::Fifo => ("FIFO", false),
        }
    }

    /// Whether the file still shows its `state_dir:` line.
    fn keeps_state_dir_line(self) -> bool {
        !matches!(self, Breakage::Deleted | Breakage::Fifo)
    }
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// Runs the CLI with its own per-user runtime folder (`XDG_RUNTIME_DIR`),
/// as a shell of the supervisor's user would, outside systemd.
fn cli(fleet: &FleetDir, xdg: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .env("XDG_RUNTIME_DIR", xdg)
        // Not this host's service, if it runs one.
        .env("SUPERVISOR_UNIT_RUNTIME_DIR", "/nonexistent/run")
        .env("SUPERVISOR_UNIT_STATE_DIR", "/nonexistent/state");
    // Well under the client's own patience (a reload waits up to 40s): an
    // answer this late would mean a read blocked somewhere.
    output_within(cmd, Duration::from_secs(20), &args.join(" "))
}

/// Runs `cmd` to completion, failing the test (and killing it) if it takes
/// longer than `limit`: a blocked read must fail the test, not hang it.
fn output_within(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let out = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("run the CLI");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`supervisor {what}` did not answer within {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&stdout).unwrap(),
        stderr: std::fs::read(&stderr).unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn expect(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out.stdout)))
}

/// `file:line:col: ` of the fleet file somewhere in `stderr`.
fn has_location(stderr: &str, fleet: &Path) -> bool {
    let prefix = format!("{}:", fleet.display());
    stderr.lines().any(|line| {
        line.strip_prefix(&prefix).is_some_and(|rest| {
            let mut parts = rest.splitn(3, ':');
            let line_no = parts.next().is_some_and(|p| p.parse::<u32>().is_ok());
            let col = parts.next().is_some_and(|p| p.parse::<u32>().is_ok());
            line_no && col
        })
    })
}

fn xdg_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

#[test]
fn every_command_answers_while_fleet_yaml_is_broken() {
    let fleet = FleetDir::new();
    std::fs::create_dir_all(fleet.file("secrets")).unwrap();
    std::fs::set_permissions(
        fleet.file("secrets"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    fleet.write_fleet(GOOD);
    let xdg = xdg_dir();
    let xdg_str = xdg.path().to_str().unwrap();
    let sup = fleet.run(&[("XDG_RUNTIME_DIR", xdg_str)]);
    sup.wait_log("control socket listening");
    let mut pid = fleet.wait_pid("a");
    let state = fleet.file("state");
    assert!(state.join("control.sock").exists(), "state_dir is `state`");
    assert!(!fleet.file(".supervisor").exists(), "not the default");
    put_quarantine(
        &state,
        &QuarantineRecord {
            agent: "q".into(),
            since_ms: 1_700_000_000_000,
            reason: "failing_retries".into(),
            evidence: serde_json::json!({"steps": []}),
        },
    )
    .unwrap();
    // Another fleet file with the same state dir reaches the same
    // supervisor, which answers for its own file: the CLI says so.
    std::fs::write(fleet.file("other.yaml"), GOOD).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["status", "-f"])
        .arg(fleet.file("other.yaml"))
        .env("XDG_RUNTIME_DIR", xdg.path());
    let out = output_within(cmd, Duration::from_secs(20), "status -f other.yaml");
    expect(&out, 0, "status -f other.yaml");
    assert!(
        text(&out.stderr).contains(&format!(
            "runs `{}`, not `{}`",
            std::fs::canonicalize(fleet.path())
                .unwrap()
                .join("fleet.yaml")
                .display(),
            fleet.file("other.yaml").display()
        )),
        "{}",
        text(&out.stderr)
    );
    // A CLI that has no discovery record (another runtime folder) still
    // finds it through the `state_dir:` line.
    let elsewhere = xdg_dir();
    let fleet_file = fleet.file("fleet.yaml");

    for breakage in Breakage::ALL {
        breakage.apply(&fleet);
        let what = |cmd: &str| format!("{breakage:?}: `{cmd}`");

        let out = cli(&fleet, xdg.path(), &["reload"]);
        expect(&out, 1, &what("reload"));
        let err = text(&out.stderr);
        let (says, located) = breakage.rejection();
        assert!(
            err.starts_with("error: reload rejected; the running fleet is unchanged\n"),
            "{}: {err}",
            what("reload")
        );
        assert!(err.contains(says), "{}: {err}", what("reload"));
        assert_eq!(has_location(&err, &fleet_file), located, "{err}");

        let out = cli(&fleet, xdg.path(), &["status", "--json"]);
        expect(&out, 0, &what("status"));
        assert_eq!(json(&out)[0]["pid"], pid, "{}", what("status"));
        assert!(
            text(&out.stderr).contains("using the running supervisor's"),
            "{}: {}",
            what("status"),
            text(&out.stderr)
        );

        let out = cli(&fleet, xdg.path(), &["usage", "--json"]);
        expect(&out, 0, &what("usage"));
        let rows = json(&out);
        let a = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["agent"] == "a")
            .unwrap_or_else(|| panic!("{}: {rows}", what("usage")));
        assert_eq!(a["ceilings_from"], "running_supervisor", "{a}");
        assert_eq!(a["monthly_tokens_ceiling"], 5_000_000, "{a}");
        assert_eq!(a["monthly_usd_ceiling"], 20.0, "{a}");
        assert!(text(&out.stderr).contains("the ceilings shown are the running supervisor's"));

        let out = cli(&fleet, xdg.path(), &["quarantine", "--json"]);
        expect(&out, 0, &what("quarantine"));
        assert_eq!(json(&out)[0]["agent"], "q", "{}", what("quarantine"));

        let out = cli(&fleet, xdg.path(), &["tune", "--json"]);
        expect(&out, 0, &what("tune"));
        assert_eq!(json(&out)["current_from"], "running_supervisor");

        let out = cli(&fleet, xdg.path(), &["tune", "--apply"]);
        expect(&out, 1, &what("tune --apply"));
        assert!(text(&out.stderr).contains("nothing was written"));
        assert!(!fleet.file("fleet.budgets.yaml").exists());

        let out = cli(&fleet, xdg.path(), &["rotate", "--history", "--json"]);
        expect(&out, 0, &what("rotate --history"));
        assert_eq!(json(&out), serde_json::json!([]));

        let out = cli(&fleet, xdg.path(), &["release", "q"]);
        expect(&out, 1, &what("release"));
        assert!(text(&out.stderr).contains("nothing was released"));

        std::fs::remove_file(fleet.file("a.pid")).unwrap();
        let out = cli(&fleet, xdg.path(), &["restart", "a"]);
        expect(&out, 0, &what("restart"));
        let restarted = fleet.wait_pid("a");
        assert_ne!(restarted, pid, "{}", what("restart"));
        pid = restarted;

        // Without the record: the `state_dir:` line, when the file has one.
        let out = cli(&fleet, elsewhere.path(), &["reload"]);
        let err = text(&out.stderr);
        if breakage.keeps_state_dir_line() {
            expect(&out, 1, &what("reload, no record"));
            assert!(
                err.contains("reload rejected") && err.contains(says),
                "{err}"
            );
            let out = cli(&fleet, elsewhere.path(), &["status", "--json"]);
            expect(&out, 0, &what("status, no record"));
            assert!(text(&out.stderr).contains("its `state_dir:` line names"));
        } else {
            // Nothing says where it runs: "not running", and why the file
            // cannot say either.
            expect(&out, 3, &what("reload, no record"));
            assert!(
                err.contains("no supervisor is running") && err.contains(says),
                "{err}"
            );
        }
        assert!(process_alive(pid), "{breakage:?}: the agent keeps running");
    }

    // The budget overlay as a FIFO: refused, not waited on.
    std::fs::remove_file(&fleet_file).unwrap();
    fleet.write_fleet(GOOD);
    mkfifo(&fleet.file("fleet.budgets.yaml"));
    let out = cli(&fleet, xdg.path(), &["reload"]);
    expect(&out, 1, "reload with a FIFO overlay");
    assert!(text(&out.stderr).contains("fleet.budgets.yaml"));
    assert!(text(&out.stderr).contains("FIFO"));
    std::fs::remove_file(fleet.file("fleet.budgets.yaml")).unwrap();
    let out = cli(&fleet, xdg.path(), &["reload"]);
    expect(&out, 0, "reload once the file is fixed");
    assert!(text(&out.stdout).contains("unchanged: 1 agent"));
    assert!(process_alive(pid));

    // Once it has stopped: usage still reads the ledger, and says that
    // ceilings are unknown rather than showing none.
    let mut sup = sup;
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
    Breakage::Syntax.apply(&fleet);
    let out = cli(&fleet, xdg.path(), &["usage", "--json"]);
    expect(&out, 0, "usage, nothing running");
    let rows = json(&out);
    let a = rows.as_array().unwrap().iter().find(|r| r["agent"] == "a");
    assert!(
        a.is_none(),
        "no request was made, so no row for `a`: {rows}"
    );
    assert!(text(&out.stderr).contains("ceilings are unavailable"));
    let out = cli(&fleet, xdg.path(), &["status"]);
    expect(&out, 3, "status, nothing running");
    assert!(text(&out.stderr).contains("invalid YAML"));
}

/// The shipped unit's layout, simulated: fleet.yaml names no state dir
/// (the service relies on `$STATE_DIRECTORY`), the service has a private
/// /tmp and no `$XDG_RUNTIME_DIR`, and a host shell has neither
/// `$RUNTIME_DIRECTORY` nor `$STATE_DIRECTORY`. The shell's CLI finds the
/// service through the unit's runtime folder (its record), else through the
/// unit's state dir, with the file valid or broken; the well-known folders
/// are temp dirs here, named by the test-only overrides.
#[test]
fn a_host_shell_finds_the_systemd_service() {
    const NO_STATE_DIR: &str = "version: 1
vault: { backend: dir, path: secrets }
agents:
  a:
    command: [sh, -c, 'echo $$ > a.pid; exec sleep 1000']
    stop: { grace: 2s }
    budget: { monthly_tokens: 5M, monthly_usd: 20 }
";
    let fleet = FleetDir::new();
    std::fs::create_dir_all(fleet.file("secrets")).unwrap();
    std::fs::set_permissions(
        fleet.file("secrets"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    fleet.write_fleet(NO_STATE_DIR);
    // /run/agent-supervisor, /var/lib/agent-supervisor, the private /tmp.
    let (run, state, private_tmp) = (xdg_dir(), xdg_dir(), xdg_dir());
    let sup = fleet.run(&[
        ("RUNTIME_DIRECTORY", run.path().to_str().unwrap()),
        ("STATE_DIRECTORY", state.path().to_str().unwrap()),
        ("TMPDIR", private_tmp.path().to_str().unwrap()),
        ("XDG_RUNTIME_DIR", ""),
    ]);
    sup.wait_log("control socket listening");
    let pid = fleet.wait_pid("a");
    assert!(run.path().join("control.sock").exists());
    let fleet_file = fleet.file("fleet.yaml");
    let host_tmp = xdg_dir();
    let missing = xdg_dir();
    // A root shell: its own /tmp, no runtime folder of its own.
    let shell = |unit_run: &Path, unit_state: &Path, args: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .arg("-f")
            .arg(&fleet_file)
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("STATE_DIRECTORY")
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", host_tmp.path())
            .env("SUPERVISOR_UNIT_RUNTIME_DIR", unit_run)
            .env("SUPERVISOR_UNIT_STATE_DIR", unit_state);
        output_within(cmd, Duration::from_secs(20), &args.join(" "))
    };
    let nowhere = missing.path().join("none");
    // (how it is found, the unit's runtime folder, the unit's state dir)
    let ways = [
        ("the record", run.path(), nowhere.as_path()),
        ("the state dir", nowhere.as_path(), state.path()),
    ];
    for (way, unit_run, unit_state) in ways {
        let what = |cmd: &str, file: &str| format!("{cmd} via {way}, {file} file");

        fleet.write_fleet(NO_STATE_DIR);
        let out = shell(unit_run, unit_state, &["status", "--json"]);
        expect(&out, 0, &what("status", "valid"));
        assert_eq!(json(&out)[0]["pid"], pid, "{}", what("status", "valid"));
        let out = shell(unit_run, unit_state, &["reload"]);
        expect(&out, 0, &what("reload", "valid"));
        assert!(text(&out.stdout).contains("unchanged: 1 agent"));
        let out = shell(unit_run, unit_state, &["usage", "--json"]);
        expect(&out, 0, &what("usage", "valid"));
        assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));

        std::fs::write(&fleet_file, "version: 1\nagents:\n  a: [\n    - : :\n").unwrap();
        let out = shell(unit_run, unit_state, &["reload"]);
        expect(&out, 1, &what("reload", "broken"));
        let err = text(&out.stderr);
        assert!(err.starts_with("error: reload rejected"), "{err}");
        assert!(has_location(&err, &fleet_file), "{err}");
        let out = shell(unit_run, unit_state, &["status", "--json"]);
        expect(&out, 0, &what("status", "broken"));
        assert_eq!(json(&out)[0]["pid"], pid);
        let says = match way {
            "the record" => "using the running supervisor's".to_owned(),
            _ => format!(
                "using the state dir of the agent-supervisor service, `{}`",
                state.path().display()
            ),
        };
        assert!(text(&out.stderr).contains(&says), "{}", text(&out.stderr));
        let out = shell(unit_run, unit_state, &["usage", "--json"]);
        expect(&out, 0, &what("usage", "broken"));
        assert!(
            !text(&out.stderr).contains("ceilings are unavailable"),
            "{}",
            text(&out.stderr)
        );
    }
    assert!(!fleet.file(".supervisor").exists(), "never the default");

    // A runtime folder someone else could write in is not believed.
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
    let out = shell(run.path(), &nowhere, &["reload"]);
    expect(&out, 3, "reload, group-writable runtime folder");
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // Nor a record someone else could have written.
    let record = std::fs::read_dir(run.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("the service's record in its runtime folder");
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o622)).unwrap();
    let out = shell(run.path(), &nowhere, &["reload"]);
    expect(&out, 3, "reload, group-writable record");
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = shell(run.path(), &nowhere, &["reload"]);
    expect(&out, 1, "reload, record private again");

    // Its records go with it.
    let mut sup = sup;
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
    assert!(!record.exists(), "the record is removed on exit");
}

/// `check` and `run` on a FIFO fail at once with a clear message instead of
/// waiting for a writer that never comes.
#[test]
fn check_and_run_refuse_a_fifo_at_once() {
    let fleet = FleetDir::new();
    mkfifo(&fleet.file("fleet.yaml"));
    for (args, code) in [(&["check"][..], 1), (&["run", "--log-format", "plain"], 78)] {
        let mut cmd = Command::new(bin());
        cmd.args(args).arg("-f").arg(fleet.file("fleet.yaml"));
        let out = output_within(cmd, Duration::from_secs(20), args[0]);
        let status = out.status;
        assert_eq!(status.code(), Some(code), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "error: cannot read `{}`",
                fleet.file("fleet.yaml").display()
            )) && err.contains("caused by: it is a FIFO (named pipe), not a regular file"),
            "{err}"
        );
    }
}

/// A `ledger.db` that is not a database stops `run` with 65, which the
/// shipped unit does not retry, and a hint about recovery; the journal is
/// left in place.
#[test]
fn a_corrupt_ledger_exits_65_with_a_recovery_hint() {
    let fleet = FleetDir::new();
    fleet
        .write_fleet("version: 1\nstate_dir: state\nagents:\n  a:\n    command: [sleep, '1000']\n");
    let state = fleet.file("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(state.join("ledger.db"), &garbage).unwrap();
    let journal = b"{\"v\":1,\"id\":1}\n";
    std::fs::write(state.join("ledger.journal"), journal).unwrap();
    let mut sup = fleet.run(&[]);
    let status = sup.wait_exit();
    let log = sup.log();
    assert_eq!(status.code(), Some(65), "{log}");
    assert!(log.contains("ledger.db` is corrupt"), "{log}");
    assert!(log.contains("move `ledger.db`"), "{log}");
    assert!(!log.contains("permission"), "{log}");
    assert_eq!(
        std::fs::read(state.join("ledger.journal")).unwrap(),
        journal
    );
    // The read-only commands say the same.
    let out = Command::new(bin())
        .args(["usage", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is corrupt"),
        "{}",
        text(&out.stderr)
    );
    // The shipped unit does not restart it.
    let unit = std::fs::read_to_string(repo_file("systemd/agent-supervisor.service")).unwrap();
    let prevent = unit
        .lines()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .unwrap();
    assert!(prevent.split_whitespace().any(|c| c == "65"), "{prevent}");
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        out.push(path.clone());
        if entry.file_type().unwrap().is_dir() {
            walk(&path, out);
        }
    }
}

/// Under `umask 000`, everything the supervisor and its CLI create is
/// private: folders 0700, files and the socket 0600.
#[test]
fn what_the_supervisor_creates_is_private_whatever_the_umask() {
    let fleet = FleetDir::new();
    fleet.write_fleet(
        "version: 1\nstate_dir: state\nagents:\n  a:\n    command: [sh, -c, 'echo $$ > a.pid; exec sleep 1000']\n    stop: { grace: 2s }\n",
    );
    let xdg = xdg_dir();
    let log = std::fs::File::create(fleet.file("supervisor.log")).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--log-format", "plain", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .env("XDG_RUNTIME_DIR", xdg.path())
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let mut sup = Supervisor {
        child,
        log: fleet.file("supervisor.log"),
    };
    sup.wait_log("control socket listening");
    fleet.wait_pid("a");
    let state = fleet.file("state");
    wait_for("the agent's pid record", || {
        state.join("agents/a.json").exists().then_some(())
    });
    // `tune --apply` writes the overlay, also under umask 000.
    let mut tune = Command::new(bin());
    tune.args(["tune", "--apply", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .env("XDG_RUNTIME_DIR", xdg.path());
    // SAFETY: as above.
    unsafe {
        tune.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = tune.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut created = vec![state.clone()];
    walk(&state, &mut created);
    for name in [
        "ledger.db",
        "ledger.db-wal",
        "ledger.db-shm",
        "ledger.journal",
    ] {
        assert!(created.contains(&state.join(name)), "{name} in {created:?}");
    }
    walk(xdg.path(), &mut created);
    created.push(fleet.file("fleet.budgets.yaml"));
    for path in &created {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert!(
            meta.is_dir() || meta.is_file() || meta.file_type().is_socket(),
            "{}",
            path.display()
        );
        assert_eq!(mode(path), want, "{}", path.display());
    }
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}
