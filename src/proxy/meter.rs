//! Per-agent proxy state: the agent's budget (ceilings and rate buckets), the
//! routes of its `llm:` entries (provider and real key, swapped in place on
//! reload or rotation), its quarantine flag, its record of OpenAI Responses
//! context sizes (`chain`, which bounds continued requests), and its Prometheus counters
//! (`metrics`, bumped by the request path). One `AgentMeter` per agent,
//! shared by every request of that agent; the supervisor updates it in place.
//!
//! Must not do I/O. Locks here are held for a few instructions, never across
//! an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::budget::threshold::{self, ThresholdCrossed};
use hyper::header::{AUTHORIZATION, HeaderName, HeaderValue};

use super::chain::{Begun, ChainEnd, ChainRecord, ChainRefs, KnownContext};
use super::refusal::Api;
use crate::budget::{AgentBudget, BudgetLimits, Ceilings, Month, RateLimits};
use crate::fleet::{BudgetSpec, ProviderKind, ProviderSpec};
use crate::ledger::{AgentMonthUsage, WindowSpend};
use crate::metrics::{AgentCounters, AgentMetrics};
use crate::runaway::{
    ConversationKey, Detector, RequestSummary, ResponseSummary, RunawayAction, RunawayConfig,
    VelocityConfig, VelocityEvidence, VelocityWire, Verdict,
};
use crate::vault::Secret;

/// Where one `llm:` entry's requests go, and with which real key.
#[derive(Debug, Clone)]
pub struct Route {
    pub provider: Arc<ProviderSpec>,
    /// The real provider key; `None` for a simulated provider.
    pub key: Option<Secret>,
}

/// A route as the request path uses it, prepared once per reload: the
/// upstream origin already parsed and the real key already a header, so no
/// request parses a URL or formats a credential.
pub struct Target {
    pub provider: Arc<ProviderSpec>,
    /// The origin to forward to; `None` for a simulated provider.
    pub upstream: Option<Result<reqwest::Url, String>>,
    pub credential: Credential,
}

/// The real key, as the header upstream expects.
pub enum Credential {
    /// A simulated provider needs none.
    None,
    /// Marked sensitive: hyper and reqwest redact it in Debug output.
    Header(HeaderName, HeaderValue),
    /// The key cannot be sent in a header (control characters, say).
    Invalid,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("provider", &self.provider.name)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Target {
    fn new(route: Route) -> Self {
        let upstream = match &route.provider.kind {
            ProviderKind::Anthropic { upstream } | ProviderKind::OpenAi { upstream } => Some(
                reqwest::Url::parse(upstream)
                    .map_err(|e| format!("upstream `{upstream}` is not a URL: {e}")),
            ),
            ProviderKind::Simulated { .. } => None,
        };
        let credential = match &route.key {
            None => Credential::None,
            Some(key) => {
                let (name, value) = match route.provider.api() {
                    Api::Anthropic => (
                        HeaderName::from_static("x-api-key"),
                        HeaderValue::from_str(key.expose()),
                    ),
                    Api::OpenAi => (
                        AUTHORIZATION,
                        HeaderValue::from_str(&format!("Bearer {}", key.expose())),
                    ),
                };
                match value {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        Credential::Header(name, value)
                    }
                    Err(_) => Credential::Invalid,
                }
            }
        };
        Self {
            provider: route.provider,
            upstream,
            credential,
        }
    }
}

fn targets(routes: Vec<Route>) -> Vec<Arc<Target>> {
    routes
        .into_iter()
        .map(|r| Arc::new(Target::new(r)))
        .collect()
}

pub struct AgentMeter {
    name: String,
    pub budget: AgentBudget,
    routes: RwLock<Vec<Arc<Target>>>,
    quarantine: RwLock<Option<String>>,
    /// The runaway detector: pure state, fed every request and answer.
    detector: Mutex<Detector>,
    /// The spend-velocity wire: pure state, fed every settlement.
    velocity: Mutex<VelocityWire>,
    /// Context sizes of the Responses answers and conversations it metered.
    chains: Mutex<ChainRecord>,
    /// Counters for `/metrics`; atomics, so the request path takes no lock.
    pub metrics: AgentMetrics,
    /// `budget.alert_at` in percent; 0 = none.
    alert_at: AtomicU32,
    /// The month a soft budget alert was last raised for, so each month raises one.
    alerted: Mutex<Option<Month>>,
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
        let alert_at = budget.alert_at_percent.unwrap_or(0);
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
            routes: RwLock::new(targets(routes)),
            quarantine: RwLock::new(None),
            detector: Mutex::new(Detector::new(runaway)),
            velocity: Mutex::new(VelocityWire::new(runaway.velocity)),
            chains: Mutex::new(ChainRecord::default()),
            metrics: AgentMetrics::default(),
            alert_at: AtomicU32::new(alert_at),
            alerted: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn route(&self, entry: usize) -> Option<Arc<Target>> {
        self.routes.read().ok()?.get(entry).cloned()
    }

    /// Applies a reloaded budget and routes (new keys, prices, upstreams) in
    /// place: requests in flight keep what they started with.
    pub fn update(&self, budget: &BudgetSpec, runaway: RunawayConfig, routes: Vec<Route>) {
        self.budget.set_limits(limits(budget), Instant::now());
        self.alert_at
            .store(budget.alert_at_percent.unwrap_or(0), Ordering::Relaxed);
        if let Ok(mut d) = self.detector.lock()
            && d.config() != &runaway
        {
            d.set_config(runaway);
        }
        if let Ok(mut v) = self.velocity.lock()
            && v.config() != &runaway.velocity
        {
            v.set_config(runaway.velocity);
        }
        let routes = targets(routes);
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

    /// A request continuing `refs` is about to be estimated: the context
    /// known for it, and a ticket to hand back when it ends (dropped unended,
    /// it counts as never sent). Requests with no refs take no lock.
    pub fn begin_chain(self: &Arc<Self>, refs: ChainRefs) -> (KnownContext, ChainTicket) {
        let begun = if refs == ChainRefs::default() {
            Begun::default()
        } else {
            self.chains
                .lock()
                .map(|mut c| c.begin(&refs))
                .unwrap_or_default()
        };
        let ticket = ChainTicket {
            meter: self.clone(),
            refs,
            begun,
            ended: false,
        };
        (begun.known, ticket)
    }

    /// The velocity wire's settings; a change of `window` or `baseline`
    /// needs its history loaded again ([`Self::load_velocity_history`]).
    pub fn velocity_config(&self) -> Option<VelocityConfig> {
        self.velocity.lock().ok().map(|v| *v.config())
    }

    /// The agent's spend from the ledger (see `ledger::spend_by_agent`),
    /// as of `now_ms`: per window over the baseline period, and per minute
    /// over the last window.
    pub fn load_velocity_history(
        &self,
        windows: &[WindowSpend],
        minutes: &[WindowSpend],
        now_ms: i64,
    ) {
        if let Ok(mut v) = self.velocity.lock() {
            v.load_history(windows.iter().map(|w| (w.index, w.tokens)), now_ms);
            v.seed_window(
                minutes.iter().map(|m| (m.index, m.tokens, m.requests)),
                now_ms,
            );
        }
    }

    /// Feeds one settlement of `tokens` to the velocity wire; a trip carries
    /// its evidence and the action configured for it. With `quarantine` the
    /// meter refuses the agent from now on — unless it already does (a
    /// request in flight when another trip stopped it): then the record that
    /// stopped it stands and nothing is reported.
    pub fn observe_spend(
        &self,
        now_ms: i64,
        tokens: u64,
    ) -> Option<(VelocityEvidence, RunawayAction)> {
        let (evidence, action) = {
            let mut v = self.velocity.lock().ok()?;
            (v.observe(now_ms, tokens)?, v.config().action)
        };
        if action == RunawayAction::Quarantine {
            let mut q = self.quarantine.write().ok()?;
            if q.is_some() {
                return None;
            }
            *q = Some(format!("spend velocity: {evidence}"));
        }
        Some((evidence, action))
    }

    /// After a settlement charged to `month`: the crossing to alert about, the
    /// first time this month's settled usage reaches `alert_at` of a ceiling.
    /// At most one per month per meter; the alerter debounces again by agent.
    pub fn budget_threshold(&self, month: Month) -> Option<ThresholdCrossed> {
        let percent = self.alert_at.load(Ordering::Relaxed);
        if percent == 0 {
            return None;
        }
        let mut alerted = self.alerted.lock().ok()?;
        if *alerted >= Some(month) {
            return None;
        }
        let snapshot = self.budget.usage(month);
        if snapshot.month != month {
            return None; // a late settlement of an earlier month
        }
        let crossed = threshold::crossed(&snapshot, percent)?;
        *alerted = Some(month);
        Some(crossed)
    }

    pub fn quarantine_reason(&self) -> Option<String> {
        self.quarantine.read().ok()?.clone()
    }

    pub fn set_quarantine(&self, reason: Option<String>) {
        let released = reason.is_none();
        let was = match self.quarantine.write() {
            Ok(mut q) => std::mem::replace(&mut *q, reason),
            Err(_) => return,
        };
        // Released: the spend that tripped is no reason to trip again (nor
        // to stay tripped and miss the next episode).
        if released
            && was.is_some()
            && let Ok(mut v) = self.velocity.lock()
        {
            v.reset_window();
        }
    }
}

/// A request's place in its agent's chain record, from estimate to
/// settlement (see [`AgentMeter::begin_chain`]).
pub struct ChainTicket {
    meter: Arc<AgentMeter>,
    refs: ChainRefs,
    begun: Begun,
    ended: bool,
}

impl ChainTicket {
    /// Records how the request ended.
    pub fn end(mut self, end: &ChainEnd) {
        self.finish(end);
    }

    fn finish(&mut self, end: &ChainEnd) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let records = matches!(end, ChainEnd::Answered { id: Some(_), .. });
        if (records || self.refs.conversation.is_some())
            && let Ok(mut c) = self.meter.chains.lock()
        {
            c.end(&self.refs, self.begun, end);
        }
    }
}

impl Drop for ChainTicket {
    /// Refused, or released before it was sent: the provider saw nothing.
    fn drop(&mut self) {
        self.finish(&ChainEnd::Unchanged);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Amount, CeilingKind};

    #[test]
    fn velocity_settings_apply_live_and_a_release_clears_the_window() {
        let nov = Month::new(2026, 11).unwrap();
        let spec = BudgetSpec::default();
        let meter = AgentMeter::new("a", &spec, RunawayConfig::default(), vec![], nov, None);
        let t0 = 1_795_000_200_000;
        assert!(
            meter.observe_spend(t0, 300_000).is_none(),
            "no history: only `no_baseline_tokens` (10M)"
        );
        let strict = RunawayConfig {
            velocity: VelocityConfig {
                max_tokens_per_window: Some(400_000),
                action: RunawayAction::Quarantine,
                ..VelocityConfig::default()
            },
            ..RunawayConfig::default()
        };
        meter.update(&spec, strict, vec![]);
        let (evidence, action) = meter.observe_spend(t0 + 1, 200_000).expect("over 400k");
        assert_eq!(action, RunawayAction::Quarantine);
        assert_eq!(
            evidence.spend_tokens, 500_000,
            "the window survived the reload"
        );
        let reason = meter.quarantine_reason().expect("refused from now on");
        assert!(
            reason.starts_with("spend velocity: 500,000 weighted tokens"),
            "{reason}"
        );
        meter.set_quarantine(None);
        assert!(
            meter.observe_spend(t0 + 2, 300_000).is_none(),
            "a fresh window"
        );
        assert!(
            meter.observe_spend(t0 + 3, 200_000).is_some(),
            "and re-armed"
        );

        // Quarantined by another trip while a request was in flight: its
        // settlement leaves that record alone and reports nothing.
        meter.set_quarantine(Some("runaway: 4 failing retries".into()));
        meter.set_quarantine(None);
        meter.set_quarantine(Some("runaway: 4 failing retries".into()));
        assert!(meter.observe_spend(t0 + 4, 500_000).is_none());
        assert_eq!(
            meter.quarantine_reason().as_deref(),
            Some("runaway: 4 failing retries")
        );
    }

    #[test]
    fn a_soft_alert_is_raised_once_a_month_when_usage_crosses_alert_at() {
        let nov = Month::new(2026, 11).unwrap();
        let spec = BudgetSpec {
            monthly_tokens: Some(1_000),
            alert_at_percent: Some(50),
            ..BudgetSpec::default()
        };
        let meter = AgentMeter::new("a", &spec, RunawayConfig::default(), vec![], nov, None);
        let spend = |tokens| {
            let r = meter.budget.reserve(nov, Amount::new(tokens, 0)).unwrap();
            r.settle(Amount::new(tokens, 0));
            meter.budget_threshold(nov)
        };
        assert_eq!(spend(499), None, "49.9%");
        assert_eq!(
            spend(1),
            Some(ThresholdCrossed {
                kind: CeilingKind::Tokens,
                percent: 50,
                used: 500,
                ceiling: 1_000
            })
        );
        assert_eq!(spend(100), None, "once this month");
        let dec = nov.next();
        let r = meter.budget.reserve(dec, Amount::new(600, 0)).unwrap();
        r.settle(Amount::new(600, 0));
        assert_eq!(
            meter.budget_threshold(nov),
            None,
            "a late settlement of an earlier month"
        );
        assert!(
            meter.budget_threshold(dec).is_some(),
            "a new month alerts anew"
        );

        let quiet = AgentMeter::new(
            "b",
            &BudgetSpec {
                alert_at_percent: None,
                ..spec
            },
            RunawayConfig::default(),
            vec![],
            nov,
            None,
        );
        let r = quiet.budget.reserve(nov, Amount::new(900, 0)).unwrap();
        r.settle(Amount::new(900, 0));
        assert_eq!(quiet.budget_threshold(nov), None, "no `alert_at`, no alert");
        quiet.update(&spec, RunawayConfig::default(), vec![]);
        assert!(
            quiet.budget_threshold(nov).is_some(),
            "a reload sets `alert_at`"
        );
    }
}
