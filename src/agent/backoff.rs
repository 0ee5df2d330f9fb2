//! Restart decisions and the crash-loop backoff, as pure values: no clock, no
//! processes. The actor feeds in how an agent ended and how long it ran; this
//! module says whether to restart and after what delay. Must not sleep or read
//! the time itself, so every rule here is table-tested.

use std::fmt;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::fleet::{RestartPolicy, RestartSpec};

/// How one run of an agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The leader exited by itself with this code.
    Code(i32),
    /// The leader was killed by this signal (ours during a stop, or anyone's).
    Signal(Signal),
    /// The command could not be started at all; the text says why.
    SpawnFailed(String),
}

impl Exit {
    pub fn is_success(&self) -> bool {
        matches!(self, Exit::Code(0))
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(signal) => write!(f, "killed by {}", signal.as_str()),
            Exit::SpawnFailed(why) => write!(f, "spawn failed: {why}"),
        }
    }
}

/// Whether an agent that ended with `exit` is started again under `policy`.
/// A spawn failure counts as a failure: a missing binary may appear later
/// (a deploy in progress), and backoff keeps the retries cheap.
pub fn should_restart(policy: RestartPolicy, exit: &Exit) -> bool {
    match policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => !exit.is_success(),
        RestartPolicy::Always => true,
    }
}

/// The Kubernetes CrashLoopBackOff shape: the first restart waits `initial`,
/// each further one twice as long up to `max`, and a run that lasted at least
/// `reset_after` starts the sequence over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    next: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(spec: &RestartSpec) -> Self {
        let initial = spec.backoff_initial.min(spec.backoff_max);
        Self {
            initial,
            max: spec.backoff_max,
            reset_after: spec.reset_after,
            next: initial,
            attempt: 0,
        }
    }

    /// Records a run that ended after `ran_for` and returns the delay before
    /// the next start. Advances the sequence, so call it once per exit.
    pub fn on_exit(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.reset();
        }
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Consecutive restarts without a healthy run, counting the pending one
    /// (1 right after the first crash); 0 after a reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Forget the crash history: used on explicit `start`/`restart` and after
    /// a healthy run.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn spec(initial: u64, max: u64, reset_after: u64) -> RestartSpec {
        RestartSpec {
            policy: RestartPolicy::OnFailure,
            backoff_initial: ms(initial),
            backoff_max: ms(max),
            reset_after: ms(reset_after),
        }
    }

    #[test]
    fn restart_decision_table() {
        use RestartPolicy::*;
        let spawn_failed = Exit::SpawnFailed("no such file".into());
        let cases = [
            (Never, Exit::Code(0), false),
            (Never, Exit::Code(1), false),
            (Never, Exit::Signal(Signal::SIGKILL), false),
            (Never, spawn_failed.clone(), false),
            (OnFailure, Exit::Code(0), false),
            (OnFailure, Exit::Code(1), true),
            (OnFailure, Exit::Code(-1), true),
            (OnFailure, Exit::Signal(Signal::SIGTERM), true),
            (OnFailure, Exit::Signal(Signal::SIGKILL), true),
            (OnFailure, spawn_failed.clone(), true),
            (Always, Exit::Code(0), true),
            (Always, Exit::Code(3), true),
            (Always, Exit::Signal(Signal::SIGSEGV), true),
            (Always, spawn_failed, true),
        ];
        for (policy, exit, want) in cases {
            assert_eq!(should_restart(policy, &exit), want, "{policy:?} {exit:?}");
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut b = Backoff::new(&spec(100, 1000, 60_000));
        let delays: Vec<u64> = (0..7)
            .map(|_| b.on_exit(ms(5)).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(b.attempt(), 7);
    }

    #[test]
    fn table_of_runs_and_resets() {
        // (ran_for ms, expected delay ms, expected attempt) with initial 10,
        // max 80, reset_after 1000.
        let steps = [
            (0, 10, 1),
            (999, 20, 2),
            (5, 40, 3),
            (5, 80, 4),
            (5, 80, 5),
            (1000, 10, 1), // a healthy run starts over
            (1, 20, 2),
            (5000, 10, 1),
        ];
        let mut b = Backoff::new(&spec(10, 80, 1000));
        for (i, (ran, delay, attempt)) in steps.into_iter().enumerate() {
            assert_eq!(b.on_exit(ms(ran)), ms(delay), "step {i}");
            assert_eq!(b.attempt(), attempt, "step {i}");
        }
    }

    #[test]
    fn explicit_reset_starts_over() {
        let mut b = Backoff::new(&spec(10, 80, 1000));
        b.on_exit(ms(1));
        b.on_exit(ms(1));
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.on_exit(ms(1)), ms(10));
    }

    #[test]
    fn initial_above_max_is_capped_and_zero_stays_zero() {
        let mut b = Backoff::new(&spec(5000, 1000, 60_000));
        assert_eq!(b.on_exit(ms(1)), ms(1000));
        assert_eq!(b.on_exit(ms(1)), ms(1000));

        let mut z = Backoff::new(&spec(0, 1000, 60_000));
        assert_eq!(z.on_exit(ms(1)), ms(0));
        assert_eq!(z.on_exit(ms(1)), ms(0));
    }

    #[test]
    fn huge_durations_saturate_instead_of_overflowing() {
        let big = Duration::MAX / 2 + Duration::from_secs(1);
        let mut b = Backoff::new(&RestartSpec {
            policy: RestartPolicy::Always,
            backoff_initial: big,
            backoff_max: Duration::MAX,
            reset_after: Duration::MAX,
        });
        assert_eq!(b.on_exit(ms(1)), big);
        assert_eq!(b.on_exit(ms(1)), Duration::MAX);
    }

    #[test]
    fn exit_display_names_the_cause() {
        assert_eq!(Exit::Code(3).to_string(), "exit code 3");
        assert_eq!(
            Exit::Signal(Signal::SIGKILL).to_string(),
            "killed by SIGKILL"
        );
        assert_eq!(
            Exit::SpawnFailed("`x` not found".into()).to_string(),
            "spawn failed: `x` not found"
        );
    }
}
