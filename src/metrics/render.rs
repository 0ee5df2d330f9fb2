//! What `/metrics` says: every series, its name, labels and help text, from
//! a plain snapshot of the proxy's counters and the supervisor's view of its
//! agents. Pure: the admin server gathers the snapshot, this writes it.
//! The README's "Metrics" section lists these series; keep them in step.

use std::collections::BTreeMap;

use super::exposition::{Exposition, MetricType};
use super::{AgentCounters, RequestOutcome, TokenKind};
use crate::control::protocol::AgentStatusRow;

/// The states `supervisor_agent_state` is one-hot over, so a dashboard sees a
/// 0 rather than a missing series when an agent leaves a state.
pub const AGENT_STATES: &[&str] = &[
    "starting",
    "running",
    "backoff",
    "stopping",
    "stopped",
    "exited",
    "quarantined",
    "locked_out",
];

/// Everything one scrape shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetSnapshot {
    /// The proxy's counters by agent.
    pub counters: BTreeMap<String, AgentCounters>,
    /// The supervisor's rows, or `None` when its loop did not answer in time
    /// (then only the proxy's series are shown, and `supervisor_loop_up` is 0).
    pub status: Option<Vec<AgentStatusRow>>,
}

fn micro_usd_to_usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

pub fn render(snapshot: &FleetSnapshot) -> String {
    let mut e = Exposition::new();
    let counters = &snapshot.counters;

    e.family(
        "supervisor_loop_up",
        MetricType::Gauge,
        "1 when the supervisor's main loop answered this scrape, 0 when it did not (agent state series are then missing).",
    );
    e.sample("supervisor_loop_up", &[], snapshot.status.is_some());

    e.family(
        "supervisor_agent_requests_total",
        MetricType::Counter,
        "Metered model calls by how they ended: ok, upstream_error, cut, or refused by the proxy (throttled, refused_ceiling, refused_quarantine, bad_request, internal_error).",
    );
    for (agent, c) in counters {
        for outcome in RequestOutcome::ALL {
            e.sample(
                "supervisor_agent_requests_total",
                &[("agent", agent), ("outcome", outcome.label())],
                c.requests(outcome),
            );
        }
    }

    e.family(
        "supervisor_agent_tokens_total",
        MetricType::Counter,
        "Tokens the provider reported, by kind: input (uncached), output, cache_creation, cache_read.",
    );
    for (agent, c) in counters {
        for kind in TokenKind::ALL {
            e.sample(
                "supervisor_agent_tokens_total",
                &[("agent", agent), ("kind", kind.label())],
                c.tokens(kind),
            );
        }
    }

    e.family(
        "supervisor_agent_cost_usd_total",
        MetricType::Counter,
        "USD charged against the agent's ceiling: exact usage at fleet.yaml prices, or the reservation for an answer cut before its usage arrived.",
    );
    for (agent, c) in counters {
        e.sample(
            "supervisor_agent_cost_usd_total",
            &[("agent", agent)],
            micro_usd_to_usd(c.cost_micro_usd),
        );
    }

    e.family(
        "supervisor_agent_quarantines_total",
        MetricType::Counter,
        "Times the runaway detector quarantined the agent.",
    );
    for (agent, c) in counters {
        e.sample(
            "supervisor_agent_quarantines_total",
            &[("agent", agent)],
            c.quarantines,
        );
    }

    e.family(
        "supervisor_agent_velocity_trips_total",
        MetricType::Counter,
        "Times the spend-velocity wire tripped for the agent (`runaway.velocity`), with action alert or quarantine: once per episode.",
    );
    for (agent, c) in counters {
        e.sample(
            "supervisor_agent_velocity_trips_total",
            &[("agent", agent)],
            c.velocity_trips,
        );
    }

    e.family(
        "supervisor_proxy_overhead_seconds",
        MetricType::Histogram,
        "Time the proxy adds before a metered request leaves for the provider: from its arrival (body read included) through admission and reservation.",
    );
    for (agent, c) in counters {
        e.histogram(
            "supervisor_proxy_overhead_seconds",
            &[("agent", agent)],
            &c.overhead,
        );
    }

    e.family(
        "supervisor_proxy_request_duration_seconds",
        MetricType::Histogram,
        "Whole metered requests that reached the provider, from arrival until the answer was settled.",
    );
    for (agent, c) in counters {
        e.histogram(
            "supervisor_proxy_request_duration_seconds",
            &[("agent", agent)],
            &c.duration,
        );
    }

    let Some(rows) = &snapshot.status else {
        return e.finish();
    };
    let mut rows: Vec<&AgentStatusRow> = rows.iter().collect();
    rows.sort_by(|a, b| a.agent.cmp(&b.agent));

    e.family(
        "supervisor_agent_state",
        MetricType::Gauge,
        "1 for the state the agent is in, 0 for the others.",
    );
    for row in &rows {
        let known = AGENT_STATES.contains(&row.state.as_str());
        let extra = (!known).then_some(row.state.as_str());
        for state in AGENT_STATES.iter().copied().chain(extra) {
            e.sample(
                "supervisor_agent_state",
                &[("agent", &row.agent), ("state", state)],
                row.state == state,
            );
        }
    }

    e.family(
        "supervisor_agent_quarantined",
        MetricType::Gauge,
        "1 while the agent is quarantined (held down until `supervisor release`).",
    );
    for row in &rows {
        let quarantined = row.state == "quarantined" || row.quarantine_reason.is_some();
        e.sample(
            "supervisor_agent_quarantined",
            &[("agent", &row.agent)],
            quarantined,
        );
    }

    e.family(
        "supervisor_agent_restarts_total",
        MetricType::Counter,
        "Starts of the agent after its first, automatic or requested.",
    );
    for row in &rows {
        e.sample(
            "supervisor_agent_restarts_total",
            &[("agent", &row.agent)],
            row.restarts,
        );
    }

    e.family(
        "supervisor_agent_month_tokens",
        MetricType::Gauge,
        "Tokens charged this calendar month (UTC), as the monthly ceiling counts them.",
    );
    for row in &rows {
        e.sample(
            "supervisor_agent_month_tokens",
            &[("agent", &row.agent)],
            row.month_tokens,
        );
    }

    e.family(
        "supervisor_agent_month_cost_usd",
        MetricType::Gauge,
        "USD charged this calendar month (UTC), as the monthly ceiling counts them.",
    );
    for row in &rows {
        e.sample(
            "supervisor_agent_month_cost_usd",
            &[("agent", &row.agent)],
            row.month_usd,
        );
    }

    e.family(
        "supervisor_agent_monthly_tokens_ceiling",
        MetricType::Gauge,
        "The agent's `budget.monthly_tokens` (absent when it has none).",
    );
    for row in &rows {
        if let Some(ceiling) = row.monthly_tokens_ceiling {
            e.sample(
                "supervisor_agent_monthly_tokens_ceiling",
                &[("agent", &row.agent)],
                ceiling,
            );
        }
    }

    e.family(
        "supervisor_agent_monthly_usd_ceiling",
        MetricType::Gauge,
        "The agent's `budget.monthly_usd` (absent when it has none).",
    );
    for row in &rows {
        if let Some(ceiling) = row.monthly_usd_ceiling {
            e.sample(
                "supervisor_agent_monthly_usd_ceiling",
                &[("agent", &row.agent)],
                ceiling,
            );
        }
    }

    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::AgentMetrics;

    fn row(agent: &str, state: &str) -> AgentStatusRow {
        AgentStatusRow {
            agent: agent.to_owned(),
            state: state.to_owned(),
            pid: None,
            uptime_secs: None,
            restarts: 2,
            last_exit: None,
            month: "2025-01".to_owned(),
            month_tokens: 1234,
            month_usd: 0.5,
            monthly_tokens_ceiling: Some(40_000_000),
            monthly_usd_ceiling: None,
            tokens_available: None,
            requests_available: None,
            quarantine_reason: None,
            secrets: Vec::new(),
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn proxy_series_for_each_agent() {
        let m = AgentMetrics::default();
        m.count_request(RequestOutcome::Ok);
        m.count_request(RequestOutcome::Throttled);
        m.add_tokens(TokenKind::Output, 42);
        m.add_cost(2_500_000);
        m.observe_overhead(std::time::Duration::from_micros(300));
        let snapshot = FleetSnapshot {
            counters: [("a".to_owned(), m.snapshot())].into(),
            status: None,
        };
        let text = render(&snapshot);
        let l = lines(&text);
        for want in [
            "supervisor_loop_up 0",
            "supervisor_agent_requests_total{agent=\"a\",outcome=\"ok\"} 1",
            "supervisor_agent_requests_total{agent=\"a\",outcome=\"throttled\"} 1",
            "supervisor_agent_requests_total{agent=\"a\",outcome=\"refused_ceiling\"} 0",
            "supervisor_agent_tokens_total{agent=\"a\",kind=\"output\"} 42",
            "supervisor_agent_tokens_total{agent=\"a\",kind=\"cache_read\"} 0",
            "supervisor_agent_cost_usd_total{agent=\"a\"} 2.5",
            "supervisor_agent_quarantines_total{agent=\"a\"} 0",
            "supervisor_agent_velocity_trips_total{agent=\"a\"} 0",
            "supervisor_proxy_overhead_seconds_bucket{agent=\"a\",le=\"0.0005\"} 1",
            "supervisor_proxy_overhead_seconds_bucket{agent=\"a\",le=\"+Inf\"} 1",
            "supervisor_proxy_overhead_seconds_count{agent=\"a\"} 1",
            "supervisor_proxy_request_duration_seconds_count{agent=\"a\"} 0",
        ] {
            assert!(l.contains(&want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("supervisor_agent_state"),
            "no status, no state series:\n{text}"
        );
    }

    #[test]
    fn state_is_one_hot_and_unknown_states_still_show() {
        let mut q = row("q", "quarantined");
        q.quarantine_reason = Some("runaway".to_owned());
        let snapshot = FleetSnapshot {
            counters: BTreeMap::new(),
            status: Some(vec![row("z", "future_state"), q, row("a", "running")]),
        };
        let text = render(&snapshot);
        let l = lines(&text);
        let ones: Vec<&str> = l
            .iter()
            .copied()
            .filter(|l| l.starts_with("supervisor_agent_state{") && l.ends_with(" 1"))
            .collect();
        assert_eq!(
            ones,
            [
                "supervisor_agent_state{agent=\"a\",state=\"running\"} 1",
                "supervisor_agent_state{agent=\"q\",state=\"quarantined\"} 1",
                "supervisor_agent_state{agent=\"z\",state=\"future_state\"} 1",
            ]
        );
        let per_agent = |agent: &str| {
            l.iter()
                .filter(|l| l.starts_with(&format!("supervisor_agent_state{{agent=\"{agent}\"")))
                .count()
        };
        assert_eq!(per_agent("a"), AGENT_STATES.len());
        assert_eq!(per_agent("z"), AGENT_STATES.len() + 1);
        for want in [
            "supervisor_loop_up 1",
            "supervisor_agent_quarantined{agent=\"a\"} 0",
            "supervisor_agent_quarantined{agent=\"q\"} 1",
            "supervisor_agent_restarts_total{agent=\"a\"} 2",
            "supervisor_agent_month_tokens{agent=\"a\"} 1234",
            "supervisor_agent_month_cost_usd{agent=\"a\"} 0.5",
            "supervisor_agent_monthly_tokens_ceiling{agent=\"a\"} 40000000",
        ] {
            assert!(l.contains(&want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("supervisor_agent_monthly_usd_ceiling{"),
            "{text}"
        );
    }

    #[test]
    fn every_family_is_contiguous_with_help_and_type() {
        let m = AgentMetrics::default();
        let snapshot = FleetSnapshot {
            counters: [
                ("a".to_owned(), m.snapshot()),
                ("b".to_owned(), m.snapshot()),
            ]
            .into(),
            status: Some(vec![row("a", "running"), row("b", "backoff")]),
        };
        let text = render(&snapshot);
        let mut current: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        let mut typed = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(seen.insert(name.clone()), "family {name} twice");
                current = Some(name);
                typed = false;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert_eq!(Some(rest.split(' ').next().unwrap()), current.as_deref());
                typed = true;
            } else {
                let family = current.as_deref().expect("sample before any family");
                assert!(typed, "{line}");
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| *b == family))
                    .unwrap_or(name);
                assert_eq!(base, family, "{line} outside its family");
            }
        }
    }

    #[test]
    fn agent_names_are_escaped() {
        let snapshot = FleetSnapshot {
            counters: BTreeMap::new(),
            status: Some(vec![row("we\"ird\\\nname", "running")]),
        };
        let text = render(&snapshot);
        assert!(
            text.contains("supervisor_agent_restarts_total{agent=\"we\\\"ird\\\\\\nname\"} 2"),
            "{text}"
        );
    }
}
