//! README "Threat model": the supervisor is not dumpable, and agents run as
//! different users (`user:`/`group:`) cannot read each other's
//! `/proc/PID/environ`, which a process of the same user can. As root (CI)
//! these tests create throwaway users and run the supervisor as `nobody`
//! where they need a non-root one; as any other user they run the same
//! checks with the supervisor as themselves, and the refusal of `user:`.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use common::*;
use nix::sys::signal::Signal;
use nix::unistd::{Uid, User, getgid, getuid};

const NOBODY: (u32, u32) = (65534, 65534);

fn is_root() -> bool {
    Uid::effective().is_root()
}

/// A system user that exists for one test; removed on drop.
struct ThrowawayUser {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

impl ThrowawayUser {
    fn create(tag: &str) -> Self {
        let name = format!("supt{}{tag}", std::process::id());
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin", &name])
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {name} failed");
        let user = User::from_name(&name)
            .expect("look up the new user")
            .expect("the new user exists");
        Self {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir.display().to_string(),
            name,
        }
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        // A failed test may leave its agents behind (the supervisor was
        // killed); they are this user's only processes, and userdel refuses
        // a user with processes.
        for pid in pids_of_uid(self.uid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = Command::new("userdel").arg(&self.name).status();
        // With USERGROUPS_ENAB the group goes with the user; if not, now.
        let _ = Command::new("groupdel")
            .arg(&self.name)
            .stderr(Stdio::null())
            .status();
    }
}

/// Processes whose real uid is `uid`.
fn pids_of_uid(uid: u32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| status_ids(*pid, "Uid").split(' ').next() == Some(uid.to_string().as_str()))
        .collect()
}

/// `cat PATH` as `who` (uid, gid), or as ourselves.
fn read_as(who: Option<(u32, u32)>, path: &str) -> Output {
    let mut cmd = Command::new("cat");
    cmd.arg(path);
    if let Some((uid, gid)) = who {
        cmd.uid(uid).gid(gid);
    }
    cmd.output().expect("run cat")
}

/// Lets `uid` read the fleet directory and write its state there.
fn hand_over(fleet: &FleetDir, (uid, gid): (u32, u32)) {
    for path in [fleet.path().to_owned(), fleet.file("fleet.yaml")] {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
    }
    fs::set_permissions(fleet.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// `supervisor ARGS -f fleet.yaml` as `who`, or as ourselves, logging to `supervisor.log`.
fn supervisor_as(fleet: &FleetDir, who: Option<(u32, u32)>, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .args(["-f", "fleet.yaml"])
        .current_dir(fleet.path())
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null());
    if let Some((uid, gid)) = who {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn run_as(fleet: &FleetDir, who: Option<(u32, u32)>) -> Supervisor {
    let log = fleet.file("supervisor.log");
    let out = fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("clone log");
    let child = supervisor_as(fleet, who, &["run", "--log-format", "plain"])
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn supervisor");
    Supervisor { child, log }
}

fn status_ids(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|ids| ids.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A non-dumpable process's `/proc/PID` entries belong to root, and a
/// process of its own user cannot read its environment; its agents, being
/// exec'd afresh, are dumpable and readable by their own user as usual.
#[test]
fn the_supervisor_is_not_dumpable_and_its_agents_still_run() {
    let fleet = FleetDir::new();
    fleet.write_fleet(
        "version: 1\nagents:\n  a:\n    command: [sh, -c, 'echo $$ > a.pid; exec sleep 1000']\n",
    );
    // Root may read anything: the supervisor runs as `nobody` then.
    let who = is_root().then_some(NOBODY);
    let (uid, _) = who.unwrap_or((getuid().as_raw(), getgid().as_raw()));
    if let Some(who) = who {
        hand_over(&fleet, who);
    }
    let mut sup = run_as(&fleet, who);
    let agent = fleet.wait_pid("a");
    let me = sup.pid();
    assert_eq!(status_ids(me, "Uid"), format!("{uid} {uid} {uid} {uid}"));

    let environ = format!("/proc/{me}/environ");
    let owner = fs::metadata(&environ).expect("stat environ").uid();
    assert_eq!(owner, 0, "the supervisor (uid {uid}) is non-dumpable");
    let denied = read_as(who, &environ);
    assert!(
        !denied.status.success(),
        "its own user read its environment"
    );
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{denied:?}"
    );

    let agent_environ = format!("/proc/{agent}/environ");
    assert_eq!(fs::metadata(&agent_environ).expect("stat").uid(), uid);
    let read = read_as(who, &agent_environ);
    assert!(read.status.success(), "{read:?}");
    assert!(String::from_utf8_lossy(&read.stdout).contains("SUPERVISOR_AGENT=a"));

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}

/// Only root can start a child as another user: `run` refuses the fleet
/// with a located error and the config exit code; `check` passes it with a
/// warning (it may be checked as a user and run as root).
#[test]
fn user_needs_a_supervisor_running_as_root() {
    let fleet = FleetDir::new();
    fleet.write_fleet(
        "version: 1\nagents:\n  a:\n    command: [sh, -c, 'exit 0']\n    user: root\n",
    );
    // As root, the non-root path is taken as `nobody`.
    let who = is_root().then_some(NOBODY);
    let uid = who.map_or(getuid().as_raw(), |(uid, _)| uid);
    if let Some(who) = who {
        hand_over(&fleet, who);
    }
    let problem = format!(
        "fleet.yaml:5:11: agent \"a\": `user`: running an agent as another user needs the supervisor \
         to run as root, but it runs as uid {uid} (hint: run the supervisor as root, e.g. as a system \
         service, or remove `user` and `group`)"
    );

    let run = supervisor_as(&fleet, who, &["run"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains(&problem), "{stderr}");

    let check = supervisor_as(&fleet, who, &["check"])
        .output()
        .expect("check");
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{stderr}");
    assert_eq!(stderr, format!("warning: {problem}\n"));

    if is_root() {
        let check = supervisor_as(&fleet, None, &["check"])
            .output()
            .expect("check");
        assert!(check.status.success());
        assert_eq!(
            String::from_utf8_lossy(&check.stderr),
            "",
            "no warning as root"
        );
    }
}

/// Two agents as two users: each runs with its user's uid, groups, `HOME`
/// and `USER`; neither can read the other's environment (a process of the
/// same user can). An agent whose `cwd` its user cannot enter fails to
/// start, with a clear error, and is retried like any failed start.
#[test]
fn agents_of_different_users_cannot_read_each_others_environment() {
    if !is_root() {
        // Not root here: the same fleet is refused, one problem per agent.
        let fleet = FleetDir::new();
        fleet.write_fleet(
            "version: 1\nagents:\n  alpha:\n    command: [x]\n    user: root\n  bravo:\n    command: [x]\n    user: '0'\n    group: '0'\n",
        );
        let run = supervisor_as(&fleet, None, &["run"]).output().expect("run");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains("(2 problems)"), "{stderr}");
        assert_eq!(
            stderr
                .matches("needs the supervisor to run as root")
                .count(),
            2
        );
        return;
    }
    let a = ThrowawayUser::create("a");
    let b = ThrowawayUser::create("b");
    let fleet = FleetDir::new();
    fs::set_permissions(fleet.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    for (dir, owner) in [("alpha", Some(&a)), ("bravo", Some(&b)), ("locked", None)] {
        let path = fleet.file(dir);
        fs::create_dir(&path).expect("mkdir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod");
        if let Some(user) = owner {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid)).expect("chown");
        }
    }
    fleet.write_secret("alpha", "token", "alpha-only-secret-8d1e");
    fleet.write_secret("bravo", "token", "bravo-only-secret-4c7a");
    let script = "echo $$ > pid; env > env.txt; id -G > groups.txt; exec sleep 1000";
    fleet.write_fleet(&format!(
        "version: 1
agents:
  alpha:
    command: [sh, -c, '{script}']
    cwd: alpha
    user: {a_name}
    secrets: {{ TOKEN: token }}
  bravo:
    command: [sh, -c, '{script}']
    cwd: bravo
    user: {b_uid}
    group: {b_name}
    secrets: {{ TOKEN: token }}
  locked:
    command: [sh, -c, 'exit 0']
    cwd: locked
    user: {a_name}
",
        a_name = a.name,
        b_uid = b.uid,
        b_name = b.name,
    ));
    let mut sup = fleet.run(&[]);
    let pid_of = |dir: &str| {
        wait_for(&format!("{dir}/pid"), || {
            fleet
                .read(&format!("{dir}/pid"))?
                .trim()
                .parse::<i32>()
                .ok()
        })
    };
    let (alpha, bravo) = (pid_of("alpha"), pid_of("bravo"));

    for (pid, dir, user) in [(alpha, "alpha", &a), (bravo, "bravo", &b)] {
        let (uid, gid) = (user.uid, user.gid);
        assert_eq!(status_ids(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
        assert_eq!(status_ids(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
        assert_eq!(
            status_ids(pid, "Groups"),
            gid.to_string(),
            "initgroups' list"
        );
        let env = wait_for("env.txt", || {
            fleet
                .read(&format!("{dir}/env.txt"))
                .filter(|t| t.contains("SUPERVISOR_AGENT"))
        });
        let has = |line: String| env.lines().any(|l| l == line);
        assert!(has(format!("USER={}", user.name)), "{env}");
        assert!(has(format!("HOME={}", user.home)), "{env}");
        // Written after env.txt: wait for the whole line.
        let groups = wait_for("groups.txt", || {
            fleet
                .read(&format!("{dir}/groups.txt"))
                .filter(|t| t.ends_with('\n'))
        });
        assert_eq!(groups.trim(), gid.to_string());
    }

    let environ = |pid: i32| format!("/proc/{pid}/environ");
    // The same user can read an agent's environment: why users matter.
    let own = read_as(Some((a.uid, a.gid)), &environ(alpha));
    assert!(own.status.success(), "{own:?}");
    assert!(String::from_utf8_lossy(&own.stdout).contains("alpha-only-secret-8d1e"));
    // Another user cannot.
    for (reader, pid) in [(&a, bravo), (&b, alpha)] {
        let out = read_as(Some((reader.uid, reader.gid)), &environ(pid));
        assert!(
            !out.status.success(),
            "{} read {pid}'s environment",
            reader.name
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("only-secret"));
    }

    // `locked` is root's 0700 directory: user a cannot enter it; nothing is chowned.
    let message = format!(
        "cannot start agent: cannot start `sh` in `{}` as user `{}` (uid {}): Permission denied (os error 13)",
        fleet.file("locked").display(),
        a.name,
        a.uid
    );
    wait_for("the failed start to be retried", || {
        let log = sup.log();
        (log.matches(&message).count() >= 2 && log.contains("retrying in")).then_some(())
    });
    let locked = fs::metadata(fleet.file("locked")).expect("stat");
    assert_eq!((locked.uid(), locked.mode() & 0o777), (0, 0o700));

    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}

/// README "Threat model": the control socket answers only the supervisor's
/// own user and root. Its mode (0600, in a 0700 directory) already keeps
/// other users out; the peer-uid check behind it holds even when those
/// permissions are loosened by mistake. As root the supervisor runs as
/// `nobody` and a throwaway user knocks; as anyone else, the own-user path.
#[test]
fn the_control_socket_answers_only_its_own_user_and_root() {
    let fleet = FleetDir::new();
    fleet.write_fleet("version: 1\nagents:\n  a:\n    command: [sleep, '1000']\n");
    let who = is_root().then_some(NOBODY);
    let (uid, _) = who.unwrap_or((getuid().as_raw(), getgid().as_raw()));
    if let Some(who) = who {
        hand_over(&fleet, who);
    }
    let mut sup = run_as(&fleet, who);
    sup.wait_log("control socket listening");
    let socket = fleet.file(".supervisor/control.sock");
    let meta = fs::metadata(&socket).expect("stat the socket");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));

    let status_as = |as_who: Option<(u32, u32)>| {
        supervisor_as(&fleet, as_who, &["status", "--json"])
            .output()
            .expect("run supervisor status")
    };
    let own = status_as(who);
    assert!(own.status.success(), "{own:?}");
    assert!(String::from_utf8_lossy(&own.stdout).contains("\"agent\": \"a\""));

    if is_root() {
        let stranger = ThrowawayUser::create("peer");
        let stranger_id = Some((stranger.uid, stranger.gid));
        // The stranger may read the fleet file (to find the socket) whatever
        // the umask made of it.
        fs::set_permissions(fleet.file("fleet.yaml"), fs::Permissions::from_mode(0o644))
            .expect("chmod fleet.yaml");
        // As installed: the file mode stops the stranger at connect(2).
        let out = status_as(stranger_id);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("Permission denied"), "{err}");
        assert!(
            err.contains("hint: run the command as the user the supervisor runs as (or as root)"),
            "{err}"
        );

        // Loosened by mistake: the stranger connects, and the peer check refuses.
        fs::set_permissions(fleet.file(".supervisor"), fs::Permissions::from_mode(0o755))
            .expect("chmod the state dir");
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).expect("chmod the socket");
        let out = status_as(stranger_id);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "permission denied: only uid {uid} (the supervisor's user) or root may use the control socket"
            )),
            "{err}"
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "no status leaked");
        let refused = format!("uid={}", stranger.uid);
        sup.wait_log(&refused);
        assert!(sup.log().contains("refused a connection from another user"));

        // Root is always let in.
        let root = status_as(None);
        assert!(root.status.success(), "{root:?}");
    }
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}

/// README "Live control": root's CLI finds a supervisor a user runs by hand
/// through that user's discovery record (in `$TMPDIR/agent-supervisor-UID`),
/// whether the fleet file loads or not, though nothing else says where its
/// state dir is. As another user, the supervisor runs as that user and is
/// found through the CLI's own folder.
#[test]
fn root_finds_a_supervisor_another_user_runs() {
    let fleet = FleetDir::new();
    let good =
        "version: 1\nagents:\n  a:\n    command: [sh, -c, 'echo $$ > a.pid; exec sleep 1000']\n";
    fleet.write_fleet(good);
    let who = is_root().then_some(NOBODY);
    // A shared /tmp, and a state dir only the fleet's `STATE_DIRECTORY` names.
    let tmp = tempfile::tempdir().expect("tmp");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o1777)).expect("chmod");
    let state = tempfile::tempdir().expect("state");
    fs::set_permissions(state.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    if let Some(who) = who {
        hand_over(&fleet, who);
        std::os::unix::fs::chown(state.path(), Some(who.0), Some(who.1)).expect("chown");
    }
    let log = fleet.file("supervisor.log");
    let out = fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("clone log");
    let child = supervisor_as(&fleet, who, &["run", "--log-format", "plain"])
        .env("STATE_DIRECTORY", state.path())
        .env("TMPDIR", tmp.path())
        .env("XDG_RUNTIME_DIR", "")
        .env_remove("RUNTIME_DIRECTORY")
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn supervisor");
    let mut sup = Supervisor { child, log };
    sup.wait_log("control socket listening");
    let agent = fleet.wait_pid("a");
    let cli = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .arg("-f")
            .arg(fleet.file("fleet.yaml"))
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", tmp.path())
            .env("SUPERVISOR_UNIT_RUNTIME_DIR", "/nonexistent/run")
            .env("SUPERVISOR_UNIT_STATE_DIR", "/nonexistent/state")
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI")
    };
    let broken = "version: 1\nagents:\n  a: [\n    - : :\n";
    for (file, status_code, reload_code) in [(good, 0, 0), (broken, 0, 1)] {
        fs::write(fleet.file("fleet.yaml"), file).expect("write fleet.yaml");
        let out = cli(&["status", "--json"]);
        assert_eq!(out.status.code(), Some(status_code), "{out:?}");
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON rows");
        assert_eq!(rows[0]["pid"], agent, "{rows}");
        let out = cli(&["reload"]);
        assert_eq!(out.status.code(), Some(reload_code), "{out:?}");
    }
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success(), "{}", sup.log());
}
