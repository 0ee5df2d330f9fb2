//! What a child process is started with: its environment, its `Command`, and
//! the words used when it cannot be started. Owns the isolation rule that a
//! child sees only an allow-list of the supervisor's environment plus what its
//! own spec declares, and runs as the account its spec names (`user:`), if
//! any. Must not read the process environment itself (callers pass it in),
//! must never put a secret in argv or in an error, and changes no file's
//! ownership or mode to make an agent runnable.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::fleet::{AgentSpec, RunAs};
use crate::vault::Secret;

/// The supervisor's own variables a child may inherit; `LC_*` also passes.
const INHERITED: &[&str] = &["PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR"];

/// Set so Python agents' lines reach the log as they are printed, not when a
/// block buffer fills; an agent's own `env` may override it.
const PYTHON_UNBUFFERED: (&str, &str) = ("PYTHONUNBUFFERED", "1");

/// Tells a child which agent it is; set last so nothing can spoof it.
pub const AGENT_VAR: &str = "SUPERVISOR_AGENT";

fn inherited(key: &OsStr) -> bool {
    let bytes = key.as_bytes();
    bytes.starts_with(b"LC_") || INHERITED.iter().any(|k| k.as_bytes() == bytes)
}

/// The complete environment of `spec`'s child, sorted by name: the allow-list
/// from `supervisor_env` (with `HOME` and `USER` those of `spec.run_as`, if
/// set), `PYTHONUNBUFFERED=1`, `spec.env`, the secrets, and finally
/// `SUPERVISOR_AGENT=<name>`, each layer overriding the ones before.
///
/// The result holds secret values in the clear: hand it to `Command::envs`
/// and drop it, never format it.
pub fn child_env(
    spec: &AgentSpec,
    secret_env: &[(String, Secret)],
    supervisor_env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = supervisor_env
        .into_iter()
        .filter(|(k, _)| inherited(k))
        .collect();
    if let Some(run_as) = &spec.run_as {
        env.insert("HOME".into(), run_as.home.clone().into());
        env.insert("USER".into(), run_as.user.as_str().into());
    }
    env.insert(PYTHON_UNBUFFERED.0.into(), PYTHON_UNBUFFERED.1.into());
    for (k, v) in &spec.env {
        env.insert(k.into(), v.into());
    }
    for (k, secret) in secret_env {
        env.insert(k.into(), secret.expose().into());
    }
    env.insert(AGENT_VAR.into(), spec.name.as_str().into());
    env.into_iter().collect()
}

/// The `Command` for one run of `spec` with the environment from
/// [`child_env`]: cleared environment, its own process group (so a stop can
/// signal every process it started), stdin from /dev/null, stdout and stderr
/// piped to the supervisor's log, and the account of `spec.run_as` (see
/// [`switch_account`]). `None` when `spec.command` is empty.
pub fn command(spec: &AgentSpec, env: Vec<(OsString, OsString)>) -> Option<Command> {
    let (program, args) = spec.command.split_first()?;
    // A relative program path like `./run.sh` means "in the agent's cwd"; resolve
    // it here because std leaves relative-path-plus-current_dir platform-defined.
    // A bare name (`python3`) is still looked up on the child's PATH.
    let program = Path::new(program);
    let program = if program.is_relative() && program.components().count() > 1 {
        spec.cwd.join(program)
    } else {
        program.to_owned()
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // Only a backstop if the actor task is dropped without stopping; the
        // actor itself always stops the whole group.
        .kill_on_drop(true);
    crate::fdlimit::restore_in_child(&mut cmd);
    if let Some(run_as) = &spec.run_as {
        switch_account(&mut cmd, run_as, &spec.cwd);
    }
    Some(cmd)
}

/// Makes the child drop to `run_as` between fork and exec: supplementary
/// groups (as `initgroups` would set them), then the group, then the user —
/// in that order, as only root may set groups. Not `Command::uid`/`gid`:
/// std then clears the supplementary groups and offers no stable way to set
/// them. std has already changed to `cwd` as root; it is entered again as the
/// user, so an agent whose `cwd` its user cannot reach fails to start
/// (nothing is chowned to make it work).
fn switch_account(cmd: &mut Command, run_as: &RunAs, cwd: &Path) {
    use nix::unistd::{Gid, Uid, chdir, setgid, setgroups, setuid};
    // Everything the child needs is built here: between fork and exec only
    // async-signal-safe calls are allowed, so no allocation.
    let groups: Vec<Gid> = run_as.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let gid = Gid::from_raw(run_as.gid);
    let uid = Uid::from_raw(run_as.uid);
    // A `cwd` with a NUL byte cannot be entered at all; std reports that.
    let cwd = CString::new(cwd.as_os_str().as_bytes()).ok();
    let switch = move || -> io::Result<()> {
        setgroups(&groups)?;
        setgid(gid)?;
        setuid(uid)?;
        if let Some(cwd) = &cwd {
            chdir(cwd.as_c_str())?;
        }
        Ok(())
    };
    // SAFETY: the closure only makes system calls (setgroups, setgid, setuid,
    // chdir) on data prepared before the fork; it allocates nothing and
    // takes no lock, so it is safe to run in the forked child.
    unsafe {
        cmd.pre_exec(switch);
    }
}

/// One line saying why `spec` could not be started, naming the program, the
/// working directory and the OS error, with a hint. `cwd_is_dir` is passed in
/// because the OS reports a missing cwd and a missing program with the same
/// ENOENT.
pub fn describe_spawn_error(spec: &AgentSpec, err: &io::Error, cwd_is_dir: bool) -> String {
    let cwd = spec.cwd.display();
    let Some(program) = spec.command.first() else {
        return "`command` is empty (hint: give the program and its arguments as a list)".into();
    };
    if let Some(hint) = descriptor_hint(err) {
        return format!("cannot start `{program}` in `{cwd}`: {err} ({hint})");
    }
    if !cwd_is_dir {
        return format!(
            "cannot start `{program}`: working directory `{cwd}` does not exist or is not a directory ({err}) (hint: check `cwd`)"
        );
    }
    if let Some(run_as) = &spec.run_as {
        let user = &run_as.user;
        let uid = run_as.uid;
        let hint = match err.kind() {
            // EPERM is also `PermissionDenied`: it comes from setuid & co.
            _ if err.raw_os_error() == Some(libc::EPERM) => {
                "hint: only a supervisor running as root can start an agent as another user".into()
            }
            io::ErrorKind::PermissionDenied => format!(
                "hint: user `{user}` must be able to enter `{cwd}` (search permission on it and every directory above it) and to execute `{program}`; the supervisor changes no ownership or modes"
            ),
            io::ErrorKind::NotFound => {
                format!("hint: check `command` and the `PATH` the agent inherits, as user `{user}`")
            }
            _ => "hint: check `command`, `cwd` and `user`".into(),
        };
        return format!(
            "cannot start `{program}` in `{cwd}` as user `{user}` (uid {uid}): {err} ({hint})"
        );
    }
    let hint = match err.kind() {
        io::ErrorKind::NotFound if Path::new(program).components().count() > 1 => {
            format!("hint: `{program}` is resolved against `{cwd}`; check `command`")
        }
        io::ErrorKind::NotFound => "hint: check `command` and the `PATH` the agent inherits".into(),
        io::ErrorKind::PermissionDenied => format!("hint: `chmod +x {program}`"),
        _ => "hint: check `command` and `cwd`".into(),
    };
    format!("cannot start `{program}` in `{cwd}`: {err} ({hint})")
}

/// The hint for running out of descriptors, which says nothing about the
/// agent's `command` or `cwd`.
fn descriptor_hint(err: &io::Error) -> Option<&'static str> {
    match err.raw_os_error()? {
        libc::EMFILE => Some(
            "hint: the supervisor has reached its open-file limit (RLIMIT_NOFILE); raise `LimitNOFILE=` in its unit (or `ulimit -n`), or lower `proxy.max_connections`; `supervisor status` shows descriptors in use",
        ),
        libc::ENFILE => Some(
            "hint: the system-wide open-file table is full (`fs.file-max`); see what holds descriptors, or raise `fs.file-max`",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::fleet::{RestartSpec, StopSpec};

    fn spec(name: &str, env: &[(&str, &str)]) -> AgentSpec {
        AgentSpec {
            name: name.into(),
            command: vec!["sh".into(), "-c".into(), "true".into()],
            cwd: PathBuf::from("/tmp"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets: BTreeMap::new(),
            restart: RestartSpec::default(),
            stop: StopSpec::default(),
            llm: Vec::new(),
            budget: Default::default(),
            runaway: Default::default(),
            run_as: None,
        }
    }

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    fn secrets(pairs: &[(&str, &str)]) -> Vec<(String, Secret)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Secret::new(v.to_string())))
            .collect()
    }

    #[test]
    fn environment_layers_table() {
        struct Case {
            what: &'static str,
            host: &'static [(&'static str, &'static str)],
            env: &'static [(&'static str, &'static str)],
            secrets: &'static [(&'static str, &'static str)],
            want: &'static [(&'static str, &'static str)],
        }
        let cases = [
            Case {
                what: "empty host, bare spec",
                host: &[],
                env: &[],
                secrets: &[],
                want: &[("PYTHONUNBUFFERED", "1"), ("SUPERVISOR_AGENT", "a")],
            },
            Case {
                what: "allow-list passes, the rest is dropped",
                host: &[
                    ("PATH", "/bin"),
                    ("HOME", "/root"),
                    ("USER", "root"),
                    ("LANG", "C.UTF-8"),
                    ("LC_ALL", "C"),
                    ("LC_TIME", "en_GB"),
                    ("TZ", "UTC"),
                    ("TMPDIR", "/tmp"),
                    ("ANTHROPIC_API_KEY", "sk-host"),
                    ("AWS_SECRET_ACCESS_KEY", "x"),
                    ("SUPERVISOR_SECRET_A_KEY", "x"),
                    ("XLC_ALL", "x"),
                    ("PATHX", "x"),
                    ("path", "x"),
                ],
                env: &[],
                secrets: &[],
                want: &[
                    ("HOME", "/root"),
                    ("LANG", "C.UTF-8"),
                    ("LC_ALL", "C"),
                    ("LC_TIME", "en_GB"),
                    ("PATH", "/bin"),
                    ("PYTHONUNBUFFERED", "1"),
                    ("SUPERVISOR_AGENT", "a"),
                    ("TMPDIR", "/tmp"),
                    ("TZ", "UTC"),
                    ("USER", "root"),
                ],
            },
            Case {
                what: "agent env overrides inherited and PYTHONUNBUFFERED",
                host: &[("PATH", "/bin"), ("TZ", "UTC")],
                env: &[
                    ("PATH", "/opt/bin"),
                    ("PYTHONUNBUFFERED", "0"),
                    ("LOG", "info"),
                ],
                secrets: &[],
                want: &[
                    ("LOG", "info"),
                    ("PATH", "/opt/bin"),
                    ("PYTHONUNBUFFERED", "0"),
                    ("SUPERVISOR_AGENT", "a"),
                    ("TZ", "UTC"),
                ],
            },
            Case {
                what: "secrets come after env; SUPERVISOR_AGENT cannot be overridden",
                host: &[("SUPERVISOR_AGENT", "host")],
                env: &[("SUPERVISOR_AGENT", "evil"), ("TOKEN", "plain")],
                secrets: &[
                    ("TOKEN", "s3cret"),
                    ("SUPERVISOR_AGENT", "evil2"),
                    ("K", "v"),
                ],
                want: &[
                    ("K", "v"),
                    ("PYTHONUNBUFFERED", "1"),
                    ("SUPERVISOR_AGENT", "a"),
                    ("TOKEN", "s3cret"),
                ],
            },
        ];
        for case in cases {
            let got = child_env(&spec("a", case.env), &secrets(case.secrets), os(case.host));
            assert_eq!(got, os(case.want), "{}", case.what);
        }
    }

    fn bob() -> RunAs {
        RunAs {
            user: "bob".into(),
            uid: 1002,
            gid: 2000,
            groups: vec![2000],
            home: "/srv/bob".into(),
        }
    }

    #[test]
    fn home_and_user_follow_the_account() {
        let mut s = spec("a", &[("LOG", "info")]);
        s.run_as = Some(bob());
        let host = os(&[("HOME", "/root"), ("USER", "root"), ("PATH", "/bin")]);
        let got = child_env(&s, &[], host.clone());
        assert_eq!(
            got,
            os(&[
                ("HOME", "/srv/bob"),
                ("LOG", "info"),
                ("PATH", "/bin"),
                ("PYTHONUNBUFFERED", "1"),
                ("SUPERVISOR_AGENT", "a"),
                ("USER", "bob"),
            ])
        );
        // Even when the supervisor has neither; the agent's own `env` still wins.
        s.env.insert("HOME".into(), "/tmp/h".into());
        let got = child_env(&s, &[], os(&[]));
        assert!(got.contains(&("HOME".into(), "/tmp/h".into())));
        assert!(got.contains(&("USER".into(), "bob".into())));
    }

    #[test]
    fn spawn_error_texts_as_another_user() {
        let mut s = spec("a", &[]);
        s.command = vec!["./agent.sh".into()];
        s.run_as = Some(bob());
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let not_found = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(
            describe_spawn_error(&s, &denied, true),
            "cannot start `./agent.sh` in `/tmp` as user `bob` (uid 1002): Permission denied (os error 13) \
             (hint: user `bob` must be able to enter `/tmp` (search permission on it and every directory \
             above it) and to execute `./agent.sh`; the supervisor changes no ownership or modes)"
        );
        assert_eq!(
            describe_spawn_error(&s, &eperm, true),
            "cannot start `./agent.sh` in `/tmp` as user `bob` (uid 1002): Operation not permitted (os error 1) \
             (hint: only a supervisor running as root can start an agent as another user)"
        );
        assert_eq!(
            describe_spawn_error(&s, &not_found, true),
            "cannot start `./agent.sh` in `/tmp` as user `bob` (uid 1002): No such file or directory (os error 2) \
             (hint: check `command` and the `PATH` the agent inherits, as user `bob`)"
        );
        // A missing cwd is reported as such, whoever the agent runs as.
        assert!(describe_spawn_error(&s, &not_found, false).contains("does not exist"));
    }

    #[test]
    fn relative_program_paths_resolve_against_cwd() {
        let mut s = spec("a", &[]);
        s.cwd = "/srv/agents".into();
        s.command = vec!["bin/run".into(), "--flag".into()];
        let cmd = command(&s, Vec::new()).unwrap();
        assert_eq!(cmd.as_std().get_program(), "/srv/agents/bin/run");
        s.command = vec!["python3".into()];
        assert_eq!(
            command(&s, Vec::new()).unwrap().as_std().get_program(),
            "python3"
        );
        s.command = vec!["/usr/bin/env".into()];
        assert_eq!(
            command(&s, Vec::new()).unwrap().as_std().get_program(),
            "/usr/bin/env"
        );
    }

    #[test]
    fn command_is_none_for_empty_argv() {
        let mut s = spec("a", &[]);
        s.command.clear();
        assert!(command(&s, Vec::new()).is_none());
    }

    #[test]
    fn spawn_error_texts() {
        let mut s = spec("a", &[]);
        s.command = vec!["nope-agent".into()];
        let not_found = io::Error::from_raw_os_error(libc::ENOENT);
        let denied = io::Error::from_raw_os_error(libc::EACCES);

        assert_eq!(
            describe_spawn_error(&s, &not_found, true),
            "cannot start `nope-agent` in `/tmp`: No such file or directory (os error 2) \
             (hint: check `command` and the `PATH` the agent inherits)"
        );
        assert_eq!(
            describe_spawn_error(&s, &not_found, false),
            "cannot start `nope-agent`: working directory `/tmp` does not exist or is not a \
             directory (No such file or directory (os error 2)) (hint: check `cwd`)"
        );
        s.command = vec!["./agent.sh".into()];
        assert_eq!(
            describe_spawn_error(&s, &denied, true),
            "cannot start `./agent.sh` in `/tmp`: Permission denied (os error 13) \
             (hint: `chmod +x ./agent.sh`)"
        );
        assert_eq!(
            describe_spawn_error(&s, &not_found, true),
            "cannot start `./agent.sh` in `/tmp`: No such file or directory (os error 2) \
             (hint: `./agent.sh` is resolved against `/tmp`; check `command`)"
        );
        for (errno, want) in [
            (libc::EMFILE, "LimitNOFILE="),
            (libc::ENFILE, "fs.file-max"),
        ] {
            let text = describe_spawn_error(&s, &io::Error::from_raw_os_error(errno), true);
            assert!(text.contains(want), "{text}");
            assert!(!text.contains("check `command`"), "{text}");
        }
        s.command.clear();
        assert!(describe_spawn_error(&s, &not_found, true).starts_with("`command` is empty"));
    }
}
