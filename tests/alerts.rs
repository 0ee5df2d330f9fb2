//! Alert delivery through the library's `Alerter`: a real webhook receiver
//! on loopback (including a failing first attempt, to prove the retry) and a
//! real command sink; debouncing seen from the receiving end; failures logged
//! without the webhook's secret path.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_supervisor::alert::{AlertEvent, Alerter, WebhookUrl};
use agent_supervisor::budget::Month;
use agent_supervisor::fleet::{AlertCommand, AlertsSpec, CrashLoopSpec, StormSpec};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

/// Upper bound for "eventually": generous because machines are shared.
const PATIENCE: Duration = Duration::from_secs(30);

/// The secret part of the webhook URL, which must never reach a log line.
const SECRET_PATH: &str = "/services/T0/B0/XXXXSECRETXXXX?token=SECRETQUERY";

#[derive(Debug, Clone)]
struct Post {
    path_and_query: String,
    content_type: String,
    body: Value,
}

/// A tiny HTTP server that records every request and answers with the next
/// scripted status (200 once the script runs out).
struct Receiver {
    addr: SocketAddr,
    posts: Arc<Mutex<Vec<Post>>>,
}

impl Receiver {
    async fn start(script: &[u16]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let (posts_in, script_in) = (posts.clone(), script.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (posts, script) = (posts_in.clone(), script_in.clone());
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (posts, script) = (posts.clone(), script.clone());
                        async move {
                            let path_and_query = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let content_type = req
                                .headers()
                                .get(hyper::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let bytes = req.into_body().collect().await.unwrap().to_bytes();
                            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            posts.lock().unwrap().push(Post {
                                path_and_query,
                                content_type,
                                body,
                            });
                            let status = script.lock().unwrap().pop_front().unwrap_or(200);
                            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *response.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self { addr, posts }
    }

    fn url(&self) -> WebhookUrl {
        WebhookUrl::parse(&format!("http://{}{SECRET_PATH}", self.addr)).unwrap()
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }
}

fn webhook_spec(url: WebhookUrl) -> AlertsSpec {
    AlertsSpec {
        webhook: Some(url),
        ..AlertsSpec::default()
    }
}

fn quarantined(agent: &str) -> AlertEvent {
    AlertEvent::Quarantined {
        agent: agent.into(),
        reason: "4 failing retries with growing context".into(),
        evidence_summary: "#1 input 12,400 tokens: tool error `malformed JSON`".into(),
    }
}

async fn flush(alerter: &Alerter) {
    tokio::time::timeout(PATIENCE, alerter.flush())
        .await
        .expect("alerts delivered in time");
}

#[tokio::test]
async fn the_webhook_receives_slack_compatible_json() {
    let receiver = Receiver::start(&[]).await;
    let (alerter, _task) = Alerter::new(webhook_spec(receiver.url()), "demo");
    alerter.send(quarantined("notes"));
    flush(&alerter).await;

    let posts = receiver.posts();
    assert_eq!(posts.len(), 1, "{posts:#?}");
    let post = &posts[0];
    assert_eq!(post.path_and_query, SECRET_PATH, "the full URL is used");
    assert_eq!(post.content_type, "application/json");
    let body = &post.body;
    assert_eq!(
        body["text"],
        "[demo] agent `notes` quarantined: 4 failing retries with growing context\n#1 input 12,400 tokens: tool error `malformed JSON`"
    );
    assert_eq!(body["event"], "agent_quarantined");
    assert_eq!(body["agent"], "notes");
    assert_eq!(body["fleet"], "demo");
    assert_eq!(body["version"], 1);
    assert_eq!(body["reason"], "4 failing retries with growing context");
    let time = body["time"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(time).is_ok() && time.ends_with('Z'),
        "{time}"
    );
}

#[tokio::test]
async fn a_failed_first_attempt_is_retried_after_a_backoff() {
    let receiver = Receiver::start(&[500]).await;
    let (alerter, _task) = Alerter::new(webhook_spec(receiver.url()), "demo");
    let started = Instant::now();
    alerter.send(quarantined("notes"));
    flush(&alerter).await;

    let posts = receiver.posts();
    assert_eq!(posts.len(), 2, "one failed attempt, one retry: {posts:#?}");
    assert_eq!(
        posts[0].body, posts[1].body,
        "the retry sends the same alert"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the retry waited for the backoff"
    );
}

#[tokio::test]
async fn retries_stop_after_four_attempts_and_client_errors_are_not_retried() {
    let receiver = Receiver::start(&[503, 503, 503, 503, 404]).await;
    let (alerter, _task) = Alerter::new(webhook_spec(receiver.url()), "demo");
    alerter.send(quarantined("a"));
    flush(&alerter).await;
    assert_eq!(
        receiver.posts().len(),
        4,
        "the first attempt and three retries"
    );

    alerter.send(quarantined("b"));
    flush(&alerter).await;
    let posts = receiver.posts();
    assert_eq!(posts.len(), 5, "a 404 is final: {posts:#?}");
    assert_eq!(posts[4].body["agent"], "b");
}

#[tokio::test]
async fn repeated_trouble_arrives_once() {
    let receiver = Receiver::start(&[]).await;
    let spec = AlertsSpec {
        crash_loop: CrashLoopSpec {
            restarts: 3,
            window: Duration::from_secs(600),
        },
        rate_limit_storm: StormSpec {
            refusals: 5,
            window: Duration::from_secs(600),
            quiet: Duration::from_secs(600),
        },
        ..webhook_spec(receiver.url())
    };
    let (alerter, _task) = Alerter::new(spec, "demo");
    let ceiling = |month| AlertEvent::CeilingReached {
        agent: "a".into(),
        month: Month::new(2026, month).unwrap(),
        message: "agent \"a\" reached its monthly ceiling".into(),
    };
    for _ in 0..3 {
        alerter.send(ceiling(5));
    }
    alerter.send(ceiling(6));
    for _ in 0..12 {
        alerter.rate_limited("b");
    }
    for _ in 0..7 {
        alerter.agent_restarted("c");
    }
    alerter.agent_restarted("d");
    flush(&alerter).await;

    let got: Vec<(String, String)> = receiver
        .posts()
        .iter()
        .map(|p| {
            (
                p.body["event"].as_str().unwrap().to_owned(),
                p.body["agent"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("ceiling_reached", "a"),
        ("ceiling_reached", "a"),
        ("rate_limit_storm", "b"),
        ("crash_looping", "c"),
    ]
    .map(|(e, a)| (e.to_owned(), a.to_owned()))
    .into();
    assert_eq!(got, want);
    let posts = receiver.posts();
    assert_eq!(posts[1].body["month"], "2026-06");
    assert_eq!(posts[2].body["refused"], 5);
    assert_eq!(posts[3].body["restarts"], 3);
    assert_eq!(posts[3].body["window_secs"], 600);
}

#[tokio::test]
async fn the_command_gets_the_payload_on_stdin_in_the_fleet_directory() {
    let dir = tempfile::tempdir().unwrap();
    let spec = AlertsSpec {
        command: Some(AlertCommand {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "cat >> alerts.jsonl && echo >> alerts.jsonl && echo \"$SUPERVISOR_ALERT_EVENT $SUPERVISOR_ALERT_AGENT\" >> env.txt".into(),
            ],
            cwd: dir.path().to_owned(),
        }),
        ..AlertsSpec::default()
    };
    let (alerter, _task) = Alerter::new(spec, "demo");
    alerter.send(quarantined("notes"));
    alerter.send(AlertEvent::RateLimitStorm {
        agent: "b".into(),
        refused: 40,
        window: Duration::from_secs(60),
    });
    flush(&alerter).await;

    let lines = read(&dir.path().join("alerts.jsonl"));
    let bodies: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(bodies.len(), 2, "{lines}");
    assert_eq!(bodies[0]["event"], "agent_quarantined");
    assert_eq!(bodies[0]["fleet"], "demo");
    assert_eq!(bodies[1]["event"], "rate_limit_storm");
    assert_eq!(bodies[1]["refused"], 40);
    assert_eq!(
        read(&dir.path().join("env.txt")),
        "agent_quarantined notes\nrate_limit_storm b\n"
    );
}

#[tokio::test]
async fn the_demos_alert_log_example_appends_each_alert_as_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/alert_log.py");
    let spec = AlertsSpec {
        command: Some(AlertCommand {
            argv: vec![
                "python3".into(),
                script.display().to_string(),
                ".supervisor/alerts.jsonl".into(),
            ],
            cwd: dir.path().to_owned(),
        }),
        ..AlertsSpec::default()
    };
    let (alerter, _task) = Alerter::new(spec, "demo");
    alerter.send(quarantined("notes"));
    alerter.send(quarantined("other"));
    flush(&alerter).await;
    let lines = read(&dir.path().join(".supervisor/alerts.jsonl"));
    let agents: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["agent"].clone())
        .collect();
    assert_eq!(agents, ["notes", "other"], "{lines}");
}

#[tokio::test]
async fn both_sinks_get_every_alert() {
    let receiver = Receiver::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = AlertsSpec {
        command: Some(AlertCommand {
            argv: vec!["sh".into(), "-c".into(), "cat > alert.json".into()],
            cwd: dir.path().to_owned(),
        }),
        ..webhook_spec(receiver.url())
    };
    let (alerter, task) = Alerter::new(spec, "demo");
    alerter.send(quarantined("notes"));
    flush(&alerter).await;
    let from_command: Value = serde_json::from_str(&read(&dir.path().join("alert.json"))).unwrap();
    assert_eq!(receiver.posts()[0].body, from_command);

    drop(alerter);
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the delivery task ends with its last handle")
        .unwrap();
}

#[tokio::test]
async fn a_reconfigured_alerter_delivers_to_the_new_sink() {
    let old = Receiver::start(&[]).await;
    let new = Receiver::start(&[]).await;
    let (alerter, _task) = Alerter::new(webhook_spec(old.url()), "demo");
    alerter.send(quarantined("a"));
    flush(&alerter).await;
    alerter.reconfigure(webhook_spec(new.url()));
    alerter.send(quarantined("b"));
    flush(&alerter).await;
    assert_eq!(old.posts().len(), 1);
    assert_eq!(new.posts().len(), 1);
    assert_eq!(new.posts()[0].body["agent"], "b");
}

/// Records what the alerter logs, on this test's thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// A current-thread runtime, so the delivery task logs to this thread's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn failed_deliveries_are_logged_without_the_webhook_secret() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // A port nobody listens on: every attempt is refused.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let url = WebhookUrl::parse(&format!("http://{closed}{SECRET_PATH}")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = AlertsSpec {
        command: Some(AlertCommand {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo 'notify: no route' >&2; exit 3".into(),
            ],
            cwd: dir.path().to_owned(),
        }),
        ..webhook_spec(url)
    };
    let (alerter, _task) = Alerter::new(spec, "demo");
    alerter.send(quarantined("notes"));
    flush(&alerter).await;

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!log.contains("SECRET"), "{log}");
    assert!(!log.contains("/services"), "{log}");
    let origin = format!("http://{closed}");
    assert!(
        log.contains("alert: agent `notes` quarantined: 4 failing retries"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "alert `agent_quarantined` for agent `notes` not delivered to webhook {origin}: "
        )),
        "{log}"
    );
    assert!(log.contains("(after 4 attempts)"), "{log}");
    assert!(
        log.contains(&format!("alert webhook {origin}: attempt 1 of 4 failed: ")),
        "{log}"
    );
    assert!(
        log.contains("alert `agent_quarantined` for agent `notes` not delivered to command `sh`: exited with status 3; stderr: notify: no route"),
        "{log}"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
