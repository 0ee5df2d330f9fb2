//! `supervisor check`, run as the real binary: exact error texts with line and
//! column, every problem reported, exit codes, and no secret value ever printed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every secret written by these tests starts with this; none may be printed.
const LEAK: &str = "sk-LEAK-";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A fleet directory: `fleet.yaml` plus a `secrets/` vault.
struct FleetDir {
    dir: tempfile::TempDir,
}

impl FleetDir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A fleet directory holding the named fixture as `fleet.yaml`.
    fn fixture(name: &str) -> Self {
        let me = Self::new();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/check")
            .join(name);
        fs::copy(&path, me.dir.path().join("fleet.yaml")).expect("copy fixture");
        me
    }

    /// The directory as the supervisor sees it (symlinks resolved), for paths in messages.
    fn real(&self) -> PathBuf {
        self.dir.path().canonicalize().expect("canonicalize")
    }

    fn secret(&self, agent: &str, name: &str, mode: u32) -> PathBuf {
        let folder = self.dir.path().join("secrets").join(agent);
        fs::create_dir_all(&folder).expect("mkdir");
        fs::set_permissions(&folder, fs::Permissions::from_mode(0o700)).expect("chmod dir");
        let path = folder.join(name);
        fs::write(&path, format!("{LEAK}{agent}-{name}\n")).expect("write secret");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    fn valid_secrets(&self) {
        self.secret("sparkles", "llm_api_key", 0o600);
        self.secret("sparkles", "gmail_token", 0o600);
        self.secret("soundwave", "llm_api_key", 0o400);
        self.secret("jazz", "slack.token", 0o600);
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_supervisor"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("STATE_DIRECTORY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .expect("run supervisor");
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(
            !run.stdout.contains(LEAK) && !run.stderr.contains(LEAK),
            "a secret value was printed:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        run
    }

    fn check(&self) -> Run {
        self.run(&["check", "-f", "fleet.yaml"])
    }
}

const HINT: &str = "hint: fix each problem at the line and column shown; README.md documents every fleet.yaml field\n";

/// `check` on a fixture fails with exactly these problems.
fn assert_problems(fixture: &str, problems: &[&str]) {
    let run = FleetDir::fixture(fixture).check();
    assert_invalid(&run, problems);
}

fn assert_invalid(run: &Run, problems: &[&str]) {
    let count = match problems.len() {
        1 => "1 problem".to_owned(),
        n => format!("{n} problems"),
    };
    let mut want = format!("error: `fleet.yaml` is not valid ({count})\n");
    for p in problems {
        want.push_str(p);
        want.push('\n');
    }
    want.push_str(HINT);
    assert_eq!(run.stderr, want);
    assert_eq!(run.stdout, "");
    assert_eq!(run.code, 1);
}

#[test]
fn valid_fleet_prints_a_summary_and_exits_0() {
    let fleet = FleetDir::fixture("valid.yaml");
    fleet.valid_secrets();
    let run = fleet.check();
    assert_eq!(run.stderr, "");
    assert_eq!(
        run.stdout,
        "fleet.yaml: ok — 3 agents, 4 secrets resolved\n"
    );
    assert_eq!(run.code, 0);
}

#[test]
fn flag_after_or_before_the_command() {
    let fleet = FleetDir::fixture("valid.yaml");
    fleet.valid_secrets();
    let run = fleet.run(&["-f", "fleet.yaml", "check"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn malformed_yaml() {
    // The flow list opened on line 4 is never closed, so the parser stumbles
    // on `env:`: the error points at the bracket, and says where it stumbled.
    assert_problems(
        "malformed.yaml",
        &[
            "fleet.yaml:4:14: invalid YAML: `[` is never closed (the parser noticed at 5:8: illegal placement of ':' indicator)",
        ],
    );
}

#[test]
fn unknown_field_names_the_agent_and_the_choices() {
    assert_problems(
        "unknown_field.yaml",
        &[
            "fleet.yaml:14:5: agent \"soundwave\": unknown field `restrat`, expected one of `command`, `cwd`, `env`, `secrets`, `restart`, `stop`, `llm`, `budget`, `runaway`, `user`, `group`",
        ],
    );
}

#[test]
fn wrong_type() {
    assert_problems(
        "wrong_type.yaml",
        &[
            "fleet.yaml:4:14: agent \"sparkles\": `command`: invalid type: string \"python3 agents/sparkles.py\", expected a list of arguments, like `[python3, agent.py]`",
        ],
    );
}

#[test]
fn duplicate_agent_name() {
    assert_problems(
        "duplicate_agent.yaml",
        &[
            "fleet.yaml:7:3: agent \"sparkles\": duplicate agent name, first defined at line 3; agent names must be unique",
        ],
    );
}

#[test]
fn empty_command() {
    assert_problems(
        "empty_command.yaml",
        &[
            "fleet.yaml:4:14: agent \"sparkles\": `command` is empty; give the program and its arguments, like `[python3, agent.py]`",
        ],
    );
}

#[test]
fn bad_secret_name() {
    assert_problems(
        "bad_secret_name.yaml",
        &[
            "fleet.yaml:6:20: agent \"sparkles\": `secrets.LLM_API_KEY`: invalid secret name `../soundwave/llm_api_key`: use letters, digits, `_`, `.` and `-` only (no `/`, not `.` or `..`)",
        ],
    );
}

#[test]
fn bad_duration() {
    assert_problems(
        "bad_duration.yaml",
        &[
            "fleet.yaml:5:20: agent \"sparkles\": `stop.grace`: invalid duration `10`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`",
        ],
    );
}

#[test]
fn invalid_agent_name() {
    assert_problems(
        "bad_agent_name.yaml",
        &[
            "fleet.yaml:3:3: agent \"Sparkles\": invalid agent name; use lower-case letters, digits, `_` and `-`, starting with a letter or digit (at most 63)",
        ],
    );
}

#[test]
fn every_broken_agent_is_reported() {
    assert_problems(
        "several_errors.yaml",
        &[
            "fleet.yaml:5:24: agent \"sparkles\": `restart.policy`: unknown variant `sometimes`, expected one of `never`, `on-failure`, `always`",
            "fleet.yaml:7:14: agent \"soundwave\": `command` is empty; give the program and its arguments, like `[python3, agent.py]`",
            "fleet.yaml:10:20: agent \"jazz\": `stop.grace`: invalid duration `soon`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`",
            "fleet.yaml:11:3: agent \"Bumblebee\": invalid agent name; use lower-case letters, digits, `_` and `-`, starting with a letter or digit (at most 63)",
        ],
    );
}

#[test]
fn every_broken_leaf_of_a_nested_section_is_reported() {
    let fleet = FleetDir::new();
    fs::write(
        fleet.dir.path().join("fleet.yaml"),
        "version: 1\nagents:\n  a:\n    command: [x]\n    stop: { grace: 5x, signal: SIGSTOP }\n    env: { 1X: y, OK: {a: 1} }\n",
    )
    .expect("write");
    assert_invalid(
        &fleet.check(),
        &[
            "fleet.yaml:5:20: agent \"a\": `stop.grace`: invalid duration `5x`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`",
            "fleet.yaml:5:32: agent \"a\": `stop.signal`: `SIGSTOP` does not make a process exit; use `SIGTERM`, `SIGINT`, `SIGQUIT` or `SIGHUP`",
            // The well-formed `1X` entry is still checked beside the broken `OK`.
            "fleet.yaml:6:12: agent \"a\": `env`: invalid environment variable name `1X`; use letters, digits and `_`, not starting with a digit",
            "fleet.yaml:6:23: agent \"a\": `env.OK`: invalid type: map, expected a string",
        ],
    );
}

#[test]
fn missing_secret_is_reported_at_its_secrets_entry() {
    let fleet = FleetDir::fixture("valid.yaml");
    fleet.valid_secrets();
    fs::remove_file(fleet.dir.path().join("secrets/jazz/slack.token")).expect("rm");
    let path = fleet.real().join("secrets/jazz/slack.token");
    assert_invalid(
        &fleet.check(),
        &[&format!(
            "fleet.yaml:19:29: agent \"jazz\": secret `slack.token` not found: `{}` does not exist",
            path.display()
        )],
    );
}

#[test]
fn insecure_secret_file_gets_the_chmod_fix() {
    let fleet = FleetDir::fixture("valid.yaml");
    fleet.valid_secrets();
    fleet.secret("sparkles", "llm_api_key", 0o644);
    let p = fleet.real().join("secrets/sparkles/llm_api_key");
    let p = p.display();
    assert_invalid(
        &fleet.check(),
        &[&format!(
            "fleet.yaml:12:29: agent \"sparkles\": secret `llm_api_key`: `{p}` is accessible by group or others (mode 0644); run `chmod 600 {p}`"
        )],
    );
}

#[test]
fn insecure_agent_folder_gets_the_chmod_fix() {
    let fleet = FleetDir::fixture("valid.yaml");
    fleet.valid_secrets();
    let folder = fleet.dir.path().join("secrets/soundwave");
    fs::set_permissions(&folder, fs::Permissions::from_mode(0o755)).expect("chmod");
    let f = fleet.real().join("secrets/soundwave");
    let f = f.display();
    assert_invalid(
        &fleet.check(),
        &[&format!(
            "fleet.yaml:15:29: agent \"soundwave\": secret `llm_api_key`: `{f}` is accessible by group or others (mode 0755); run `chmod 700 {f}`"
        )],
    );
}

#[test]
fn a_fifo_in_the_vault_is_refused_promptly() {
    let fleet = FleetDir::fixture("valid.yaml");
    fleet.valid_secrets();
    let path = fleet.dir.path().join("secrets/jazz/slack.token");
    fs::remove_file(&path).expect("rm");
    nix::unistd::mkfifo(
        &path,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .expect("mkfifo");
    let mut child = Command::new(env!("CARGO_BIN_EXE_supervisor"))
        .args(["check", "-f", "fleet.yaml"])
        .current_dir(fleet.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run supervisor");
    // A generous upper bound: a blocking open never returns at all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`check` blocked on a FIFO in the vault");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let path = fleet.real().join("secrets/jazz/slack.token");
    assert_invalid(
        &run,
        &[&format!(
            "fleet.yaml:19:29: agent \"jazz\": secret `slack.token`: `{}` is unusable: it is not a regular file",
            path.display()
        )],
    );
}

#[test]
fn config_and_secret_problems_are_reported_together() {
    let fleet = FleetDir::new();
    fs::write(
        fleet.dir.path().join("fleet.yaml"),
        "version: 1\nagents:\n  a:\n    command: [x]\n    secrets: { TOKEN: token }\n  b:\n    command: [y]\n    restrat: {}\n",
    )
    .expect("write");
    let path = fleet.real().join("secrets/a/token");
    // Secrets are only resolved once the file itself is valid.
    assert_invalid(
        &fleet.check(),
        &[
            "fleet.yaml:8:5: agent \"b\": unknown field `restrat`, expected one of `command`, `cwd`, `env`, `secrets`, `restart`, `stop`, `llm`, `budget`, `runaway`, `user`, `group`",
        ],
    );
    fs::write(
        fleet.dir.path().join("fleet.yaml"),
        "version: 1\nagents:\n  a:\n    command: [x]\n    secrets: { TOKEN: token }\n",
    )
    .expect("write");
    assert_invalid(
        &fleet.check(),
        &[&format!(
            "fleet.yaml:5:23: agent \"a\": secret `token` not found: `{}` does not exist",
            path.display()
        )],
    );
}

#[test]
fn missing_fleet_file() {
    let run = FleetDir::new().check();
    assert_eq!(
        run.stderr,
        "error: cannot read `fleet.yaml`\n\
         caused by: No such file or directory (os error 2)\n\
         hint: run from the directory that holds `fleet.yaml`, or name the fleet file with `-f PATH`\n"
    );
    assert_eq!(run.code, 1);
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let run = FleetDir::new().run(&["check", "--no-such-flag"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--no-such-flag"), "{}", run.stderr);
}
