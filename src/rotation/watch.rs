//! Automatic pick-up of new secret versions in the `dir` backend: a thread
//! that notices when any file in an agent's folder of the vault changes and,
//! once things have been quiet for a moment, asks for one reload. inotify
//! wakes it at once; a poll of the folders' metadata every few seconds is the
//! fallback (inotify unavailable, watch limit reached, network file systems)
//! and the judge: a reload is asked for only when the metadata really
//! changed. Reads metadata only, never a secret's content.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::mpsc::UnboundedSender;

/// Quiet time after a change before the reload: an editor's save or a
/// script writing several secrets becomes one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// How often the folders are compared when inotify says nothing.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// What the vault looks like, without reading any secret: per file under
/// `<root>/<agent>/`, its identity, size and times.
type Snapshot = BTreeMap<PathBuf, (u64, u64, i64, i64, i64, i64)>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let Ok(agents) = std::fs::read_dir(root) else {
        return out;
    };
    for agent in agents.flatten() {
        let Ok(files) = std::fs::read_dir(agent.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            // Follow links: a secret may be a link to a versioned file.
            if let Ok(m) = std::fs::metadata(&path).or_else(|_| file.metadata()) {
                out.insert(
                    path,
                    (
                        m.ino(),
                        m.size(),
                        m.mtime(),
                        m.mtime_nsec(),
                        m.ctime(),
                        m.ctime_nsec(),
                    ),
                );
            }
        }
    }
    out
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MODIFY
}

/// Watches `root` and every folder in it (new folders as they appear).
fn watch_all(inotify: &Inotify, root: &Path, watched: &mut Vec<PathBuf>) {
    let mut add = |path: &Path| {
        if !watched.iter().any(|w| w == path) && inotify.add_watch(path, flags()).is_ok() {
            watched.push(path.to_owned());
        }
    };
    add(root);
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                add(&entry.path());
            }
        }
    }
}

/// Starts watching `root`; each settled change sends `()` on `changed`. The
/// thread ends when `changed` is closed.
pub fn spawn(root: PathBuf, changed: UnboundedSender<()>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vault-watch".into())
        .spawn(move || run(&root, &changed))
        .map(drop)
}

fn run(root: &Path, changed: &UnboundedSender<()>) {
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(i) => Some(i),
        Err(err) => {
            tracing::warn!(
                "cannot watch the vault with inotify ({err}); polling `{}` every {}s instead",
                root.display(),
                POLL_EVERY.as_secs()
            );
            None
        }
    };
    let mut watched = Vec::new();
    if let Some(i) = &inotify {
        watch_all(i, root, &mut watched);
    }
    let mut last = snapshot(root);
    // Set when a change was seen and not yet reported.
    let mut pending_since: Option<Instant> = None;
    while !changed.is_closed() {
        let wait = match pending_since {
            Some(_) => DEBOUNCE,
            None => POLL_EVERY,
        };
        let woke = match &inotify {
            Some(i) => {
                let mut fds = [PollFd::new(i.as_fd(), PollFlags::POLLIN)];
                let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
                let ready = poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) > 0;
                // Drain what woke us: the snapshot decides what it means.
                if ready {
                    let _ = i.read_events();
                    watch_all(i, root, &mut watched);
                }
                ready
            }
            None => {
                std::thread::sleep(wait);
                false
            }
        };
        if woke {
            // More may follow: wait for quiet before comparing.
            pending_since = Some(Instant::now());
            continue;
        }
        let now = snapshot(root);
        if now != last {
            last = now;
            pending_since = Some(Instant::now());
            continue;
        }
        if pending_since.take().is_some() {
            // Settled after a change (or an event that changed nothing we
            // can see, such as a rewrite within the same timestamp).
            if changed.send(()).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_version_is_reported_once_settled() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        std::fs::write(root.path().join("a/key"), "v1\n").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn(root.path().to_owned(), tx).unwrap();
        // Nothing changed: nothing reported within a couple of polls.
        assert!(
            tokio::time::timeout(Duration::from_millis(2500), rx.recv())
                .await
                .is_err()
        );
        std::fs::write(root.path().join("a/key"), "v2-longer\n").unwrap();
        std::fs::write(root.path().join("a/other"), "x\n").unwrap();
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the change is reported")
            .unwrap();
        // A folder that appears later is watched too.
        std::fs::create_dir(root.path().join("b")).unwrap();
        std::fs::write(root.path().join("b/key"), "v1\n").unwrap();
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
}
