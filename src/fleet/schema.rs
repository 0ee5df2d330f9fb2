//! The fleet.yaml sections as written, before validation and defaults: one
//! serde struct per section, each `deny_unknown_fields`, each field optional
//! where the file may leave it out. Adding a section means a struct here and a
//! line in `load::SECTIONS`. Owns leaf syntax (durations, signals, argv); must
//! not apply defaults or check cross-field rules (that is `load`'s job).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use serde::de::{self, Visitor};

use super::node::At;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    pub backend: Option<At<Backend>>,
    pub path: Option<At<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Dir,
    SystemdCreds,
    Env,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Dir => "dir",
            Self::SystemdCreds => "systemd-creds",
            Self::Env => "env",
        }
    }
}

/// `env:` maps, with every key and value located for validation.
pub type RawEnv = BTreeMap<At<String>, At<String>>;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub env: Option<RawEnv>,
    pub user: Option<At<AccountName>>,
    pub group: Option<At<AccountName>>,
    pub restart: Option<RawRestart>,
    pub stop: Option<RawStop>,
    pub budget: Option<RawBudget>,
    pub runaway: Option<RawRunaway>,
}

/// `proxy: { listen, max_body, upstream_timeout, max_connections,
/// max_unidentified_connections, max_connections_per_agent,
/// max_body_in_flight, max_body_in_flight_per_agent, header_timeout }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<At<String>>,
    pub max_body: Option<At<ByteSize>>,
    pub upstream_timeout: Option<At<Dur>>,
    pub max_connections: Option<At<u32>>,
    pub max_unidentified_connections: Option<At<u32>>,
    pub max_connections_per_agent: Option<At<u32>>,
    pub max_body_in_flight: Option<At<ByteSize>>,
    pub max_body_in_flight_per_agent: Option<At<ByteSize>>,
    pub header_timeout: Option<At<Dur>>,
}

/// `admin: { listen }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<At<String>>,
}

/// `alerts: { webhook, command, crash_loop, rate_limit_storm }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub webhook: Option<At<String>>,
    pub command: Option<At<Argv>>,
    pub crash_loop: Option<RawCrashLoop>,
    pub rate_limit_storm: Option<RawStorm>,
}

/// `crash_loop: { restarts, window }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCrashLoop {
    pub restarts: Option<At<u32>>,
    pub window: Option<At<Dur>>,
}

/// `rate_limit_storm: { refusals, window, quiet }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorm {
    pub refusals: Option<At<u32>>,
    pub window: Option<At<Dur>>,
    pub quiet: Option<At<Dur>>,
}

/// One entry of `providers:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: At<ProviderKindName>,
    pub upstream: Option<At<String>>,
    /// Which API a `simulated` provider speaks.
    pub api: Option<At<ApiName>>,
    /// How long a `simulated` provider takes to answer.
    pub latency: Option<At<Dur>>,
    pub prices: Option<BTreeMap<At<String>, At<RawPrice>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKindName {
    Anthropic,
    Openai,
    Simulated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiName {
    Anthropic,
    Openai,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    pub output: f64,
    pub cache_write: Option<f64>,
    pub cache_read: Option<f64>,
}

/// One entry of an agent's `llm:` list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLlm {
    pub provider: At<String>,
    pub key: Option<At<RawSecretRef>>,
    pub delivery: Option<At<DeliveryName>>,
    pub env: Option<RawLlmEnv>,
}

/// A secret as `secrets:` values and `llm[].key` name it: a plain name, or
/// `{ name, rotate_every, issuer, revoke, grace }`.
#[derive(Debug, Clone)]
pub enum RawSecretRef {
    Name(String),
    Policy(RawSecretPolicy),
}

impl RawSecretRef {
    /// The secret's name, with where it is written (`at` for the plain form).
    pub fn name(&self, at: super::node::Pos) -> (&str, super::node::Pos) {
        match self {
            Self::Name(name) => (name, at),
            Self::Policy(p) => (&p.name.value, p.name.pos),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretPolicy {
    pub name: At<String>,
    pub rotate_every: Option<At<Dur>>,
    pub issuer: Option<At<Argv>>,
    pub revoke: Option<At<Argv>>,
    pub grace: Option<At<Dur>>,
}

impl<'de> Deserialize<'de> for RawSecretRef {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RefVisitor;
        impl<'de> Visitor<'de> for RefVisitor {
            type Value = RawSecretRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a secret name, or a mapping like `{ name: key, rotate_every: 90d, issuer: [...] }`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSecretRef, E> {
                Ok(RawSecretRef::Name(v.to_owned()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawSecretRef, A::Error> {
                RawSecretPolicy::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawSecretRef::Policy)
            }
        }
        deserializer.deserialize_any(RefVisitor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryName {
    Proxy,
    Direct,
}

/// Overrides of the variable names an `llm:` entry sets.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLlmEnv {
    pub key: Option<At<String>>,
    pub base_url: Option<At<String>>,
}

/// `budget: { monthly_usd, monthly_tokens, tokens_per_minute, requests_per_minute, alert_at }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub monthly_usd: Option<At<Usd>>,
    pub monthly_tokens: Option<At<Count>>,
    pub tokens_per_minute: Option<At<Count>>,
    pub requests_per_minute: Option<At<Count>>,
    pub alert_at: Option<At<Percent>>,
}

/// The budget overlay written by `supervisor tune --apply` beside the fleet
/// file: `agents: { name: { budget: {...} } }` and nothing else.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverlay {
    pub agents: Option<BTreeMap<At<String>, At<RawOverlayAgent>>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverlayAgent {
    pub budget: Option<RawBudget>,
}

/// A whole percentage from 1 to 100, written `80%` or `80`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u32);

impl FromStr for Percent {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let digits = text.trim().trim_end_matches('%').trim_end();
        match digits.parse::<u32>() {
            Ok(n) if (1..=100).contains(&n) => Ok(Percent(n)),
            _ => Err(format!(
                "invalid percentage `{text}`: use a whole percentage from 1% to 100%, like `80%`"
            )),
        }
    }
}

/// `runaway: { failing_retries, no_progress_repeats, poll_interval,
/// poll_budget_tokens, max_polls, action }`, merged per field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRunaway {
    pub failing_retries: Option<At<u32>>,
    pub no_progress_repeats: Option<At<u32>>,
    pub poll_interval: Option<At<Dur>>,
    pub poll_budget_tokens: Option<At<Count>>,
    pub max_polls: Option<At<u32>>,
    pub action: Option<crate::runaway::RunawayAction>,
    pub velocity: Option<super::velocity::RawVelocity>,
}

/// A count written as an integer or with a suffix: `40000`, `60k`, `40M`, `1.5G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub u64);

impl FromStr for Count {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid count `{text}`: use a whole number, optionally with `k`, `M` or `G`, like `60k` or `40M`"
            )
        };
        let t = text.trim().replace('_', "");
        let (digits, scale) = match t.chars().last() {
            Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
            Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
            Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
            _ => (t.as_str(), 1.0),
        };
        if scale == 1.0 {
            return digits.parse::<u64>().map(Count).map_err(|_| bad());
        }
        let n: f64 = digits.parse().map_err(|_| bad())?;
        let v = (n * scale).round();
        if !n.is_finite() || n < 0.0 || v > u64::MAX as f64 || (n * scale - v).abs() > 1e-6 {
            return Err(bad());
        }
        Ok(Count(v as u64))
    }
}

/// Dollars, as a number (`150`, `12.5`); held as integer micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usd(pub u64);

impl FromStr for Usd {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid amount `{text}`: use dollars as a number, like `150` or `12.50`");
        let n: f64 = text
            .trim()
            .trim_start_matches('$')
            .parse()
            .map_err(|_| bad())?;
        if !n.is_finite() || !(0.0..=1e12).contains(&n) {
            return Err(bad());
        }
        Ok(Usd((n * 1e6).round() as u64))
    }
}

/// Bytes, as an integer or with a unit: `32MiB`, `512KiB`, `1GiB`, `1000000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid size `{text}`: use bytes or a unit, like `32MiB` or `512KiB`");
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(scale).map(ByteSize).ok_or_else(bad)
    }
}

/// Deserializes a `FromStr` leaf from its text, as written in the file.
macro_rules! from_text {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct TextVisitor;
                impl Visitor<'_> for TextVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$ty, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(TextVisitor)
            }
        }
    };
}

/// A user or group as written for `user:`/`group:`: a name, or a numeric id.
/// Only the syntax is checked here; the lookup is `accounts`'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountName(pub String);

impl FromStr for AccountName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let ok = !text.is_empty()
            && text.len() <= 256
            && !text.starts_with('-')
            && text
                .chars()
                .all(|c| !c.is_control() && !c.is_whitespace() && c != ':' && c != '/');
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "invalid account `{}`: give a user or group name, like `agents`, or a numeric id",
                text.escape_debug()
            ))
        }
    }
}

from_text!(AccountName, "a user or group name, or a numeric id");
from_text!(Count, "a count, like `60k` or `40M`");
from_text!(Usd, "an amount in dollars, like `150`");
from_text!(ByteSize, "a size, like `32MiB`");
from_text!(Percent, "a percentage, like `80%`");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub command: At<Argv>,
    pub cwd: Option<At<String>>,
    pub env: Option<RawEnv>,
    pub secrets: Option<BTreeMap<At<String>, At<RawSecretRef>>>,
    pub restart: Option<RawRestart>,
    pub stop: Option<RawStop>,
    pub llm: Option<Vec<At<RawLlm>>>,
    pub budget: Option<RawBudget>,
    pub runaway: Option<RawRunaway>,
    pub user: Option<At<AccountName>>,
    pub group: Option<At<AccountName>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    pub policy: Option<Policy>,
    pub backoff_initial: Option<At<Dur>>,
    pub backoff_max: Option<At<Dur>>,
    pub reset_after: Option<At<Dur>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Never,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStop {
    pub signal: Option<StopSignal>,
    pub grace: Option<Dur>,
}

/// A command line: a list of arguments, each located.
#[derive(Debug, Clone, PartialEq)]
pub struct Argv(pub Vec<At<String>>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ArgvVisitor;
        impl<'de> Visitor<'de> for ArgvVisitor {
            type Value = Argv;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of arguments, like `[python3, agent.py]`")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Argv, A::Error> {
                let mut args = Vec::new();
                while let Some(arg) = seq.next_element()? {
                    args.push(arg);
                }
                Ok(Argv(args))
            }
        }
        deserializer.deserialize_seq(ArgvVisitor)
    }
}

/// A human duration: `500ms`, `10s`, `5m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim()).map(Dur).map_err(|_| {
            format!("invalid duration `{text}`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`")
        })
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;
        impl Visitor<'_> for DurVisitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration, like `10s` or `5m`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurVisitor)
    }
}

/// A signal that asks a process to stop, by name: `SIGTERM`, `TERM`, `sigint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(pub Signal);

impl FromStr for StopSignal {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let upper = text.trim().to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        let signal = Signal::from_str(&full).map_err(|_| {
            format!("unknown signal `{text}`, expected a name like `SIGTERM`, `SIGINT`, `SIGQUIT` or `SIGHUP`")
        })?;
        use Signal::*;
        if matches!(
            signal,
            SIGSTOP | SIGTSTP | SIGTTIN | SIGTTOU | SIGCONT | SIGCHLD | SIGURG | SIGWINCH
        ) {
            return Err(format!(
                "`{}` does not make a process exit; use `SIGTERM`, `SIGINT`, `SIGQUIT` or `SIGHUP`",
                signal.as_str()
            ));
        }
        Ok(StopSignal(signal))
    }
}

impl<'de> Deserialize<'de> for StopSignal {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SignalVisitor;
        impl Visitor<'_> for SignalVisitor {
            type Value = StopSignal;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a signal name, like `SIGTERM`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StopSignal, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(SignalVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sizes_and_dollars() {
        let counts: &[(&str, Option<u64>)] = &[
            ("40000", Some(40_000)),
            ("60k", Some(60_000)),
            ("40M", Some(40_000_000)),
            ("1.5k", Some(1_500)),
            ("2G", Some(2_000_000_000)),
            ("1_000", Some(1_000)),
            ("0.0001k", None),
            ("-5", None),
            ("ten", None),
            ("5x", None),
            ("", None),
        ];
        for (text, want) in counts {
            assert_eq!(text.parse::<Count>().ok().map(|c| c.0), *want, "{text}");
        }
        assert_eq!("32MiB".parse::<ByteSize>().unwrap().0, 32 << 20);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert!("32 parsecs".parse::<ByteSize>().is_err());
        assert_eq!("150".parse::<Usd>().unwrap().0, 150_000_000);
        assert_eq!("12.5".parse::<Usd>().unwrap().0, 12_500_000);
        assert!("-1".parse::<Usd>().is_err());
        assert!("NaN".parse::<Usd>().is_err());
    }

    #[test]
    fn durations() {
        let cases: &[(&str, Option<u64>)] = &[
            ("10s", Some(10_000)),
            ("500ms", Some(500)),
            ("5m", Some(300_000)),
            ("1h30m", Some(5_400_000)),
            ("1h 30m", Some(5_400_000)),
            (" 2s ", Some(2_000)),
            ("10", None),
            ("ten seconds", None),
            ("5x", None),
            ("", None),
            ("-1s", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<Dur>().ok().map(|d| d.0.as_millis() as u64);
            assert_eq!(got, *want, "{text:?}");
        }
        assert_eq!(
            "5x".parse::<Dur>().unwrap_err(),
            "invalid duration `5x`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`"
        );
    }

    #[test]
    fn stop_signals() {
        let cases: &[(&str, Option<Signal>)] = &[
            ("SIGTERM", Some(Signal::SIGTERM)),
            ("TERM", Some(Signal::SIGTERM)),
            ("sigint", Some(Signal::SIGINT)),
            ("Quit", Some(Signal::SIGQUIT)),
            ("SIGHUP", Some(Signal::SIGHUP)),
            ("SIGKILL", Some(Signal::SIGKILL)),
            ("SIGUSR1", Some(Signal::SIGUSR1)),
            ("SIGSTOP", None),
            ("CHLD", None),
            ("SIGFOO", None),
            ("15", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                text.parse::<StopSignal>().ok().map(|s| s.0),
                *want,
                "{text:?}"
            );
        }
        assert_eq!(
            "SIGCONT".parse::<StopSignal>().unwrap_err(),
            "`SIGCONT` does not make a process exit; use `SIGTERM`, `SIGINT`, `SIGQUIT` or `SIGHUP`"
        );
    }
}
