//! README "Metering proxy": a request's parsed JSON is dropped before it is
//! forwarded, so what a request holds while upstream works is the body
//! bytes `proxy.max_body_in_flight` counts — not its parsed form, which for
//! a body of small numbers is some 16–32 times larger.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_upstream::ANTHROPIC_KEY;
use common::*;

fn rss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// Reads one HTTP/1.1 request (head and a `content-length` body).
fn read_request(stream: &mut TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if seen.len() >= end + 4 + length {
                return;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn parsed_bodies_are_not_held_while_upstream_works() {
    const REQUESTS: usize = 8;
    // Reads each request whole, then holds it unanswered until released.
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let holder_url = format!("http://{}", holder.local_addr().unwrap());
    let arrived = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let (arrived, held) = (arrived.clone(), held.clone());
        std::thread::spawn(move || {
            for stream in holder.incoming() {
                let Ok(mut stream) = stream else { return };
                let (arrived, held) = (arrived.clone(), held.clone());
                std::thread::spawn(move || {
                    read_request(&mut stream);
                    held.lock().unwrap().push(stream);
                    arrived.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
    }

    let fleet = FleetDir::new();
    fleet.write_secret("a", "key", ANTHROPIC_KEY);
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0', upstream_timeout: 30s }}
admin: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
providers:
  slow: {{ kind: anthropic, upstream: '{holder_url}' }}
agents:
  a:
    command: [sh, -c, 'env > a.env; exec sleep 1000']
    llm: [{{ provider: slow, key: key }}]
    budget: {{ monthly_tokens: 100000000000 }}
"
    ));
    let supervisor = fleet.run(&[]);
    let env = fleet.wait_env("a.env", "ANTHROPIC_API_KEY");
    let url = format!("{}/v1/messages", env["ANTHROPIC_BASE_URL"]);
    let token = env["ANTHROPIC_API_KEY"].to_owned();
    let pid = supervisor.pid();
    let baseline = rss(pid);

    // 2 MiB of `0,`: a million numbers, 32 MiB and more once parsed.
    let mut body = String::from(
        r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}],"metadata":{"pad":["#,
    );
    body.push_str(&"0,".repeat(1 << 20));
    body.push_str("0]}}");
    let clients: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (url, token, body) = (url.clone(), token.clone(), body.clone());
            std::thread::spawn(move || {
                let _ = blocking_post(&url, &token, body);
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrived.load(Ordering::SeqCst) < REQUESTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {REQUESTS} requests reached upstream",
            arrived.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // All are waiting on upstream now: what the proxy holds for them.
    let holding = rss(pid);
    held.lock().unwrap().clear();
    for client in clients {
        let _ = client.join();
    }
    eprintln!(
        "supervisor RSS: {} MiB before, {} MiB with {REQUESTS} requests waiting upstream",
        baseline >> 20,
        holding >> 20
    );
    // Their bodies are 16 MiB; their parsed forms would be 256 MiB and more.
    assert!(
        holding.saturating_sub(baseline) < 160 << 20,
        "the supervisor grew by {} MiB while {REQUESTS} requests of 2 MiB waited upstream",
        holding.saturating_sub(baseline) >> 20
    );
}

/// A blocking POST over a small tokio runtime of its own.
fn blocking_post(url: &str, token: &str, body: String) -> Option<u16> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let resp = reqwest::Client::new()
            .post(url)
            .header("x-api-key", token)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .ok()?;
        Some(resp.status().as_u16())
    })
}
