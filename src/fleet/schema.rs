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
    pub restart: Option<RawRestart>,
    pub stop: Option<RawStop>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub command: At<Argv>,
    pub cwd: Option<At<String>>,
    pub env: Option<RawEnv>,
    pub secrets: Option<RawEnv>,
    pub restart: Option<RawRestart>,
    pub stop: Option<RawStop>,
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
