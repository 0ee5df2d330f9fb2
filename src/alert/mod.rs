//! Alerts: the [`Alerter`] handle that the supervisor and the proxy report
//! to, and the one task that delivers to the sinks of `alerts:` (a webhook, a
//! command). Reporting never blocks: debouncing is a few map operations under
//! a short lock, and delivery happens on the task behind a bounded queue
//! (full → the alert is dropped and that is logged). Every alert is logged;
//! failed deliveries are logged too. Must not decide that an agent is
//! quarantined, over its ceiling or crash-looping beyond counting what it is
//! told: callers report facts, this module words and delivers them. Every
//! text an event carries is masked for secret values when it is reported,
//! before it is queued, logged or delivered.

mod debounce;
mod event;
mod sink;
mod webhook_url;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use debounce::Debouncer;
pub use event::{AlertEvent, PAYLOAD_VERSION, payload};
pub use sink::{COMMAND_TIMEOUT, WEBHOOK_RETRY_DELAYS, WEBHOOK_TIMEOUT};
pub use webhook_url::WebhookUrl;

use crate::fleet::AlertsSpec;
use crate::redact::Redaction;

/// Alerts waiting for delivery; beyond this they are dropped (and logged).
/// Deliveries to a dead webhook take up to ~24s each, so this holds a long outage.
pub const QUEUE_CAPACITY: usize = 128;

/// Where agents' trouble is reported. Cheap to clone; every clone feeds the
/// same delivery task, which ends once the last clone is dropped.
#[derive(Clone)]
pub struct Alerter {
    inner: Arc<Inner>,
}

struct Inner {
    debouncer: Mutex<Debouncer>,
    queue: mpsc::Sender<Job>,
    spec: watch::Sender<AlertsSpec>,
    redaction: Redaction,
}

enum Job {
    Deliver {
        event: AlertEvent,
        time: SystemTime,
    },
    /// Answered once every job queued before it is done.
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerter").finish_non_exhaustive()
    }
}

impl Alerter {
    /// Starts the delivery task for `spec`; `fleet` names the fleet in every
    /// alert. Call from within a tokio runtime. The task ends once every
    /// clone of the returned handle is dropped and the queue is delivered.
    pub fn new(spec: AlertsSpec, fleet: impl Into<String>) -> (Alerter, JoinHandle<()>) {
        Self::with_redaction(spec, fleet, Redaction::default())
    }

    /// [`Alerter::new`], masking the values of `redaction` (as it stands
    /// when each event is reported) in every event's texts.
    pub fn with_redaction(
        spec: AlertsSpec,
        fleet: impl Into<String>,
        redaction: Redaction,
    ) -> (Alerter, JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(QUEUE_CAPACITY);
        let debouncer = Debouncer::new(spec.crash_loop, spec.rate_limit_storm);
        let (spec, spec_rx) = watch::channel(spec);
        let task = tokio::spawn(deliver_all(jobs, spec_rx, fleet.into()));
        let inner = Inner {
            debouncer: Mutex::new(debouncer),
            queue,
            spec,
            redaction,
        };
        (
            Alerter {
                inner: Arc::new(inner),
            },
            task,
        )
    }

    /// Sends `event` unless it repeats one already sent: a ceiling once per
    /// agent and month, crash loops and storms once per quiet period.
    /// Quarantines always go out.
    pub fn send(&self, event: AlertEvent) {
        if self.debouncer().admit(&event, Instant::now()) {
            self.enqueue(event);
        } else {
            tracing::debug!(
                "alert `{}` for agent `{}` already sent; not repeated",
                event.kind(),
                event.agent()
            );
        }
    }

    /// Reports that `agent` was restarted; alerts when this makes it crash-loop.
    pub fn agent_restarted(&self, agent: &str) {
        let event = self.debouncer().restarted(agent, Instant::now());
        if let Some(event) = event {
            self.enqueue(event);
        }
    }

    /// Reports that one of `agent`'s requests was refused by its rate limit;
    /// alerts when refusals amount to a storm.
    pub fn rate_limited(&self, agent: &str) {
        let event = self.debouncer().rate_limited(agent, Instant::now());
        if let Some(event) = event {
            self.enqueue(event);
        }
    }

    /// Takes on a reloaded `alerts:` section: new sinks for what is delivered
    /// from now on, new thresholds for what is counted from now on.
    pub fn reconfigure(&self, spec: AlertsSpec) {
        self.debouncer()
            .set_thresholds(spec.crash_loop, spec.rate_limit_storm);
        self.inner.spec.send_replace(spec);
    }

    /// Waits until every alert reported before this call has been delivered
    /// or has failed for good (for tests, and shutdown under a time limit).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.inner.queue.send(Job::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    fn debouncer(&self) -> MutexGuard<'_, Debouncer> {
        // A panic while holding the lock leaves counters, not broken invariants.
        self.inner
            .debouncer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn enqueue(&self, event: AlertEvent) {
        let job = Job::Deliver {
            event: event.redacted(&self.inner.redaction.current()),
            time: SystemTime::now(),
        };
        match self.inner.queue.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Job::Deliver { event, .. })) => tracing::error!(
                "alert `{}` for agent `{}` dropped: {QUEUE_CAPACITY} alerts are already waiting for delivery; check that the alert sinks answer",
                event.kind(),
                event.agent()
            ),
            Err(mpsc::error::TrySendError::Closed(Job::Deliver { event, .. })) => tracing::error!(
                "alert `{}` for agent `{}` dropped: alert delivery has stopped",
                event.kind(),
                event.agent()
            ),
            Err(_) => {}
        }
    }
}

/// The delivery task: one alert at a time, in the order reported.
async fn deliver_all(
    mut jobs: mpsc::Receiver<Job>,
    spec: watch::Receiver<AlertsSpec>,
    fleet: String,
) {
    let client = match sink::webhook_client() {
        Ok(client) => Some(client),
        Err(why) => {
            tracing::error!("{why}; webhook alerts cannot be delivered");
            None
        }
    };
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Deliver { event, time } => {
                let spec = spec.borrow().clone();
                deliver(&event, time, &fleet, &spec, client.as_ref()).await;
            }
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Logs the alert and hands it to every configured sink at once.
async fn deliver(
    event: &AlertEvent,
    time: SystemTime,
    fleet: &str,
    spec: &AlertsSpec,
    client: Option<&reqwest::Client>,
) {
    tracing::warn!("alert: {}", event.headline());
    let body = match serde_json::to_vec(&payload(event, fleet, time)) {
        Ok(body) => bytes::Bytes::from(body),
        Err(err) => {
            tracing::error!("alert `{}` cannot be encoded as JSON: {err}", event.kind());
            return;
        }
    };
    let failed = |sink: String, why: String| {
        tracing::error!(
            "alert `{}` for agent `{}` not delivered to {sink}: {why}",
            event.kind(),
            event.agent()
        );
    };
    let webhook = async {
        let Some(url) = &spec.webhook else { return };
        let sink = format!("webhook {url}");
        let Some(client) = client else {
            return failed(sink, "no HTTP client (see the error at start-up)".into());
        };
        match sink::post_webhook(client, url, &body, &WEBHOOK_RETRY_DELAYS).await {
            Ok(attempts) => tracing::debug!(
                "alert `{}` delivered to {sink} (attempt {attempts})",
                event.kind()
            ),
            Err(why) => failed(sink, why),
        }
    };
    let command = async {
        let Some(command) = &spec.command else { return };
        let program = command.argv.first().map_or("", String::as_str);
        let sink = format!("command `{program}`");
        let env = sink::command_env(std::env::vars_os(), event);
        match sink::run_command(command, &body, env, COMMAND_TIMEOUT).await {
            Ok(()) => tracing::debug!("alert `{}` delivered to {sink}", event.kind()),
            Err(why) => failed(sink, why),
        }
    };
    tokio::join!(webhook, command);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy and the supervisor share one handle across tasks and threads.
    #[test]
    fn the_handle_is_shareable() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Alerter>();
    }

    /// What a sink receives has the values in force at report time masked.
    #[tokio::test]
    async fn delivered_payloads_are_masked() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("payload.json");
        let spec = AlertsSpec {
            command: Some(crate::fleet::AlertCommand {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("cat >> '{}'", out.display()),
                ],
                cwd: dir.path().to_owned(),
            }),
            ..AlertsSpec::default()
        };
        let redaction = Redaction::default();
        let (alerter, _task) = Alerter::with_redaction(spec, "f", redaction.clone());
        let secrets = [crate::vault::Secret::new("sup-leaked-token-0123".into())];
        redaction.replace(crate::redact::Redactor::new(&secrets));
        alerter.send(AlertEvent::Quarantined {
            agent: "a".into(),
            reason: "runaway: tool said sup-leaked-token-0123 is invalid".into(),
            evidence_summary: "sup-leaked-token-0123".into(),
        });
        tokio::time::timeout(std::time::Duration::from_secs(60), alerter.flush())
            .await
            .expect("delivered");
        let payload = std::fs::read_to_string(&out).unwrap();
        assert!(payload.contains("[REDACTED] is invalid"), "{payload}");
        assert!(!payload.contains("sup-leaked"), "{payload}");
    }

    #[tokio::test]
    async fn flush_returns_once_the_task_is_gone() {
        let (alerter, task) = Alerter::new(AlertsSpec::default(), "f");
        task.abort();
        let _ = task.await;
        alerter.send(AlertEvent::CrashLooping {
            agent: "a".into(),
            restarts: 1,
            window: std::time::Duration::from_secs(1),
        });
        tokio::time::timeout(std::time::Duration::from_secs(20), alerter.flush())
            .await
            .expect("flush does not hang on a stopped task");
    }
}
