//! The systemd notify protocol (`Type=notify`): tells the service manager
//! where the supervisor is in its life — `READY=1`, `RELOADING=1`,
//! `STOPPING=1`, `STATUS=` with agent counts — and pings the watchdog while
//! the supervisor's loop is healthy.
//!
//! Owns the `$NOTIFY_SOCKET` datagram socket and the reporter task. Decides
//! nothing about agents: the counts it reports come from the supervisor loop,
//! which answers heartbeats — that answer is what proves the loop responsive
//! and earns a `WATCHDOG=1`. Everything is a no-op when `NOTIFY_SOCKET` is
//! unset (a foreground run). Must not stall the loop: a send waits at most
//! `SEND_WAIT` and a failure is logged, never fatal. Agents never see these
//! variables: their environment is cleared (see `agent::launch`).

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use crate::agent::AgentState;

/// How often `STATUS=` may change at most: a crash-looping fleet must not
/// flood the journal's view of the unit.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);

/// How long a send may wait for room in the manager's queue. A unix datagram
/// queue holds few messages (`net.unix.max_dgram_qlen`, often 10) shared by
/// every service: dropping at once could lose a `READY=1` while systemd is
/// busy, and waiting forever would stall the loop if it were wedged.
pub const SEND_WAIT: Duration = Duration::from_millis(500);

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// A socket file (`/run/systemd/notify`).
    Path(PathBuf),
    /// A Linux abstract socket, written `@name` (the `@` stands for the NUL).
    Abstract(Vec<u8>),
}

/// Parses `$NOTIFY_SOCKET` the way `sd_notify(3)` does: an absolute path or
/// `@abstract`. (`vsock:` addresses are for VMs, never for a host service.)
pub fn parse_notify_socket(value: &OsStr) -> Result<NotifyAddr, String> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => Ok(NotifyAddr::Path(PathBuf::from(value))),
        Some(b'@') if bytes.len() > 1 => Ok(NotifyAddr::Abstract(bytes[1..].to_vec())),
        _ => Err(format!(
            "`NOTIFY_SOCKET` is `{}`, which is neither an absolute path nor `@abstract-name`",
            value.to_string_lossy()
        )),
    }
}

/// The watchdog timeout systemd asked for (`$WATCHDOG_USEC`), if it is meant
/// for this process: `$WATCHDOG_PID`, when set, must be our pid (a wrapper
/// script may have passed the variables on). `Ok(None)`: no watchdog.
pub fn watchdog_timeout(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| format!("`WATCHDOG_PID` is `{pid}`, not a process id"))?;
        if pid != own_pid {
            return Ok(None);
        }
    }
    let usec: u64 = usec
        .trim()
        .parse()
        .map_err(|_| format!("`WATCHDOG_USEC` is `{usec}`, not a number of microseconds"))?;
    Ok((usec > 0).then(|| Duration::from_micros(usec)))
}

/// What `STATUS=` reports: how many agents are in each state that matters
/// to an operator glancing at `systemctl status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Every agent of the fleet, quarantined ones included.
    pub agents: usize,
    pub running: usize,
    pub backoff: usize,
    pub quarantined: usize,
}

impl StatusCounts {
    /// Counts the states of the agents the supervisor runs plus the agents
    /// it holds in quarantine (which have no running actor).
    pub fn tally<'a>(states: impl IntoIterator<Item = &'a AgentState>, quarantined: usize) -> Self {
        let mut counts = Self {
            quarantined,
            agents: quarantined,
            ..Self::default()
        };
        for state in states {
            counts.agents += 1;
            match state {
                AgentState::Running { .. } => counts.running += 1,
                AgentState::Backoff { .. } => counts.backoff += 1,
                AgentState::Starting
                | AgentState::Stopping { .. }
                | AgentState::Stopped
                | AgentState::Exited { .. } => {}
            }
        }
        counts
    }

    /// The `STATUS=` text, e.g. `4 agents: 2 running, 1 in backoff, 1 quarantined`.
    pub fn line(&self) -> String {
        let plural = if self.agents == 1 { "" } else { "s" };
        format!(
            "{} agent{plural}: {} running, {} in backoff, {} quarantined",
            self.agents, self.running, self.backoff, self.quarantined
        )
    }
}

/// One assignment of the notify protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ready,
    /// Sent with `CLOCK_MONOTONIC` in µs, which systemd ≥ 253 uses to match
    /// the reload to the request that caused it.
    Reloading {
        monotonic_usec: u64,
    },
    Stopping,
    Watchdog,
    Status(String),
}

/// The datagram for `messages`: one `KEY=value` per line. A status is kept
/// on its one line, since a newline would start a new assignment.
pub fn encode(messages: &[Message]) -> String {
    let lines: Vec<String> = messages
        .iter()
        .map(|m| match m {
            Message::Ready => "READY=1".to_owned(),
            Message::Reloading { monotonic_usec } => {
                format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
            }
            Message::Stopping => "STOPPING=1".to_owned(),
            Message::Watchdog => "WATCHDOG=1".to_owned(),
            Message::Status(text) => format!("STATUS={}", text.replace(['\n', '\r'], " ")),
        })
        .collect();
    lines.join("\n")
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd stamps jobs with.
pub fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let micros = u64::try_from(ts.tv_nsec()).unwrap_or(0) / 1_000;
            secs.saturating_mul(1_000_000).saturating_add(micros)
        }
        // Cannot happen on Linux; systemd treats 0 as "no timestamp".
        Err(_) => 0,
    }
}

/// The sending end of the notify protocol; cheap to share.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
    /// The first failed send is a warning, the rest are debug: a vanished
    /// socket must not fill the log once a second.
    warned: AtomicBool,
    /// The `STATUS=` systemd last received, whoever sent it (the loop around
    /// a reload, the reporter in between), so an update is sent only when
    /// what systemd shows differs.
    shown_status: Mutex<Option<String>>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `$NOTIFY_SOCKET` as written, for messages.
    shown: String,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; unset means every call is a no-op. A value we
    /// cannot use is logged once and also means no-op: the service manager
    /// then sees no `READY=1`, and its start timeout names the problem.
    pub fn from_env() -> Self {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self::default();
        };
        match Self::connect(&value) {
            Ok(notifier) => notifier,
            Err(err) => {
                tracing::warn!("systemd notifications are off: {err}");
                Self::default()
            }
        }
    }

    /// A notifier sending to `value` (a `$NOTIFY_SOCKET` value).
    pub fn connect(value: &OsStr) -> Result<Self, String> {
        let shown = value.to_string_lossy().into_owned();
        let addr = match parse_notify_socket(value)? {
            NotifyAddr::Path(path) => SocketAddr::from_pathname(&path),
            NotifyAddr::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
        .map_err(|e| format!("`NOTIFY_SOCKET` `{shown}` is not a usable socket address: {e}"))?;
        let socket = UnixDatagram::unbound()
            .and_then(|s| s.set_write_timeout(Some(SEND_WAIT)).map(|()| s))
            .map_err(|e| format!("cannot open a socket to send to `{shown}`: {e}"))?;
        Ok(Self {
            target: Some(Target {
                socket,
                addr,
                shown,
            }),
            warned: AtomicBool::new(false),
            shown_status: Mutex::new(None),
        })
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one datagram; waits at most `SEND_WAIT`, never fails the caller.
    pub fn send(&self, messages: &[Message]) {
        let Some(target) = &self.target else {
            return;
        };
        let datagram = encode(messages);
        let sent = target
            .socket
            .send_to_addr(datagram.as_bytes(), &target.addr);
        if sent.is_ok()
            && let Some(text) = messages.iter().rev().find_map(|m| match m {
                Message::Status(text) => Some(text.clone()),
                _ => None,
            })
        {
            *self.shown_status() = Some(text);
        }
        if let Err(err) = sent {
            if self.warned.swap(true, Ordering::Relaxed) {
                tracing::debug!("cannot notify systemd at `{}`: {err}", target.shown);
            } else {
                tracing::warn!(
                    "cannot notify systemd at `{}`: {err}; the service manager may consider the supervisor hung",
                    target.shown
                );
            }
        }
    }

    fn shown_status(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // Only ever holds a finished assignment: a panic elsewhere cannot
        // leave it half-written.
        self.shown_status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shows `counts` unless systemd already shows exactly that.
    pub fn status(&self, counts: StatusCounts) {
        let line = counts.line();
        if self.shown_status().as_deref() != Some(line.as_str()) {
            self.send(&[Message::Status(line)]);
        }
    }

    /// The fleet is up: the proxy listens and every agent was spawned.
    pub fn ready(&self, counts: StatusCounts) {
        self.send(&[Message::Ready, Message::Status(counts.line())]);
    }

    /// A reload begins; `ready` must follow whether it applies or not.
    pub fn reloading(&self) {
        self.send(&[
            Message::Reloading {
                monotonic_usec: monotonic_usec(),
            },
            Message::Status("reloading fleet.yaml".to_owned()),
        ]);
    }

    pub fn stopping(&self) {
        self.send(&[
            Message::Stopping,
            Message::Status("stopping every agent".to_owned()),
        ]);
    }
}

/// A request from the reporter to the supervisor loop: answering it (with
/// the current counts) is what proves the loop alive.
#[derive(Debug)]
pub struct Heartbeat {
    reply: oneshot::Sender<StatusCounts>,
}

impl Heartbeat {
    pub fn answer(self, counts: StatusCounts) {
        // The reporter may have given up on this one; the next will do.
        let _ = self.reply.send(counts);
    }
}

/// Starts the reporter task when notifications are on and returns the
/// heartbeats the supervisor loop must answer. When they are off, the
/// returned channel is already closed, so a `Some(beat) = rx.recv()` select
/// arm simply never fires. Dropping the receiver stops the reporter (do so
/// before shutting down, so a busy shutdown is not reported as a hang).
pub fn start_reporter(
    notifier: Arc<Notifier>,
    watchdog: Option<Duration>,
) -> mpsc::Receiver<Heartbeat> {
    let (tx, rx) = mpsc::channel(1);
    if notifier.enabled() {
        tokio::spawn(report(notifier, tx, watchdog));
    }
    rx
}

/// The watchdog timeout from the environment, logged when unusable.
pub fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id()).unwrap_or_else(|err| {
        tracing::warn!("the systemd watchdog is off: {err}");
        None
    })
}

enum Beat {
    Answered(StatusCounts),
    Late,
    Gone,
}

/// Asks the loop for a heartbeat and waits at most `limit` for it.
async fn ask(tx: &mpsc::Sender<Heartbeat>, limit: Duration) -> Beat {
    let (reply, answer) = oneshot::channel();
    let exchange = async {
        tx.send(Heartbeat { reply }).await.ok()?;
        answer.await.ok()
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(Some(counts)) => Beat::Answered(counts),
        // The loop dropped its end: it is shutting down.
        Ok(None) => Beat::Gone,
        Err(_) => Beat::Late,
    }
}

/// Every `STATUS_EVERY`: report the counts if they changed. Every half
/// watchdog timeout: ping, but only if the loop answered in time — a
/// missed ping is how systemd learns the loop hangs.
async fn report(notifier: Arc<Notifier>, tx: mpsc::Sender<Heartbeat>, watchdog: Option<Duration>) {
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Clamped both ways: `interval` refuses zero, and without a watchdog the
    // tick is disabled anyway.
    let ping_every = watchdog
        .map(|w| (w / 2).max(Duration::from_millis(1)))
        .unwrap_or(Duration::from_secs(86_400));
    let mut ping_tick = tokio::time::interval(ping_every);
    ping_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut hung = false;
    loop {
        tokio::select! {
            _ = status_tick.tick() => match ask(&tx, STATUS_EVERY).await {
                Beat::Answered(counts) => notifier.status(counts),
                Beat::Late => {}
                Beat::Gone => return,
            },
            _ = ping_tick.tick(), if watchdog.is_some() => match ask(&tx, ping_every).await {
                Beat::Answered(_) => {
                    if hung {
                        tracing::info!("the supervisor loop answers again; watchdog pings resume");
                        hung = false;
                    }
                    notifier.send(&[Message::Watchdog]);
                }
                Beat::Late => {
                    if !hung {
                        tracing::error!(
                            "the supervisor loop did not answer within {ping_every:?}; withholding the watchdog ping (systemd restarts the service if this lasts)"
                        );
                        hung = true;
                    }
                }
                Beat::Gone => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn notify_socket_addresses() {
        let cases: &[(&str, Result<NotifyAddr, ()>)] = &[
            (
                "/run/systemd/notify",
                Ok(NotifyAddr::Path("/run/systemd/notify".into())),
            ),
            (
                "@/org/freedesktop/systemd1/notify/123",
                Ok(NotifyAddr::Abstract(
                    b"/org/freedesktop/systemd1/notify/123".to_vec(),
                )),
            ),
            ("@", Err(())),
            ("", Err(())),
            ("relative/notify", Err(())),
            ("vsock:2:1234", Err(())),
        ];
        for (value, want) in cases {
            let got = parse_notify_socket(OsStr::new(value)).map_err(|_| ());
            assert_eq!(&got, want, "NOTIFY_SOCKET={value:?}");
        }
        let err = parse_notify_socket(OsStr::new("relative")).unwrap_err();
        assert_eq!(
            err,
            "`NOTIFY_SOCKET` is `relative`, which is neither an absolute path nor `@abstract-name`"
        );
    }

    #[test]
    fn watchdog_timeouts() {
        let s = Duration::from_secs;
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Result<Option<Duration>, ()>,
        );
        let cases: &[Case] = &[
            (None, None, Ok(None)),
            (None, Some("42"), Ok(None)),
            (Some("30000000"), None, Ok(Some(s(30)))),
            (Some("30000000"), Some("42"), Ok(Some(s(30)))),
            (Some("30000000"), Some(" 42\n"), Ok(Some(s(30)))),
            // Meant for another process (we were started by a wrapper).
            (Some("30000000"), Some("43"), Ok(None)),
            (Some("0"), None, Ok(None)),
            (Some("200000"), None, Ok(Some(Duration::from_millis(200)))),
            (Some("soon"), None, Err(())),
            (Some("-1"), None, Err(())),
            (Some("30000000"), Some("me"), Err(())),
        ];
        for (usec, pid, want) in cases {
            let got = watchdog_timeout(*usec, *pid, 42).map_err(|_| ());
            assert_eq!(&got, want, "WATCHDOG_USEC={usec:?} WATCHDOG_PID={pid:?}");
        }
    }

    #[test]
    fn tally_counts_states_that_matter() {
        let now = Instant::now();
        let states = [
            AgentState::Running { since: now },
            AgentState::Running { since: now },
            AgentState::Backoff {
                until: now,
                attempt: 1,
            },
            AgentState::Starting,
            AgentState::Stopping { since: now },
            AgentState::Stopped,
        ];
        let counts = StatusCounts::tally(&states, 2);
        assert_eq!(
            counts,
            StatusCounts {
                agents: 8,
                running: 2,
                backoff: 1,
                quarantined: 2
            }
        );
        assert_eq!(
            counts.line(),
            "8 agents: 2 running, 1 in backoff, 2 quarantined"
        );
        assert_eq!(
            StatusCounts::tally(&[AgentState::Running { since: now }], 0).line(),
            "1 agent: 1 running, 0 in backoff, 0 quarantined"
        );
        assert_eq!(
            StatusCounts::tally(&[], 0).line(),
            "0 agents: 0 running, 0 in backoff, 0 quarantined"
        );
    }

    #[test]
    fn datagrams() {
        assert_eq!(encode(&[Message::Ready]), "READY=1");
        assert_eq!(
            encode(&[
                Message::Reloading {
                    monotonic_usec: 123
                },
                Message::Status("reloading".into())
            ]),
            "RELOADING=1\nMONOTONIC_USEC=123\nSTATUS=reloading"
        );
        assert_eq!(encode(&[Message::Stopping]), "STOPPING=1");
        assert_eq!(encode(&[Message::Watchdog]), "WATCHDOG=1");
        // A newline in a status cannot smuggle in another assignment.
        assert_eq!(
            encode(&[Message::Status("a\nREADY=1".into())]),
            "STATUS=a READY=1"
        );
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a, "{a} then {b}");
    }

    #[test]
    fn unset_socket_is_a_no_op() {
        let notifier = Notifier::default();
        assert!(!notifier.enabled());
        notifier.ready(StatusCounts::default());
    }

    fn recv(listener: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = listener.recv(&mut buf).expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("agent-supervisor-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        listener
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let notifier = Notifier::connect(OsStr::new(&format!("@{name}"))).expect("connect");
        notifier.stopping();
        assert_eq!(recv(&listener), "STOPPING=1\nSTATUS=stopping every agent");
    }

    #[test]
    fn status_is_sent_only_when_what_systemd_shows_differs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let notifier = Notifier::connect(path.as_os_str()).expect("connect");
        let drain = || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = listener.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            got
        };
        let one = StatusCounts {
            agents: 1,
            running: 1,
            ..StatusCounts::default()
        };
        notifier.ready(one);
        notifier.status(one);
        assert_eq!(
            drain(),
            vec!["READY=1\nSTATUS=1 agent: 1 running, 0 in backoff, 0 quarantined"]
        );
        // A reload shows its own status; the same counts afterwards must
        // replace it, or `systemctl status` would say "reloading" forever.
        notifier.reloading();
        notifier.status(one);
        let got = drain();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{got:?}"
        );
        assert!(got[0].ends_with("\nSTATUS=reloading fleet.yaml"), "{got:?}");
        assert_eq!(
            got[1],
            "STATUS=1 agent: 1 running, 0 in backoff, 0 quarantined"
        );
    }

    #[test]
    fn a_missing_socket_is_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let notifier = Notifier::connect(dir.path().join("gone").as_os_str()).expect("connect");
        notifier.send(&[Message::Ready]);
        notifier.send(&[Message::Ready]);
        assert!(notifier.warned.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn pings_only_while_the_loop_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let notifier = Arc::new(Notifier::connect(path.as_os_str()).expect("connect"));
        let watchdog = Duration::from_millis(100);
        let mut beats = start_reporter(notifier, Some(watchdog));
        let drain = |listener: &UnixDatagram| {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = listener.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            got
        };

        // An answering loop earns pings.
        let counts = StatusCounts {
            agents: 1,
            running: 1,
            ..StatusCounts::default()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut pings = 0;
        let mut statuses = Vec::new();
        while pings < 3 {
            assert!(Instant::now() < deadline, "no pings from an answering loop");
            if let Ok(Some(beat)) =
                tokio::time::timeout(Duration::from_millis(20), beats.recv()).await
            {
                beat.answer(counts);
            }
            for msg in drain(&listener) {
                if msg == "WATCHDOG=1" {
                    pings += 1;
                } else {
                    statuses.push(msg);
                }
            }
        }

        // A loop that stops answering earns none: every request is taken
        // and left unanswered, as by a loop stuck in a long await.
        tokio::time::sleep(Duration::from_millis(60)).await;
        drain(&listener);
        let mut unanswered = Vec::new();
        let silent_until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < silent_until {
            if let Ok(Some(beat)) =
                tokio::time::timeout(Duration::from_millis(20), beats.recv()).await
            {
                unanswered.push(beat);
            }
            let got = drain(&listener);
            assert!(
                !got.iter().any(|m| m == "WATCHDOG=1"),
                "pinged for a loop that did not answer: {got:?}"
            );
        }
        assert!(!unanswered.is_empty(), "the reporter kept asking");
        // The counts never changed: shown once, not once a second.
        assert_eq!(
            statuses,
            vec!["STATUS=1 agent: 1 running, 0 in backoff, 0 quarantined".to_owned()]
        );
    }
}
