//! The proxy's HTTP shell: a loopback HTTP/1.1 listener whose every request
//! goes through one pipeline, declared in `handle_metered`, in this order:
//!
//! 1. identify: scoped token → agent and `llm:` entry (401 if unknown);
//! 2. refuse a quarantined agent (403) — before anything else can cost money;
//!    then resolve the path against the allow-list (`route`): 400 if it could
//!    be read as another path, 404 if it is no route; only its canonical form
//!    is ever forwarded;
//! 3. read and parse the body (413/400), estimate its worst case;
//! 4. rate buckets (429 + retry-after);
//! 5. reserve the worst case under the monthly ceilings (429, no retry),
//!    and record the reservation durably in the ledger before forwarding;
//! 6. forward with the real key (or answer from the simulated provider);
//! 7. stream the answer back through the usage tap;
//! 8. settle ceilings, rate buckets and ledger to the real usage; a request
//!    that got no answer is charged as cut once it may have reached the
//!    provider, released only when it provably never left (`WatchedBody`).
//!
//! The order matters: nothing reaches upstream without a reservation, and a
//! refusal never costs money. Settlement happens in the answer's body
//! (`answer`), so it runs whether the client reads to the end, leaves, or
//! stops reading (`client_io` fails its writes, which drops the body).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::admission::{BodyLease, Gate};
use super::answer::{AnswerBody, Reader, Source};
use super::capacity;
use super::chain::{ChainEnd, ChainRefs};
use super::client_io::WriteStallLimit;
use super::estimate::{EstimateConfig, estimate_request};
use super::meter::{AgentMeter, ChainTicket, Credential, Meters, Target};
use super::refusal::{Api, Refusal, RefusalKind};
use super::route::{self, Endpoint};
use super::simulated;
use super::tokens::{Grant, TokenTable};
use super::usage::{
    ApiKind, Metered, Outcome as TapOutcome, TapOptions, TapReport, Usage, UsageTap,
    ensure_openai_stream_usage,
};
use crate::budget::threshold::ThresholdCrossed;
use crate::budget::{Amount, Month, RateTicket, Reservation};
use crate::fleet::{ProviderKind, ProxySpec};
use crate::ledger::{self, Ledger, Outcome, Settlement};
use crate::metrics::{RequestOutcome, TokenKind};
use crate::pricing::{Prices, cost_micro_usd, worst_case_cost_micro_usd};
use crate::redact::Redaction;
use crate::runaway::{
    self, ConversationKey, Evidence, InputUsage, RequestSummary, ResponseSummary, RunawayAction,
    VelocityEvidence, Verdict,
};

/// What the proxy tells the supervisor; sent without blocking the request path.
#[derive(Debug, Clone)]
pub enum ProxyEvent {
    /// The runaway detector tripped. With `Quarantine`, the proxy already
    /// refuses the agent; the supervisor stops it and persists the record.
    Tripped {
        agent: String,
        action: RunawayAction,
        evidence: Evidence,
    },
    /// The spend-velocity wire tripped (`runaway.velocity`). With
    /// `Quarantine`, the proxy already refuses the agent.
    SpendVelocity {
        agent: String,
        action: RunawayAction,
        evidence: VelocityEvidence,
    },
    /// A request was refused at a monthly ceiling.
    CeilingReached { agent: String, message: String },
    /// A request was refused by a rate bucket.
    RateLimited { agent: String },
    /// The agent's settled usage this month crossed its `budget.alert_at`
    /// share of a ceiling (sent once per agent per month).
    BudgetThreshold {
        agent: String,
        month: Month,
        crossed: ThresholdCrossed,
    },
}

/// An answer's body. Its error aborts the client's connection, so a broken
/// answer is never mistaken for a complete one.
pub type ProxyBody = BoxBody<Bytes, io::Error>;

/// How long a client may take to send its request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the request path shares. Built once by the supervisor.
pub struct ProxyShared {
    pub tokens: TokenTable,
    pub meters: Meters,
    pub ledger: Arc<Ledger>,
    /// Masks secret values in what the proxy logs; the supervisor keeps it current.
    pub redaction: Redaction,
    client: reqwest::Client,
    settings: ProxySpec,
    events: mpsc::UnboundedSender<ProxyEvent>,
    /// Models already logged as unpriced, so each is logged once.
    unpriced: Mutex<std::collections::HashSet<(String, String)>>,
    /// Connection and body-byte caps (`proxy::capacity`).
    pub gate: Arc<Gate>,
}

impl std::fmt::Debug for ProxyShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyShared").finish_non_exhaustive()
    }
}

impl ProxyShared {
    pub fn new(
        settings: ProxySpec,
        ledger: Arc<Ledger>,
        events: mpsc::UnboundedSender<ProxyEvent>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // No `read_timeout`: it arms a timer per request and polls it per
            // chunk; the answer body keeps its own idle limit, armed only
            // while it actually waits. Keep-alive pooling with no cap on idle
            // connections per host, and no Nagle delay on small requests.
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(usize::MAX)
            .tcp_nodelay(true)
            // Never follow a redirect: the allow-list checked the path sent,
            // not a Location's, and on another host reqwest would carry the
            // real key in `x-api-key` there. A 3xx goes back to the agent.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the upstream HTTP client: {e}"))?;
        let gate = Arc::new(Gate::new(&settings, 0));
        Ok(Self {
            gate,
            tokens: TokenTable::new(),
            meters: Meters::default(),
            ledger,
            redaction: Redaction::default(),
            client,
            settings,
            events,
            unpriced: Mutex::new(Default::default()),
        })
    }
}

/// Starts [`serve`] on a thread of its own, on a single-threaded runtime; the
/// returned receiver resolves once it has finished. A request's tasks (the
/// client connection, the pooled upstream connection, the answer body) then
/// all live on one thread and never hop between workers: that cut the
/// proxy's CPU per request by about a third under load (README "Benchmark").
/// Agents' output, reloads and the control socket stay on the main runtime,
/// so they cannot delay a request. Nothing on this thread may block for
/// long: the journal append and the ledger queue push are its only syscalls
/// besides the sockets'.
pub async fn serve_on_own_thread(
    listener: TcpListener,
    shared: Arc<ProxyShared>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.into_std()?;
    let (ready, started) = tokio::sync::oneshot::channel::<io::Result<()>>();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    // The runtime is built on the thread: had the spawn failed with it built
    // here, dropping it inside this async context would panic.
    std::thread::Builder::new()
        .name("proxy".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready.send(Err(err));
                    return;
                }
            };
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let _ = ready.send(Ok(()));
                        serve(listener, shared, shutdown).await;
                    }
                    Err(err) => {
                        let _ = ready.send(Err(err));
                    }
                }
            });
            // Connections still open past the drain go with the runtime,
            // which settles their answers; a DNS lookup stuck in its blocking
            // pool must not hold up shutdown.
            runtime.shutdown_timeout(Duration::from_secs(1));
            drop(done);
        })?;
    match started.await {
        Ok(result) => result?,
        Err(_) => return Err(io::Error::other("the proxy thread ended before serving")),
    }
    Ok(finished)
}

/// How long requests in flight may finish once the proxy is told to stop.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves until `shutdown` turns true, then stops accepting and lets requests
/// in flight finish (each bounded by its own timeouts).
///
/// Every connection takes a slot of the gate first: while no slot is free
/// (every connection identified and within its agent's cap, the total
/// reached) accept waits, so the descriptor reserve is never touched; a
/// connection still unidentified is evicted to make room for a new one.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<ProxyShared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let gate = shared.gate.clone();
    let mut accept_warned: Option<Instant> = None;
    loop {
        if !gate.can_admit() {
            tokio::select! {
                _ = gate.room() => continue,
                _ = shutdown.changed() => break,
            }
        }
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        if accept_warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                            accept_warned = Some(Instant::now());
                            tracing::warn!("proxy: accept failed: {err} ({})", descriptor_figures());
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = gate.admit() else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let stream = WriteStallLimit::new(stream, shared.settings.upstream_timeout);
                let header_timeout = shared.settings.header_timeout;
                let shared = shared.clone();
                let id = slot.id;
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(admit_and_handle(&shared, id, req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive(true)
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let mut slot = slot;
                    tokio::select! {
                        result = conn => {
                            if let Err(err) = result {
                                tracing::debug!("proxy: connection from {peer}: {err}");
                            }
                        }
                        _ = &mut slot.evicted => {
                            tracing::debug!("proxy: closed {peer}'s connection, which sent no request headers, to admit a newer one");
                        }
                    }
                    drop(slot);
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN) => {
            tracing::warn!(
                "proxy: requests still in flight after {}s; closing them (their answers are charged as cut)",
                DRAIN.as_secs()
            );
        }
    }
}

/// How often a failing accept is logged.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// `N descriptors open of a limit of M`, for logs.
fn descriptor_figures() -> String {
    match (
        crate::fdlimit::open_descriptors(),
        crate::fdlimit::soft_limit(),
    ) {
        (Ok(open), Some(limit)) => format!("{open} descriptors open of a limit of {limit}"),
        // Counting needs a descriptor too, which EMFILE may leave none for.
        (Err(_), Some(limit)) => format!("the open-file limit is {limit}"),
        _ => "descriptor use unknown".to_owned(),
    }
}

/// Identifies the agent of a request for the gate (its connection is the
/// agent's from now on, within `proxy.max_connections_per_agent`), gives it
/// a body lease, then runs the pipeline. A request without a known token
/// leaves its connection unidentified, and `handle` answers it 401. The
/// token is looked up here only, and its grant handed on: a second lookup
/// could find a token registered in between and serve it without a lease.
async fn admit_and_handle(
    shared: &ProxyShared,
    conn: super::capacity::ConnId,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let grant = presented_token(req.headers()).and_then(|token| shared.tokens.lookup(token));
    let Some(grant) = grant else {
        return handle(shared, req, None, peer).await;
    };
    let agent = grant.agent.clone();
    if let Err(refused) = shared.gate.identify(conn, &agent) {
        let mut response =
            refused_response(shared, route::shape_of(req.uri().path()), &agent, &refused);
        response
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let lease = shared.gate.lease(&agent);
    req.extensions_mut().insert(lease.clone());
    let response = handle(shared, req, Some(grant), peer).await;
    // The body the lease paid for is gone with the handler; the answer
    // streams on without it.
    drop(lease);
    response
}

/// A refusal by the gate, in the provider's shape: the agent's own caps are
/// 429 (its SDK backs off), the proxy's shared ones 503; both retry.
fn refused_response(
    shared: &ProxyShared,
    api: Api,
    agent: &str,
    refused: &capacity::Refused,
) -> Response<ProxyBody> {
    if let Some(meter) = shared.meters.get(agent) {
        meter.metrics.count_request(RequestOutcome::Throttled);
    }
    refused_body(api, agent, refused)
}

/// [`refused_response`] without the metrics.
fn refused_body(api: Api, agent: &str, refused: &capacity::Refused) -> Response<ProxyBody> {
    let retry_after = Duration::from_secs(1);
    let (kind, message) = match refused {
        capacity::Refused::AgentConnections { limit } => (
            RefusalKind::RateLimited { retry_after },
            format!(
                "agent \"{agent}\" already holds {limit} connections to the supervisor's proxy (`proxy.max_connections_per_agent`); send fewer requests at once"
            ),
        ),
        capacity::Refused::AgentBody { limit } => (
            RefusalKind::RateLimited { retry_after },
            format!(
                "agent \"{agent}\" already has {limit} bytes of request bodies in flight (`proxy.max_body_in_flight_per_agent`); send fewer large requests at once"
            ),
        ),
        capacity::Refused::TotalBody { limit } => (
            RefusalKind::Overloaded { retry_after },
            format!(
                "the supervisor's proxy has {limit} bytes of request bodies in flight from all agents (`proxy.max_body_in_flight`); retry shortly"
            ),
        ),
        capacity::Refused::Evicted => (
            RefusalKind::Overloaded { retry_after },
            "the supervisor's proxy closed this connection: too many connections had not sent their request headers".to_owned(),
        ),
    };
    tracing::debug!(agent, "proxy refused a request at a cap: {message}");
    refuse(api, kind, message)
}

fn refusal_response(refusal: Refusal) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&refusal.body).unwrap_or_default();
    let mut response = Response::new(whole(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-supervisor-refusal", HeaderValue::from_static("1"));
    for (name, value) in refusal.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}

/// A body already in hand.
fn whole(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn refuse(api: Api, kind: RefusalKind, message: impl Into<String>) -> Response<ProxyBody> {
    refusal_response(Refusal::new(api, kind, message))
}

/// The agent's credential, from `x-api-key` or `Authorization: Bearer` (both
/// are sent by current SDKs, depending on version).
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    let auth = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The pipeline for one request; `grant` is what its token was found to
/// be (`None`: no token, or an unknown one).
async fn handle(
    shared: &ProxyShared,
    req: Request<Incoming>,
    grant: Option<Grant>,
    _peer: SocketAddr,
) -> Response<ProxyBody> {
    let received = Instant::now();
    let path = req.uri().path().to_owned();
    let shape = route::shape_of(&path);
    if presented_token(req.headers()).is_none() {
        return refuse(
            shape,
            RefusalKind::Unauthenticated,
            "no API key: send the scoped token the supervisor put in your environment (`x-api-key` or `Authorization: Bearer`)",
        );
    }
    let Some(grant) = grant else {
        return refuse(
            shape,
            RefusalKind::Unauthenticated,
            "unknown or expired API key: only the token of the agent's current launch is accepted",
        );
    };
    let meter = shared.meters.get(&grant.agent);
    let route = meter.as_ref().and_then(|m| m.route(grant.entry));
    let (Some(meter), Some(route)) = (meter, route) else {
        return refuse(
            shape,
            RefusalKind::Unauthenticated,
            format!("agent \"{}\" is no longer in the fleet", grant.agent),
        );
    };
    let api = route.provider.api();
    if let Some(reason) = meter.quarantine_reason() {
        meter
            .metrics
            .count_request(RequestOutcome::RefusedQuarantine);
        return refuse(
            api,
            RefusalKind::Quarantined,
            format!(
                "agent \"{}\" is quarantined: {reason}; an operator can release it with `supervisor release {}`",
                meter.name(),
                meter.name()
            ),
        );
    }
    // The one place the path is checked: what passes is its canonical form,
    // and that (never the path as sent) is what is forwarded.
    let resolved = match route::resolve(api, req.method(), &path) {
        Ok(resolved) => resolved,
        Err(refused) => {
            return refuse_path(api, meter.name(), req.method(), &path, refused, shared);
        }
    };
    match resolved.endpoint {
        Endpoint::Metered(kind) => {
            handle_metered(shared, req, &meter, route, kind, &resolved.path, received).await
        }
        Endpoint::CountTokens | Endpoint::Models | Endpoint::Model => {
            forward_unmetered(shared, req, &route, &resolved.path).await
        }
    }
}

/// A path the allow-list refused: 400 if it could be read as another path,
/// 404 if it is simply not a route the proxy forwards.
fn refuse_path(
    api: Api,
    agent: &str,
    method: &Method,
    path: &str,
    refused: route::Refused,
    shared: &ProxyShared,
) -> Response<ProxyBody> {
    let shown = route::shown(path);
    let routes = route::routes_for(api);
    match refused {
        route::Refused::Malformed(why) => {
            tracing::warn!(
                agent,
                "proxy: refused `{method} {}`: {why}",
                shared.redaction.redact(&shown)
            );
            refuse(
                api,
                RefusalKind::BadRequest,
                format!(
                    "the supervisor's proxy refused `{method} {shown}` for agent \"{agent}\": {why}; nothing was forwarded. Only these routes pass, exactly: {routes}"
                ),
            )
        }
        route::Refused::NotRouted => refuse(
            api,
            RefusalKind::NotFound,
            format!(
                "the supervisor's proxy does not forward `{method} {shown}` for agent \"{agent}\": only these routes pass, exactly: {routes}"
            ),
        ),
    }
}

/// Headers never copied between the agent and upstream: hop-by-hop ones,
/// the agent's credentials (replaced by the real key), encodings the tap
/// could not read, and the headers some servers and gateways read as
/// another path, method or host than the request line's — the allow-list
/// checked that line, so nothing may override it.
const SKIPPED_REQUEST_HEADERS: [&str; 25] = [
    "x-original-url",
    "x-rewrite-url",
    "x-override-url",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-forwarded-prefix",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-forwarded-host",
    "x-host",
    "forwarded",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "x-api-key",
    "accept-encoding",
];

/// Hop-by-hop headers of an answer; `content-length` is set again when the
/// answer passes unchanged.
const SKIPPED_RESPONSE_HEADERS: [&str; 8] = [
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The request to send upstream: the agent's method, the checked canonical
/// `path`, the agent's query and headers (less the skipped ones), to the
/// route's origin, with the real key. Moves the agent's headers rather than
/// copying them one by one.
fn upstream_request(
    target: &Target,
    method: Method,
    path: &str,
    query: Option<&str>,
    mut headers: HeaderMap,
    body: reqwest::Body,
) -> Result<reqwest::Request, Box<Response<ProxyBody>>> {
    let api = target.provider.api();
    let origin = match &target.upstream {
        Some(Ok(origin)) => origin,
        Some(Err(message)) => {
            return Err(Box::new(refuse(
                api,
                RefusalKind::UpstreamUnreachable,
                format!(
                    "{message}; fix `providers.{}.upstream`",
                    target.provider.name
                ),
            )));
        }
        None => {
            return Err(Box::new(refuse(
                api,
                RefusalKind::NotFound,
                "the simulated provider only answers model calls",
            )));
        }
    };
    let url = match route::upstream_url(origin, path, query) {
        Ok(url) => url,
        Err(err) => {
            tracing::error!("proxy: refusing to forward: {err}");
            return Err(Box::new(refuse(
                api,
                RefusalKind::Internal,
                "the supervisor's proxy could not build an upstream URL with exactly the checked path, so it forwarded nothing; see its log",
            )));
        }
    };
    for name in SKIPPED_REQUEST_HEADERS {
        headers.remove(name);
    }
    match &target.credential {
        Credential::Header(name, value) => {
            headers.insert(name.clone(), value.clone());
        }
        Credential::None => {}
        Credential::Invalid => {
            return Err(Box::new(refuse(
                api,
                RefusalKind::Internal,
                format!(
                    "the key of provider `{}` cannot be sent in an HTTP header; check the secret for control characters",
                    target.provider.name
                ),
            )));
        }
    }
    let mut request = reqwest::Request::new(method, url);
    *request.headers_mut() = headers;
    *request.body_mut() = Some(body);
    Ok(request)
}

/// A metered request's body as sent upstream. It records when the HTTP
/// client first asks for it: the client does so only once a connection is
/// up (TCP and TLS) and the request head is queued on it, in the same step
/// that flushes both. Until then nothing of the request has left the
/// proxy (over HTTP/2 its headers may have, but not the body, without which
/// the provider cannot run it), so the provider cannot have billed it.
struct WatchedBody {
    bytes: Option<Bytes>,
    len: u64,
    asked: Arc<AtomicBool>,
}

impl WatchedBody {
    fn new(bytes: Bytes) -> (Self, Arc<AtomicBool>) {
        let asked = Arc::new(AtomicBool::new(false));
        let body = Self {
            len: bytes.len() as u64,
            bytes: Some(bytes),
            asked: asked.clone(),
        };
        (body, asked)
    }
}

impl hyper::body::Body for WatchedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.asked.store(true, Ordering::Release);
        std::task::Poll::Ready(self.bytes.take().map(|b| Ok(hyper::body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        // An exact length: the client sends `content-length`, as for bytes.
        hyper::body::SizeHint::with_exact(self.bytes.as_ref().map_or(0, |_| self.len))
    }
}

/// Whether a request that got no answer may have reached the provider (and
/// so may be billed). Only proof that nothing was sent counts as "no": the
/// body was never asked for, or the error is one of connecting (DNS, TCP,
/// TLS handshake), which comes before anything is written.
fn may_have_reached(body_asked: bool, err: Option<&reqwest::Error>) -> bool {
    body_asked && !err.is_some_and(reqwest::Error::is_connect)
}

async fn forward_unmetered(
    shared: &ProxyShared,
    req: Request<Incoming>,
    route: &Target,
    path: &str,
) -> Response<ProxyBody> {
    let api = route.provider.api();
    if route.upstream.is_none() {
        return refuse(
            api,
            RefusalKind::NotFound,
            "the simulated provider only answers model calls",
        );
    }
    let (parts, body) = req.into_parts();
    let body = match read_body(body, shared.settings.max_body, body_lease(&parts)).await {
        Ok(b) => b,
        Err(resp) => return resp(api),
    };
    let request = match upstream_request(
        route,
        parts.method,
        path,
        parts.uri.query(),
        parts.headers,
        reqwest::Body::from(body),
    ) {
        Ok(request) => request,
        Err(refusal) => return *refusal,
    };
    let exchange = async {
        let answer = shared.client.execute(request).await?;
        let status = answer.status().as_u16();
        let headers = answer.headers().clone();
        let body = answer.bytes().await?;
        Ok::<_, reqwest::Error>((status, headers, body))
    };
    match tokio::time::timeout(shared.settings.upstream_timeout, exchange).await {
        Ok(Ok((status, headers, body))) => {
            let mut response = Response::new(whole(body));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            copy_response_headers(&headers, response.headers_mut());
            response
        }
        Ok(Err(err)) => {
            let (kind, what) = upstream_error(&route.provider.name, &err, &shared.redaction);
            refuse(
                api,
                kind,
                format!(
                    "upstream provider `{}` {what}; this endpoint is free, nothing was charged",
                    route.provider.name
                ),
            )
        }
        Err(_) => refuse(
            api,
            RefusalKind::UpstreamTimeout,
            format!(
                "upstream provider `{}` did not answer in time",
                route.provider.name
            ),
        ),
    }
}

fn copy_response_headers(from: &reqwest::header::HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !SKIPPED_RESPONSE_HEADERS.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Logs a failed upstream exchange; says which refusal it is and what
/// happened, for the agent's message.
fn upstream_error(
    provider: &str,
    err: &reqwest::Error,
    redaction: &Redaction,
) -> (RefusalKind, &'static str) {
    // reqwest's Display can include the URL, never the headers; an agent may
    // have put a value in the URL's query, so the text is masked too.
    let (kind, what) = if err.is_connect() {
        (RefusalKind::UpstreamUnreachable, "could not be reached")
    } else if err.is_timeout() {
        (RefusalKind::UpstreamTimeout, "did not answer in time")
    } else {
        (
            RefusalKind::UpstreamUnreachable,
            "failed before its answer began",
        )
    };
    let text = redaction.redact(&error_chain(err));
    tracing::warn!(provider, "upstream {what}: {text}");
    (kind, what)
}

/// An error with its causes, `: `-joined (reqwest's own Display is only the
/// outermost, "error sending request").
fn error_chain(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What an agent is told of a metered request that got no answer, and how
/// it was settled.
fn unanswered_message(provider: &str, what: &str, charged: Option<Amount>) -> String {
    match charged {
        None => format!(
            "upstream provider `{provider}` {what}; the request never left the proxy, so nothing was charged"
        ),
        Some(amount) => {
            let cost = if amount.micro_usd > 0 {
                format!(" / ${:.6}", amount.micro_usd as f64 / 1e6)
            } else {
                String::new()
            };
            format!(
                "upstream provider `{provider}` {what}; the request had been sent and may be billed, so it is charged as cut at its reservation ({} tokens{cost})",
                amount.tokens
            )
        }
    }
}

type Refuser = Box<dyn FnOnce(Api) -> Response<ProxyBody> + Send>;

/// The body lease the gate gave this request (none for a request whose
/// agent is unknown, which never gets this far).
fn body_lease(parts: &hyper::http::request::Parts) -> Option<Arc<BodyLease>> {
    parts.extensions.get::<Arc<BodyLease>>().cloned()
}

fn too_large(max: u64) -> Refuser {
    Box::new(move |api| {
        let mut response = refuse(
            api,
            RefusalKind::TooLarge,
            format!("request body is larger than `proxy.max_body` ({max} bytes)"),
        );
        // The rest of the body is not read: the connection cannot be reused.
        response
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        response
    })
}

/// Reads the request body within `max` bytes and `BODY_READ_TIMEOUT`,
/// taking each chunk from `lease` (the agent's and the proxy's budgets of
/// bytes in flight) as it arrives, so slow bodies cannot pile up memory. A
/// `Content-Length` above `max` is refused before a byte is read.
async fn read_body(
    mut body: Incoming,
    max: u64,
    lease: Option<Arc<BodyLease>>,
) -> Result<Bytes, Refuser> {
    if hyper::body::Body::size_hint(&body).lower() > max {
        return Err(too_large(max));
    }
    let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
    let mut buffer = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => return Ok(buffer.freeze()),
            Ok(Some(Err(err))) => {
                let message = format!("could not read the request body: {err}");
                return Err(Box::new(move |api| {
                    refuse(api, RefusalKind::BadRequest, message)
                }));
            }
            Err(_) => {
                return Err(Box::new(|api| {
                    refuse(
                        api,
                        RefusalKind::BadRequest,
                        "the request body did not arrive within 60s",
                    )
                }));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = data.len() as u64;
        if buffer.len() as u64 + len > max {
            return Err(too_large(max));
        }
        if let Some(lease) = &lease
            && let Err(refused) = lease.grow(len)
        {
            let agent = lease.agent().to_owned();
            return Err(Box::new(move |api| {
                let mut response = refused_body(api, &agent, &refused);
                // The rest of the body is not read: the connection cannot be reused.
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                response
            }));
        }
        buffer.extend_from_slice(&data);
    }
}

fn usage_amount(usage: &Usage, prices: Option<&Prices>) -> Amount {
    Amount::new(
        usage.total(),
        prices.map_or(0, |p| cost_micro_usd(usage, p)),
    )
}

/// Steps 3–8 of the pipeline for one metered model call.
async fn handle_metered(
    shared: &ProxyShared,
    req: Request<Incoming>,
    meter: &Arc<AgentMeter>,
    route: Arc<Target>,
    kind: ApiKind,
    path: &str,
    started: Instant,
) -> Response<ProxyBody> {
    let api = route.provider.api();
    let agent = meter.name().to_owned();
    let (parts, body) = req.into_parts();

    let bad_request = || meter.metrics.count_request(RequestOutcome::BadRequest);

    // 3. body and worst case
    let body = match read_body(body, shared.settings.max_body, body_lease(&parts)).await {
        Ok(b) => b,
        Err(resp) => {
            bad_request();
            return resp(api);
        }
    };
    let mut json: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(err) => {
            bad_request();
            return refuse(
                api,
                RefusalKind::BadRequest,
                format!("request body is not valid JSON: {err}"),
            );
        }
    };

    // 3b. the runaway detector sees every parsed request before it can cost anything
    let runaway_api = match kind {
        ApiKind::Anthropic => runaway::Api::AnthropicMessages,
        ApiKind::OpenAiChat => runaway::Api::OpenAiChat,
        ApiKind::OpenAiResponses => runaway::Api::OpenAiResponses,
    };
    let retry = runaway::parse_retry_count(
        parts
            .headers
            .get("x-stainless-retry-count")
            .map(|v| v.as_bytes()),
    );
    let conversation = match RequestSummary::from_json(runaway_api, &json, retry) {
        Ok(summary) => {
            let summary = summary.at(monotonic_ms());
            let (verdict, action) = meter.observe_request(&summary);
            if let Verdict::Tripped(evidence) = verdict {
                let reason = format!("runaway: {evidence}");
                let _ = shared.events.send(ProxyEvent::Tripped {
                    agent: agent.clone(),
                    action,
                    evidence,
                });
                if action == RunawayAction::Quarantine {
                    meter.set_quarantine(Some(reason.clone()));
                    meter.metrics.count_quarantine();
                    meter
                        .metrics
                        .count_request(RequestOutcome::RefusedQuarantine);
                    return refuse(
                        api,
                        RefusalKind::Quarantined,
                        format!(
                            "agent \"{agent}\" is quarantined: {reason}; an operator can release it with `supervisor release {agent}`"
                        ),
                    );
                }
            }
            Some(summary.conversation)
        }
        Err(_) => None,
    };
    let injected = kind == ApiKind::OpenAiChat && ensure_openai_stream_usage(&mut json);
    // Looked up and marked in flight in one step (see `chain`).
    let (known, chain) = meter.begin_chain(ChainRefs::of(kind, &json));
    let estimate = match estimate_request(kind, &json, &EstimateConfig::for_kind(kind), &known) {
        Ok(e) => e,
        Err(err) => {
            bad_request();
            return refuse(api, RefusalKind::BadRequest, err.to_string());
        }
    };
    let prices = route.provider.prices.get(&estimate.model).copied();
    if prices.is_none() {
        if meter
            .budget
            .usage(Month::current())
            .ceilings
            .monthly_micro_usd
            .is_some()
        {
            bad_request();
            return refuse(
                api,
                RefusalKind::BadRequest,
                format!(
                    "agent \"{agent}\" has a USD ceiling, but model `{}` has no price under `providers.{}.prices`, so this request cannot be priced; add its price to fleet.yaml",
                    estimate.model, route.provider.name
                ),
            );
        }
        let first = shared
            .unpriced
            .lock()
            .map(|mut seen| seen.insert((route.provider.name.clone(), estimate.model.clone())))
            .unwrap_or(false);
        if first {
            tracing::warn!(
                agent = %agent,
                "model `{}` has no price under `providers.{}.prices`; its requests are counted in tokens only",
                estimate.model,
                route.provider.name
            );
        }
    }
    let worst_tokens = estimate
        .input_tokens_upper_bound
        .saturating_add(estimate.max_output_tokens);
    let worst = Amount::new(
        worst_tokens,
        prices.map_or(0, |p| {
            worst_case_cost_micro_usd(
                estimate.input_tokens_upper_bound,
                estimate.max_output_tokens,
                &p,
            )
        }),
    );

    // 4. rate
    let ticket = match meter.budget.admit_rate(Instant::now(), worst_tokens) {
        Ok(t) => t,
        Err(refusal) => {
            meter.metrics.count_request(RequestOutcome::Throttled);
            let _ = shared.events.send(ProxyEvent::RateLimited {
                agent: agent.clone(),
            });
            return refuse(
                api,
                RefusalKind::RateLimited {
                    retry_after: Duration::from_secs(refusal.retry_after_secs),
                },
                refusal.to_string(),
            );
        }
    };

    // 5. ceiling, then a durable ledger row
    let month = Month::current();
    let reservation = match meter.budget.reserve(month, worst) {
        Ok(r) => r,
        Err(refusal) => {
            meter.budget.cancel_rate(Instant::now(), ticket);
            meter.metrics.count_request(RequestOutcome::RefusedCeiling);
            // Say why a worst case is so large when the body could not bound it.
            let message = match estimate.unbounded_reason {
                Some(reason) => format!(
                    "{refusal} (its input could not be bounded from its body, so it counts as the whole context window: {reason})"
                ),
                None => refusal.to_string(),
            };
            tracing::warn!(agent = %agent, "monthly ceiling reached: {message}");
            let _ = shared.events.send(ProxyEvent::CeilingReached {
                agent: agent.clone(),
                message: message.clone(),
            });
            return refuse(api, RefusalKind::CeilingReached, message);
        }
    };
    let ledger_id = match shared.ledger.reserve(ledger::Reservation {
        agent: agent.clone(),
        provider: route.provider.name.clone(),
        model: estimate.model.clone(),
        month,
        started_at_ms: ledger::unix_millis_now(),
        reserved_tokens: worst.tokens,
        reserved_micro_usd: worst.micro_usd,
    }) {
        Ok(id) => id,
        Err(err) => {
            reservation.release();
            meter.budget.cancel_rate(Instant::now(), ticket);
            meter.metrics.count_request(RequestOutcome::InternalError);
            tracing::error!(agent = %agent, "refusing a request: {err:#}");
            return refuse(
                api,
                RefusalKind::Internal,
                "the supervisor cannot record usage right now (ledger unwritable), so it forwards nothing; see its log",
            );
        }
    };
    let pending = Pending {
        meter: meter.clone(),
        ledger: shared.ledger.clone(),
        ledger_id,
        prices,
        started,
        streamed: estimate.stream,
        events: shared.events.clone(),
        open: Some(Open {
            reservation,
            ticket,
            conversation,
            chain,
        }),
    };

    // 6. forward; everything before this point is the proxy's own overhead.
    meter.metrics.observe_overhead(started.elapsed());
    // What the parsed body is still needed for is done here, and then it is
    // dropped, with every copy of the body but the one forwarded: a `Value`
    // is many times its body, and the body-byte caps bound only what is
    // held across the upstream wait. Until here nothing awaited, so at most
    // one parsed body exists on the proxy's thread at a time.
    let simulated = match &route.provider.kind {
        ProviderKind::Simulated { latency, .. } => Some((simulated::answer(api, &json), *latency)),
        ProviderKind::Anthropic { .. } | ProviderKind::OpenAi { .. } => None,
    };
    let body = if injected {
        let rewritten = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
        // The lease paid for the body as read; the rewrite adds a field, and
        // the lease covers what is held until the answer begins. A refusal
        // here (for a few dozen bytes) would only confuse the agent, so the
        // excess then goes uncounted.
        let grown = (rewritten.len() as u64).saturating_sub(body.len() as u64);
        if grown > 0
            && let Some(lease) = body_lease(&parts)
        {
            let _ = lease.grow(grown);
        }
        drop(body);
        rewritten
    } else {
        body
    };
    drop(json);
    // The simulated answer is whole before it is sent, so is its usage.
    let mut simulated_chunks = None;
    let (status, headers, source): (u16, HeaderMap, Source) = match simulated {
        Some((answer, latency)) => {
            drop(body);
            simulated_chunks = Some(answer.chunks.clone());
            let mut headers = HeaderMap::new();
            headers.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static(answer.content_type),
            );
            (
                answer.status,
                headers,
                Source::Simulated(super::answer::simulated(answer.chunks, latency)),
            )
        }
        None => {
            let (body, asked) = WatchedBody::new(body);
            let request = match upstream_request(
                &route,
                parts.method,
                path,
                parts.uri.query(),
                parts.headers,
                reqwest::Body::wrap(body),
            ) {
                Ok(request) => request,
                Err(refusal) => {
                    pending.release_failed();
                    return *refusal;
                }
            };
            let sent = tokio::time::timeout(
                shared.settings.upstream_timeout,
                shared.client.execute(request),
            )
            .await;
            match sent {
                Ok(Ok(answer)) => {
                    let (head, body) = hyper::Response::<reqwest::Body>::from(answer).into_parts();
                    let mut headers = head.headers;
                    for name in SKIPPED_RESPONSE_HEADERS {
                        headers.remove(name);
                    }
                    (head.status.as_u16(), headers, Source::Upstream(body))
                }
                Ok(Err(err)) => {
                    let provider = &route.provider.name;
                    let (kind, what) = upstream_error(provider, &err, &shared.redaction);
                    let reached = may_have_reached(asked.load(Ordering::Acquire), Some(&err));
                    let charged = pending.unanswered(reached);
                    return refuse(api, kind, unanswered_message(provider, what, charged));
                }
                Err(_) => {
                    let provider = &route.provider.name;
                    let reached = may_have_reached(asked.load(Ordering::Acquire), None);
                    let within = humantime::format_duration(shared.settings.upstream_timeout);
                    let what = if reached {
                        format!("did not answer within `proxy.upstream_timeout` ({within})")
                    } else {
                        format!(
                            "could not be connected to within `proxy.upstream_timeout` ({within})"
                        )
                    };
                    tracing::warn!(provider = %provider, "upstream {what}");
                    let charged = pending.unanswered(reached);
                    return refuse(
                        api,
                        RefusalKind::UpstreamTimeout,
                        unanswered_message(provider, &what, charged),
                    );
                }
            }
        }
    };

    // 7–8. stream back through the tap; the body settles when the answer ends.
    let is_sse = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let content_length = source_length(&source);
    let reader = if is_sse {
        Reader::Sse(Box::new(UsageTap::new(
            kind,
            TapOptions {
                drop_injected_usage: injected,
                ..TapOptions::default()
            },
        )))
    } else {
        Reader::json(kind, content_length)
    };
    // A JSON answer passes byte for byte, so its length can be announced:
    // hyper then sends head and body in one write, without chunk framing.
    let content_length = content_length.filter(|_| !is_sse);
    let mut body = AnswerBody::new(
        source,
        reader,
        pending,
        status,
        content_length,
        shared.settings.upstream_timeout,
    );
    if let Some(chunks) = simulated_chunks {
        body = body.with_known_usage(super::answer::simulated_usage(kind, is_sse, &chunks));
    }
    let mut response = Response::new(BodyExt::boxed(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *response.headers_mut() = headers;
    if let Some(n) = content_length {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    response
}

/// The exact length of an answer, when upstream announced it.
fn source_length(source: &Source) -> Option<u64> {
    match source {
        Source::Upstream(body) => hyper::body::Body::size_hint(body).exact(),
        Source::Simulated(_) => None,
    }
}

/// What a request holds until its answer is settled.
pub(super) struct Pending {
    meter: Arc<AgentMeter>,
    ledger: Arc<Ledger>,
    ledger_id: i64,
    prices: Option<Prices>,
    started: Instant,
    streamed: bool,
    /// Where a crossed `budget.alert_at` is reported.
    events: mpsc::UnboundedSender<ProxyEvent>,
    /// `Some` until the request is settled or released.
    open: Option<Open>,
}

/// The part of a request that settling uses up.
struct Open {
    reservation: Reservation,
    ticket: RateTicket,
    conversation: Option<ConversationKey>,
    /// Its place in the agent's Responses chain record.
    chain: ChainTicket,
}

impl Drop for Pending {
    /// A request dropped before its answer began (the client left, or the
    /// proxy stopped, while upstream was still thinking) may have been
    /// billed: it is charged as cut, at its reservation, in memory and in
    /// the ledger alike, so no row stays unsettled.
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            tracing::info!(agent = %self.meter.name(), "request abandoned before its answer began");
            self.charge(open, None, &TapReport::cut(), None);
        }
    }
}

impl Pending {
    /// No answer came. If the request may have reached the provider it may
    /// be billed, so it is charged as cut at its reservation (as when the
    /// client leaves) and the charge is returned; otherwise it is released.
    fn unanswered(mut self, may_have_reached: bool) -> Option<Amount> {
        if !may_have_reached {
            self.release_failed();
            return None;
        }
        let open = self.open.take()?;
        // Charged as cut, but counted where timeouts and unreachable
        // upstreams always were: as upstream errors.
        Some(self.charge(
            open,
            None,
            &TapReport::cut(),
            Some(RequestOutcome::UpstreamError),
        ))
    }

    /// Nothing was sent upstream: free everything, charge nothing, count it
    /// as an upstream error.
    fn release_failed(mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        let metrics = &self.meter.metrics;
        metrics.count_request(RequestOutcome::UpstreamError);
        metrics.observe_duration(self.started.elapsed());
        open.reservation.release();
        self.meter.budget.cancel_rate(Instant::now(), open.ticket);
        self.ledger.settle(
            self.ledger_id,
            Settlement {
                outcome: Outcome::Released,
                streamed: self.streamed,
                duration_ms: millis(self.started.elapsed()),
                ..Settlement::default()
            },
        );
    }

    /// A forwarded request holding `worst` (no prices: tokens only), for
    /// tests of what settles it.
    #[cfg(test)]
    pub(super) fn for_tests(meter: Arc<AgentMeter>, ledger: Arc<Ledger>, worst: u64) -> Self {
        let ticket = meter
            .budget
            .admit_rate(Instant::now(), worst)
            .expect("no rate limit in tests");
        let month = Month::current();
        let reservation = meter
            .budget
            .reserve(month, Amount::new(worst, 0))
            .expect("no ceiling in tests");
        let ledger_id = ledger
            .reserve(ledger::Reservation {
                agent: meter.name().to_owned(),
                provider: "fake".into(),
                model: "claude-sonnet-4-5".into(),
                month,
                started_at_ms: ledger::unix_millis_now(),
                reserved_tokens: worst,
                reserved_micro_usd: 0,
            })
            .expect("journal writable");
        let chain = meter.begin_chain(ChainRefs::default()).1;
        Self {
            meter,
            ledger,
            ledger_id,
            prices: None,
            started: Instant::now(),
            streamed: false,
            open: Some(Open {
                reservation,
                ticket,
                conversation: None,
                chain,
            }),
            events: mpsc::unbounded_channel().0,
        }
    }

    pub(super) fn agent(&self) -> &str {
        self.meter.name()
    }

    /// Charges the answer: exact usage when it completed (or was refused by
    /// upstream), conservatively otherwise (never below the reservation).
    /// The one place a forwarded request is settled.
    pub(super) fn settle(mut self, status: u16, report: &TapReport) {
        if let Some(open) = self.open.take() {
            self.charge(open, Some(status), report, None);
        }
    }

    /// Settles `open` against `report`; `status` is `None` when no answer
    /// began; `count_as` overrides the outcome counted in the metrics.
    /// Returns what was charged.
    fn charge(
        &self,
        open: Open,
        status: Option<u16>,
        report: &TapReport,
        count_as: Option<RequestOutcome>,
    ) -> Amount {
        let Open {
            reservation,
            ticket,
            conversation,
            chain,
        } = open;
        if let (Some(conversation), Some(status)) = (conversation, status) {
            self.meter
                .observe_response(conversation, &response_summary(status, report));
        }
        let failed = status.is_some_and(|s| s >= 400);
        let exact = match (&report.outcome, &report.usage) {
            (TapOutcome::Completed, Metered::Exact(u)) => Some(*u),
            (TapOutcome::Errored, Metered::Exact(u)) if failed => Some(*u),
            _ => None,
        };
        chain.end(&ChainEnd::of(status, exact.filter(|_| !failed), report));
        let seen = report.usage.seen().unwrap_or_default();
        let (settled, outcome) = match exact {
            Some(usage) => {
                let outcome = if failed || report.outcome == TapOutcome::Errored {
                    Outcome::UpstreamError
                } else {
                    Outcome::Ok
                };
                (
                    reservation.settle(usage_amount(&usage, self.prices.as_ref())),
                    outcome,
                )
            }
            None => (
                reservation.settle_cut(usage_amount(&seen, self.prices.as_ref())),
                Outcome::Cut,
            ),
        };
        if outcome == Outcome::Cut {
            tracing::warn!(
                agent = %self.meter.name(),
                charged_tokens = settled.charged.tokens,
                "answer ended before its usage arrived; charged conservatively at its reservation"
            );
        }
        if settled.overrun {
            tracing::warn!(
                agent = %self.meter.name(),
                "upstream reported more usage than the request's worst case; charged what it reported"
            );
        }
        self.meter
            .budget
            .settle_rate(Instant::now(), ticket, settled.charged.tokens);
        let metrics = &self.meter.metrics;
        metrics.count_request(count_as.unwrap_or(match outcome {
            Outcome::Ok => RequestOutcome::Ok,
            Outcome::Cut => RequestOutcome::Cut,
            Outcome::UpstreamError | Outcome::Released => RequestOutcome::UpstreamError,
        }));
        for (kind, tokens) in [
            (TokenKind::Input, seen.input_tokens),
            (TokenKind::Output, seen.output_tokens),
            (TokenKind::CacheCreation, seen.cache_creation_input_tokens),
            (TokenKind::CacheRead, seen.cache_read_input_tokens),
        ] {
            metrics.add_tokens(kind, tokens);
        }
        metrics.add_cost(settled.charged.micro_usd);
        metrics.observe_duration(self.started.elapsed());
        // Velocity counts what the provider saw, cache tokens at their price
        // weight — not the charge: a cut answer is charged at its
        // reservation, and an outage that resets connections is no runaway.
        let velocity_tokens = crate::runaway::velocity::weighted_tokens(
            seen.input_tokens,
            seen.output_tokens,
            seen.cache_creation_input_tokens,
            seen.cache_read_input_tokens,
        );
        if let Some((evidence, action)) = self
            .meter
            .observe_spend(ledger::unix_millis_now(), velocity_tokens)
        {
            metrics.count_velocity_trip();
            if action == RunawayAction::Quarantine {
                metrics.count_quarantine();
            }
            let _ = self.events.send(ProxyEvent::SpendVelocity {
                agent: self.meter.name().to_owned(),
                action,
                evidence,
            });
        }
        if let Some(crossed) = self.meter.budget_threshold(settled.month) {
            let _ = self.events.send(ProxyEvent::BudgetThreshold {
                agent: self.meter.name().to_owned(),
                month: settled.month,
                crossed,
            });
        }
        self.ledger.settle(
            self.ledger_id,
            Settlement {
                outcome,
                status,
                streamed: self.streamed,
                duration_ms: millis(self.started.elapsed()),
                input_tokens: seen.input_tokens,
                output_tokens: seen.output_tokens,
                cache_creation_input_tokens: seen.cache_creation_input_tokens,
                cache_read_input_tokens: seen.cache_read_input_tokens,
                charged_tokens: settled.charged.tokens,
                charged_micro_usd: settled.charged.micro_usd,
            },
        );
        settled.charged
    }
}

/// What the runaway detector needs of an answer: status, error, usage, tool
/// calls (a request continuing server-side state does not repeat them), the
/// answer's id (for `previous_response_id` chains) and when it ended.
fn response_summary(status: u16, report: &TapReport) -> ResponseSummary {
    let mut summary = match &report.error {
        Some(e) => ResponseSummary::upstream_error(status, Some(&e.kind), &e.message),
        None if status >= 400 => ResponseSummary::upstream_error(status, None, ""),
        None => ResponseSummary {
            status,
            tool_calls: report
                .tool_calls
                .iter()
                .map(|c| runaway::ToolCall::from_digest(&c.name, c.args_fingerprint))
                .collect(),
            response_id: report
                .response_id
                .as_deref()
                .map(runaway::Fingerprint::of_str),
            ..ResponseSummary::default()
        },
    };
    summary.at_ms = Some(monotonic_ms());
    summary.usage = report.usage.seen().map(|u| InputUsage {
        input_tokens: u.input_tokens,
        cache_creation_input_tokens: u.cache_creation_input_tokens,
        cache_read_input_tokens: u.cache_read_input_tokens,
    });
    summary
}

/// Milliseconds since the proxy's first use of this clock (monotonic): the
/// runaway detector's only notion of time.
fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    millis(EPOCH.get_or_init(Instant::now).elapsed())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token registered after admission looked it up (and missed) must
    /// not be served by `handle` without the body lease admission gives:
    /// `handle` acts on the grant it was handed and never looks again.
    #[tokio::test]
    async fn handle_acts_on_the_grant_it_was_given_not_a_second_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
        let (events, _rx) = mpsc::unbounded_channel();
        let shared = Arc::new(ProxyShared::new(ProxySpec::default(), ledger, events).unwrap());
        let token = super::super::tokens::mint().unwrap();
        let presented = token.expose().to_owned();
        shared.tokens.insert(
            token,
            Grant {
                agent: "late".to_owned(),
                entry: 0,
                launch: 1,
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = shared.clone();
        tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |req| {
                let shared = server.clone();
                // As admission does when its lookup missed.
                async move { Ok::<_, Infallible>(handle(&shared, req, None, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}/v1/messages"))
            .header("x-api-key", presented)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let text = resp.text().await.unwrap();
        assert!(text.contains("unknown or expired API key"), "{text}");
    }
}
