//! Running rotation policies: a job per due `(agent, secret)` issues a new
//! version, writes it into the `dir` backend, has the supervisor swap it in
//! (the same reload as SIGHUP) and, after the grace window, revokes the old
//! one. Every step is recorded in the ledger; any failure alerts and leaves
//! the old version in place and working. Whether a job is due is decided by
//! `should_rotate` from the ledger's history, so a restarted supervisor
//! neither forgets nor repeats a rotation.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::alert::{AlertEvent, Alerter};
use crate::fleet::RotationPolicy;
use crate::ledger::rotation::{self as rotation_ledger, RotationOutcome, RotationRecord};
use crate::ledger::unix_millis_now;
use crate::vault::{DirStore, SecretName, SecretStore};

use super::{hooks, retry_delay, should_rotate, store};

/// How often the supervisor looks for due rotations (also once at start).
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Rotations in flight, and when a failed one may be tried again.
#[derive(Debug, Default)]
pub struct Rotations {
    busy: BTreeSet<(String, SecretName)>,
    retry_after_ms: BTreeMap<(String, SecretName), i64>,
}

/// One secret to rotate if due.
#[derive(Debug, Clone)]
pub struct Job {
    pub agent: String,
    pub secret: SecretName,
    pub policy: RotationPolicy,
    pub vault_root: PathBuf,
    pub fleet_dir: PathBuf,
    pub state_dir: PathBuf,
}

fn locked(r: &Mutex<Rotations>) -> std::sync::MutexGuard<'_, Rotations> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks `job` as running; `false` if it already runs.
pub fn claim(rotations: &Mutex<Rotations>, job: &Job) -> bool {
    locked(rotations)
        .busy
        .insert((job.agent.clone(), job.secret.clone()))
}

/// Runs `job` if it is due. `swap` asks the supervisor to reload and says
/// whether the reload was applied.
pub async fn run<S, F>(job: Job, rotations: Arc<Mutex<Rotations>>, alerter: Alerter, swap: S)
where
    S: FnOnce() -> F,
    F: Future<Output = bool>,
{
    let key = (job.agent.clone(), job.secret.clone());
    let retry_after = locked(&rotations).retry_after_ms.get(&key).copied();
    let failed = rotate_if_due(&job, retry_after, &alerter, swap).await;
    let mut r = locked(&rotations);
    if failed {
        let delay = i64::try_from(retry_delay(job.policy.every).as_millis()).unwrap_or(i64::MAX);
        r.retry_after_ms
            .insert(key.clone(), unix_millis_now().saturating_add(delay));
    } else {
        r.retry_after_ms.remove(&key);
    }
    r.busy.remove(&key);
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(format!("{err:#}")),
        Err(err) => Err(err.to_string()),
    }
}

/// Returns whether an attempt was made and failed.
async fn rotate_if_due<S, F>(
    job: &Job,
    retry_after: Option<i64>,
    alerter: &Alerter,
    swap: S,
) -> bool
where
    S: FnOnce() -> F,
    F: Future<Output = bool>,
{
    let (agent, secret) = (job.agent.clone(), job.secret.to_string());
    let state_dir = job.state_dir.clone();
    let (a, s) = (agent.clone(), secret.clone());
    let last = match blocking(move || rotation_ledger::last_renewed_ms(&state_dir, &a, &s)).await {
        Ok(last) => last,
        Err(err) => {
            tracing::warn!(agent = %agent, secret = %secret, "cannot tell whether a rotation is due: {err}");
            return false;
        }
    };
    if !should_rotate(last, job.policy.every, retry_after, unix_millis_now()) {
        return false;
    }
    tracing::info!(agent = %agent, secret = %secret, "rotating: running its issuer");
    let record = |outcome, old: Option<String>, new: Option<String>, message: String| {
        let state_dir = job.state_dir.clone();
        let row = RotationRecord {
            agent: agent.clone(),
            secret: secret.clone(),
            at_ms: unix_millis_now(),
            old_fingerprint: old,
            new_fingerprint: new,
            outcome,
            message,
        };
        async move {
            if let Err(err) =
                blocking(move || rotation_ledger::record_rotation(&state_dir, &row)).await
            {
                tracing::error!("cannot record a rotation in the ledger: {err}");
            }
        }
    };
    let fail = |old: Option<String>, message: String| {
        tracing::error!(agent = %agent, secret = %secret, "rotation failed, the current version stays: {message}");
        alerter.send(AlertEvent::RotationFailed {
            agent: agent.clone(),
            secret: secret.clone(),
            message: message.clone(),
        });
        record(RotationOutcome::Failed, old, None, message)
    };

    let store = DirStore::new(job.vault_root.clone());
    let (a, name) = (agent.clone(), job.secret.clone());
    let old = match blocking(move || store.get_secret(&a, &name).map_err(anyhow::Error::from)).await
    {
        Ok(old) => old.fingerprint(),
        Err(err) => {
            fail(None, format!("cannot read the current version: {err}")).await;
            return true;
        }
    };
    let new = match hooks::issue(&job.policy.issuer, &job.fleet_dir, &agent, &secret).await {
        Ok(new) => new,
        Err(err) => {
            fail(Some(old), err).await;
            return true;
        }
    };
    let new_fp = new.fingerprint();
    if new_fp == old {
        fail(
            Some(old),
            "the issuer printed the current value; it must issue a new key".into(),
        )
        .await;
        return true;
    }
    let (root, a, name) = (job.vault_root.clone(), agent.clone(), job.secret.clone());
    if let Err(err) = blocking(move || store::write_version(&root, &a, &name, &new)).await {
        fail(Some(old), format!("cannot write the new version: {err}")).await;
        return true;
    }
    if !swap().await {
        let message = "the new version is written to the vault but the reload that swaps it in was rejected (see the supervisor's log); the old version is not revoked".to_owned();
        alerter.send(AlertEvent::RotationFailed {
            agent: agent.clone(),
            secret: secret.clone(),
            message: message.clone(),
        });
        record(RotationOutcome::Rotated, Some(old), Some(new_fp), message).await;
        return false;
    }
    tracing::info!(agent = %agent, secret = %secret, old = %old, new = %new_fp, "rotated: the new version is live");
    record(
        RotationOutcome::Rotated,
        Some(old.clone()),
        Some(new_fp.clone()),
        String::new(),
    )
    .await;
    let Some(revoke) = &job.policy.revoke else {
        return false;
    };
    tokio::time::sleep(job.policy.grace).await;
    match hooks::revoke(revoke, &job.fleet_dir, &agent, &secret, &old).await {
        Ok(()) => {
            tracing::info!(agent = %agent, secret = %secret, old = %old, "the old version is revoked");
            record(
                RotationOutcome::Revoked,
                Some(old),
                Some(new_fp),
                String::new(),
            )
            .await;
        }
        Err(message) => {
            tracing::error!(agent = %agent, secret = %secret, "revoking the old version failed: {message}");
            alerter.send(AlertEvent::RotationFailed {
                agent: agent.clone(),
                secret: secret.clone(),
                message: format!(
                    "the new version is live, but revoking the old one ({old}) failed: {message}"
                ),
            });
            record(
                RotationOutcome::RevokeFailed,
                Some(old),
                Some(new_fp),
                message,
            )
            .await;
        }
    }
    false
}
