//! The thin shell around `capacity`: one mutex over the counters, the
//! channel that closes an evicted connection, the wake-up for an accept loop
//! paused at the total cap, and the guards that give a connection slot and
//! body bytes back when they drop — so no path (error, panic, client gone)
//! can leak capacity. Decides nothing itself (`capacity` does) and never
//! blocks: the lock is held for a few instructions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, oneshot};

use super::capacity::{Admit, Capacity, ConnId, Host, Limits, Refused, Snapshot};
use crate::fleet::ProxySpec;

struct Inner {
    capacity: Capacity,
    /// Closes an unidentified connection when it is evicted.
    evictors: HashMap<ConnId, oneshot::Sender<()>>,
}

/// The proxy's admission state, shared by the accept loop and every request.
pub struct Gate {
    inner: Mutex<Inner>,
    room: Notify,
    spec: ProxySpec,
    host: Host,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

/// A connection's slot: closes it in the counters when dropped.
pub struct Slot {
    gate: Arc<Gate>,
    pub id: ConnId,
    /// Resolves when the connection is evicted.
    pub evicted: oneshot::Receiver<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.close(self.id);
    }
}

/// Body bytes one request holds; given back when the request's handler is
/// done with its body (the last clone drops).
pub struct BodyLease {
    gate: Arc<Gate>,
    agent: String,
    held: AtomicU64,
}

impl BodyLease {
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Takes `n` more bytes as they arrive, or refuses without taking any.
    pub fn grow(&self, n: u64) -> Result<(), Refused> {
        self.gate.lock().capacity.grow_body(&self.agent, n)?;
        self.held.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        if held > 0 {
            self.gate.lock().capacity.shrink_body(&self.agent, held);
        }
    }
}

impl Gate {
    /// The gate for `spec` on this host (its descriptor limit and memory as
    /// they are now) with `agents` in the fleet.
    pub fn new(spec: &ProxySpec, agents: usize) -> Self {
        let host = Host {
            descriptor_limit: crate::fdlimit::soft_limit().unwrap_or(1024),
            memory: host_memory(),
        };
        let (limits, notes) = Limits::resolve(spec, host, agents);
        for note in notes {
            tracing::warn!("{note}");
        }
        Self {
            inner: Mutex::new(Inner {
                capacity: Capacity::new(limits),
                evictors: HashMap::new(),
            }),
            room: Notify::new(),
            spec: spec.clone(),
            host,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The counters stay consistent whatever panicked while holding them:
        // every update is a few integer operations.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recomputes the connection caps for a fleet of `agents` (each costs
    /// descriptors the proxy must leave alone).
    pub fn fit_to_fleet(&self, agents: usize) {
        let (limits, notes) = Limits::resolve(&self.spec, self.host, agents);
        let mut inner = self.lock();
        if inner.capacity.limits() != limits {
            for note in notes {
                tracing::warn!("{note}");
            }
            inner.capacity.set_limits(limits);
            drop(inner);
            tracing::info!(
                "proxy caps: {} connections ({} unidentified, {} per agent), {} body bytes in flight ({} per agent)",
                limits.max_connections,
                limits.max_unidentified_connections,
                limits.max_connections_per_agent,
                limits.max_body_in_flight,
                limits.max_body_in_flight_per_agent
            );
        }
    }

    pub fn limits(&self) -> Limits {
        self.lock().capacity.limits()
    }

    pub fn can_admit(&self) -> bool {
        self.lock().capacity.can_admit()
    }

    /// Resolves once a connection may have closed since the last call.
    pub async fn room(&self) {
        self.room.notified().await;
    }

    /// A slot for a connection just accepted, evicting the oldest
    /// unidentified one if need be; `None`: close it, there is no room.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut inner = self.lock();
        let id = match inner.capacity.admit()? {
            Admit::Accept(id) => id,
            Admit::AcceptEvicting { id, evict } => {
                if let Some(evictor) = inner.evictors.remove(&evict) {
                    let _ = evictor.send(());
                }
                id
            }
        };
        let (evictor, evicted) = oneshot::channel();
        inner.evictors.insert(id, evictor);
        Some(Slot {
            gate: self.clone(),
            id,
            evicted,
        })
    }

    /// A request on connection `id` presented `agent`'s token.
    pub fn identify(&self, id: ConnId, agent: &str) -> Result<(), Refused> {
        self.lock().capacity.identify(id, agent)
    }

    /// An empty body lease for one request of `agent`.
    pub fn lease(self: &Arc<Self>, agent: &str) -> Arc<BodyLease> {
        Arc::new(BodyLease {
            gate: self.clone(),
            agent: agent.to_owned(),
            held: AtomicU64::new(0),
        })
    }

    fn close(&self, id: ConnId) {
        let mut inner = self.lock();
        inner.capacity.close(id);
        inner.evictors.remove(&id);
        drop(inner);
        self.room.notify_one();
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().capacity.snapshot()
    }
}

/// Physical memory, or the cgroup v2 limit of this process when lower.
fn host_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
            let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok()?;
            max.trim().parse::<u64>().ok()
        });
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}
