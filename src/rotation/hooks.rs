//! Running a rotation policy's `issuer` (prints the new value on stdout) and
//! `revoke` (gets the old version's fingerprint as JSON on stdin) commands,
//! each under a time limit, in the fleet directory, with `SUPERVISOR_AGENT`
//! and `SUPERVISOR_SECRET` set. Their output is never logged or put in an
//! error (stdout is the key; stderr may echo it): errors say how the
//! command ended, nothing more.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use zeroize::Zeroize;

use crate::vault::Secret;

/// Longest an `issuer` or `revoke` command may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest value an issuer may print, as the vault's own limit.
const MAX_VALUE_BYTES: usize = 64 * 1024;

fn command(argv: &[String], cwd: &Path, agent: &str, secret: &str) -> Result<Command, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("the command is empty".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .env("SUPERVISOR_AGENT", agent)
        .env("SUPERVISOR_SECRET", secret)
        .stderr(Stdio::null())
        // Its own group, so a timeout also stops what a `sh -c` started.
        .process_group(0)
        .kill_on_drop(true);
    Ok(cmd)
}

/// Spawns `cmd` registered with the orphan reaper (which would otherwise
/// take its exit status), and a guard that kills its whole group when the
/// hook is given up (timeout) or done.
fn spawn(
    mut cmd: Command,
) -> std::io::Result<(
    tokio::process::Child,
    Option<crate::agent::reaper::Owned>,
    GroupGuard,
)> {
    let (child, owned) = crate::agent::reaper::spawn_owned(|| cmd.spawn(), |c| c.id())?;
    let group = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()));
    Ok((child, owned, group))
}

/// Kills what is left of a hook's process group when dropped.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn ended(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended abnormally".into(),
    }
}

/// Runs `issuer` and returns the new value: stdout, surrounding whitespace
/// trimmed. Fails when it fails, times out, or prints nothing usable.
pub async fn issue(
    argv: &[String],
    cwd: &Path,
    agent: &str,
    secret: &str,
) -> Result<Secret, String> {
    let shown = argv.first().map(String::as_str).unwrap_or_default();
    let mut cmd = command(argv, cwd, agent, secret)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let (mut child, _owned, _group) =
        spawn(cmd).map_err(|e| format!("cannot run the issuer `{shown}`: {e}"))?;
    let Some(mut stdout) = child.stdout.take() else {
        return Err(format!("cannot read the issuer `{shown}`'s output"));
    };
    let run = async {
        let mut out = Vec::new();
        // One byte over the limit is enough to know it is too much.
        let read = (&mut stdout)
            .take(MAX_VALUE_BYTES as u64 + 1)
            .read_to_end(&mut out)
            .await;
        let status = child.wait().await;
        (read, status, out)
    };
    let (read, status, mut out) = tokio::time::timeout(HOOK_TIMEOUT, run).await.map_err(|_| {
        format!(
            "the issuer `{shown}` did not finish within {}",
            humantime::format_duration(HOOK_TIMEOUT)
        )
    })?;
    let problem = match (read, status) {
        (Err(e), _) => Some(format!("cannot read the issuer `{shown}`'s output: {e}")),
        (_, Err(e)) => Some(format!("cannot wait for the issuer `{shown}`: {e}")),
        (Ok(_), Ok(status)) if !status.success() => {
            Some(format!("the issuer `{shown}` {}", ended(status)))
        }
        _ if out.len() > MAX_VALUE_BYTES => Some(format!(
            "the issuer `{shown}` printed more than 64 KiB; it must print only the new value"
        )),
        _ => None,
    };
    if let Some(problem) = problem {
        out.zeroize();
        return Err(problem);
    }
    let value = match String::from_utf8(out) {
        Ok(text) => text,
        Err(err) => {
            err.into_bytes().zeroize();
            return Err(format!(
                "the issuer `{shown}` printed something that is not UTF-8 text"
            ));
        }
    };
    let trimmed = value.trim();
    let checked = if trimmed.is_empty() {
        Err(format!(
            "the issuer `{shown}` printed nothing; it must print the new value on stdout"
        ))
    } else if trimmed.contains('\0') || trimmed.contains('\n') {
        Err(format!(
            "the issuer `{shown}` printed more than one line; it must print only the new value"
        ))
    } else {
        Ok(Secret::new(trimmed.to_owned()))
    };
    let mut value = value;
    value.zeroize();
    checked
}

/// Runs `revoke` with `{"secret", "agent", "fingerprint"}` on stdin.
pub async fn revoke(
    argv: &[String],
    cwd: &Path,
    agent: &str,
    secret: &str,
    old_fingerprint: &str,
) -> Result<(), String> {
    let shown = argv.first().map(String::as_str).unwrap_or_default();
    let mut cmd = command(argv, cwd, agent, secret)?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    let (mut child, _owned, _group) =
        spawn(cmd).map_err(|e| format!("cannot run the revoke command `{shown}`: {e}"))?;
    let input = serde_json::json!({
        "secret": secret,
        "agent": agent,
        "fingerprint": old_fingerprint,
    })
    .to_string();
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input is its own business.
            let _ = stdin.write_all(input.as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
        }
        child.wait().await
    };
    match tokio::time::timeout(HOOK_TIMEOUT, run).await {
        Err(_) => Err(format!(
            "the revoke command `{shown}` did not finish within {}",
            humantime::format_duration(HOOK_TIMEOUT)
        )),
        Ok(Err(e)) => Err(format!("cannot wait for the revoke command `{shown}`: {e}")),
        Ok(Ok(status)) if !status.success() => {
            Err(format!("the revoke command `{shown}` {}", ended(status)))
        }
        Ok(Ok(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn issuer_output_is_the_new_value() {
        let dir = tempfile::tempdir().unwrap();
        let got = issue(
            &sh("echo \"  sk-$SUPERVISOR_AGENT-$SUPERVISOR_SECRET  \""),
            dir.path(),
            "a",
            "k",
        )
        .await
        .unwrap();
        assert_eq!(got.expose(), "sk-a-k");
    }

    #[tokio::test]
    async fn issuer_failures_name_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                sh("echo sk-leak; exit 3"),
                "the issuer `sh` exited with code 3",
            ),
            (
                sh("true"),
                "the issuer `sh` printed nothing; it must print the new value on stdout",
            ),
            (
                sh("printf 'a\\nb\\n'"),
                "the issuer `sh` printed more than one line; it must print only the new value",
            ),
            (
                vec!["/nonexistent/issuer".into()],
                "cannot run the issuer `/nonexistent/issuer`: No such file or directory (os error 2)",
            ),
        ];
        for (argv, want) in cases {
            let err = issue(&argv, dir.path(), "a", "k").await.unwrap_err();
            assert_eq!(err, want);
            assert!(!err.contains("sk-leak"));
        }
    }

    #[tokio::test]
    async fn revoke_gets_the_fingerprint_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got.json");
        let script = format!("cat > {}", out.display());
        revoke(&sh(&script), dir.path(), "a", "k", "abc123")
            .await
            .unwrap();
        let got: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(
            got,
            serde_json::json!({"secret": "k", "agent": "a", "fingerprint": "abc123"})
        );
        let err = revoke(&sh("exit 4"), dir.path(), "a", "k", "abc")
            .await
            .unwrap_err();
        assert_eq!(err, "the revoke command `sh` exited with code 4");
    }
}
