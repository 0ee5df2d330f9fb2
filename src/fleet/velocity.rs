//! `runaway.velocity` as written (`RawVelocity`) and its validation into
//! [`VelocityConfig`]: `defaults.runaway.velocity` overlaid per field by the
//! agent's own, every problem located at the value that caused it. Pure;
//! called by `metering::resolve_runaway`.

use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Visitor};

use super::load::Cx;
use super::node::{At, Pos};
use super::schema::{Count, Dur};
use crate::runaway::{RunawayAction, VelocityConfig};

/// `velocity: { window, multiple, floor_tokens, no_baseline_tokens, max_tokens_per_window, baseline, action }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVelocity {
    pub window: Option<At<Dur>>,
    pub multiple: Option<At<Off<u32>>>,
    pub floor_tokens: Option<At<Count>>,
    pub no_baseline_tokens: Option<At<Off<Count>>>,
    pub max_tokens_per_window: Option<At<Off<Count>>>,
    pub baseline: Option<At<Dur>>,
    pub action: Option<At<RunawayAction>>,
}

/// A value, or `off` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Off<T>(pub Option<T>);

impl<T: FromStr<Err = String>> FromStr for Off<T> {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(Off(None));
        }
        text.parse()
            .map(|v| Off(Some(v)))
            .map_err(|e| format!("{e}, or `off`"))
    }
}

/// A whole number, for `multiple`.
impl<'de> Deserialize<'de> for Off<u32> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(OffVisitor::<Multiple>(std::marker::PhantomData))
            .map(|Off(m)| Off(m.map(|m| m.0)))
    }
}

impl<'de> Deserialize<'de> for Off<Count> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(OffVisitor::<Count>(std::marker::PhantomData))
    }
}

/// `5`, as `multiple` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Multiple(u32);

impl FromStr for Multiple {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        text.trim()
            .trim_end_matches(['x', '×'])
            .parse()
            .map(Multiple)
            .map_err(|_| format!("invalid multiple `{text}`: use a whole number, like `5`"))
    }
}

/// Any scalar reads as its text (see `node`), so one visitor fits both.
struct OffVisitor<T>(std::marker::PhantomData<T>);

impl<T: FromStr<Err = String>> Visitor<'_> for OffVisitor<T> {
    type Value = Off<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number, or `off`")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Off<T>, E> {
        v.parse().map_err(E::custom)
    }
}

/// `defaults.runaway.velocity` overlaid per field by the agent's own.
pub(super) fn resolve(
    cx: &mut Cx,
    agent: Option<&str>,
    defaults: Option<&RawVelocity>,
    own: Option<&RawVelocity>,
) -> VelocityConfig {
    let (config, at) = merge(defaults, own);
    let problems = config.problems();
    if problems.is_empty() {
        return config;
    }
    // What `defaults` alone gets wrong is reported once, for `defaults`.
    let inherited = match (agent, defaults) {
        (Some(_), Some(d)) => merge(Some(d), None).0.problems(),
        _ => Vec::new(),
    };
    for problem in problems {
        // A problem of a field left at its default is located at the field
        // it conflicts with.
        let Some(&(_, pos, from_defaults)) = at
            .iter()
            .find(|(f, ..)| *f == problem.0)
            .or_else(|| at.last())
        else {
            continue;
        };
        if from_defaults && inherited.contains(&problem) {
            continue;
        }
        let (field, message) = problem;
        cx.push(pos, agent, format!("`runaway.velocity.{field}` {message}"));
    }
    // Never run a wire with settings its checks refused.
    VelocityConfig {
        action: config.action,
        ..VelocityConfig::default()
    }
}

/// The layers merged per field, and where each field was set last (and
/// whether by `defaults`).
fn merge(
    defaults: Option<&RawVelocity>,
    own: Option<&RawVelocity>,
) -> (VelocityConfig, Vec<(&'static str, Pos, bool)>) {
    let mut config = VelocityConfig::default();
    let mut at: Vec<(&'static str, Pos, bool)> = Vec::new();
    for (layer, from_defaults) in [(defaults, true), (own, false)] {
        let Some(layer) = layer else { continue };
        let mut set = |field: &'static str, pos: Pos| {
            at.retain(|(f, ..)| *f != field);
            at.push((field, pos, from_defaults));
        };
        if let Some(v) = &layer.window {
            config.window = v.value.0;
            set("window", v.pos);
        }
        if let Some(v) = &layer.multiple {
            config.multiple = v.value.0;
            set("multiple", v.pos);
        }
        if let Some(v) = &layer.floor_tokens {
            config.floor_tokens = v.value.0;
            set("floor_tokens", v.pos);
        }
        if let Some(v) = &layer.no_baseline_tokens {
            config.no_baseline_tokens = v.value.0.map(|c| c.0);
            set("no_baseline_tokens", v.pos);
        }
        if let Some(v) = &layer.max_tokens_per_window {
            config.max_tokens_per_window = v.value.0.map(|c| c.0);
            set("max_tokens_per_window", v.pos);
        }
        if let Some(v) = &layer.baseline {
            config.baseline = v.value.0;
            set("baseline", v.pos);
        }
        if let Some(v) = &layer.action {
            config.action = v.value;
        }
    }
    (config, at)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::load::parse_for_tests;
    use super::*;

    fn mins(n: u64) -> Duration {
        Duration::from_secs(n * 60)
    }

    fn velocity(agent: &str, defaults: &str) -> Result<VelocityConfig, Vec<String>> {
        let source = format!(
            "version: 1\nproviders:\n  sim: {{ kind: simulated }}\ndefaults:\n  runaway: {{ velocity: {{ {defaults} }} }}\nagents:\n  a:\n    command: [x]\n    llm: [ {{ provider: sim }} ]\n    runaway:\n      velocity: {{ {agent} }}\n"
        );
        parse_for_tests(&source).map(|f| f.agents["a"].runaway.velocity)
    }

    #[test]
    fn defaults_then_the_agents_own_per_field() {
        assert_eq!(velocity("", ""), Ok(VelocityConfig::default()));
        let c = velocity(
            "multiple: 8x, max_tokens_per_window: 1.5M, no_baseline_tokens: off, action: quarantine",
            "window: 5m, floor_tokens: 50k, max_tokens_per_window: 2M, baseline: 14d",
        )
        .unwrap();
        assert_eq!(
            c,
            VelocityConfig {
                window: mins(5),
                multiple: Some(8),
                floor_tokens: 50_000,
                no_baseline_tokens: None,
                max_tokens_per_window: Some(1_500_000),
                baseline: Duration::from_secs(14 * 86_400),
                action: RunawayAction::Quarantine,
            }
        );
        let off = velocity(
            "max_tokens_per_window: off, multiple: off",
            "max_tokens_per_window: 1M",
        )
        .unwrap();
        assert_eq!(
            off.max_tokens_per_window, None,
            "the agent turns the default off"
        );
        assert!(!off.enabled());
    }

    #[test]
    fn problems_are_located_at_their_value() {
        let errors = velocity("window: 90s, multiple: 1", "").unwrap_err();
        assert_eq!(
            errors,
            vec![
                "fleet.yaml:11:27: agent \"a\": `runaway.velocity.window` must be whole minutes from `1m` to `24h`, like `10m`".to_owned(),
                "fleet.yaml:11:42: agent \"a\": `runaway.velocity.multiple` is 1: it must be from 2 to 1000 (or `off`); hint: the default is 5".to_owned(),
            ]
        );
        let errors = velocity("", "baseline: 30m").unwrap_err();
        assert_eq!(
            errors,
            vec!["fleet.yaml:5:36: `runaway.velocity.baseline` must span at least 6 windows (`window` is 10m); hint: the default is `7d`".to_owned()],
            "reported once, for `defaults`"
        );
        let errors = velocity("window: 2h", "baseline: 10h").unwrap_err();
        assert_eq!(
            errors,
            vec!["fleet.yaml:5:36: agent \"a\": `runaway.velocity.baseline` must span at least 6 windows (`window` is 2h); hint: the default is `7d`".to_owned()],
            "a default that conflicts with the agent's own value"
        );
        let errors = velocity(
            "floor_tokens: lots, max_tokens_per_window: never, bogus: 1",
            "",
        )
        .unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains("invalid count `lots`")),
            "{errors:#?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("invalid count `never`") && e.contains("or `off`")),
            "{errors:#?}"
        );
        assert!(errors.iter().any(|e| e.contains("bogus")), "{errors:#?}");
    }
}
