//! Validation of the metering sections of fleet.yaml — `proxy`, `providers`,
//! and each agent's `llm`, `budget` and `runaway` — into their model types,
//! collecting every problem with its location. Pure; called by `load`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use super::load::{Cx, valid_agent_name, valid_env_name};
use super::model::{BudgetSpec, Delivery, LlmSpec, ProviderKind, ProviderSpec, ProxySpec};
use super::node::{At, Pos};
use super::schema::{
    ApiName, DeliveryName, ProviderKindName, RawBudget, RawLlm, RawProvider, RawProxy, RawRunaway,
};
use crate::pricing::Prices;
use crate::proxy::refusal::Api;
use crate::runaway::RunawayConfig;
use crate::vault::SecretName;

/// Largest `proxy.max_body` accepted: bodies are buffered whole, and
/// providers refuse requests far smaller than this.
const MAX_BODY_CEILING: u64 = 1 << 30;

/// Largest `proxy.max_body_in_flight(_per_agent)` accepted.
const BODY_IN_FLIGHT_CEILING: u64 = 64 << 30;

pub(super) fn resolve_proxy(cx: &mut Cx, raw: Option<RawProxy>) -> ProxySpec {
    let mut spec = ProxySpec::default();
    let Some(mut raw) = raw else { return spec };
    if let Some(listen) = raw.listen.take() {
        match listen.value.trim().parse::<SocketAddr>() {
            Ok(addr) => spec.listen = addr,
            Err(_) => cx.push(
                listen.pos,
                None,
                format!(
                    "`proxy.listen`: invalid address `{}`; use IP:PORT, like `127.0.0.1:7878`",
                    listen.value
                ),
            ),
        }
    }
    if let Some(max) = raw.max_body.take() {
        if max.value.0 == 0 {
            cx.push(max.pos, None, "`proxy.max_body` must be larger than zero");
        } else if max.value.0 > MAX_BODY_CEILING {
            cx.push(
                max.pos,
                None,
                format!(
                    "`proxy.max_body` ({} bytes) is above the 1GiB the proxy accepts: it buffers each body whole, and no provider takes a request that large",
                    max.value.0
                ),
            );
        } else {
            spec.max_body = max.value.0;
        }
    }
    if let Some(timeout) = raw.upstream_timeout.take() {
        if timeout.value.0.is_zero() {
            cx.push(
                timeout.pos,
                None,
                "`proxy.upstream_timeout` must be longer than zero",
            );
        } else {
            spec.upstream_timeout = timeout.value.0;
        }
    }
    resolve_proxy_caps(cx, raw, &mut spec);
    spec
}

/// The connection and body caps of `proxy:`; each must be above zero, and
/// those set together must fit each other (the rest is derived at start
/// from the host, `proxy::capacity`).
fn resolve_proxy_caps(cx: &mut Cx, raw: RawProxy, spec: &mut ProxySpec) {
    let mut count = |value: Option<At<u32>>, field: &str| -> Option<(usize, Pos)> {
        let value = value?;
        if value.value == 0 {
            cx.push(
                value.pos,
                None,
                format!("`proxy.{field}` must be larger than zero"),
            );
            return None;
        }
        Some((value.value as usize, value.pos))
    };
    let total = count(raw.max_connections, "max_connections");
    let unidentified = count(
        raw.max_unidentified_connections,
        "max_unidentified_connections",
    );
    let per_agent = count(raw.max_connections_per_agent, "max_connections_per_agent");
    for (part, field) in [
        (unidentified, "max_unidentified_connections"),
        (per_agent, "max_connections_per_agent"),
    ] {
        if let (Some((total, _)), Some((part, pos))) = (total, part)
            && part > total
        {
            cx.push(
                pos,
                None,
                format!(
                    "`proxy.{field}` ({part}) is larger than `proxy.max_connections` ({total})"
                ),
            );
        }
    }
    spec.max_connections = total.map(|(n, _)| n);
    spec.max_unidentified_connections = unidentified.map(|(n, _)| n);
    spec.max_connections_per_agent = per_agent.map(|(n, _)| n);

    let max_body = spec.max_body;
    let mut bytes = |value: Option<At<super::schema::ByteSize>>, field: &str| {
        let value = value?;
        if value.value.0 > BODY_IN_FLIGHT_CEILING {
            cx.push(
                value.pos,
                None,
                format!(
                    "`proxy.{field}` ({} bytes) is above the 64GiB the proxy accepts; it is memory held for request bodies",
                    value.value.0
                ),
            );
            return None;
        }
        if value.value.0 < max_body {
            cx.push(
                value.pos,
                None,
                format!(
                    "`proxy.{field}` ({} bytes) is smaller than `proxy.max_body` ({max_body} bytes), so a request of the largest size accepted could never be read",
                    value.value.0
                ),
            );
            return None;
        }
        Some((value.value.0, value.pos))
    };
    let body_total = bytes(raw.max_body_in_flight, "max_body_in_flight");
    let body_agent = bytes(
        raw.max_body_in_flight_per_agent,
        "max_body_in_flight_per_agent",
    );
    if let (Some((total, _)), Some((agent, pos))) = (body_total, body_agent)
        && agent > total
    {
        cx.push(
                pos,
                None,
                format!(
                    "`proxy.max_body_in_flight_per_agent` ({agent} bytes) is larger than `proxy.max_body_in_flight` ({total} bytes)"
                ),
            );
    }
    spec.max_body_in_flight = body_total.map(|(n, _)| n);
    spec.max_body_in_flight_per_agent = body_agent.map(|(n, _)| n);

    if let Some(timeout) = raw.header_timeout {
        if timeout.value.0.is_zero() {
            cx.push(
                timeout.pos,
                None,
                "`proxy.header_timeout` must be longer than zero",
            );
        } else {
            spec.header_timeout = timeout.value.0;
        }
    }
}

fn default_upstream(kind: ProviderKindName) -> &'static str {
    match kind {
        ProviderKindName::Anthropic => "https://api.anthropic.com",
        _ => "https://api.openai.com",
    }
}

/// An origin (`https://host[:port]`): the request path is appended as the agent sent it.
fn check_origin(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text.trim()).map_err(|e| {
        format!("invalid URL `{text}` ({e}); use an origin like `https://api.anthropic.com`")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "`{text}` is not an http(s) origin; use one like `https://api.anthropic.com`"
        ));
    }
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(format!(
            "`{text}` has a path, query or credentials; give only the origin (scheme, host, port), e.g. `{}://{}` — agents' request paths such as `/v1/messages` pass through",
            url.scheme(),
            url.host_str().unwrap_or("host")
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

pub(super) fn resolve_providers(
    cx: &mut Cx,
    raw: BTreeMap<At<String>, At<RawProvider>>,
) -> BTreeMap<String, ProviderSpec> {
    let mut out = BTreeMap::new();
    for (name, provider) in raw {
        let at = provider.pos;
        let provider = provider.value;
        let field = |f: &str| format!("`providers.{}.{f}`", name.value);
        if !valid_agent_name(&name.value) {
            cx.push(
                name.pos,
                None,
                format!(
                    "invalid provider name `{}`; use lower-case letters, digits, `_` and `-`",
                    name.value
                ),
            );
            continue;
        }
        let kind_name = provider.kind.value;
        let kind = match kind_name {
            ProviderKindName::Simulated => {
                if let Some(upstream) = &provider.upstream {
                    cx.push(
                        upstream.pos,
                        None,
                        format!(
                            "{}: a `simulated` provider has no upstream; remove it",
                            field("upstream")
                        ),
                    );
                }
                ProviderKind::Simulated {
                    api: match provider.api.map(|a| a.value) {
                        Some(ApiName::Openai) => Api::OpenAi,
                        _ => Api::Anthropic,
                    },
                    latency: provider
                        .latency
                        .map_or(std::time::Duration::ZERO, |l| l.value.0),
                }
            }
            ProviderKindName::Anthropic | ProviderKindName::Openai => {
                for (written, what) in [
                    (provider.api.as_ref().map(|a| a.pos), "api"),
                    (provider.latency.as_ref().map(|l| l.pos), "latency"),
                ] {
                    if let Some(pos) = written {
                        cx.push(
                            pos,
                            None,
                            format!(
                                "{}: only a `simulated` provider takes `{what}`; remove it",
                                field(what)
                            ),
                        );
                    }
                }
                let upstream = match &provider.upstream {
                    Some(u) => match check_origin(&u.value) {
                        Ok(origin) => origin,
                        Err(message) => {
                            cx.push(u.pos, None, format!("{}: {message}", field("upstream")));
                            continue;
                        }
                    },
                    None => default_upstream(kind_name).to_owned(),
                };
                if kind_name == ProviderKindName::Anthropic {
                    ProviderKind::Anthropic { upstream }
                } else {
                    ProviderKind::OpenAi { upstream }
                }
            }
        };
        let mut prices = BTreeMap::new();
        for (model, price) in provider.prices.into_iter().flatten() {
            let p = price.value;
            // Unwritten cache prices default on the expensive side: a cache write
            // at Anthropic's 1.25x input, a cache read at the full input price.
            match Prices::from_usd_per_mtok(
                p.input,
                p.output,
                p.cache_write.unwrap_or(p.input * 1.25),
                p.cache_read.unwrap_or(p.input),
            ) {
                Ok(parsed) => {
                    prices.insert(model.value, parsed);
                }
                Err(err) => cx.push(
                    price.pos,
                    None,
                    format!("{}: {err}", field(&format!("prices.{}", model.value))),
                ),
            }
        }
        let _ = at;
        out.insert(
            name.value.clone(),
            ProviderSpec {
                name: name.value,
                kind,
                prices,
            },
        );
    }
    out
}

/// What an agent's `llm:` entries resolve to, plus where each key name is written.
pub(super) fn resolve_llm(
    cx: &mut Cx,
    agent: &str,
    entries: &[At<RawLlm>],
    providers: &BTreeMap<String, ProviderSpec>,
    taken_env: &BTreeSet<String>,
    key_positions: &mut Vec<Pos>,
) -> Vec<LlmSpec> {
    let a = Some(agent);
    let mut out = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let raw = &entry.value;
        let Some(provider) = providers.get(&raw.provider.value) else {
            let known: Vec<String> = providers.keys().map(|k| format!("`{k}`")).collect();
            cx.push(
                raw.provider.pos,
                a,
                if known.is_empty() {
                    format!(
                        "`llm[{i}].provider`: unknown provider `{}`; define it under `providers:`",
                        raw.provider.value
                    )
                } else {
                    format!(
                        "`llm[{i}].provider`: unknown provider `{}`, expected one of {}",
                        raw.provider.value,
                        known.join(", ")
                    )
                },
            );
            continue;
        };
        let api = provider.api();
        let simulated = matches!(provider.kind, ProviderKind::Simulated { .. });
        let key = match &raw.key {
            Some(k) => match SecretName::parse(k.value.name(k.pos).0) {
                Ok(name) => {
                    key_positions.push(k.value.name(k.pos).1);
                    Some(name)
                }
                Err(err) => {
                    cx.push(k.value.name(k.pos).1, a, format!("`llm[{i}].key`: {err}"));
                    None
                }
            },
            None if simulated => {
                key_positions.push(entry.pos);
                None
            }
            None => {
                cx.push(
                    entry.pos,
                    a,
                    format!(
                        "`llm[{i}]`: missing `key`, the name of the secret holding the `{}` API key",
                        provider.name
                    ),
                );
                None
            }
        };
        let delivery = match raw.delivery.as_ref().map(|d| (d.value, d.pos)) {
            Some((DeliveryName::Direct, pos)) if simulated => {
                cx.push(pos, a, format!("`llm[{i}].delivery`: a `simulated` provider has no real key to deliver; remove `delivery: direct`"));
                Delivery::Proxy
            }
            Some((DeliveryName::Direct, _)) => Delivery::Direct,
            _ => Delivery::Proxy,
        };
        let (default_key, default_url) = match api {
            Api::Anthropic => ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"),
            Api::OpenAi => ("OPENAI_API_KEY", "OPENAI_BASE_URL"),
        };
        let env = raw.env.clone().unwrap_or_default();
        let mut names = Vec::new();
        for (written, default, what) in [
            (&env.key, default_key, "key"),
            (&env.base_url, default_url, "base_url"),
        ] {
            let (name, pos) = match written {
                Some(w) => (w.value.clone(), w.pos),
                None => (default.to_owned(), entry.pos),
            };
            if !valid_env_name(&name) {
                cx.push(
                    pos,
                    a,
                    format!("`llm[{i}].env.{what}`: invalid environment variable name `{name}`"),
                );
            } else if taken_env.contains(&name) {
                cx.push(pos, a, format!("`llm[{i}]` sets `{name}`, which `env` or `secrets` also sets; keep one (or rename it with `llm[{i}].env.{what}`)"));
            } else if !used.insert(name.clone()) {
                cx.push(pos, a, format!("`llm[{i}]` sets `{name}` like an earlier `llm` entry; give one of them other names with `env: {{ key: ..., base_url: ... }}`"));
            }
            names.push(name);
        }
        if key.is_none() && !simulated {
            continue;
        }
        out.push(LlmSpec {
            provider: provider.name.clone(),
            api,
            key,
            delivery,
            key_env: names[0].clone(),
            base_url_env: names[1].clone(),
        });
    }
    out
}

/// The agent's own `budget`, else the budget overlay's (written by `tune
/// --apply`), else `defaults.budget`, per field: what a person wrote for this
/// agent wins over what was measured, and both over the fleet-wide default.
/// Problems with a value from the overlay are reported in the overlay file.
pub(super) fn resolve_budget(
    cx: &mut Cx,
    agent: &str,
    defaults: Option<&RawBudget>,
    overlay: Option<&RawBudget>,
    own: Option<&RawBudget>,
    llm: &[LlmSpec],
    providers: &BTreeMap<String, ProviderSpec>,
) -> BudgetSpec {
    let a = Some(agent);
    // (value, whether it came from the overlay)
    fn pick<T: Clone>(
        layers: [(Option<&RawBudget>, bool); 3],
        field: fn(&RawBudget) -> &Option<At<T>>,
    ) -> Option<(At<T>, bool)> {
        layers
            .into_iter()
            .find_map(|(layer, from_overlay)| Some((field(layer?).clone()?, from_overlay)))
    }
    let layers = [(own, false), (overlay, true), (defaults, false)];
    let mut spec = BudgetSpec::default();
    for (value, name, slot) in [
        (
            pick(layers, |b| &b.monthly_tokens),
            "monthly_tokens",
            &mut spec.monthly_tokens,
        ),
        (
            pick(layers, |b| &b.tokens_per_minute),
            "tokens_per_minute",
            &mut spec.tokens_per_minute,
        ),
        (
            pick(layers, |b| &b.requests_per_minute),
            "requests_per_minute",
            &mut spec.requests_per_minute,
        ),
    ] {
        if let Some((v, from_overlay)) = value {
            if v.value.0 == 0 {
                cx.push_from(from_overlay, v.pos, a, format!("`budget.{name}` is 0, which would refuse every request; remove it for no limit"));
            } else {
                *slot = Some(v.value.0);
            }
        }
    }
    spec.alert_at_percent = pick(layers, |b| &b.alert_at).map(|(p, _)| p.value.0);
    if let Some((usd, from_overlay)) = pick(layers, |b| &b.monthly_usd) {
        spec.monthly_micro_usd = Some(usd.value.0);
        let unpriced: Vec<String> = llm
            .iter()
            .filter(|l| {
                providers
                    .get(&l.provider)
                    .is_some_and(|p| p.prices.is_empty())
            })
            .map(|l| format!("`{}`", l.provider))
            .collect();
        if !unpriced.is_empty() {
            cx.push_from(
                from_overlay,
                usd.pos,
                a,
                format!(
                    "`budget.monthly_usd` needs prices, but provider {} has no `prices`, so its requests cannot be priced; add `providers.<name>.prices` for the models the agent uses, or use `monthly_tokens`",
                    unpriced.join(", ")
                ),
            );
        }
    }
    spec
}

/// `defaults.runaway` overlaid per field by the agent's own.
pub(super) fn resolve_runaway(
    cx: &mut Cx,
    agent: Option<&str>,
    defaults: Option<&RawRunaway>,
    own: Option<&RawRunaway>,
) -> RunawayConfig {
    let mut config = RunawayConfig::default();
    // Where each numeric field was last set, so an error points at it.
    let mut at: Vec<(&'static str, _)> = Vec::new();
    for layer in [defaults, own].into_iter().flatten() {
        if let Some(v) = &layer.failing_retries {
            config.failing_retries = v.value;
            at.push(("failing_retries", v.pos));
        }
        if let Some(v) = &layer.no_progress_repeats {
            config.no_progress_repeats = v.value;
            at.push(("no_progress_repeats", v.pos));
        }
        if let Some(v) = &layer.poll_interval {
            config.poll_interval_ms = u64::try_from(v.value.0.as_millis()).unwrap_or(u64::MAX);
        }
        if let Some(v) = &layer.poll_budget_tokens {
            config.poll_budget_tokens = v.value.0;
            at.push(("poll_budget_tokens", v.pos));
        }
        if let Some(v) = &layer.max_polls {
            config.max_polls = v.value;
            at.push(("max_polls", v.pos));
        }
        if let Some(action) = layer.action {
            config.action = action;
        }
    }
    if let Err(err) = config.validate()
        && let Some((_, pos)) = at.iter().rev().find(|(field, _)| *field == err.field)
    {
        cx.push(*pos, agent, err.to_string());
    }
    config.velocity = super::velocity::resolve(
        cx,
        agent,
        defaults.and_then(|d| d.velocity.as_ref()),
        own.and_then(|o| o.velocity.as_ref()),
    );
    config
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::load::{LoadEnv, parse_for_tests};
    use super::super::model::Fleet;
    use super::*;

    /// Every wanted error is among `errors` (order aside).
    fn assert_has_all(errors: &[String], want: &[&str]) {
        for w in want {
            assert!(
                errors.iter().any(|e| e == w),
                "missing {w:?} in {errors:#?}"
            );
        }
    }

    fn parse(source: &str) -> Result<Fleet, Vec<String>> {
        parse_for_tests(source)
    }

    const PROVIDERS: &str = "version: 1
providers:
  claude:
    kind: anthropic
    prices: { claude-sonnet-4-5: { input: 3, output: 15, cache_write: 3.75, cache_read: 0.3 } }
  gpt: { kind: openai, upstream: 'http://127.0.0.1:9999', prices: { gpt-4.1: { input: 2, output: 8 } } }
  sim: { kind: simulated, api: openai, latency: 200ms }
";

    #[test]
    fn a_metered_fleet_resolves_with_defaults() {
        let fleet = parse(&format!(
            "{PROVIDERS}defaults:\n  budget: {{ tokens_per_minute: 60k }}\n  runaway: {{ failing_retries: 5 }}\nagents:\n  a:\n    command: [x]\n    llm:\n      - {{ provider: claude, key: llm_api_key }}\n      - {{ provider: gpt, key: openai_key, delivery: direct, env: {{ key: OAI_KEY, base_url: OAI_URL }} }}\n    budget: {{ monthly_usd: 150, monthly_tokens: 40M }}\n    runaway: {{ action: alert }}\n  b:\n    command: [y]\n    llm: [ {{ provider: sim }} ]\n"
        ))
        .unwrap();
        assert_eq!(fleet.proxy, ProxySpec::default());
        assert_eq!(
            fleet.providers["claude"].kind,
            ProviderKind::Anthropic {
                upstream: "https://api.anthropic.com".into()
            }
        );
        assert_eq!(
            fleet.providers["gpt"].kind,
            ProviderKind::OpenAi {
                upstream: "http://127.0.0.1:9999".into()
            }
        );
        assert_eq!(
            fleet.providers["claude"].prices["claude-sonnet-4-5"].output,
            15_000_000
        );
        let a = &fleet.agents["a"];
        assert_eq!(a.llm.len(), 2);
        assert_eq!(a.llm[0].key_env, "ANTHROPIC_API_KEY");
        assert_eq!(a.llm[0].base_url_env, "ANTHROPIC_BASE_URL");
        assert_eq!(a.llm[0].delivery, Delivery::Proxy);
        assert_eq!(a.llm[1].key_env, "OAI_KEY");
        assert_eq!(a.llm[1].delivery, Delivery::Direct);
        assert_eq!(a.budget.monthly_micro_usd, Some(150_000_000));
        assert_eq!(a.budget.monthly_tokens, Some(40_000_000));
        assert_eq!(a.budget.tokens_per_minute, Some(60_000), "from defaults");
        assert_eq!(a.runaway.failing_retries, 5, "from defaults");
        assert_eq!(a.runaway.action, crate::runaway::RunawayAction::Alert);
        let b = &fleet.agents["b"];
        assert_eq!(b.llm[0].api, Api::OpenAi);
        assert_eq!(b.llm[0].key, None);
        assert_eq!(b.llm[0].key_env, "OPENAI_API_KEY");
    }

    #[test]
    fn proxy_caps_are_read_and_checked_against_each_other() {
        let fleet = parse(&format!(
            "{PROVIDERS}proxy: {{ max_connections: 100, max_unidentified_connections: 10, max_connections_per_agent: 20, max_body_in_flight: 64MiB, max_body_in_flight_per_agent: 32MiB, header_timeout: 5s }}\nagents: {{}}\n"
        ))
        .unwrap();
        let p = &fleet.proxy;
        assert_eq!(p.max_connections, Some(100));
        assert_eq!(p.max_unidentified_connections, Some(10));
        assert_eq!(p.max_connections_per_agent, Some(20));
        assert_eq!(p.max_body_in_flight, Some(64 << 20));
        assert_eq!(p.max_body_in_flight_per_agent, Some(32 << 20));
        assert_eq!(p.header_timeout, std::time::Duration::from_secs(5));

        let errors = parse(&format!(
            "{PROVIDERS}proxy:\n  max_body: 1MiB\n  max_connections: 10\n  max_unidentified_connections: 0\n  max_connections_per_agent: 11\n  max_body_in_flight: 512KiB\n  max_body_in_flight_per_agent: 4MiB\n  header_timeout: 0s\nagents: {{}}\n"
        ))
        .unwrap_err();
        let want = [
            "fleet.yaml:11:33: `proxy.max_unidentified_connections` must be larger than zero",
            "fleet.yaml:12:30: `proxy.max_connections_per_agent` (11) is larger than `proxy.max_connections` (10)",
            "fleet.yaml:13:23: `proxy.max_body_in_flight` (524288 bytes) is smaller than `proxy.max_body` (1048576 bytes), so a request of the largest size accepted could never be read",
            "fleet.yaml:15:19: `proxy.header_timeout` must be longer than zero",
        ];
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
        assert_has_all(&errors, &want);
    }

    #[test]
    fn absurd_body_sizes_are_located() {
        // 600MiB is large but accepted (the derived budgets follow it).
        let fleet = parse(&format!(
            "{PROVIDERS}proxy: {{ max_body: 600MiB }}\nagents: {{}}\n"
        ))
        .unwrap();
        assert_eq!(fleet.proxy.max_body, 600 << 20);
        let errors = parse(&format!(
            "{PROVIDERS}proxy:\n  max_body: 2GiB\n  max_body_in_flight: 100GiB\n  max_body_in_flight_per_agent: 65GiB\nagents: {{}}\n"
        ))
        .unwrap_err();
        let want = [
            "fleet.yaml:9:13: `proxy.max_body` (2147483648 bytes) is above the 1GiB the proxy accepts: it buffers each body whole, and no provider takes a request that large",
            "fleet.yaml:10:23: `proxy.max_body_in_flight` (107374182400 bytes) is above the 64GiB the proxy accepts; it is memory held for request bodies",
            "fleet.yaml:11:33: `proxy.max_body_in_flight_per_agent` (69793218560 bytes) is above the 64GiB the proxy accepts; it is memory held for request bodies",
        ];
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
        assert_has_all(&errors, &want);
    }

    #[test]
    fn metering_problems_are_located() {
        let errors = parse(&format!(
            "{PROVIDERS}proxy: {{ listen: localhost, max_body: 32 parsecs }}\nagents:\n  a:\n    command: [x]\n    llm:\n      - {{ provider: nope, key: k }}\n      - {{ provider: gpt }}\n      - {{ provider: sim, delivery: direct }}\n    env: {{ OPENAI_API_KEY: x }}\n    budget: {{ monthly_usd: 10, tokens_per_minute: 0, requests_per_minute: lots }}\n    runaway: {{ failing_retries: 0 }}\n"
        ))
        .unwrap_err();
        let want = [
            "fleet.yaml:8:39: `proxy.max_body`: invalid size `32 parsecs`: use bytes or a unit, like `32MiB` or `512KiB`",
            "fleet.yaml:8:18: `proxy.listen`: invalid address `localhost`; use IP:PORT, like `127.0.0.1:7878`",
        ];
        assert_has_all(&errors, &want);
        let contains = |needle: &str| errors.iter().any(|e| e.contains(needle));
        assert!(
            contains(
                "agent \"a\": `llm[0].provider`: unknown provider `nope`, expected one of `claude`, `gpt`, `sim`"
            ),
            "{errors:#?}"
        );
        assert!(
            contains("agent \"a\": `llm[1]`: missing `key`"),
            "{errors:#?}"
        );
        assert!(
            contains("`llm[2].delivery`: a `simulated` provider has no real key"),
            "{errors:#?}"
        );
        assert!(contains("invalid count `lots`"), "{errors:#?}");
        assert!(contains("`runaway.failing_retries` is 0"), "{errors:#?}");
        assert!(
            contains("sets `OPENAI_API_KEY`, which `env` or `secrets` also sets"),
            "{errors:#?}"
        );
    }

    #[test]
    fn runaway_poll_settings_resolve_and_are_located() {
        let fleet = parse(&format!(
            "{PROVIDERS}defaults:\n  runaway: {{ poll_interval: 30s }}\nagents:\n  a:\n    command: [x]\n    llm: [ {{ provider: sim }} ]\n    runaway: {{ poll_budget_tokens: 250k, no_progress_repeats: 6, max_polls: 400 }}\n"
        ))
        .unwrap();
        let r = fleet.agents["a"].runaway;
        assert_eq!(r.poll_interval_ms, 30_000, "from defaults");
        assert_eq!(r.poll_budget_tokens, 250_000);
        assert_eq!(r.no_progress_repeats, 6);
        assert_eq!(r.max_polls, 400);
        assert_eq!(r.failing_retries, 4);

        let errors = parse(&format!(
            "{PROVIDERS}agents:\n  a:\n    command: [x]\n    llm: [ {{ provider: sim }} ]\n    runaway: {{ failing_retries: 3, poll_budget_tokens: 0 }}\n"
        ))
        .unwrap_err();
        assert!(
            errors.iter().any(|e| e
                == "fleet.yaml:12:56: agent \"a\": `runaway.poll_budget_tokens` is 0: it must be at least 1; hint: the default is 2000000"),
            "{errors:#?}"
        );
        let errors = parse(&format!(
            "{PROVIDERS}agents:\n  a:\n    command: [x]\n    llm: [ {{ provider: sim }} ]\n    runaway: {{ poll_interval: soon }}\n"
        ))
        .unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("fleet.yaml:12:") && e.contains("invalid duration `soon`")),
            "{errors:#?}"
        );
    }

    fn parse_with_overlay(
        source: &str,
        overlay: &str,
    ) -> Result<super::super::load::Located, Vec<String>> {
        super::super::load::parse_fleet_with_overlay(
            Path::new("fleet.yaml"),
            Path::new("/srv/fleet"),
            source,
            Some((Path::new("fleet.budgets.yaml"), overlay)),
            &LoadEnv::default(),
        )
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn the_overlay_sits_between_the_agents_budget_and_the_defaults() {
        let fleet = "version: 1
providers:
  claude: { kind: anthropic, prices: { m: { input: 3, output: 15 } } }
defaults:
  budget: { monthly_tokens: 1M, tokens_per_minute: 10k, requests_per_minute: 60, alert_at: 90% }
agents:
  a:
    command: [x]
    llm: [ { provider: claude, key: k } ]
    budget: { monthly_tokens: 5M }
  b:
    command: [y]
";
        let overlay = "# generated
agents:
  a:
    budget:
      monthly_tokens: 42k
      monthly_usd: 130
      tokens_per_minute: 2.5k
  b:
    budget: { monthly_tokens: 1.3M, alert_at: 50 }
  gone:
    budget: { monthly_tokens: 1k }
";
        let located = parse_with_overlay(fleet, overlay).unwrap();
        let a = located.fleet.agents["a"].budget;
        assert_eq!(a.monthly_tokens, Some(5_000_000), "fleet.yaml wins");
        assert_eq!(
            a.monthly_micro_usd,
            Some(130_000_000),
            "overlay over nothing"
        );
        assert_eq!(a.tokens_per_minute, Some(2_500), "overlay over defaults");
        assert_eq!(
            a.requests_per_minute,
            Some(60),
            "defaults where neither says"
        );
        assert_eq!(a.alert_at_percent, Some(90));
        let b = located.fleet.agents["b"].budget;
        assert_eq!(b.monthly_tokens, Some(1_300_000));
        assert_eq!(b.alert_at_percent, Some(50));
        let warnings: Vec<String> = located.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "fleet.budgets.yaml:10:3: agent \"gone\": not an agent of `fleet.yaml`; its budget here is ignored (`supervisor tune --apply` rewrites this file without it)"
            ]
        );
        // Without the overlay, the same fleet falls back to the defaults.
        assert_eq!(
            parse(fleet).unwrap().agents["b"].budget.monthly_tokens,
            Some(1_000_000)
        );
    }

    #[test]
    fn overlay_problems_are_located_in_the_overlay() {
        let fleet = "version: 1
providers:
  bare: { kind: openai }
agents:
  a:
    command: [x]
    llm: [ { provider: bare, key: k } ]
";
        let errors = parse_with_overlay(
            fleet,
            "agents:\n  a:\n    budget: { monthly_tokens: 0, monthly_usd: 5, alert_at: 120% }\n    env: {}\n",
        )
        .unwrap_err();
        let want = [
            "fleet.budgets.yaml:3:60: `agents.a.budget.alert_at`: invalid percentage `120%`: use a whole percentage from 1% to 100%, like `80%`",
            "fleet.budgets.yaml:4:5: `agents.a`: unknown field `env`, expected `budget`",
        ];
        assert_has_all(&errors, &want);
        assert!(
            errors.iter().any(|e| e
                .starts_with("fleet.budgets.yaml:3:31: agent \"a\": `budget.monthly_tokens` is 0")),
            "{errors:#?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with(
                "fleet.budgets.yaml:3:47: agent \"a\": `budget.monthly_usd` needs prices"
            )),
            "{errors:#?}"
        );
        let errors = parse_with_overlay(fleet, "agents: [a]\n").unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("fleet.budgets.yaml:1:9: `agents`:"),
            "{errors:#?}"
        );
        assert!(
            parse_with_overlay(fleet, "").is_ok(),
            "an empty overlay is no overlay"
        );
        assert!(parse_with_overlay(fleet, "agents: {}\n").is_ok());
    }

    #[test]
    fn usd_ceiling_needs_prices_and_upstream_must_be_an_origin() {
        let errors = parse(
            "version: 1\nproviders:\n  gpt: { kind: openai, upstream: 'https://api.openai.com/v1' }\n  bare: { kind: openai }\nagents:\n  a:\n    command: [x]\n    llm: [ { provider: bare, key: k } ]\n    budget: { monthly_usd: 5, tokens_per_minute: 0 }\n",
        )
        .unwrap_err();
        assert!(
            errors[0].starts_with(
                "fleet.yaml:3:34: `providers.gpt.upstream`: `https://api.openai.com/v1` has a path"
            ),
            "{errors:#?}"
        );
        assert!(errors[1].starts_with("fleet.yaml:9:28: agent \"a\": `budget.monthly_usd` needs prices, but provider `bare` has no `prices`"), "{errors:#?}");
        assert!(errors[2].starts_with("fleet.yaml:9:50: agent \"a\": `budget.tokens_per_minute` is 0, which would refuse every request"), "{errors:#?}");
    }
}
