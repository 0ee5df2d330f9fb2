//! The admin listener (`admin.listen`): `GET /metrics` in the Prometheus text
//! format and `GET /healthz`, over plain HTTP/1.1. A thin shell: it gathers
//! a snapshot — the proxy's per-agent counters and the supervisor's agent
//! rows through an [`AgentStatusSource`] — and hands it to
//! `metrics::render`.
//!
//! Must not change anything: every route is read-only, and nothing it serves
//! holds a secret (agent rows are transfer types that carry none).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
#[cfg(test)]
use tokio::sync::{mpsc, oneshot};

use crate::control::ControlHandle;
use crate::control::protocol::{AgentStatusRow, Command, Response as ControlResponse};
use crate::metrics::exposition::CONTENT_TYPE as METRICS_CONTENT_TYPE;
use crate::metrics::render::{FleetSnapshot, render};
use crate::proxy::meter::Meters;

/// How long a scrape or a health check waits for the supervisor's loop. A
/// loop that cannot answer in this time is not healthy.
pub const LOOP_ANSWER_LIMIT: Duration = Duration::from_secs(2);

pub type StatusFuture = Pin<Box<dyn Future<Output = Option<Vec<AgentStatusRow>>> + Send>>;

/// Where the admin listener learns the supervisor's view of its agents.
/// Any `Fn() -> impl Future<Output = Option<Vec<AgentStatusRow>>>` is one, so
/// the supervisor can pass a closure over whatever it has (its loop's request
/// channel today, the control handle's `Command::Status` tomorrow).
pub trait AgentStatusSource: Send + Sync + 'static {
    /// The rows, or `None` when the supervisor cannot answer (its loop is gone).
    fn agent_status(&self) -> StatusFuture;
}

impl<F, Fut> AgentStatusSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Vec<AgentStatusRow>>> + Send + 'static,
{
    fn agent_status(&self) -> StatusFuture {
        Box::pin(self())
    }
}

/// A source that asks the supervisor's loop for `status` through the control
/// handle, as `supervisor status` does. The loop answers between its other
/// work, so an answer also proves the loop is alive and not stuck — which is
/// what `/healthz` reports.
pub fn ask_control(control: ControlHandle) -> impl AgentStatusSource {
    move || {
        let control = control.clone();
        async move {
            match control.request(Command::Status).await {
                ControlResponse::Status { agents, .. } => Some(agents),
                _ => None,
            }
        }
    }
}

/// A status request for a stand-in loop in tests: where to send its rows.
#[cfg(test)]
type StatusRequest = oneshot::Sender<Vec<AgentStatusRow>>;

/// A source answered by a stand-in loop in tests.
#[cfg(test)]
fn ask_loop(requests: mpsc::Sender<StatusRequest>) -> impl AgentStatusSource {
    move || {
        let requests = requests.clone();
        async move {
            let (reply, answer) = oneshot::channel();
            requests.send(reply).await.ok()?;
            answer.await.ok()
        }
    }
}

/// What the admin routes read.
pub struct Admin {
    meters: Arc<dyn Fn() -> FleetCounters + Send + Sync>,
    status: Arc<dyn AgentStatusSource>,
    answer_limit: Duration,
}

type FleetCounters = std::collections::BTreeMap<String, crate::metrics::AgentCounters>;

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// `counters` reads the proxy's per-agent counters (see
    /// [`Admin::for_meters`]); `status` the supervisor's rows.
    pub fn new(
        counters: impl Fn() -> FleetCounters + Send + Sync + 'static,
        status: impl AgentStatusSource,
        answer_limit: Duration,
    ) -> Self {
        Self {
            meters: Arc::new(counters),
            status: Arc::new(status),
            answer_limit,
        }
    }

    /// The admin routes over the proxy's meters.
    pub fn for_meters(
        proxy: Arc<crate::proxy::server::ProxyShared>,
        status: impl AgentStatusSource,
    ) -> Self {
        Self::new(
            move || Meters::counters(&proxy.meters),
            status,
            LOOP_ANSWER_LIMIT,
        )
    }

    async fn rows(&self) -> Option<Vec<AgentStatusRow>> {
        tokio::time::timeout(self.answer_limit, self.status.agent_status())
            .await
            .ok()
            .flatten()
    }

    /// The `/metrics` body.
    pub async fn metrics_text(&self) -> String {
        let status = self.rows().await;
        // Counters after the rows: an agent added meanwhile shows its counters.
        render(&FleetSnapshot {
            counters: (self.meters)(),
            status,
        })
    }

    /// Whether the supervisor's loop answered within the limit.
    pub async fn healthy(&self) -> bool {
        self.rows().await.is_some()
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz");
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!("not found: `{path}`; the admin listener serves `/metrics` and `/healthz`\n"),
        );
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            format!(
                "method `{}` not allowed on `{path}`; use GET\n",
                req.method()
            ),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/metrics" {
        return text(
            StatusCode::OK,
            METRICS_CONTENT_TYPE,
            admin.metrics_text().await,
        );
    }
    if admin.healthy().await {
        text(StatusCode::OK, PLAIN, "ok\n".to_owned())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            format!(
                "unhealthy: the supervisor's loop did not answer within {}s\n",
                admin.answer_limit.as_secs_f64()
            ),
        )
    }
}

/// Serves until `shutdown` turns true; requests in flight then get a short
/// grace (each is bounded by the loop's answer limit anyway).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!("admin listener: accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let admin = admin.clone();
                let service = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(handle(&admin, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!("admin listener: connection from {peer}: {err}");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(LOOP_ANSWER_LIMIT + Duration::from_secs(1)) => {
            tracing::debug!("admin listener: closing scrapes still in flight");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(agent: &str) -> AgentStatusRow {
        AgentStatusRow {
            agent: agent.to_owned(),
            state: "running".to_owned(),
            pid: Some(1),
            uptime_secs: Some(1),
            restarts: 0,
            last_exit: None,
            month: "2025-01".to_owned(),
            month_tokens: 0,
            month_usd: 0.0,
            monthly_tokens_ceiling: None,
            monthly_usd_ceiling: None,
            tokens_available: None,
            requests_available: None,
            quarantine_reason: None,
            secrets: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_loop_that_answers_is_healthy() {
        let (tx, mut rx) = mpsc::channel::<StatusRequest>(4);
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(vec![row("a")]);
            }
        });
        let admin = Admin::new(FleetCounters::new, ask_loop(tx), Duration::from_secs(10));
        assert!(admin.healthy().await);
        let text = admin.metrics_text().await;
        assert!(text.contains("supervisor_loop_up 1\n"), "{text}");
        assert!(
            text.contains("supervisor_agent_state{agent=\"a\",state=\"running\"} 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_gone_loop_is_unhealthy_but_counters_still_render() {
        let (tx, rx) = mpsc::channel::<StatusRequest>(4);
        drop(rx);
        let counters = || {
            [("a".to_owned(), crate::metrics::AgentCounters::default())]
                .into_iter()
                .collect::<FleetCounters>()
        };
        let admin = Admin::new(counters, ask_loop(tx), Duration::from_secs(10));
        assert!(!admin.healthy().await);
        let text = admin.metrics_text().await;
        assert!(text.contains("supervisor_loop_up 0\n"), "{text}");
        assert!(
            text.contains("supervisor_agent_requests_total{agent=\"a\",outcome=\"ok\"} 0\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_stuck_loop_is_unhealthy_after_the_limit() {
        let (tx, rx) = mpsc::channel::<StatusRequest>(4);
        // Held, never answered: the loop is busy elsewhere.
        let _held = rx;
        let admin = Admin::new(FleetCounters::new, ask_loop(tx), Duration::from_millis(50));
        assert!(!admin.healthy().await);
    }
}
