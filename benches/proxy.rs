//! `cargo bench --bench proxy`: what the metering proxy costs. In one run it
//! starts a fast fake Anthropic upstream inside this process, the real
//! `supervisor` binary on a temporary fleet (one agent, `delivery: direct`,
//! prices and every budget limit set, so identification, the governor, the
//! ceilings and the SQLite ledger all run but never refuse), then drives the
//! same closed-loop load first straight at the upstream and then through the
//! proxy, and prints throughput, latency percentiles and what the proxy adds.
//! Finally it stops the supervisor and checks with `supervisor usage --json`
//! that the ledger recorded every proxied request with its exact usage.
//!
//! Owns only benchmark scaffolding; it must not assert on timings (machines
//! are shared and noisy): the figures are printed against the issue's aim,
//! the correctness checks are what can fail the run.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The real key of the bench agent. With `delivery: direct` the proxy
/// recognises it, so the load generator can present it like an agent would.
const KEY: &str = "bench-direct-key-not-a-real-provider-key";
const AGENT: &str = "bench";

const JSON_REQUEST: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello in five words."}]}"#;
const SSE_REQUEST: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Say hello in five words."}]}"#;

/// Usage the fake upstream reports for every answer, JSON or SSE alike.
const INPUT_TOKENS: u64 = 14;
const OUTPUT_TOKENS: u64 = 9;

const JSON_ANSWER: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello there, friend, well met!"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":14,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":9}}"#;

/// One SSE event per frame, as a real stream arrives.
const SSE_EVENTS: [&str; 8] = [
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":14,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello there,\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" friend, well met!\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

/// Upper bound for "eventually" (start-up, shutdown): generous, machines are shared.
const PATIENCE: Duration = Duration::from_secs(30);

/// One measured load shape.
struct Scenario {
    /// What to pass after `--` to run only this one, e.g. `json-c1`.
    label: &'static str,
    name: &'static str,
    connections: usize,
    stream: bool,
    warmup: Duration,
    measure: Duration,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        label: "json-c32",
        name: "json",
        connections: 32,
        stream: false,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(5),
    },
    Scenario {
        label: "json-c1",
        name: "json",
        connections: 1,
        stream: false,
        warmup: Duration::from_millis(500),
        measure: Duration::from_secs(3),
    },
    Scenario {
        label: "sse-c32",
        name: "sse",
        connections: 32,
        stream: true,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(3),
    },
];

fn main() {
    if let Err(err) = run() {
        eprintln!("error: the proxy bench failed");
        for cause in err.chain() {
            eprintln!("caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    // `cargo bench` passes `--bench`; any other argument selects scenarios by label.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s.label))
        .collect();
    ensure!(
        !scenarios.is_empty(),
        "no scenario is called {wanted:?}; the scenarios are {:?}",
        SCENARIOS.map(|s| s.label)
    );
    let upstream = FakeUpstream::start().context("cannot start the fake upstream")?;
    let dir = tempfile::tempdir().context("cannot create a temporary fleet directory")?;
    let proxy_addr = free_port()?;
    write_fleet(dir.path(), proxy_addr, upstream.addr)?;
    let supervisor = SupervisorProcess::start(dir.path())?;

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let mut proxied = 0u64;
    let mut direct = 0u64;
    proxied += client
        .block_on(wait_until_proxy_answers(proxy_addr))
        .with_context(|| {
            format!(
                "the proxy never answered; see `{}`",
                supervisor.log.display()
            )
        })?;

    println!(
        "proxy bench: closed loop, HTTP/1.1 keep-alive; upstream = fake Anthropic in-process; \
         proxy = `supervisor run` with ledger, ceilings and rate buckets on"
    );
    println!(
        "{:<6} {:>5} {:<6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "answer",
        "conns",
        "path",
        "requests",
        "req/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "max µs",
        "proxy cpu",
        "bench cpu"
    );
    let mut summary = String::new();
    let mut aim = Aim::default();
    for scenario in scenarios {
        let body = Bytes::from_static(if scenario.stream {
            SSE_REQUEST.as_bytes()
        } else {
            JSON_REQUEST.as_bytes()
        });
        let base = client.block_on(load(upstream.addr, scenario, body.clone(), None))?;
        print_row(scenario, "direct", &base);
        direct += base.total;
        let through = client.block_on(load(proxy_addr, scenario, body, Some(supervisor.pid)))?;
        print_row(scenario, "proxy", &through);
        proxied += through.total;

        let (b, p) = (base.stats(), through.stats());
        let added_p50 = p.p50_us - b.p50_us;
        let added_p99 = p.p99_us - b.p99_us;
        let ratio = p.rps / b.rps;
        writeln!(
            summary,
            "{:<4} C={:<2}  added p50 {:>+7.1} µs  added p99 {:>+7.1} µs  throughput proxy/direct {:.2} ({:.0} vs {:.0} req/s)  proxy cpu {:.1} µs/req",
            scenario.name,
            scenario.connections,
            added_p50,
            added_p99,
            ratio,
            p.rps,
            b.rps,
            p.proxy_cpu_us.unwrap_or_default()
        )?;
        if !scenario.stream {
            if scenario.connections == 1 {
                aim.added_p50_us = Some(added_p50);
            } else {
                aim.proxy_rps = Some(p.rps);
            }
        }
    }
    println!();
    print!("{summary}");
    aim.print();

    // Correctness: stop the supervisor (it flushes the ledger), then read it
    // back the way an operator would.
    let usage = supervisor.stop_and_read_usage(dir.path())?;
    let served = upstream.served.load(Ordering::Relaxed);
    ensure!(
        served == direct + proxied,
        "the upstream served {served} requests, but the bench sent {direct} direct and {proxied} through the proxy"
    );
    check_ledger(&usage, proxied)?;
    println!(
        "ledger: {proxied} proxied requests recorded with exact usage ({} input, {} output tokens, ${:.4}); upstream served {served}",
        proxied * INPUT_TOKENS,
        proxied * OUTPUT_TOKENS,
        usage["cost_usd"].as_f64().unwrap_or_default()
    );
    Ok(())
}

/// The issue's targets, filled in as the runs finish.
#[derive(Default)]
struct Aim {
    proxy_rps: Option<f64>,
    added_p50_us: Option<f64>,
}

impl Aim {
    fn print(&self) {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        if let Some(rps) = self.proxy_rps {
            println!(
                "aim: > 10000 small req/s through the proxy: {:.0} req/s, {}",
                rps,
                verdict(rps > 10_000.0)
            );
        }
        if let Some(added) = self.added_p50_us {
            println!(
                "aim: added p50 latency < 150 µs (C=1): {:+.1} µs, {}",
                added,
                verdict(added < 150.0)
            );
        }
    }
}

/// Latencies of the measured window of one load run.
struct Measured {
    latencies_ns: Vec<u64>,
    window: Duration,
    /// Every request sent, warm-up included (for the ledger check).
    total: u64,
    /// CPU the supervisor used during the window (proxied runs only).
    proxy_cpu: Option<Duration>,
    /// CPU this process (load generator and fake upstream) used during the window.
    bench_cpu: Duration,
}

struct Stats {
    /// Supervisor CPU time per request (user + system), in µs.
    proxy_cpu_us: Option<f64>,
    bench_cpu_us: f64,
    rps: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
}

impl Measured {
    fn stats(&self) -> Stats {
        let mut sorted = self.latencies_ns.clone();
        sorted.sort_unstable();
        let us = |q: f64| percentile(&sorted, q) as f64 / 1_000.0;
        let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / sorted.len().max(1) as f64;
        Stats {
            proxy_cpu_us: self.proxy_cpu.map(per_request),
            bench_cpu_us: per_request(self.bench_cpu),
            rps: sorted.len() as f64 / self.window.as_secs_f64(),
            p50_us: us(0.50),
            p90_us: us(0.90),
            p99_us: us(0.99),
            max_us: us(1.0),
        }
    }
}

/// Nearest-rank percentile of an ascending slice (0 when empty).
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_row(scenario: &Scenario, path: &str, run: &Measured) {
    let s = run.stats();
    println!(
        "{:<6} {:>5} {:<6} {:>9} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>10} {:>10.1}",
        scenario.name,
        scenario.connections,
        path,
        run.latencies_ns.len(),
        s.rps,
        s.p50_us,
        s.p90_us,
        s.p99_us,
        s.max_us,
        s.proxy_cpu_us
            .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}")),
        s.bench_cpu_us
    );
}

/// Drives `scenario.connections` keep-alive connections, each sending its
/// next request as soon as the previous answer has been read to the end.
/// When `proxy` is given, its CPU time over the measured window is sampled.
async fn load(
    addr: SocketAddr,
    scenario: &Scenario,
    body: Bytes,
    proxy: Option<u32>,
) -> Result<Measured> {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + scenario.warmup;
    let until = measure_from + scenario.measure;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..scenario.connections {
        let body = body.clone();
        tasks.spawn(connection_loop(addr, body, start, measure_from, until));
    }
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let before = (
            proxy.map(cpu_time).transpose(),
            cpu_time(std::process::id()),
        );
        tokio::time::sleep_until(until.into()).await;
        let after = (
            proxy.map(cpu_time).transpose(),
            cpu_time(std::process::id()),
        );
        match (before, after) {
            ((Ok(p0), Ok(b0)), (Ok(p1), Ok(b1))) => Ok((
                p0.zip(p1).map(|(p0, p1)| p1.saturating_sub(p0)),
                b1.saturating_sub(b0),
            )),
            ((Err(e), _) | (_, Err(e)), _) | (_, (Err(e), _) | (_, Err(e))) => Err(e),
        }
    });
    let mut latencies_ns = Vec::new();
    let mut total = 0;
    while let Some(joined) = tasks.join_next().await {
        let (lat, sent) = joined.context("a load connection panicked")??;
        latencies_ns.extend(lat);
        total += sent;
    }
    let (proxy_cpu, bench_cpu) = cpu.await.context("the CPU sampler panicked")??;
    Ok(Measured {
        latencies_ns,
        window: scenario.measure,
        total,
        proxy_cpu,
        bench_cpu,
    })
}

async fn connection_loop(
    addr: SocketAddr,
    body: Bytes,
    start: Instant,
    measure_from: Instant,
    until: Instant,
) -> Result<(Vec<u64>, u64)> {
    let mut sender = connect(addr).await?;
    tokio::time::sleep_until(start.into()).await;
    let mut latencies = Vec::with_capacity(64 * 1024);
    let mut sent = 0;
    loop {
        let began = Instant::now();
        if began >= until {
            break;
        }
        let status = exchange(&mut sender, addr, body.clone()).await?;
        let took = began.elapsed();
        sent += 1;
        ensure!(
            status == StatusCode::OK,
            "request to {addr} answered {status}"
        );
        if began >= measure_from {
            latencies.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok((latencies, sent))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr} failed"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request, its answer read to the end (as an SDK would).
async fn exchange(sender: &mut Sender, addr: SocketAddr, body: Bytes) -> Result<StatusCode> {
    let request = Request::post("/v1/messages")
        .header(HOST, addr.to_string())
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    sender.ready().await.context("connection closed")?;
    let answer = sender
        .send_request(request)
        .await
        .with_context(|| format!("request to {addr} failed"))?;
    let status = answer.status();
    answer
        .into_body()
        .collect()
        .await
        .with_context(|| format!("answer from {addr} broke off"))?;
    Ok(status)
}

/// User plus system CPU time of process `pid` so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read `{path}`"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("`{path}` has no field {n}"))
    };
    let ticks = field(14)? + field(15)?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Ok(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// Polls until the proxy forwards a request for the bench agent (the
/// listener binds a moment before the agent's key is registered). Returns how
/// many requests went through, for the ledger check.
async fn wait_until_proxy_answers(addr: SocketAddr) -> Result<u64> {
    let deadline = Instant::now() + PATIENCE;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match connect(addr).await {
            Ok(mut sender) => {
                match exchange(
                    &mut sender,
                    addr,
                    Bytes::from_static(JSON_REQUEST.as_bytes()),
                )
                .await
                {
                    Ok(StatusCode::OK) => return Ok(1),
                    Ok(status) => last = format!("answered {status}"),
                    Err(err) => last = format!("{err:#}"),
                }
            }
            Err(err) => last = format!("{err:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no successful request through the proxy at {addr} within {PATIENCE:?} (last: {last})")
}

/// A fake Anthropic API on its own thread and single-threaded runtime,
/// answering `POST /v1/messages` with a fixed small answer and its usage.
struct FakeUpstream {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
}

impl FakeUpstream {
    fn start() -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("fake-upstream".into())
            .spawn(move || runtime.block_on(serve_upstream(listener, counter)))?;
        Ok(Self { addr, served })
    }
}

async fn serve_upstream(listener: std::net::TcpListener, served: Arc<AtomicU64>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        eprintln!("fake upstream: cannot register its listener");
        return;
    };
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let served = served.clone();
        let service = hyper::service::service_fn(move |req| {
            let served = served.clone();
            async move { Ok::<_, Infallible>(answer(req, &served).await) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type AnswerBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>, served: &AtomicU64) -> Response<AnswerBody> {
    let wanted = req.method() == hyper::Method::POST && req.uri().path() == "/v1/messages";
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let Ok(body) = body else {
        return status_only(StatusCode::BAD_REQUEST);
    };
    if !wanted {
        return status_only(StatusCode::NOT_FOUND);
    }
    served.fetch_add(1, Ordering::Relaxed);
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    let (content_type, body) = if stream {
        let frames = futures_util::stream::iter(
            SSE_EVENTS.map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from_static(e.as_bytes())))),
        );
        ("text/event-stream", BodyExt::boxed(StreamBody::new(frames)))
    } else {
        (
            "application/json",
            Full::new(Bytes::from_static(JSON_ANSWER.as_bytes())).boxed(),
        )
    };
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn status_only(status: StatusCode) -> Response<AnswerBody> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = status;
    response
}

/// A port nobody listens on right now (`proxy.listen: 127.0.0.1:0` would not
/// tell us which one the supervisor got).
fn free_port() -> Result<SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?)
}

/// fleet.yaml with one idle agent whose `llm:` entry has every meter on but
/// limits far above what the bench can spend.
fn write_fleet(dir: &Path, proxy: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let secrets = dir.join("secrets");
    let agent_dir = secrets.join(AGENT);
    std::fs::create_dir_all(&agent_dir)?;
    for d in [&secrets, &agent_dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    let key_file = agent_dir.join("anthropic_key");
    std::fs::write(&key_file, format!("{KEY}\n"))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let yaml = format!(
        "version: 1
state_dir: state
vault: {{ backend: dir, path: secrets }}
proxy: {{ listen: '{proxy}' }}
providers:
  fake:
    kind: anthropic
    upstream: 'http://{upstream}'
    prices: {{ claude-sonnet-4-5: {{ input: 3, output: 15, cache_write: 3.75, cache_read: 0.3 }} }}
agents:
  {AGENT}:
    command: [sleep, '3600']
    restart: {{ policy: never }}
    stop: {{ grace: 2s }}
    llm: [{{ provider: fake, key: anthropic_key, delivery: direct }}]
    budget: {{ monthly_usd: 1000000000, monthly_tokens: 1000G, tokens_per_minute: 1000G, requests_per_minute: 1000G }}
"
    );
    std::fs::write(dir.join("fleet.yaml"), yaml)?;
    Ok(())
}

/// `supervisor run` on the bench fleet; killed if the bench fails midway.
struct SupervisorProcess {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

/// The binary under test: this build's, or `SUPERVISOR_BENCH_BIN` to compare
/// another build (say, before and after a change) against the same upstream
/// and load generator.
fn supervisor_bin() -> String {
    std::env::var("SUPERVISOR_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_supervisor").to_owned())
}

impl SupervisorProcess {
    fn start(dir: &Path) -> Result<Self> {
        let log = dir.join("supervisor.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(supervisor_bin())
            .args(["run", "--log-format", "plain", "-f"])
            .arg(dir.join("fleet.yaml"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start `{}`", supervisor_bin()))?;
        Ok(Self {
            pid: child.id(),
            child: Some(child),
            log,
        })
    }

    /// SIGTERM, wait for the graceful exit (which flushes the ledger), then
    /// `supervisor usage --json`: the bench agent's row.
    fn stop_and_read_usage(mut self, dir: &Path) -> Result<serde_json::Value> {
        let mut child = self.child.take().context("supervisor already stopped")?;
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        kill(pid, Signal::SIGTERM).context("cannot signal the supervisor")?;
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the supervisor did not stop within {PATIENCE:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            status.success(),
            "the supervisor exited with {status}; see `{}`",
            self.log.display()
        );
        let output = Command::new(supervisor_bin())
            .args(["usage", "--json", "-f"])
            .arg(dir.join("fleet.yaml"))
            .output()
            .context("cannot run `supervisor usage`")?;
        ensure!(
            output.status.success(),
            "`supervisor usage --json` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rows: serde_json::Value = serde_json::from_slice(&output.stdout)
            .context("`supervisor usage --json` printed invalid JSON")?;
        rows.as_array()
            .and_then(|rows| rows.iter().find(|r| r["agent"] == AGENT))
            .cloned()
            .with_context(|| format!("`supervisor usage --json` has no row for `{AGENT}`"))
    }
}

impl Drop for SupervisorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The ledger holds exactly the proxied requests, each settled with the
/// upstream's usage: metering really was on for every one.
fn check_ledger(row: &serde_json::Value, proxied: u64) -> Result<()> {
    let field = |name: &str| {
        row[name]
            .as_u64()
            .with_context(|| format!("`supervisor usage --json` row has no number `{name}`"))
    };
    ensure!(
        field("requests")? == proxied,
        "the ledger holds {} requests, the bench sent {proxied} through the proxy",
        field("requests")?
    );
    ensure!(
        field("unsettled_requests")? == 0,
        "the ledger left {} requests unsettled",
        field("unsettled_requests")?
    );
    ensure!(
        field("input_tokens")? == proxied * INPUT_TOKENS
            && field("output_tokens")? == proxied * OUTPUT_TOKENS,
        "the ledger's usage ({} in, {} out) is not the upstream's ({} in, {} out)",
        field("input_tokens")?,
        field("output_tokens")?,
        proxied * INPUT_TOKENS,
        proxied * OUTPUT_TOKENS
    );
    Ok(())
}
