//! README "Metering proxy" (caps) and "Running under systemd" (descriptor
//! limits): a supervisor started under a low soft `RLIMIT_NOFILE` raises it,
//! starts a large fleet, and keeps serving every agent while one floods the
//! proxy with half-open connections or slow bodies.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Starts `supervisor run` with its soft open-file limit lowered to `soft`
/// (the hard one untouched), as systemd's default 1024 would.
fn run_with_soft_nofile(fleet: &FleetDir, soft: u64) -> Supervisor {
    run_with_nofile(fleet, soft, None)
}

/// [`run_with_soft_nofile`], with the hard limit lowered too when given.
fn run_with_nofile(fleet: &FleetDir, soft: u64, hard: Option<u64>) -> Supervisor {
    let log = fleet.file("supervisor.log");
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("clone log");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--log-format", "plain", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .current_dir(fleet.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: one system call on a value prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = soft;
            if let Some(hard) = hard {
                limit.rlim_max = hard;
            }
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn supervisor");
    Supervisor { child, log }
}

fn hard_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max
}

fn status(fleet: &FleetDir) -> Option<Vec<Value>> {
    let out = Command::new(bin())
        .args(["status", "--json", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .expect("run supervisor status");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// 1,000 agents under a soft limit of 1024 (the shipped unit's): each costs
/// the supervisor three descriptors (stdout, stderr, pidfd), so only ~330
/// started before the supervisor raised its soft limit to the hard one.
/// Agents still get the original soft limit back.
#[test]
fn a_thousand_agents_start_under_a_soft_limit_of_1024() {
    let agents = 1000;
    assert!(
        hard_nofile() >= 4096,
        "this test needs a hard open-file limit of at least 4096 (have {})",
        hard_nofile()
    );
    let fleet = FleetDir::new();
    let mut yaml = String::from("version: 1\nagents:\n");
    yaml.push_str("  probe:\n    command: [sh, -c, 'ulimit -Sn > nofile.txt; exec sleep 3600']\n");
    for i in 1..agents {
        yaml.push_str(&format!("  a{i}:\n    command: [sleep, '3600']\n"));
    }
    fleet.write_fleet(&yaml);
    let supervisor = run_with_soft_nofile(&fleet, 1024);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        if let Some(rows) = status(&fleet) {
            let running = rows.iter().filter(|r| r["state"] == "running").count();
            if running == agents {
                break;
            }
            last = format!(
                "{running} of {} running; others: {:?}",
                rows.len(),
                rows.iter()
                    .filter(|r| r["state"] != "running")
                    .take(3)
                    .map(|r| (
                        r["agent"].clone(),
                        r["state"].clone(),
                        r["last_exit"].clone()
                    ))
                    .collect::<Vec<_>>()
            );
        }
        assert!(
            Instant::now() < deadline,
            "not every agent reached running: {last}\nlog tail:\n{}",
            tail(&supervisor.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let probe = wait_for("probe's nofile.txt", || fleet.read("nofile.txt"));
    assert_eq!(
        probe.trim(),
        "1024",
        "agents get the original soft limit back"
    );
    assert!(
        supervisor
            .log()
            .contains("raised the open-file limit from 1024"),
        "{}",
        tail(&supervisor.log(), 20)
    );
}

/// Near the limit, the supervisor says so: a WARN in its log with the
/// figures, and the header of `supervisor status`.
#[test]
fn descriptors_near_the_limit_are_reported() {
    // 280 agents cost 840 descriptors: over 80% of a hard limit of 1024.
    let fleet = FleetDir::new();
    let mut yaml = String::from("version: 1\nagents:\n");
    for i in 0..280 {
        yaml.push_str(&format!("  a{i}:\n    command: [sleep, '3600']\n"));
    }
    fleet.write_fleet(&yaml);
    let supervisor = run_with_nofile(&fleet, 1024, Some(1024));
    supervisor.wait_log("open-file descriptors in use (over 80%)");
    let out = Command::new(bin())
        .args(["status", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .expect("run supervisor status");
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("descriptors: ") && first.ends_with("of 1,024 (NEAR THE LIMIT)"),
        "{text}"
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Two agents on the offline provider, each dumping its environment.
fn two_agent_fleet(proxy: &str) -> FleetDir {
    let fleet = FleetDir::new();
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0'{proxy} }}
providers:
  sim: {{ kind: simulated, latency: 0ms }}
agents:
  flood:
    command: [sh, -c, 'env > flood.env; exec sleep 1000']
    llm: [ {{ provider: sim }} ]
  good:
    command: [sh, -c, 'env > good.env; exec sleep 1000']
    llm: [ {{ provider: sim }} ]
"
    ));
    fleet
}

/// An agent as the proxy knows it: where to call, with which token.
struct Caller {
    addr: SocketAddr,
    token: String,
}

impl Caller {
    fn wait(fleet: &FleetDir, agent: &str) -> Self {
        let text = wait_for(&format!("{agent}.env"), || {
            fleet
                .read(&format!("{agent}.env"))
                .filter(|t| t.contains("ANTHROPIC_BASE_URL="))
        });
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{agent} has no {name}"))
                .to_owned()
        };
        let base = var("ANTHROPIC_BASE_URL");
        let addr = base
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("proxy address");
        Self {
            addr,
            token: var("ANTHROPIC_API_KEY"),
        }
    }

    fn head(&self, content_length: u64) -> String {
        format!(
            "POST /v1/messages HTTP/1.1\r\nhost: proxy\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: {content_length}\r\nconnection: close\r\n\r\n",
            self.token
        )
    }

    /// One small model call; its status and answer (`None`: no answer in 10s).
    fn call(&self) -> Option<(u16, String)> {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        stream
            .write_all(self.head(body.len() as u64).as_bytes())
            .ok()?;
        stream.write_all(body).ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).ok()?;
        parse_answer(&answer)
    }
}

fn parse_answer(answer: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(answer).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

/// Reads whatever answer `stream` has within `wait` (`None`: none yet).
fn answer_within(stream: &mut TcpStream, wait: Duration) -> Option<(u16, String)> {
    stream.set_read_timeout(Some(wait)).ok()?;
    let mut buf = vec![0u8; 16 << 10];
    let mut got = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    parse_answer(&got)
}

fn assert_served(good: &Caller, what: &str) {
    match good.call() {
        Some((200, _)) => {}
        other => panic!("the good agent was not served {what}: {other:?}"),
    }
}

/// Resident memory of `pid`, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// 2,000 half-open connections and 40 stalled requests from one agent,
/// against a supervisor whose open-file limit is 512 (soft and hard): the
/// other agent keeps being served, the flooding agent is refused in the
/// provider's shape, and a reload can still read fleet.yaml. Before the
/// caps, accept failed with EMFILE and the good agent's calls hung.
#[test]
fn a_connection_flood_leaves_other_agents_served() {
    let fleet = two_agent_fleet(", max_connections_per_agent: 16");
    let _supervisor = run_with_nofile(&fleet, 512, Some(512));
    let flood = Caller::wait(&fleet, "flood");
    let good = Caller::wait(&fleet, "good");
    assert_served(&good, "before the flood");

    // Half-open: connected, nothing sent. Bounded in count and time.
    let started = Instant::now();
    let mut half_open = Vec::new();
    while half_open.len() < 2000 && started.elapsed() < Duration::from_secs(15) {
        if let Ok(stream) = TcpStream::connect_timeout(&flood.addr, Duration::from_millis(100)) {
            half_open.push(stream);
        }
    }
    assert_served(&good, "during a half-open flood");

    // Identified and stalled: headers of a body that never comes. One at a
    // time, as each would otherwise evict the previous ones (still
    // unidentified, the newest of the flood) from the pool.
    let mut stalled: Vec<TcpStream> = (0..40)
        .filter_map(|_| {
            let mut stream =
                TcpStream::connect_timeout(&flood.addr, Duration::from_secs(2)).ok()?;
            stream.write_all(flood.head(100).as_bytes()).ok()?;
            std::thread::sleep(Duration::from_millis(20));
            Some(stream)
        })
        .collect();
    let refusals: Vec<(u16, String)> = stalled
        .iter_mut()
        .filter_map(|s| answer_within(s, Duration::from_millis(300)))
        .collect();
    assert!(
        refusals.len() == 24,
        "16 of the flooding agent's 40 stalled requests are held, the other 24 refused; got {} refusals",
        refusals.len()
    );
    for (status, text) in &refusals {
        assert_eq!(*status, 429, "{text}");
        assert!(text.contains("\"type\":\"rate_limit_error\""), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("retry-after: 1"),
            "{text}"
        );
        assert!(text.contains("max_connections_per_agent"), "{text}");
    }
    for i in 0..10 {
        assert_served(&good, &format!("during both floods (call {i})"));
    }
    let reload = Command::new(bin())
        .args(["reload", "-f"])
        .arg(fleet.file("fleet.yaml"))
        .output()
        .expect("run supervisor reload");
    assert!(
        reload.status.success(),
        "reload during the flood failed: {}{}",
        String::from_utf8_lossy(&reload.stdout),
        String::from_utf8_lossy(&reload.stderr)
    );
    drop(half_open);
    drop(stalled);
}

/// 60 connections from one agent each sending a 29 MiB body (10 MiB of it,
/// then stalling): the supervisor buffers at most the agent's budget
/// (`proxy.max_body_in_flight_per_agent`, 128 MiB by default here) and
/// refuses the rest in the provider's shape, while the other agent is
/// served. Before the budget, RSS grew by every byte sent (600 MB here).
#[test]
fn a_slow_body_flood_keeps_memory_bounded() {
    let fleet = two_agent_fleet(", max_connections_per_agent: 32");
    let supervisor = run_with_soft_nofile(&fleet, 256);
    let flood = Caller::wait(&fleet, "flood");
    let good = Caller::wait(&fleet, "good");
    assert_served(&good, "before the flood");
    let pid = supervisor.pid();
    let baseline = rss(pid);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };

    let declared: u64 = 29 << 20;
    let mut conns: Vec<TcpStream> = (0..60)
        .filter_map(|_| {
            let mut stream =
                TcpStream::connect_timeout(&flood.addr, Duration::from_secs(2)).ok()?;
            stream
                .set_write_timeout(Some(Duration::from_secs(2)))
                .ok()?;
            stream.write_all(flood.head(declared).as_bytes()).ok()?;
            Some(stream)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut refusals = Vec::new();
    let mut sending = Vec::new();
    for mut stream in conns.drain(..) {
        stream.set_nonblocking(true).expect("nonblocking");
        let mut probe = [0u8; 1];
        let answered = matches!(stream.peek(&mut probe), Ok(n) if n > 0);
        stream.set_nonblocking(false).expect("blocking");
        if answered {
            refusals.extend(answer_within(&mut stream, Duration::from_secs(1)));
        } else {
            sending.push(stream);
        }
    }
    // `{"x":"` then filler: a valid JSON prefix, never completed.
    let chunk = vec![b'a'; 1 << 20];
    let mut open = vec![true; sending.len()];
    for round in 0..10 {
        for (i, stream) in sending.iter_mut().enumerate() {
            if !open[i] {
                continue;
            }
            let data: &[u8] = if round == 0 { b"{\"x\":\"" } else { &[] };
            if stream.write_all(data).is_err() || stream.write_all(&chunk).is_err() {
                open[i] = false;
            }
        }
        if round == 5 {
            assert_served(&good, "during a slow-body flood");
        }
    }
    assert_served(&good, "after the flood sent its bytes");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    for (i, stream) in sending.iter_mut().enumerate() {
        if !open[i] {
            refusals.extend(answer_within(stream, Duration::from_millis(200)));
        }
    }
    eprintln!(
        "supervisor RSS: {} MiB before, {} MiB at peak",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak < 300 << 20,
        "the supervisor's RSS peaked at {} MiB (from {} MiB)",
        peak >> 20,
        baseline >> 20
    );
    assert!(
        refusals.iter().any(|(status, text)| *status == 429
            && text.contains("rate_limit_error")
            && text.to_ascii_lowercase().contains("retry-after")),
        "the flooding agent was not refused in the provider's shape: {refusals:?}"
    );
}

/// A `Content-Length` above `proxy.max_body` is answered 413 at once: the
/// client sends headers only, and reads the answer.
#[test]
fn a_large_content_length_is_refused_before_the_body() {
    let fleet = two_agent_fleet(", max_body: 1MiB");
    let _supervisor = fleet.run(&[]);
    let good = Caller::wait(&fleet, "good");
    let mut stream = TcpStream::connect(good.addr).expect("connect");
    stream
        .write_all(good.head(2 << 20).as_bytes())
        .expect("send headers");
    let (status, text) = answer_within(&mut stream, Duration::from_secs(5))
        .expect("an answer before the body was sent");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("request_too_large"), "{text}");
    assert!(text.contains("proxy.max_body"), "{text}");
}
