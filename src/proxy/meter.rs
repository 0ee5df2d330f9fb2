//! Per-agent proxy state: the agent's budget (ceilings and rate buckets), the
//! routes of its `llm:` entries (provider and real key, swapped in place on
//! reload or rotation), its quarantine flag, and its Prometheus counters
//! (`metrics`, bumped by the request path). One `AgentMeter` per agent,
//! shared by every request of that agent; the supervisor updates it in place.
//!
//! Must not do I/O. Locks here are held for a few instructions, never across
//! an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::budget::{AgentBudget, BudgetLimits, Ceilings, Month, RateLimits};
use crate::fleet::{BudgetSpec, ProviderSpec};
use crate::ledger::AgentMonthUsage;
use crate::metrics::{AgentCounters, AgentMetrics};
use crate::runaway::{
    ConversationKey, Detector, RequestSummary, ResponseSummary, RunawayAction, RunawayConfig,
    Verdict,
};
use crate::vault::Secret;

/// Where one `llm:` entry's requests go, and with which real key.
#[derive(Debug, Clone)]
pub struct Route {
    pub provider: Arc<ProviderSpec>,
    /// The real provider key; `None` for a simulated provider.
    pub key: Option<Secret>,
}

pub struct AgentMeter {
    name: String,
    pub budget: AgentBudget,
    routes: RwLock<Vec<Route>>,
    quarantine: RwLock<Option<String>>,
    /// The runaway detector: pure state, fed every request and answer.
    detector: Mutex<Detector>,
    /// Counters for `/metrics`; atomics, so the request path takes no lock.
    pub metrics: AgentMetrics,
}

impl std::fmt::Debug for AgentMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMeter")
            .field("name", &self.name)
            .finish()
    }
}

/// `fleet.yaml` budget → the budget module's limits.
pub fn limits(spec: &BudgetSpec) -> BudgetLimits {
    BudgetLimits {
        ceilings: Ceilings {
            monthly_tokens: spec.monthly_tokens,
            monthly_micro_usd: spec.monthly_micro_usd,
        },
        rates: RateLimits {
            tokens_per_minute: spec.tokens_per_minute.and_then(std::num::NonZeroU64::new),
            requests_per_minute: spec.requests_per_minute.and_then(std::num::NonZeroU64::new),
        },
    }
}

impl AgentMeter {
    /// A meter whose month totals start from what the ledger recorded.
    pub fn new(
        name: &str,
        budget: &BudgetSpec,
        runaway: RunawayConfig,
        routes: Vec<Route>,
        month: Month,
        recorded: Option<&AgentMonthUsage>,
    ) -> Self {
        let now = Instant::now();
        let budget = match recorded {
            Some(u) => AgentBudget::from_totals(
                name,
                limits(budget),
                month,
                crate::budget::Amount::new(u.charged_tokens, u.charged_micro_usd),
                crate::budget::Amount::ZERO,
                now,
            ),
            None => AgentBudget::new(name, limits(budget), month, now),
        };
        Self {
            name: name.to_owned(),
            budget,
            routes: RwLock::new(routes),
            quarantine: RwLock::new(None),
            detector: Mutex::new(Detector::new(runaway)),
            metrics: AgentMetrics::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn route(&self, entry: usize) -> Option<Route> {
        self.routes.read().ok()?.get(entry).cloned()
    }

    /// Applies a reloaded budget and routes (new keys, prices, upstreams) in
    /// place: requests in flight keep what they started with.
    pub fn update(&self, budget: &BudgetSpec, runaway: RunawayConfig, routes: Vec<Route>) {
        self.budget.set_limits(limits(budget), Instant::now());
        if let Ok(mut d) = self.detector.lock()
            && d.config() != &runaway
        {
            d.set_config(runaway);
        }
        if let Ok(mut r) = self.routes.write() {
            *r = routes;
        }
    }

    /// Feeds one request to the detector; a trip carries its evidence.
    pub fn observe_request(&self, summary: &RequestSummary) -> (Verdict, RunawayAction) {
        match self.detector.lock() {
            Ok(mut d) => (d.observe_request(summary), d.config().action),
            Err(_) => (Verdict::Healthy, RunawayAction::Alert),
        }
    }

    pub fn observe_response(&self, conversation: ConversationKey, summary: &ResponseSummary) {
        if let Ok(mut d) = self.detector.lock() {
            d.observe_response(conversation, summary);
        }
    }

    pub fn quarantine_reason(&self) -> Option<String> {
        self.quarantine.read().ok()?.clone()
    }

    pub fn set_quarantine(&self, reason: Option<String>) {
        if let Ok(mut q) = self.quarantine.write() {
            *q = reason;
        }
    }
}

/// Every agent's meter by name. Read on every request; written on reload.
#[derive(Debug, Default)]
pub struct Meters {
    by_agent: RwLock<HashMap<String, Arc<AgentMeter>>>,
}

impl Meters {
    pub fn get(&self, agent: &str) -> Option<Arc<AgentMeter>> {
        self.by_agent.read().ok()?.get(agent).cloned()
    }

    pub fn insert(&self, meter: Arc<AgentMeter>) {
        if let Ok(mut map) = self.by_agent.write() {
            map.insert(meter.name.clone(), meter);
        }
    }

    pub fn remove(&self, agent: &str) {
        if let Ok(mut map) = self.by_agent.write() {
            map.remove(agent);
        }
    }

    /// Every agent's counters, for a scrape.
    pub fn counters(&self) -> std::collections::BTreeMap<String, AgentCounters> {
        self.by_agent
            .read()
            .map(|m| {
                m.iter()
                    .map(|(name, meter)| (name.clone(), meter.metrics.snapshot()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn names(&self) -> Vec<String> {
        self.by_agent
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}
