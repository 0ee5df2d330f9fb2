//! The proxy's admission bookkeeping, pure: how many client connections are
//! open (in total, not yet identified, per agent) and how many request-body
//! bytes are buffered (in total, per agent), against the caps of
//! `proxy:` — resolved here from fleet.yaml and the host's descriptor limit
//! and memory. Decides; performs no I/O, holds no socket, takes no lock (the
//! proxy's shell, `server.rs`, holds it behind one mutex and acts on the
//! decisions: closing an evicted connection, pausing accept, refusing).
//!
//! The agent is known only once a request's headers (its token) are read, so
//! a connection starts *unidentified*. Those share one pool with a short
//! header timeout; when the pool is full, the oldest unidentified connection
//! is evicted rather than a new one refused, so a flood of half-open
//! connections only pushes out itself: a real client sends its headers at
//! once and leaves the pool within microseconds. An identified connection
//! (in flight, or idle in keep-alive) counts against its agent's cap; body
//! bytes are acquired as they arrive, per agent and globally.

use std::collections::{BTreeSet, HashMap};

use crate::fleet::ProxySpec;

/// Descriptors kept out of the proxy's reach for everything else: the
/// ledger (SQLite and its journal), the control socket and its clients,
/// vault and fleet.yaml reads, spawning (a pipe pair in flight), logging.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Descriptors each running agent costs the supervisor: stdout, stderr and
/// a pidfd, plus one of slack for a respawn in flight.
pub const DESCRIPTORS_PER_AGENT: u64 = 4;

/// A client connection costs its socket and, while forwarded, one upstream
/// socket, which may then idle in the pool: three per connection at worst.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 3;

/// The caps in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_unidentified_connections: usize,
    pub max_connections_per_agent: usize,
    pub max_body_in_flight: u64,
    pub max_body_in_flight_per_agent: u64,
}

/// What the host offers, read by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// The soft `RLIMIT_NOFILE` the supervisor runs with.
    pub descriptor_limit: u64,
    /// Physical memory, or the cgroup's limit when lower (`None`: unknown).
    pub memory: Option<u64>,
}

/// Connections the descriptor limit affords with `agents` running.
pub fn connections_affordable(descriptor_limit: u64, agents: usize) -> usize {
    let spare = descriptor_limit
        .saturating_sub(RESERVED_DESCRIPTORS)
        .saturating_sub(DESCRIPTORS_PER_AGENT.saturating_mul(agents as u64));
    usize::try_from(spare / DESCRIPTORS_PER_CONNECTION).unwrap_or(usize::MAX)
}

/// Fallback when the host's memory cannot be read.
const UNKNOWN_MEMORY: u64 = 4 << 30;

/// Ceiling of the derived total body budget.
const DERIVED_BODY_CEILING: u64 = 1 << 30;

/// Agents whose bodies at their own cap fill the derived total: one agent
/// cannot take more than this share of the others' room.
const BODY_SHARES: u64 = 8;

/// The total body budget when fleet.yaml sets none: a sixteenth of memory
/// up to 1 GiB, but always room for two of the largest bodies — the floor
/// wins over the ceiling, so a `max_body` above 512 MiB raises the total
/// rather than inverting the bounds.
fn default_body_in_flight(memory: u64, max_body: u64) -> u64 {
    (memory / 16)
        .min(DERIVED_BODY_CEILING)
        .max(max_body.saturating_mul(2))
}

/// An agent's body budget when fleet.yaml sets none: an eighth of the
/// total, whatever `max_body` is (many small requests in parallel are an
/// agent's normal load: 1 GiB affords an agent 128 MiB, some 650 bodies of
/// 200 KB), but never less than one largest body nor more than the total.
fn default_body_in_flight_per_agent(total: u64, max_body: u64) -> u64 {
    (total / BODY_SHARES).max(max_body).min(total)
}

impl Limits {
    /// The caps for `spec` on `host` with `agents` in the fleet: what
    /// fleet.yaml sets, the rest derived, and every connection figure held
    /// within what the descriptor limit affords (with a note saying so when
    /// fleet.yaml asked for more). The loader already checked each set value
    /// against the others.
    pub fn resolve(spec: &ProxySpec, host: Host, agents: usize) -> (Limits, Vec<String>) {
        let mut notes = Vec::new();
        let affordable = connections_affordable(host.descriptor_limit, agents).max(8);
        let max_connections = match spec.max_connections {
            Some(n) if n > affordable => {
                notes.push(format!(
                    "`proxy.max_connections` is {n}, but an open-file limit of {} with {agents} agents affords {affordable}; using {affordable} (raise `LimitNOFILE=`)",
                    host.descriptor_limit
                ));
                affordable
            }
            Some(n) => n,
            None => affordable.min(16_384),
        };
        let cap = |set: Option<usize>, derived: usize, field: &str, notes: &mut Vec<String>| {
            match set {
                Some(n) if n > max_connections => {
                    notes.push(format!(
                    "`proxy.{field}` is {n}, above the {max_connections} connections in force; using {max_connections}"
                ));
                    max_connections
                }
                Some(n) => n,
                // Not `clamp`: it panics should the bounds ever cross.
                None => derived.max(1).min(max_connections),
            }
        };
        let max_unidentified_connections = cap(
            spec.max_unidentified_connections,
            (max_connections / 4).max(8),
            "max_unidentified_connections",
            &mut notes,
        );
        let max_connections_per_agent = cap(
            spec.max_connections_per_agent,
            (max_connections / 4).clamp(4, 256),
            "max_connections_per_agent",
            &mut notes,
        );
        let memory = host.memory.unwrap_or(UNKNOWN_MEMORY);
        let max_body_in_flight = spec
            .max_body_in_flight
            .unwrap_or_else(|| default_body_in_flight(memory, spec.max_body));
        let max_body_in_flight_per_agent = spec
            .max_body_in_flight_per_agent
            .unwrap_or_else(|| default_body_in_flight_per_agent(max_body_in_flight, spec.max_body));
        (
            Limits {
                max_connections,
                max_unidentified_connections,
                max_connections_per_agent,
                max_body_in_flight,
                max_body_in_flight_per_agent,
            },
            notes,
        )
    }
}

/// A client connection, numbered in accept order (so the smallest
/// unidentified one is the oldest).
pub type ConnId = u64;

/// What to do with a connection just accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Serve it as `id`.
    Accept(ConnId),
    /// Serve it as `id` and close `evict`, the oldest unidentified one.
    AcceptEvicting { id: ConnId, evict: ConnId },
}

/// Why a connection or a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The agent holds `limit` connections already.
    AgentConnections { limit: usize },
    /// The agent's bodies in flight would pass `limit` bytes.
    AgentBody { limit: u64 },
    /// All agents' bodies in flight would pass `limit` bytes.
    TotalBody { limit: u64 },
    /// The connection was evicted before its headers were read.
    Evicted,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct AgentUse {
    connections: usize,
    body: u64,
}

/// A figure for `status`: current use against the caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub connections: usize,
    pub unidentified: usize,
    pub body_in_flight: u64,
    pub limits: Limits,
}

/// The counters.
#[derive(Debug)]
pub struct Capacity {
    limits: Limits,
    next: ConnId,
    /// Every open connection and the agent it belongs to (`None`: not yet
    /// identified).
    open: HashMap<ConnId, Option<String>>,
    unidentified: BTreeSet<ConnId>,
    agents: HashMap<String, AgentUse>,
    body: u64,
}

impl Capacity {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            next: 0,
            open: HashMap::new(),
            unidentified: BTreeSet::new(),
            agents: HashMap::new(),
            body: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// New caps (the fleet's size changed); what is open stays open and
    /// drains below them.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether a connection could be admitted now, so accept is worth
    /// calling: room in total, or an unidentified one to evict.
    pub fn can_admit(&self) -> bool {
        self.open.len() < self.limits.max_connections || !self.unidentified.is_empty()
    }

    /// Admits a connection just accepted; `None` when there is no room at
    /// all (the caller checked [`can_admit`](Self::can_admit), so only a
    /// race gets here) and the connection must be closed.
    pub fn admit(&mut self) -> Option<Admit> {
        let full = self.open.len() >= self.limits.max_connections
            || self.unidentified.len() >= self.limits.max_unidentified_connections;
        let evict = if full {
            let oldest = self.unidentified.first().copied()?;
            self.close(oldest);
            Some(oldest)
        } else {
            None
        };
        let id = self.next;
        self.next += 1;
        self.open.insert(id, None);
        self.unidentified.insert(id);
        Some(match evict {
            Some(evict) => Admit::AcceptEvicting { id, evict },
            None => Admit::Accept(id),
        })
    }

    /// A request on `id` presented `agent`'s token. The connection is the
    /// agent's from now on (while idle in keep-alive too), within its cap; a
    /// refused one is left as it was and should be closed.
    pub fn identify(&mut self, id: ConnId, agent: &str) -> Result<(), Refused> {
        let Some(owner) = self.open.get(&id) else {
            return Err(Refused::Evicted);
        };
        if owner.as_deref() == Some(agent) {
            return Ok(());
        }
        let limit = self.limits.max_connections_per_agent;
        let used = self.agents.get(agent).map_or(0, |u| u.connections);
        if used >= limit {
            return Err(Refused::AgentConnections { limit });
        }
        let previous = self.open.insert(id, Some(agent.to_owned())).flatten();
        match previous {
            Some(previous) => self.drop_connection_of(&previous),
            None => {
                self.unidentified.remove(&id);
            }
        }
        self.agents.entry(agent.to_owned()).or_default().connections += 1;
        Ok(())
    }

    /// The connection `id` closed (or was evicted); idempotent.
    pub fn close(&mut self, id: ConnId) {
        match self.open.remove(&id) {
            Some(Some(agent)) => self.drop_connection_of(&agent),
            Some(None) => {
                self.unidentified.remove(&id);
            }
            None => {}
        }
    }

    fn drop_connection_of(&mut self, agent: &str) {
        if let Some(used) = self.agents.get_mut(agent) {
            used.connections = used.connections.saturating_sub(1);
            if used.connections == 0 && used.body == 0 {
                self.agents.remove(agent);
            }
        }
    }

    /// Takes `n` more body bytes for `agent`, or refuses without taking any.
    pub fn grow_body(&mut self, agent: &str, n: u64) -> Result<(), Refused> {
        let used = self.agents.get(agent).map_or(0, |u| u.body);
        let limit = self.limits.max_body_in_flight_per_agent;
        if used.saturating_add(n) > limit {
            return Err(Refused::AgentBody { limit });
        }
        let limit = self.limits.max_body_in_flight;
        if self.body.saturating_add(n) > limit {
            return Err(Refused::TotalBody { limit });
        }
        self.body += n;
        self.agents.entry(agent.to_owned()).or_default().body += n;
        Ok(())
    }

    /// Gives back `n` body bytes of `agent` (its request ended).
    pub fn shrink_body(&mut self, agent: &str, n: u64) {
        self.body = self.body.saturating_sub(n);
        if let Some(used) = self.agents.get_mut(agent) {
            used.body = used.body.saturating_sub(n);
            if used.connections == 0 && used.body == 0 {
                self.agents.remove(agent);
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections: self.open.len(),
            unidentified: self.unidentified.len(),
            body_in_flight: self.body,
            limits: self.limits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, unidentified: usize, per_agent: usize) -> Limits {
        Limits {
            max_connections: total,
            max_unidentified_connections: unidentified,
            max_connections_per_agent: per_agent,
            max_body_in_flight: 100,
            max_body_in_flight_per_agent: 60,
        }
    }

    fn id(admit: Option<Admit>) -> ConnId {
        match admit {
            Some(Admit::Accept(id) | Admit::AcceptEvicting { id, .. }) => id,
            None => panic!("not admitted"),
        }
    }

    #[test]
    fn a_half_open_flood_evicts_only_the_oldest_unidentified() {
        let mut cap = Capacity::new(limits(10, 3, 5));
        let good = id(cap.admit());
        cap.identify(good, "good").unwrap();
        let flood: Vec<_> = (0..3).map(|_| id(cap.admit())).collect();
        // The pool is full: each newcomer pushes out the oldest of the flood.
        assert_eq!(
            cap.admit(),
            Some(Admit::AcceptEvicting {
                id: 4,
                evict: flood[0]
            })
        );
        assert_eq!(
            cap.admit(),
            Some(Admit::AcceptEvicting {
                id: 5,
                evict: flood[1]
            })
        );
        // The identified connection was never a candidate.
        assert_eq!(cap.snapshot().connections, 4);
        assert_eq!(cap.snapshot().unidentified, 3);
        // An evicted connection whose headers arrive late is refused.
        assert_eq!(cap.identify(flood[0], "flood"), Err(Refused::Evicted));
        // A real client's connection, admitted during the flood, identifies.
        let late = id(cap.admit());
        assert_eq!(cap.identify(late, "good"), Ok(()));
    }

    #[test]
    fn total_cap_evicts_unidentified_then_stops_admitting() {
        let mut cap = Capacity::new(limits(3, 3, 3));
        let a = id(cap.admit());
        let b = id(cap.admit());
        let c = id(cap.admit());
        cap.identify(a, "x").unwrap();
        cap.identify(b, "y").unwrap();
        assert!(cap.can_admit());
        assert_eq!(cap.admit(), Some(Admit::AcceptEvicting { id: 3, evict: c }));
        cap.identify(3, "z").unwrap();
        assert!(!cap.can_admit());
        assert_eq!(cap.admit(), None);
        cap.close(a);
        assert!(cap.can_admit());
    }

    #[test]
    fn per_agent_connection_cap_leaves_others_their_room() {
        let mut cap = Capacity::new(limits(10, 10, 2));
        let conns: Vec<_> = (0..4).map(|_| id(cap.admit())).collect();
        assert_eq!(cap.identify(conns[0], "flood"), Ok(()));
        assert_eq!(cap.identify(conns[1], "flood"), Ok(()));
        assert_eq!(
            cap.identify(conns[2], "flood"),
            Err(Refused::AgentConnections { limit: 2 })
        );
        assert_eq!(cap.identify(conns[3], "good"), Ok(()));
        // Idempotent for its own agent; a keep-alive connection reused by
        // another agent moves over.
        assert_eq!(cap.identify(conns[0], "flood"), Ok(()));
        assert_eq!(cap.identify(conns[0], "good"), Ok(()));
        assert_eq!(cap.identify(conns[2], "flood"), Ok(()));
        cap.close(conns[2]);
        cap.close(conns[2]);
        assert_eq!(cap.snapshot().connections, 3);
    }

    #[test]
    fn body_budget_is_per_agent_then_total() {
        let mut cap = Capacity::new(limits(10, 10, 10));
        assert_eq!(cap.grow_body("a", 60), Ok(()));
        assert_eq!(cap.grow_body("a", 1), Err(Refused::AgentBody { limit: 60 }));
        assert_eq!(cap.grow_body("b", 40), Ok(()));
        assert_eq!(
            cap.grow_body("c", 1),
            Err(Refused::TotalBody { limit: 100 })
        );
        cap.shrink_body("a", 60);
        assert_eq!(cap.grow_body("c", 50), Ok(()));
        assert_eq!(cap.snapshot().body_in_flight, 90);
        cap.shrink_body("b", 40);
        cap.shrink_body("c", 50);
        assert_eq!(cap.snapshot().body_in_flight, 0);
        assert!(cap.agents.is_empty());
    }

    #[test]
    fn body_budgets_table() {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        // (memory, max_body) → (total, per agent). A `max_body` above 512 MiB
        // once inverted the bounds of a `clamp`, which panicked at start.
        let cases = [
            (24 * GIB, 32 * MIB, (GIB, 128 * MIB)),
            (24 * GIB, 600 * MIB, (1200 * MIB, 600 * MIB)),
            (24 * GIB, GIB, (2 * GIB, GIB)),
            (24 * GIB, MIB, (GIB, 128 * MIB)),
            (4 * GIB, MIB, (256 * MIB, 32 * MIB)),
            (512 * MIB, 32 * MIB, (64 * MIB, 32 * MIB)),
            (0, MIB, (2 * MIB, MIB)),
            (24 * GIB, u64::MAX, (u64::MAX, u64::MAX)),
        ];
        for (memory, max_body, want) in cases {
            let spec = ProxySpec {
                max_body,
                ..ProxySpec::default()
            };
            let host = Host {
                descriptor_limit: 65_536,
                memory: Some(memory),
            };
            let (got, _) = Limits::resolve(&spec, host, 4);
            assert_eq!(
                (got.max_body_in_flight, got.max_body_in_flight_per_agent),
                want,
                "memory {memory}, max_body {max_body}"
            );
        }
    }

    #[test]
    fn many_small_parallel_bodies_fit_an_agents_default_budget() {
        let spec = ProxySpec {
            max_body: 1 << 20,
            ..ProxySpec::default()
        };
        let host = Host {
            descriptor_limit: 65_536,
            memory: Some(24 << 30),
        };
        let (limits, _) = Limits::resolve(&spec, host, 4);
        let mut cap = Capacity::new(limits);
        for n in 0..64 {
            assert_eq!(cap.grow_body("a", 200_000), Ok(()), "request {n}");
        }
        // Another agent keeps its room.
        assert_eq!(cap.grow_body("b", 1 << 20), Ok(()));
    }

    #[test]
    fn resolve_table() {
        let spec = ProxySpec::default();
        let host = |limit, memory| Host {
            descriptor_limit: limit,
            memory: Some(memory),
        };
        // (descriptor limit, memory, agents) → (total, unidentified, per agent, body, body per agent)
        let cases = [
            (
                524_288,
                24 << 30,
                10,
                (16_384, 4096, 256, 1 << 30, 128 << 20),
            ),
            (1024, 24 << 30, 2, (253, 63, 63, 1 << 30, 128 << 20)),
            (1024, 24 << 30, 600, (8, 8, 4, 1 << 30, 128 << 20)),
            (
                65_536,
                512 << 20,
                0,
                (16_384, 4096, 256, 64 << 20, 32 << 20),
            ),
        ];
        for (limit, memory, agents, want) in cases {
            let (got, _) = Limits::resolve(&spec, host(limit, memory), agents);
            assert_eq!(
                (
                    got.max_connections,
                    got.max_unidentified_connections,
                    got.max_connections_per_agent,
                    got.max_body_in_flight,
                    got.max_body_in_flight_per_agent
                ),
                want,
                "limit {limit}, memory {memory}, {agents} agents"
            );
        }
        let spec = ProxySpec {
            max_connections: Some(10_000),
            max_connections_per_agent: Some(20_000),
            ..ProxySpec::default()
        };
        let (got, notes) = Limits::resolve(&spec, host(1024, 1 << 30), 2);
        assert_eq!(got.max_connections, 253);
        assert_eq!(got.max_connections_per_agent, 253);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("LimitNOFILE="), "{notes:?}");
    }
}
