//! What `supervisor status` shows: one [`AgentStatusRow`] per agent, built
//! from plain snapshots (the actor's status, the meter's month counters and
//! rate buckets), and the table the CLI prints. Pure: no clock is read here
//! and nothing is locked; callers pass `now`.

use std::time::Instant;

use super::protocol::{AgentStatusRow, HostStatus};
use crate::agent::{AgentState, AgentStatus};
use crate::budget::{CeilingSnapshot, Month, RateSnapshot, group_thousands};

/// Everything one row is made of.
#[derive(Debug, Clone)]
pub struct RowInput<'a> {
    pub agent: &'a str,
    /// `None` for an agent that never ran under this supervisor (held in
    /// quarantine from the start).
    pub status: Option<&'a AgentStatus>,
    pub quarantine: Option<&'a str>,
    /// `None` once the agent left the fleet (its meter is gone).
    pub usage: Option<CeilingSnapshot>,
    pub rate: Option<RateSnapshot>,
    pub month: Month,
    pub now: Instant,
    /// Which version of each secret the agent runs with (fingerprints, never values).
    pub secrets: Vec<crate::control::protocol::SecretVersion>,
}

/// True when a monthly ceiling is used up: the proxy refuses every request
/// of the agent until the month ends or the ceiling is raised. Settled usage
/// only, so a large request in flight does not make the state flicker.
pub fn locked_out(usage: &CeilingSnapshot) -> bool {
    let tokens_out = usage
        .ceilings
        .monthly_tokens
        .is_some_and(|ceiling| usage.committed.tokens >= ceiling);
    let usd_out = usage
        .ceilings
        .monthly_micro_usd
        .is_some_and(|ceiling| usage.committed.micro_usd >= ceiling);
    tokens_out || usd_out
}

/// The state name `status` shows. Quarantine wins; a ceiling lockout hides a
/// process state that would suggest the agent can work (starting, running,
/// backoff, exited), but not a stop an operator asked for.
pub fn state_name(state: Option<&AgentState>, quarantined: bool, locked: bool) -> &'static str {
    if quarantined {
        return "quarantined";
    }
    match state {
        Some(AgentState::Stopping { .. }) => "stopping",
        Some(AgentState::Stopped) | None => "stopped",
        _ if locked => "locked_out",
        Some(AgentState::Starting) => "starting",
        Some(AgentState::Running { .. }) => "running",
        Some(AgentState::Backoff { .. }) => "backoff",
        Some(AgentState::Exited { .. }) => "exited",
    }
}

fn usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

pub fn row(input: RowInput<'_>) -> AgentStatusRow {
    let state = input.status.map(|s| &s.state);
    let locked = input.usage.as_ref().is_some_and(locked_out);
    let uptime_secs = match state {
        Some(AgentState::Running { since }) => {
            Some(input.now.saturating_duration_since(*since).as_secs())
        }
        _ => None,
    };
    let usage = input.usage;
    AgentStatusRow {
        agent: input.agent.to_owned(),
        state: state_name(state, input.quarantine.is_some(), locked).to_owned(),
        pid: input.status.and_then(|s| s.pid),
        uptime_secs,
        restarts: input.status.map_or(0, |s| s.restarts),
        last_exit: input
            .status
            .and_then(|s| s.last_exit.as_ref())
            .map(|e| e.exit.to_string()),
        month: usage.map_or(input.month, |u| u.month).to_string(),
        month_tokens: usage.map_or(0, |u| u.committed.tokens),
        month_usd: usage.map_or(0.0, |u| usd(u.committed.micro_usd)),
        monthly_tokens_ceiling: usage.and_then(|u| u.ceilings.monthly_tokens),
        monthly_usd_ceiling: usage.and_then(|u| u.ceilings.monthly_micro_usd.map(usd)),
        tokens_available: input.rate.and_then(|r| r.tokens_available),
        requests_available: input.rate.and_then(|r| r.requests_available),
        quarantine_reason: input.quarantine.map(str::to_owned),
        secrets: input.secrets,
    }
}

/// `3d4h`, `2h5m`, `4m10s`, `12s`: the two largest units are enough to read.
pub fn short_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn signed(n: i64) -> String {
    let grouped = group_thousands(n.unsigned_abs());
    if n < 0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

fn of(used: String, ceiling: Option<String>) -> String {
    match ceiling {
        Some(c) => format!("{used} / {c}"),
        None => used,
    }
}

fn rate_cell(r: &AgentStatusRow) -> String {
    let parts: Vec<String> = [
        r.tokens_available.map(|t| format!("{} tok", signed(t))),
        r.requests_available.map(|q| format!("{} req", signed(q))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The lines above the table: descriptors against the limit, the proxy's
/// connections and buffered body bytes against their caps; a figure at 80%
/// of its limit or more is flagged.
pub fn host_header(host: &HostStatus) -> String {
    let near = |used: u64, limit: u64| {
        if limit > 0 && used.saturating_mul(100) / limit >= crate::fdlimit::WARN_PERCENT {
            " (NEAR THE LIMIT)"
        } else {
            ""
        }
    };
    let mut out = String::new();
    if let (Some(open), Some(limit)) = (host.descriptors_open, host.descriptor_limit) {
        out.push_str(&format!(
            "descriptors: {} open of {}{}\n",
            group_thousands(open),
            group_thousands(limit),
            near(open, limit)
        ));
    }
    out.push_str(&format!(
        "proxy: {} connections of {}{} ({} unidentified of {}, {} per agent); {} of request bodies in flight of {}{} ({} per agent)\n\n",
        group_thousands(host.proxy_connections),
        group_thousands(host.proxy_max_connections),
        near(host.proxy_connections, host.proxy_max_connections),
        group_thousands(host.proxy_unidentified),
        group_thousands(host.proxy_max_unidentified_connections),
        group_thousands(host.proxy_max_connections_per_agent),
        bytes(host.proxy_body_in_flight),
        bytes(host.proxy_max_body_in_flight),
        near(host.proxy_body_in_flight, host.proxy_max_body_in_flight),
        bytes(host.proxy_max_body_in_flight_per_agent),
    ));
    out
}

/// `512 B`, `1.5 MiB`, `1 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The table `supervisor status` prints. TOKENS and USD are this month's,
/// against the ceilings; RATE is what the rate buckets hold right now.
pub fn table(rows: &[AgentStatusRow]) -> String {
    const HEADER: [&str; 9] = [
        "AGENT",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
        "TOKENS",
        "USD",
        "RATE LEFT",
    ];
    // Numbers read best right-aligned; names and words left-aligned.
    const RIGHT: [bool; 9] = [false, false, true, true, true, false, true, true, false];
    let dash = || "-".to_owned();
    let mut lines: Vec<Vec<String>> = vec![HEADER.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        lines.push(vec![
            r.agent.clone(),
            r.state.clone(),
            r.pid.map_or_else(dash, |p| p.to_string()),
            r.uptime_secs.map_or_else(dash, short_duration),
            r.restarts.to_string(),
            r.last_exit.clone().unwrap_or_else(dash),
            of(
                group_thousands(r.month_tokens),
                r.monthly_tokens_ceiling.map(group_thousands),
            ),
            of(
                format!("${:.2}", r.month_usd),
                r.monthly_usd_ceiling.map(|c| format!("${c:.2}")),
            ),
            rate_cell(r),
        ]);
    }
    let mut out = String::new();
    for (i, line) in crate::text_table::align(&lines, |i| RIGHT[i])
        .into_iter()
        .enumerate()
    {
        out.push_str(&line);
        out.push('\n');
        // Under each agent, the version of each secret it holds: fingerprints
        // and ages only, never a value; a stale one says what it still runs.
        if let Some(row) = i.checked_sub(1).and_then(|r| rows.get(r)) {
            for v in &row.secrets {
                out.push_str(&format!(
                    "    secret `{}` ({}, {}): {}, {} old",
                    v.name,
                    v.slot,
                    v.used_as,
                    v.fingerprint,
                    short_duration(v.age_secs)
                ));
                if v.stale {
                    out.push_str(&format!(
                        " — STALE: the process still runs {}",
                        v.running_fingerprint
                            .as_deref()
                            .unwrap_or("an older version")
                    ));
                }
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_header_flags_figures_near_their_limit() {
        let host = HostStatus {
            descriptors_open: Some(850),
            descriptor_limit: Some(1024),
            proxy_connections: 12,
            proxy_unidentified: 3,
            proxy_max_connections: 253,
            proxy_max_unidentified_connections: 63,
            proxy_max_connections_per_agent: 63,
            proxy_body_in_flight: 3 << 19,
            proxy_max_body_in_flight: 1 << 30,
            proxy_max_body_in_flight_per_agent: 128 << 20,
        };
        assert_eq!(
            host_header(&host),
            "descriptors: 850 open of 1,024 (NEAR THE LIMIT)\n\
             proxy: 12 connections of 253 (3 unidentified of 63, 63 per agent); \
             1.5 MiB of request bodies in flight of 1 GiB (128 MiB per agent)\n\n"
        );
        let quiet = HostStatus {
            descriptors_open: None,
            ..host
        };
        assert!(host_header(&quiet).starts_with("proxy: 12 connections"));
    }

    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn the_table_lists_secret_versions_and_flags_stale_ones() {
        let mut r = row(RowInput {
            agent: "a",
            status: None,
            quarantine: None,
            usage: None,
            rate: None,
            month: "2026-11".parse().unwrap(),
            now: Instant::now(),
            secrets: Vec::new(),
        });
        r.secrets = vec![
            crate::control::protocol::SecretVersion {
                name: "llm_api_key".into(),
                slot: "llm[0]".into(),
                used_as: "proxied".into(),
                fingerprint: "3fa2c1d0e4b5".into(),
                age_secs: 90_000,
                running_fingerprint: None,
                stale: false,
            },
            crate::control::protocol::SecretVersion {
                name: "gmail_token".into(),
                slot: "GMAIL_TOKEN".into(),
                used_as: "env".into(),
                fingerprint: "aaaaaaaaaaaa".into(),
                age_secs: 30,
                running_fingerprint: Some("bbbbbbbbbbbb".into()),
                stale: true,
            },
        ];
        let text = table(&[r]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[2],
            "    secret `llm_api_key` (llm[0], proxied): 3fa2c1d0e4b5, 1d1h old"
        );
        assert_eq!(
            lines[3],
            "    secret `gmail_token` (GMAIL_TOKEN, env): aaaaaaaaaaaa, 30s old — STALE: the process still runs bbbbbbbbbbbb"
        );
    }
    use crate::agent::{Exit, ExitInfo};
    use crate::budget::{Amount, Ceilings};

    fn usage(tokens: u64, micro_usd: u64, ceilings: Ceilings) -> CeilingSnapshot {
        CeilingSnapshot {
            month: "2026-03".parse().unwrap(),
            ceilings,
            committed: Amount::new(tokens, micro_usd),
            reserved: Amount::ZERO,
            in_flight: 0,
        }
    }

    fn ceilings(tokens: Option<u64>, micro_usd: Option<u64>) -> Ceilings {
        Ceilings {
            monthly_tokens: tokens,
            monthly_micro_usd: micro_usd,
        }
    }

    #[test]
    fn locked_out_when_any_ceiling_is_used_up() {
        let cases = [
            (0, 0, ceilings(None, None), false),
            (u64::MAX, u64::MAX, ceilings(None, None), false),
            (999, 0, ceilings(Some(1000), None), false),
            (1000, 0, ceilings(Some(1000), None), true),
            (1001, 0, ceilings(Some(1000), None), true),
            (0, 4_999_999, ceilings(None, Some(5_000_000)), false),
            (0, 5_000_000, ceilings(None, Some(5_000_000)), true),
            (10, 5_000_000, ceilings(Some(1000), Some(5_000_000)), true),
            (1000, 1, ceilings(Some(1000), Some(5_000_000)), true),
            (999, 1, ceilings(Some(1000), Some(5_000_000)), false),
        ];
        for (tokens, micro, c, want) in cases {
            assert_eq!(
                locked_out(&usage(tokens, micro, c)),
                want,
                "{tokens} tokens, {micro} micro-USD against {c:?}"
            );
        }
    }

    #[test]
    fn reserved_amounts_do_not_lock_out() {
        let mut u = usage(900, 0, ceilings(Some(1000), None));
        u.reserved = Amount::new(500, 0);
        u.in_flight = 1;
        assert!(!locked_out(&u));
    }

    #[test]
    fn state_names() {
        let now = Instant::now();
        let running = AgentState::Running { since: now };
        let backoff = AgentState::Backoff {
            until: now,
            attempt: 1,
        };
        let stopping = AgentState::Stopping { since: now };
        let exited = AgentState::Exited {
            exit: Exit::Code(0),
        };
        // (state, quarantined, locked out) → name
        let cases: Vec<(Option<&AgentState>, bool, bool, &str)> = vec![
            (Some(&AgentState::Starting), false, false, "starting"),
            (Some(&running), false, false, "running"),
            (Some(&backoff), false, false, "backoff"),
            (Some(&stopping), false, false, "stopping"),
            (Some(&AgentState::Stopped), false, false, "stopped"),
            (Some(&exited), false, false, "exited"),
            (None, false, false, "stopped"),
            (Some(&AgentState::Starting), false, true, "locked_out"),
            (Some(&running), false, true, "locked_out"),
            (Some(&backoff), false, true, "locked_out"),
            (Some(&exited), false, true, "locked_out"),
            (Some(&stopping), false, true, "stopping"),
            (Some(&AgentState::Stopped), false, true, "stopped"),
            (None, false, true, "stopped"),
            (Some(&running), true, false, "quarantined"),
            (Some(&stopping), true, true, "quarantined"),
            (Some(&AgentState::Stopped), true, false, "quarantined"),
            (None, true, false, "quarantined"),
        ];
        for (state, quarantined, locked, want) in cases {
            assert_eq!(
                state_name(state, quarantined, locked),
                want,
                "{state:?} quarantined={quarantined} locked={locked}"
            );
        }
    }

    #[test]
    fn row_carries_process_usage_and_rate() {
        let now = Instant::now();
        let since = now.checked_sub(Duration::from_secs(125)).unwrap_or(now);
        let status = AgentStatus {
            state: AgentState::Running { since },
            pid: Some(4242),
            restarts: 2,
            last_exit: Some(ExitInfo {
                exit: Exit::Code(3),
                ran_for: Duration::from_secs(1),
                at: SystemTime::UNIX_EPOCH,
            }),
        };
        let row = row(RowInput {
            agent: "sparkles",
            status: Some(&status),
            quarantine: None,
            usage: Some(usage(
                1234,
                2_500_000,
                ceilings(Some(40_000), Some(150_000_000)),
            )),
            rate: Some(RateSnapshot {
                tokens_available: Some(-20),
                requests_available: None,
            }),
            month: "2026-04".parse().unwrap(),
            now,
            secrets: Vec::new(),
        });
        let want = AgentStatusRow {
            agent: "sparkles".into(),
            state: "running".into(),
            pid: Some(4242),
            uptime_secs: Some(125),
            restarts: 2,
            last_exit: Some("exit code 3".into()),
            month: "2026-03".into(),
            month_tokens: 1234,
            month_usd: 2.5,
            monthly_tokens_ceiling: Some(40_000),
            monthly_usd_ceiling: Some(150.0),
            tokens_available: Some(-20),
            requests_available: None,
            quarantine_reason: None,
            secrets: Vec::new(),
        };
        assert_eq!(row, want);
    }

    #[test]
    fn row_of_an_agent_held_in_quarantine_since_start() {
        let row = row(RowInput {
            agent: "loopy",
            status: None,
            quarantine: Some("runaway: 4 failing retries"),
            usage: None,
            rate: None,
            month: "2026-04".parse().unwrap(),
            now: Instant::now(),
            secrets: Vec::new(),
        });
        assert_eq!(row.state, "quarantined");
        assert_eq!(row.pid, None);
        assert_eq!(row.month, "2026-04");
        assert_eq!(
            row.quarantine_reason.as_deref(),
            Some("runaway: 4 failing retries")
        );
    }

    #[test]
    fn short_durations() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m0s"),
            (3599, "59m59s"),
            (3600, "1h0m"),
            (86_399, "23h59m"),
            (86_400, "1d0h"),
            (90_061, "1d1h"),
        ];
        for (secs, want) in cases {
            assert_eq!(short_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn table_aligns_and_shows_ceilings_and_buckets() {
        let rows = vec![
            AgentStatusRow {
                agent: "sparkles".into(),
                state: "running".into(),
                pid: Some(4242),
                uptime_secs: Some(3700),
                restarts: 0,
                last_exit: None,
                month: "2026-03".into(),
                month_tokens: 1_234_567,
                month_usd: 2.5,
                monthly_tokens_ceiling: Some(40_000_000),
                monthly_usd_ceiling: Some(150.0),
                tokens_available: Some(59_000),
                requests_available: Some(-1),
                quarantine_reason: None,
                secrets: Vec::new(),
            },
            AgentStatusRow {
                agent: "b".into(),
                state: "stopped".into(),
                pid: None,
                uptime_secs: None,
                restarts: 3,
                last_exit: Some("killed by SIGTERM".into()),
                month: "2026-03".into(),
                month_tokens: 0,
                month_usd: 0.0,
                monthly_tokens_ceiling: None,
                monthly_usd_ceiling: None,
                tokens_available: None,
                requests_available: None,
                quarantine_reason: None,
                secrets: Vec::new(),
            },
        ];
        let want = "\
AGENT     STATE     PID  UPTIME  RESTARTS  LAST EXIT                          TOKENS              USD  RATE LEFT
sparkles  running  4242    1h1m         0  -                  1,234,567 / 40,000,000  $2.50 / $150.00  59,000 tok, -1 req
b         stopped     -       -         3  killed by SIGTERM                       0            $0.00  -
";
        assert_eq!(table(&rows), want);
    }
}
