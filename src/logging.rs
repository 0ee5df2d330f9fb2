//! Log output for `supervisor run`: agents' lines as `name | line`, the
//! supervisor's own events as `supervisor | LEVEL message fields`, or JSON.
//! Owns the tracing subscriber; must not decide anything about agents.
//!
//! Agent output arrives as tracing events with target `agent` and the fields
//! `agent` and `stream` (see `agent::output`), so one subscriber orders agent
//! lines and supervisor events in a single stream.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::LogFormat;

/// The tracing target agents' stdout/stderr lines are logged under.
pub const AGENT_TARGET: &str = "agent";

/// Width of the name column, so `name |` prefixes line up. Grows to the longest
/// agent name seen by `set_name_width`; "supervisor" is the floor.
static NAME_WIDTH: AtomicUsize = AtomicUsize::new(10);

/// Widens the name column to fit `names` (called when a fleet is loaded).
pub fn set_name_width<'a>(names: impl IntoIterator<Item = &'a str>) {
    let widest = names.into_iter().map(str::len).max().unwrap_or(0);
    NAME_WIDTH.fetch_max(widest.min(32), Ordering::Relaxed);
}

/// Installs the global subscriber writing to stderr. `RUST_LOG` filters
/// (default `info`). With `timestamps`, `auto`/`plain` lines start with the
/// time (UTC; JSON always has its own). Safe to call once; later calls are
/// ignored.
pub fn init(format: LogFormat, timestamps: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Auto | LogFormat::Plain => builder
            .event_format(FleetFormat {
                ansi: format == LogFormat::Auto && terminal,
                timestamps,
            })
            .try_init(),
    };
    // Already installed (e.g. a test harness did it): keep the first one.
    drop(result);
}

/// `name | line` formatting, coloured per agent on a terminal.
struct FleetFormat {
    ansi: bool,
    /// Each line starts with the time: `HH:MM:SS.mmm` on a terminal (where
    /// one reads a live run), full RFC 3339 in milliseconds otherwise (a
    /// file outlives the day), both UTC.
    timestamps: bool,
}

/// The time at the start of a line: `2026-11-14T12:00:07.250Z`, or on a
/// terminal just `12:00:07.250`.
pub fn timestamp(now: std::time::SystemTime, terminal: bool) -> String {
    let full = humantime::format_rfc3339_millis(now).to_string();
    if terminal {
        // `YYYY-MM-DDT` is 11 bytes, the trailing `Z` one.
        full.get(11..full.len() - 1).unwrap_or(&full).to_owned()
    } else {
        full
    }
}

impl<S, N> FormatEvent<S, N> for FleetFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let width = NAME_WIDTH.load(Ordering::Relaxed);
        let meta = event.metadata();
        if self.timestamps {
            let now = timestamp(std::time::SystemTime::now(), self.ansi);
            if self.ansi {
                write!(writer, "\x1b[2m{now}\x1b[0m ")?;
            } else {
                write!(writer, "{now} ")?;
            }
        }
        if meta.target() == AGENT_TARGET {
            let name = fields.agent.as_deref().unwrap_or("?");
            if self.ansi {
                let colour = colour_for(name);
                write!(writer, "\x1b[{colour}m{name:>width$} |\x1b[0m ")?;
            } else {
                write!(writer, "{name:>width$} | ")?;
            }
            return writeln!(writer, "{}", fields.message);
        }
        let level = *meta.level();
        let label = match level {
            Level::ERROR => "ERROR",
            Level::WARN => "WARN",
            Level::INFO => "INFO",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        if self.ansi {
            let colour = match level {
                Level::ERROR => "1;31",
                Level::WARN => "1;33",
                _ => "2",
            };
            write!(
                writer,
                "\x1b[1m{:>width$} |\x1b[0m \x1b[{colour}m{label}\x1b[0m ",
                "supervisor"
            )?;
        } else {
            write!(writer, "{:>width$} | {label} ", "supervisor")?;
        }
        // Events about one agent name it first: `supervisor | INFO sparkles: agent started pid=7`.
        if let Some(agent) = &fields.agent {
            write!(writer, "{agent}: ")?;
        }
        writeln!(writer, "{}{}", fields.message, fields.rest)
    }
}

/// Picks one of six readable ANSI colours from the agent's name, so an agent
/// keeps its colour across restarts and runs.
fn colour_for(name: &str) -> u8 {
    const COLOURS: [u8; 6] = [36, 32, 33, 35, 34, 96];
    let hash = name
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    COLOURS[(hash % COLOURS.len() as u32) as usize]
}

#[derive(Default)]
struct Fields {
    message: String,
    agent: Option<String>,
    /// Every other field, rendered ` key=value`.
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "agent" => self.agent = Some(value.to_owned()),
            "stream" => {}
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "agent" => self.agent = Some(format!("{value:?}").trim_matches('"').to_owned()),
            "stream" => {}
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stable_per_name() {
        assert_eq!(colour_for("sparkles"), colour_for("sparkles"));
        let distinct: std::collections::BTreeSet<u8> = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|n| colour_for(n))
            .collect();
        assert!(distinct.len() > 1);
    }
}
