//! README "Metering proxy": the proxy never follows an upstream redirect. A
//! 3xx goes back to the agent as it came (less hop-by-hop headers), and
//! nothing — least of all the real key — reaches the `Location` host: the
//! allow-list checked the path sent, not the one a provider points to.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::fake_upstream::ANTHROPIC_KEY;
use common::*;
use serde_json::json;

/// Reads one HTTP/1.1 request (head and a `content-length` body).
fn read_request(stream: &mut TcpStream) -> Vec<u8> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
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
                return seen;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_redirect_goes_back_to_the_agent_and_is_never_followed() {
    // Where the redirects point: counts every connection it is offered.
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let elsewhere_addr = elsewhere.local_addr().unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    {
        let arrived = arrived.clone();
        std::thread::spawn(move || {
            for stream in elsewhere.incoming() {
                arrived.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
    }
    // The "provider": answers every request with a redirect, 302 then 307
    // in turn, to the same path on the other listener.
    let redirector = TcpListener::bind("127.0.0.1:0").unwrap();
    let redirector_url = format!("http://{}", redirector.local_addr().unwrap());
    std::thread::spawn(move || {
        for (n, stream) in redirector.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let request = read_request(&mut stream);
            let path = String::from_utf8_lossy(&request)
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            let (code, reason) = if n % 2 == 0 {
                (302, "Found")
            } else {
                (307, "Temporary Redirect")
            };
            let body = "{\"moved\":true}";
            let answer = format!(
                "HTTP/1.1 {code} {reason}\r\nlocation: http://{elsewhere_addr}{path}\r\nx-upstream-note: kept\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });

    let fleet = FleetDir::new();
    fleet.write_secret("a", "key", ANTHROPIC_KEY);
    fleet.write_fleet(&format!(
        "version: 1
proxy: {{ listen: '127.0.0.1:0', upstream_timeout: 2s }}
admin: {{ listen: '127.0.0.1:0' }}
vault: {{ backend: dir, path: secrets }}
providers:
  moving: {{ kind: anthropic, upstream: '{redirector_url}' }}
agents:
  a:
    command: [sh, -c, 'env > a.env; exec sleep 1000']
    llm: [{{ provider: moving, key: key }}]
    budget: {{ monthly_tokens: 1000000 }}
"
    ));
    let _sup = fleet.run(&[]);
    let env = fleet.wait_env("a.env", "ANTHROPIC_API_KEY");
    let base = env["ANTHROPIC_BASE_URL"].as_str();
    let token = env["ANTHROPIC_API_KEY"].as_str();
    // The agent's own client must not follow either, to see what came back.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let mut statuses = Vec::new();
    for _ in 0..2 {
        let resp = client
            .post(format!("{base}/v1/messages"))
            .header("x-api-key", token)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            location,
            format!("http://{elsewhere_addr}/v1/messages"),
            "the Location passes unchanged"
        );
        assert_eq!(resp.headers()["x-upstream-note"], "kept");
        assert!(
            resp.headers()
                .get("connection")
                .is_none_or(|v| v != "close")
        );
        assert_eq!(resp.text().await.unwrap(), "{\"moved\":true}");
        statuses.push(status);
    }
    assert_eq!(statuses, [302, 307]);

    // An unmetered route goes through the same client.
    let resp = client
        .get(format!("{base}/v1/models"))
        .header("x-api-key", token)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);

    assert_eq!(
        arrived.load(Ordering::SeqCst),
        0,
        "nothing may reach the Location host"
    );
}
