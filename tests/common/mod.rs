//! Shared scaffolding for integration tests that run the real `supervisor`
//! binary against a fleet written into a temporary directory.
#![allow(dead_code)]

pub mod fake_upstream;
pub mod webhook;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for "eventually" checks: generous because CI machines are shared.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_supervisor")
}

/// A temporary fleet directory: fleet.yaml, a `secrets/` vault, agents' files.
pub struct FleetDir {
    pub dir: tempfile::TempDir,
}

impl FleetDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write_fleet(&self, yaml: &str) {
        // Write then rename so a running supervisor never reads a half-written file.
        let tmp = self.file("fleet.yaml.tmp");
        fs::write(&tmp, yaml).expect("write fleet");
        fs::rename(&tmp, self.file("fleet.yaml")).expect("rename fleet");
    }

    /// Stores a secret in the dir vault with safe permissions (0700 dir, 0600 file).
    pub fn write_secret(&self, agent: &str, name: &str, value: &str) {
        let root = self.file("secrets");
        fs::create_dir_all(&root).expect("secrets dir");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).expect("chmod");
        let dir = root.join(agent);
        fs::create_dir_all(&dir).expect("agent dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let path = dir.join(name);
        fs::write(&path, format!("{value}\n")).expect("write secret");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    /// Starts `supervisor run` on this fleet, logging to `supervisor.log`.
    pub fn run(&self, extra_env: &[(&str, &str)]) -> Supervisor {
        let log = self.file("supervisor.log");
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("clone log");
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--log-format", "plain", "-f"])
            .arg(self.file("fleet.yaml"))
            .current_dir(self.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn supervisor");
        Supervisor { child, log }
    }

    pub fn read(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.file(name)).ok()
    }

    /// Reads a pid an agent wrote (`echo $$ > NAME.pid`) once it is there.
    /// The environment an agent dumped with `env > FILE`, once `FILE` holds
    /// `needle` (so a half-written dump is not read).
    pub fn wait_env(&self, file: &str, needle: &str) -> std::collections::BTreeMap<String, String> {
        let text = wait_for(file, || self.read(file).filter(|t| t.contains(needle)));
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub fn wait_pid(&self, name: &str) -> i32 {
        wait_for(&format!("{name}.pid"), || {
            self.read(&format!("{name}.pid"))
                .and_then(|s| s.trim().parse::<i32>().ok())
        })
    }
}

pub struct Supervisor {
    pub child: Child,
    pub log: PathBuf,
}

impl Supervisor {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .expect("signal supervisor");
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str) {
        wait_for(&format!("log line containing {needle:?}"), || {
            self.log().contains(needle).then_some(())
        });
    }

    /// Waits for the supervisor to exit, failing the test after `PATIENCE`.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > PATIENCE {
                let _ = self.child.kill();
                panic!("supervisor did not exit; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Supervisor {
    /// A test that ends (or fails) with its supervisor still running stops it
    /// the way an operator would, so its agents go with it: SIGKILL alone
    /// would leave them running after the test (as it would in production,
    /// until the next start reaps them). SIGKILL only if SIGTERM is ignored.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.pid());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = self.child.wait();
            }
        }
    }
}

/// Polls `probe` until it yields a value; panics with `what` after `PATIENCE`.
pub fn wait_for<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    wait_for_within(what, PATIENCE, probe)
}

/// Upper bound for steps that start Python with the SDKs: imports alone take
/// seconds on a loaded machine.
pub const PATIENCE_SDK: Duration = Duration::from_secs(120);

/// [`wait_for`] with an explicit upper bound.
pub fn wait_for_within<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True while any process is in process group `pgid` (zombies included).
pub fn group_alive(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

pub fn process_alive(pid: i32) -> bool {
    // A zombie is dead for our purposes: check /proc state, not only kill(0).
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub fn wait_gone(pid: i32) {
    wait_for(&format!("pid {pid} to exit"), || {
        (!process_alive(pid)).then_some(())
    });
}

/// Every process's argv on the machine, for "no secret in argv" checks.
pub fn all_cmdlines() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Ok(raw) = fs::read(entry.path().join("cmdline")) {
                out.push(String::from_utf8_lossy(&raw).replace('\0', " "));
            }
        }
    }
    out
}

/// The Python interpreter with the official `anthropic` and `openai` SDKs:
/// `$SUPERVISOR_TEST_PYTHON`, else `.venv/bin/python` in the crate root (what
/// `.ci/run` creates). Fails the test, never skips it, when they are missing.
pub fn python_with_sdks() -> PathBuf {
    let py = std::env::var_os("SUPERVISOR_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let hint = "hint: run `python3 -m venv .venv && .venv/bin/pip install anthropic openai` in the crate root, \
                or point `SUPERVISOR_TEST_PYTHON` at an interpreter that has them";
    match Command::new(&py)
        .args(["-c", "import anthropic, openai"])
        .output()
    {
        Ok(out) if out.status.success() => py,
        Ok(out) => panic!(
            "the SDK tests need the `anthropic` and `openai` Python packages, but `{}` cannot import them: {}\n{hint}",
            py.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "the SDK tests need a Python interpreter at `{}` ({e})\n{hint}",
            py.display()
        ),
    }
}

/// A file of the repository, for agents' scripts.
pub fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `supervisor usage --json` for the fleet, parsed; panics with its stderr
/// if it fails.
pub fn usage_json(fleet: &FleetDir) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["usage", "--json", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .expect("run supervisor usage");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("usage --json prints JSON")
}
