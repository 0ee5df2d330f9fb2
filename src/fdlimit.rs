//! The supervisor's file-descriptor limit: raising the soft `RLIMIT_NOFILE`
//! to the hard one at start (remembering the original, which agents'
//! processes get back between fork and exec, as Go does), counting the
//! descriptors open now, and the pure decision of when to warn that they near
//! the limit. Decides nothing about proxy connections (`proxy::capacity`
//! turns the limit into caps) and never fails the supervisor: a limit that
//! cannot be raised is logged and lived with.

use std::sync::OnceLock;

/// The soft and hard `RLIMIT_NOFILE` before and after [`raise_to_hard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimits {
    /// The soft limit the supervisor was started with.
    pub original_soft: u64,
    /// The soft limit now.
    pub soft: u64,
    pub hard: u64,
}

/// The limit agents' processes get back, set once by [`raise_to_hard`] when
/// it raised anything.
static ORIGINAL: OnceLock<libc::rlimit> = OnceLock::new();

fn get() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the pointer it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit)
}

/// The soft `RLIMIT_NOFILE` now (`None` when it cannot be read).
pub fn soft_limit() -> Option<u64> {
    get().ok().map(|l| l.rlim_cur)
}

/// Raises the soft limit to the hard one. The proxy and a large fleet need
/// far more descriptors than systemd's default soft 1024 (which exists only
/// for the sake of `select()`); agents get the original back at exec.
pub fn raise_to_hard() -> std::io::Result<NofileLimits> {
    let before = get()?;
    let mut after = before;
    if before.rlim_cur < before.rlim_max {
        after.rlim_cur = before.rlim_max;
        // SAFETY: setrlimit reads one `rlimit` from the pointer it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &after) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _ = ORIGINAL.set(before);
    }
    Ok(NofileLimits {
        original_soft: before.rlim_cur,
        soft: after.rlim_cur,
        hard: after.rlim_max,
    })
}

/// Makes `cmd`'s process start with the soft limit the supervisor was
/// started with, so a `select()`-based program is not handed descriptors
/// above 1023. A no-op when nothing was raised.
pub fn restore_in_child(cmd: &mut tokio::process::Command) {
    let Some(original) = ORIGINAL.get().copied() else {
        return;
    };
    let restore = move || -> std::io::Result<()> {
        // Only lowering the soft limit, which never fails for a valid value;
        // an error is ignored rather than failing the agent's start.
        // SAFETY: setrlimit is a plain system call on a value copied before
        // the fork: no allocation, no lock.
        unsafe {
            libc::setrlimit(libc::RLIMIT_NOFILE, &original);
        }
        Ok(())
    };
    // SAFETY: the closure makes one system call on prepared data (see above).
    unsafe {
        cmd.pre_exec(restore);
    }
}

/// How many descriptors this process has open now, from `/proc/self/fd`.
pub fn open_descriptors() -> std::io::Result<u64> {
    // One descriptor is the directory being read; it is not counted.
    let count = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(count.saturating_sub(1))
}

/// Warn at this share of the limit, and again only after falling below
/// [`CLEAR_PERCENT`], so a count hovering at the line logs once.
pub const WARN_PERCENT: u64 = 80;
pub const CLEAR_PERCENT: u64 = 70;

/// What the periodic check should say about `open` descriptors of `limit`,
/// given whether it last warned: `Some(true)` warn now, `Some(false)` say it
/// cleared, `None` nothing.
pub fn pressure_change(open: u64, limit: u64, warned: bool) -> Option<bool> {
    let percent = open.saturating_mul(100) / limit.max(1);
    match (warned, percent) {
        (false, p) if p >= WARN_PERCENT => Some(true),
        (true, p) if p < CLEAR_PERCENT => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_table() {
        // (open, limit, warned) → change
        let cases = [
            (0, 1024, false, None),
            (818, 1024, false, None),
            (820, 1024, false, Some(true)),
            (1024, 1024, false, Some(true)),
            (900, 1024, true, None),
            (720, 1024, true, None),
            (716, 1024, true, Some(false)),
            (5, 0, false, Some(true)),
        ];
        for (open, limit, warned, want) in cases {
            assert_eq!(
                pressure_change(open, limit, warned),
                want,
                "{open}/{limit} warned={warned}"
            );
        }
    }
}
