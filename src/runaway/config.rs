//! The per-agent `runaway:` settings of fleet.yaml. Plain data with serde
//! defaults; owns no behaviour beyond validating its own numbers.

use serde::{Deserialize, Serialize};

use super::velocity::VelocityConfig;

/// What the supervisor does when an agent trips.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunawayAction {
    /// Refuse, kill and quarantine the agent until `supervisor release`.
    #[default]
    Quarantine,
    /// Only raise an alert; the agent keeps running.
    Alert,
}

/// `runaway: { failing_retries: 4, no_progress_repeats: 8, poll_interval: 2s,
/// poll_budget_tokens: 2M, max_polls: 200, action: quarantine }` (fleet.yaml writes the
/// interval as a duration; here it is milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunawayConfig {
    /// Consecutive failing retries (context grew, failure repeated) that trip.
    pub failing_retries: u32,
    /// Times in a row the same tool call may get a byte-identical result
    /// when the agent fires it back to back.
    pub no_progress_repeats: u32,
    /// An identical call the agent sends at least this long after the
    /// previous answer is a poll: it never trips by count. 0 = no polls.
    pub poll_interval_ms: u64,
    /// Input tokens a run of polls with identical answers may spend before
    /// it trips, cache reads counted at a tenth (what they are billed).
    pub poll_budget_tokens: u64,
    /// Identical polls in a row that trip whatever they cost: a model
    /// re-running a slow tool looks like a poller to the clock.
    pub max_polls: u32,
    pub action: RunawayAction,
    /// The spend-velocity backstop (`velocity.rs`), with its own action.
    pub velocity: VelocityConfig,
}

impl Default for RunawayConfig {
    fn default() -> Self {
        Self {
            failing_retries: 4,
            no_progress_repeats: 8,
            poll_interval_ms: 2_000,
            poll_budget_tokens: 2_000_000,
            max_polls: 200,
            action: RunawayAction::Quarantine,
            velocity: VelocityConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`runaway.{field}` is {value}: it must be at least {min}; hint: the default is {default}")]
pub struct RunawayConfigError {
    pub field: &'static str,
    pub value: u64,
    pub min: u64,
    pub default: u64,
}

impl RunawayConfig {
    /// Zero would trip on the first failure (or first repeated answer) of a
    /// healthy agent; fleet validation reports it instead.
    pub fn validate(&self) -> Result<(), RunawayConfigError> {
        let defaults = Self::default();
        let checks = [
            (
                "failing_retries",
                u64::from(self.failing_retries),
                1,
                u64::from(defaults.failing_retries),
            ),
            (
                "no_progress_repeats",
                u64::from(self.no_progress_repeats),
                2,
                u64::from(defaults.no_progress_repeats),
            ),
            (
                "max_polls",
                u64::from(self.max_polls),
                1,
                u64::from(defaults.max_polls),
            ),
            (
                "poll_budget_tokens",
                self.poll_budget_tokens,
                1,
                defaults.poll_budget_tokens,
            ),
        ];
        for (field, value, min, default) in checks {
            if value < min {
                return Err(RunawayConfigError {
                    field,
                    value,
                    min,
                    default,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_yaml() {
        let c: RunawayConfig = serde_saphyr::from_str("failing_retries: 6\n").unwrap();
        assert_eq!(
            c,
            RunawayConfig {
                failing_retries: 6,
                ..RunawayConfig::default()
            }
        );
        let c: RunawayConfig = serde_saphyr::from_str("action: alert\n").unwrap();
        assert_eq!(c.action, RunawayAction::Alert);
        assert_eq!(c.failing_retries, 4);
        assert_eq!(c.no_progress_repeats, 8);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(serde_saphyr::from_str::<RunawayConfig>("failing_retry: 3\n").is_err());
        assert!(serde_saphyr::from_str::<RunawayConfig>("action: kill\n").is_err());
        let zero = RunawayConfig {
            failing_retries: 0,
            ..RunawayConfig::default()
        };
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "`runaway.failing_retries` is 0: it must be at least 1; hint: the default is 4"
        );
        assert!(RunawayConfig::default().validate().is_ok());
    }
}
