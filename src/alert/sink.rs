//! Delivery of one payload to one sink: the webhook (a POST with a timeout
//! and retries with backoff) and the command (the payload on stdin, a
//! timeout, its whole process group killed when it runs over). A failure is
//! returned as a message for the caller to log. Owns the rule that a webhook
//! is named by its origin only — its path and query may carry a token — and
//! that the command sees only an allow-list of the supervisor's environment.
//! Must not decide what is sent, or when.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::event::AlertEvent;
use super::webhook_url::WebhookUrl;
use crate::agent::ProcessGroup;
use crate::fleet::AlertCommand;

/// Longest one webhook attempt may take, answer included.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits before the retries: the first attempt, then one retry after each.
pub const WEBHOOK_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];
/// Longest the alert command may run before its process group is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a failed answer or of the command's stderr goes into the log.
const EXCERPT_BYTES: usize = 300;

/// The supervisor's own variables the command may inherit; `LC_*` also
/// passes. The same list agents get (see `agent::launch`): the supervisor's
/// environment can hold secrets (the `env` vault backend keeps them there).
const INHERITED: &[&str] = &["PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR"];

/// The HTTP client for webhooks: per-attempt timeout, and no redirects, so
/// the payload never follows a redirect to a host nobody configured.
pub(crate) fn webhook_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(WEBHOOK_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("agent-supervisor/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the webhook HTTP client: {}", error_chain(&e)))
}

/// What one attempt's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Delivered,
    /// Worth another attempt: the receiver is overloaded or briefly broken.
    Retry,
    /// Another attempt would get the same answer (a revoked or wrong URL, a
    /// rejected payload).
    GiveUp,
}

pub(crate) fn judge(status: StatusCode) -> Verdict {
    if status.is_success() {
        Verdict::Delivered
    } else if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Verdict::Retry
    } else {
        Verdict::GiveUp
    }
}

/// POSTs `body` to `url`: the first attempt, then one retry after each of
/// `delays` while the failure is worth retrying. `Ok` holds the number of
/// attempts made; `Err` says why the last one failed.
pub(crate) async fn post_webhook(
    client: &reqwest::Client,
    url: &WebhookUrl,
    body: &bytes::Bytes,
    delays: &[Duration],
) -> Result<usize, String> {
    let attempts = delays.len() + 1;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sent = client
            .post(url.expose().clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let (verdict, why) = match sent {
            Ok(response) => {
                let status = response.status();
                match judge(status) {
                    Verdict::Delivered => return Ok(attempt),
                    verdict => (verdict, answer_excerpt(status, response).await),
                }
            }
            // Without the URL: reqwest's message would carry its path and query.
            Err(err) if err.is_timeout() => (
                Verdict::Retry,
                format!(
                    "no answer within {}",
                    humantime::format_duration(WEBHOOK_TIMEOUT)
                ),
            ),
            Err(err) => (Verdict::Retry, error_chain(&err.without_url())),
        };
        let delay = delays.get(attempt - 1);
        match (verdict, delay) {
            (Verdict::Retry, Some(delay)) => {
                tracing::warn!(
                    "alert webhook {url}: attempt {attempt} of {attempts} failed: {why}; retrying in {}",
                    humantime::format_duration(*delay)
                );
                tokio::time::sleep(*delay).await;
            }
            (Verdict::Retry, None) => return Err(format!("{why} (after {attempt} attempts)")),
            _ => return Err(format!("{why} (not retried)")),
        }
    }
}

/// `HTTP 404 Not Found: no_service`, with the start of the answer's body.
async fn answer_excerpt(status: StatusCode, mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = excerpt(&body);
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

/// The error and its causes on one line, as `a: b: c`.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // hyper and reqwest often repeat a cause inside their own message.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The first bytes of `bytes` as one printable line.
fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(EXCERPT_BYTES)];
    let text: String = String::from_utf8_lossy(cut)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if bytes.len() > EXCERPT_BYTES {
        format!("{text}…")
    } else {
        text
    }
}

fn inherited(key: &OsStr) -> bool {
    let bytes = key.as_bytes();
    bytes.starts_with(b"LC_") || INHERITED.iter().any(|k| k.as_bytes() == bytes)
}

/// The command's whole environment: the allow-list from `supervisor_env`,
/// then `SUPERVISOR_ALERT_EVENT` and `SUPERVISOR_ALERT_AGENT` for scripts
/// that would rather not parse JSON.
pub(crate) fn command_env(
    supervisor_env: impl IntoIterator<Item = (OsString, OsString)>,
    event: &AlertEvent,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = supervisor_env
        .into_iter()
        .filter(|(k, _)| inherited(k))
        .collect();
    env.push(("SUPERVISOR_ALERT_EVENT".into(), event.kind().into()));
    env.push(("SUPERVISOR_ALERT_AGENT".into(), event.agent().into()));
    env
}

/// Runs `command` with `payload` on its stdin and waits for it, at most
/// `timeout`; past that its whole process group is killed.
pub(crate) async fn run_command(
    command: &AlertCommand,
    payload: &[u8],
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, args)) = command.argv.split_first() else {
        return Err("`alerts.command` is empty".to_owned());
    };
    // Registered with the orphan reaper, which must leave its exit status to us.
    let (mut child, _owned) = crate::agent::reaper::spawn_owned(
        || {
            Command::new(program)
                .args(args)
                .current_dir(&command.cwd)
                .env_clear()
                .envs(env)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                // Its own group, so a timeout also stops what a `sh -c` started.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
        },
        |child| child.id(),
    )
    .map_err(|e| {
        format!(
            "cannot start it: {e}; check `alerts.command` in fleet.yaml (run in `{}`)",
            command.cwd.display()
        )
    })?;
    let group = child.id().and_then(ProcessGroup::from_leader);
    let stdin = child.stdin.take();
    let mut stderr = tokio::spawn(read_excerpt(child.stderr.take()));

    let finished = tokio::time::timeout(timeout, async {
        if let Some(mut stdin) = stdin {
            // A command that ignores its stdin and exits early has not failed
            // by that alone (the write then fails with a broken pipe): its
            // exit status says whether it worked.
            let _ = stdin.write_all(payload).await;
            drop(stdin);
        }
        child.wait().await
    })
    .await;

    let outcome = match finished {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(describe_exit(status)),
        Ok(Err(e)) => Err(format!("cannot wait for it: {e}")),
        Err(_) => Err(format!(
            "still running after {}; killed it",
            humantime::format_duration(timeout)
        )),
    };
    if outcome.is_err() {
        if let Some(group) = group {
            // Best effort: a group already gone is fine.
            let _ = group.signal(Signal::SIGKILL);
        }
        let _ = child.kill().await;
        if let Some(group) = group {
            group.reap();
        }
    }
    // Anything the group left behind may hold stderr open: do not wait for it long.
    let said = match tokio::time::timeout(Duration::from_secs(1), &mut stderr).await {
        Ok(Ok(text)) => text,
        _ => {
            stderr.abort();
            String::new()
        }
    };
    outcome.map_err(|why| {
        if said.is_empty() {
            why
        } else {
            format!("{why}; stderr: {said}")
        }
    })
}

/// Reads a child's stream to its end, keeping only the start.
async fn read_excerpt(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Keep one byte past the limit so `excerpt` knows it was cut.
                let room = (EXCERPT_BYTES + 1).saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    excerpt(&kept)
}

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal).map_or("unknown", Signal::as_str);
            format!("killed by signal {signal} ({name})")
        }
        (None, None) => format!("ended with {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_answers_are_retried() {
        let cases: &[(u16, Verdict)] = &[
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (301, Verdict::GiveUp),
            (400, Verdict::GiveUp),
            (403, Verdict::GiveUp),
            (404, Verdict::GiveUp),
            (408, Verdict::Retry),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (502, Verdict::Retry),
            (503, Verdict::Retry),
        ];
        for (code, want) in cases {
            let status = StatusCode::from_u16(*code).unwrap();
            assert_eq!(judge(status), *want, "{code}");
        }
    }

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt(b""), "");
        assert_eq!(excerpt(b"no_service\n"), "no_service");
        assert_eq!(excerpt(b"a\r\n\tb\x00c"), "a b c");
        let long = vec![b'x'; EXCERPT_BYTES + 50];
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_BYTES + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_command_sees_only_the_allow_list() {
        let env = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/s"),
            ("LC_ALL", "C"),
            ("SUPERVISOR_SECRET_A_KEY", "sk-live"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("XPATH", "y"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let event = AlertEvent::CrashLooping {
            agent: "a".into(),
            restarts: 3,
            window: Duration::from_secs(60),
        };
        let got: Vec<(String, String)> = command_env(env, &event)
            .into_iter()
            .map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into()))
            .collect();
        let want: Vec<(String, String)> = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/s"),
            ("LC_ALL", "C"),
            ("SUPERVISOR_ALERT_EVENT", "crash_looping"),
            ("SUPERVISOR_ALERT_AGENT", "a"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
        assert_eq!(got, want);
    }

    fn sh(script: &str, cwd: &std::path::Path) -> AlertCommand {
        AlertCommand {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: cwd.to_owned(),
        }
    }

    fn path_env() -> Vec<(OsString, OsString)> {
        std::env::var_os("PATH")
            .map(|p| vec![("PATH".into(), p)])
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        // The background sleep is what a plain kill of `sh` would leave running.
        let command = sh("sleep 60 & echo $! > bg.pid; wait", dir.path());
        let started = std::time::Instant::now();
        let err = run_command(&command, b"{}", path_env(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err, "still running after 300ms; killed it");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "did not wait for the sleeps"
        );
        let pid: i32 = std::fs::read_to_string(dir.path().join("bg.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed; a zombie at most until its new parent reaps it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let alive = state
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|s| s != "Z" && s != "X");
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} survived: {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn command_failures_say_what_happened() {
        let dir = tempfile::tempdir().unwrap();
        let run = |command: AlertCommand| async move {
            run_command(&command, b"{\"a\":1}", path_env(), Duration::from_secs(20)).await
        };
        assert_eq!(run(sh("cat > got.json", dir.path())).await, Ok(()));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("got.json")).unwrap(),
            "{\"a\":1}"
        );
        assert_eq!(
            run(sh("exit 0", dir.path())).await,
            Ok(()),
            "ignoring stdin is fine"
        );
        assert_eq!(
            run(sh("echo 'bad  token' >&2; exit 2", dir.path())).await,
            Err("exited with status 2; stderr: bad token".to_owned())
        );
        assert_eq!(
            run(sh("kill -TERM $$", dir.path())).await,
            Err("killed by signal 15 (SIGTERM)".to_owned())
        );
        let missing = AlertCommand {
            argv: vec!["/nonexistent/notify".into()],
            cwd: dir.path().to_owned(),
        };
        assert_eq!(
            run(missing).await,
            Err(format!(
                "cannot start it: No such file or directory (os error 2); check `alerts.command` in fleet.yaml (run in `{}`)",
                dir.path().display()
            ))
        );
    }

    #[test]
    fn exits_are_described() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
    }
}
