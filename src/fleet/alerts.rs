//! Validation of fleet.yaml's `alerts:` section into [`AlertsSpec`],
//! collecting every problem with its location. Pure; called by `load`. Must
//! never repeat the webhook URL in a message: it is a credential.

use std::path::Path;
use std::time::Duration;

use super::load::Cx;
use super::model::{AlertCommand, AlertsSpec};
use super::node::At;
use super::schema::{Dur, RawAlerts};
use crate::alert::WebhookUrl;

/// Thresholds above this would only keep memory busy: each counted
/// occurrence is remembered until the threshold is reached.
const MAX_RESTARTS: u32 = 1_000;
const MAX_REFUSALS: u32 = 100_000;

pub(super) fn resolve_alerts(cx: &mut Cx, raw: Option<RawAlerts>, base_dir: &Path) -> AlertsSpec {
    let mut spec = AlertsSpec::default();
    let Some(raw) = raw else { return spec };

    if let Some(webhook) = raw.webhook {
        match WebhookUrl::parse(&webhook.value) {
            Ok(url) => spec.webhook = Some(url),
            Err(why) => cx.push(webhook.pos, None, format!("`alerts.webhook`: {why}")),
        }
    }

    if let Some(command) = raw.command {
        let argv = command.value.0;
        match argv.first() {
            None => cx.push(
                command.pos,
                None,
                "`alerts.command` is empty; give the program and its arguments, like `[python3, alerts/notify.py]`, or remove it",
            ),
            Some(program) if program.value.trim().is_empty() => cx.push(
                program.pos,
                None,
                "`alerts.command[0]` is empty; name the program to run",
            ),
            Some(_) => {
                let nul = argv.iter().position(|a| a.value.contains('\0'));
                if let Some(i) = nul {
                    cx.push(
                        argv[i].pos,
                        None,
                        format!("`alerts.command[{i}]` contains a NUL character"),
                    );
                } else {
                    spec.command = Some(alert_command(
                        argv.into_iter().map(|a| a.value).collect(),
                        base_dir,
                    ));
                }
            }
        }
    }

    if let Some(crash) = raw.crash_loop {
        if let Some(n) = count(cx, crash.restarts, "crash_loop.restarts", MAX_RESTARTS) {
            spec.crash_loop.restarts = n;
        }
        if let Some(d) = duration(cx, crash.window, "crash_loop.window") {
            spec.crash_loop.window = d;
        }
    }
    if let Some(storm) = raw.rate_limit_storm {
        if let Some(n) = count(
            cx,
            storm.refusals,
            "rate_limit_storm.refusals",
            MAX_REFUSALS,
        ) {
            spec.rate_limit_storm.refusals = n;
        }
        if let Some(d) = duration(cx, storm.window, "rate_limit_storm.window") {
            spec.rate_limit_storm.window = d;
        }
        if let Some(d) = duration(cx, storm.quiet, "rate_limit_storm.quiet") {
            spec.rate_limit_storm.quiet = d;
        }
    }
    spec
}

/// A relative program path like `alerts/notify.sh` means "in the fleet
/// directory", as it does for an agent's command in its `cwd`; a bare name
/// (`curl`) is still looked up on `PATH`.
fn alert_command(mut argv: Vec<String>, base_dir: &Path) -> AlertCommand {
    if let Some(program) = argv.first_mut() {
        let path = Path::new(program.as_str());
        if path.is_relative() && path.components().count() > 1 {
            *program = base_dir.join(path).to_string_lossy().into_owned();
        }
    }
    AlertCommand {
        argv,
        cwd: base_dir.to_owned(),
    }
}

fn count(cx: &mut Cx, value: Option<At<u32>>, field: &str, max: u32) -> Option<u32> {
    let value = value?;
    if value.value == 0 {
        cx.push(
            value.pos,
            None,
            format!("`alerts.{field}` must be at least 1"),
        );
        None
    } else if value.value > max {
        cx.push(
            value.pos,
            None,
            format!(
                "`alerts.{field}` is {}, more than the most this supervisor counts ({max})",
                value.value
            ),
        );
        None
    } else {
        Some(value.value)
    }
}

fn duration(cx: &mut Cx, value: Option<At<Dur>>, field: &str) -> Option<Duration> {
    let value = value?;
    if value.value.0.is_zero() {
        cx.push(
            value.pos,
            None,
            format!("`alerts.{field}` must be longer than zero"),
        );
        None
    } else {
        Some(value.value.0)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::load::parse_for_tests;
    use super::super::model::{CrashLoopSpec, Fleet, StormSpec};
    use super::*;

    fn parse(source: &str) -> Result<Fleet, Vec<String>> {
        parse_for_tests(source)
    }

    #[test]
    fn no_section_means_no_sinks_and_default_thresholds() {
        let fleet = parse("version: 1\nagents: {}\n").unwrap();
        assert_eq!(fleet.alerts, AlertsSpec::default());
        assert_eq!(fleet.alerts.webhook, None);
        assert_eq!(fleet.alerts.command, None);
        assert_eq!(
            fleet.alerts.crash_loop,
            CrashLoopSpec {
                restarts: 5,
                window: Duration::from_secs(600)
            }
        );
        assert_eq!(
            fleet.alerts.rate_limit_storm,
            StormSpec {
                refusals: 20,
                window: Duration::from_secs(60),
                quiet: Duration::from_secs(900)
            }
        );
        let empty = parse("version: 1\nalerts: {}\nagents: {}\n").unwrap();
        assert_eq!(empty.alerts, AlertsSpec::default());
    }

    #[test]
    fn a_full_section_resolves() {
        let fleet = parse(
            "version: 1
alerts:
  webhook: https://hooks.slack.com/services/T0/B0/SECRET
  command: [alerts/notify.sh, --urgent]
  crash_loop: { restarts: 3, window: 2m }
  rate_limit_storm: { refusals: 100, window: 30s, quiet: 1h }
agents: {}
",
        )
        .unwrap();
        let alerts = fleet.alerts;
        assert_eq!(
            alerts.webhook.as_ref().map(WebhookUrl::origin).as_deref(),
            Some("https://hooks.slack.com")
        );
        assert_eq!(
            alerts.command,
            Some(AlertCommand {
                argv: vec!["/srv/fleet/alerts/notify.sh".into(), "--urgent".into()],
                cwd: PathBuf::from("/srv/fleet"),
            })
        );
        assert_eq!(
            alerts.crash_loop,
            CrashLoopSpec {
                restarts: 3,
                window: Duration::from_secs(120)
            }
        );
        assert_eq!(
            alerts.rate_limit_storm,
            StormSpec {
                refusals: 100,
                window: Duration::from_secs(30),
                quiet: Duration::from_secs(3600)
            }
        );
    }

    #[test]
    fn bare_and_absolute_programs_are_kept() {
        for (argv, want) in [
            ("[curl, -d, '@-']", "curl"),
            ("[/usr/bin/logger]", "/usr/bin/logger"),
            ("[./notify.sh]", "/srv/fleet/./notify.sh"),
        ] {
            let fleet = parse(&format!(
                "version: 1\nalerts: {{ command: {argv} }}\nagents: {{}}\n"
            ))
            .unwrap();
            assert_eq!(fleet.alerts.command.unwrap().argv[0], want, "{argv}");
        }
    }

    #[test]
    fn problems_are_located_and_never_repeat_the_webhook() {
        let errors = parse(
            "version: 1
alerts:
  webhook: ftp://example.com/T0/SECRET
  command: []
  crash_loop: { restarts: 0, window: 0s }
  rate_limit_storm: { refusals: 1000001, window: 1m, quiet: 0s }
agents: {}
",
        )
        .unwrap_err();
        let want = [
            "fleet.yaml:3:12: `alerts.webhook`: the scheme must be `http` or `https`, not `ftp`; use an http(s) URL like `https://hooks.slack.com/services/...`",
            "fleet.yaml:4:12: `alerts.command` is empty; give the program and its arguments, like `[python3, alerts/notify.py]`, or remove it",
            "fleet.yaml:5:27: `alerts.crash_loop.restarts` must be at least 1",
            "fleet.yaml:5:38: `alerts.crash_loop.window` must be longer than zero",
            "fleet.yaml:6:33: `alerts.rate_limit_storm.refusals` is 1000001, more than the most this supervisor counts (100000)",
            "fleet.yaml:6:61: `alerts.rate_limit_storm.quiet` must be longer than zero",
        ];
        assert_eq!(errors, want);
        for e in &errors {
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    #[test]
    fn syntax_errors_in_each_subsection_are_all_reported() {
        let errors = parse(
            "version: 1\nalerts:\n  crash_loop: { burst: 3 }\n  rate_limit_storm: { window: soon }\n  webhok: x\nagents: {}\n",
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "fleet.yaml:3:17: `alerts.crash_loop`: unknown field `burst`, expected `restarts` or `window`",
                "fleet.yaml:4:31: `alerts.rate_limit_storm.window`: invalid duration `soon`: use a number with a unit, like `500ms`, `10s`, `5m` or `1h30m`",
                "fleet.yaml:5:3: `alerts`: unknown field `webhok`, expected one of `webhook`, `command`, `crash_loop`, `rate_limit_storm`",
            ]
        );
    }

    #[test]
    fn an_alerts_string_is_refused_without_echoing_it() {
        let errors =
            parse("version: 1\nalerts: https://hooks.slack.com/services/T0/SECRET\nagents: {}\n")
                .unwrap_err();
        assert_eq!(
            errors,
            [
                "fleet.yaml:2:9: `alerts`: expected a mapping like `{ webhook: https://..., command: [...] }`, found a string"
            ]
        );
        let errors = parse(
            "version: 1\nalerts: { webhook: [https://hooks.slack.com/services/T0/SECRET], command: notify }\nagents: {}\n",
        )
        .unwrap_err();
        for e in &errors {
            assert!(!e.contains("SECRET"), "{e}");
        }
        assert_eq!(errors.len(), 2, "{errors:#?}");
    }
}
