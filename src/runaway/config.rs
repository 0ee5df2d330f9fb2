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

/// `runaway: { failing_retries: 4, no_progress_repeats: 8, action: quarantine }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunawayConfig {
    /// Consecutive failing retries (context grew, failure repeated) that trip.
    pub failing_retries: u32,
    /// Times in a row the same tool call may get a byte-identical result.
    pub no_progress_repeats: u32,
    pub action: RunawayAction,
    /// The spend-velocity backstop (`velocity.rs`), with its own action.
    pub velocity: VelocityConfig,
}

impl Default for RunawayConfig {
    fn default() -> Self {
        Self {
            failing_retries: 4,
            no_progress_repeats: 8,
            action: RunawayAction::Quarantine,
            velocity: VelocityConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`runaway.{field}` is {value}: it must be at least {min}; hint: the default is {default}")]
pub struct RunawayConfigError {
    pub field: &'static str,
    pub value: u32,
    pub min: u32,
    pub default: u32,
}

impl RunawayConfig {
    /// Zero would trip on the first failure (or first repeated answer) of a
    /// healthy agent; fleet validation reports it instead.
    pub fn validate(&self) -> Result<(), RunawayConfigError> {
        let defaults = Self::default();
        if self.failing_retries < 1 {
            return Err(RunawayConfigError {
                field: "failing_retries",
                value: self.failing_retries,
                min: 1,
                default: defaults.failing_retries,
            });
        }
        if self.no_progress_repeats < 2 {
            return Err(RunawayConfigError {
                field: "no_progress_repeats",
                value: self.no_progress_repeats,
                min: 2,
                default: defaults.no_progress_repeats,
            });
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
