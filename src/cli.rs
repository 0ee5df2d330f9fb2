//! Command-line interface: argument parsing and dispatch. No logic lives here;
//! each command calls into its module and returns an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::control::client::agent_command;
use crate::control::protocol::Command as Control;

/// Exit codes, documented in `--help` and README.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The command failed (for `check`: the fleet is not valid).
    pub const FAILURE: u8 = 1;
    /// Usage error: bad arguments (clap's own code).
    pub const USAGE: u8 = 2;
    /// `status`, `reload`, `start`, `stop`, `restart`: no supervisor is
    /// running for the fleet (no control socket, or nobody listening on it).
    pub const NOT_RUNNING: u8 = 3;
    /// `run`: `ledger.db` is corrupt (EX_DATAERR); restarting cannot help.
    pub const DATA: u8 = 65;
    /// `run` was refused because fleet.yaml is not valid (EX_CONFIG).
    pub const CONFIG: u8 = 78;
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success
  1   failure (`check`: the fleet is not valid; `release`: unknown agent or not
      quarantined; `tune --apply`: too little history)
  2   usage error (bad arguments)
  3   `status`, `reload`, `start`, `stop`, `restart`: no supervisor is running for the fleet
  65  `run`: ledger.db (in state_dir) is corrupt, nothing was started
  78  `run`: fleet.yaml is not valid, nothing was started
  141 killed by SIGPIPE (as the shell shows it): whoever read the output went
      away, e.g. `supervisor tune --json | head -c1`; the command ends as `cat` does";

/// Each subcommand's help points at the one table in `supervisor --help`.
const EXIT_CODES_SEE: &str = "Exit codes: see `supervisor --help`.";

#[derive(Debug, Parser)]
#[command(
    name = "supervisor",
    version,
    about = "Run a fleet of LLM agents so that one runaway agent costs one agent, never the fleet.",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Path to the fleet file.
    #[arg(
        short = 'f',
        long = "fleet",
        global = true,
        default_value = "fleet.yaml"
    )]
    pub fleet: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the fleet in the foreground until SIGTERM/SIGINT; SIGHUP reloads fleet.yaml.
    #[command(after_help = EXIT_CODES_SEE)]
    Run {
        /// Log format: `auto` (coloured `agent | line` on a terminal, plain otherwise), `plain` or `json`.
        #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
        log_format: LogFormat,
        /// No timestamp at the start of each `auto`/`plain` line (journald
        /// adds its own; they are left out by themselves when it is the log's
        /// destination, i.e. `JOURNAL_STREAM` is set).
        #[arg(long)]
        no_timestamps: bool,
    },
    /// Validate fleet.yaml and check that every referenced secret resolves (values are never printed).
    #[command(after_help = EXIT_CODES_SEE)]
    Check,
    /// Show each agent of the running supervisor: state, pid, uptime, restarts, last exit, this month's usage against the ceilings, and what its rate buckets hold.
    #[command(after_help = EXIT_CODES_SEE)]
    Status {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the running supervisor re-read fleet.yaml (same as SIGHUP); prints what changed, or every problem (exit 1) while the fleet keeps running.
    #[command(after_help = EXIT_CODES_SEE)]
    Reload,
    /// Start a stopped (or exited, or backing-off) agent in the running supervisor.
    #[command(after_help = EXIT_CODES_SEE)]
    Start {
        /// The agent's name in fleet.yaml.
        agent: String,
    },
    /// Stop an agent gracefully; it stays stopped (also across reloads) until `supervisor start`.
    #[command(after_help = EXIT_CODES_SEE)]
    Stop {
        /// The agent's name in fleet.yaml.
        agent: String,
    },
    /// Stop an agent gracefully and start it again with fresh credentials.
    #[command(after_help = EXIT_CODES_SEE)]
    Restart {
        /// The agent's name in fleet.yaml.
        agent: String,
    },
    /// Per-agent usage for a month from the ledger, against the ceilings; works without a running supervisor.
    #[command(after_help = EXIT_CODES_SEE)]
    Usage {
        /// The UTC month to show, as YYYY-MM (default: the current month).
        #[arg(long, value_name = "YYYY-MM")]
        month: Option<crate::budget::Month>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Recommend each agent's monthly ceilings and token rate from the ledger's last 30 days.
    #[command(after_help = EXIT_CODES_SEE)]
    Tune {
        /// Print a JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Write the recommendations to the budget overlay beside the fleet file
        /// (`fleet.budgets.yaml`) and reload a running supervisor.
        #[arg(long)]
        apply: bool,
        /// Room added above what was used, as a percentage.
        #[arg(long, value_name = "PERCENT", default_value = "25%", value_parser = crate::tune::parse_headroom)]
        headroom: u32,
        /// Days of history an agent needs before its recommendations count:
        /// fewer are marked low confidence and `--apply` refuses them. Lower it
        /// to apply from less history anyway.
        #[arg(long, value_name = "DAYS", default_value_t = crate::tune::DEFAULT_MIN_DAYS)]
        min_days: u32,
    },
    /// List quarantined agents with the reason and the evidence that tripped them.
    #[command(after_help = EXIT_CODES_SEE)]
    Quarantine {
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Let a quarantined agent run again (a running supervisor starts it at once).
    #[command(after_help = EXIT_CODES_SEE)]
    Release {
        /// The agent's name in fleet.yaml.
        agent: String,
    },
    /// Pick up new secret versions now: proxied LLM keys swap in place, agents whose environment holds a changed secret restart one at a time. `--history` lists past rotations.
    #[command(after_help = EXIT_CODES_SEE)]
    Rotate {
        /// The agent's name in fleet.yaml (with `--history`: only its rotations).
        #[arg(required_unless_present = "history")]
        agent: Option<String>,
        /// Only this secret (its name in the vault); the reload still re-reads them all.
        #[arg(conflicts_with = "history")]
        secret: Option<String>,
        /// List past rotations from the ledger instead.
        #[arg(long)]
        history: bool,
        /// With `--history`: print a JSON array.
        #[arg(long, requires = "history")]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Plain,
    Json,
}

/// A command whose reader went away (`supervisor tune --json | head -c1`)
/// ends as `cat` does: killed by SIGPIPE, silently, whatever it was printing.
///
/// Rust ignores SIGPIPE, so `print!` on a closed pipe panics with a
/// backtrace; this hook is the one place that turns exactly that panic into
/// the default SIGPIPE death. SIGPIPE itself stays ignored, so a command
/// writing to a control socket the supervisor closed still gets an error it
/// can report. Not for `run`: the supervisor must outlive its terminal.
fn end_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        let closed = (message.starts_with("failed printing to stdout")
            || message.starts_with("failed printing to stderr"))
            && message.contains(&format!("(os error {})", nix::errno::Errno::EPIPE as i32));
        if closed {
            // SAFETY: restoring the default disposition of one signal and
            // raising it; no handler runs, the process ends here.
            unsafe {
                let _ = nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGPIPE,
                    nix::sys::signal::SigHandler::SigDfl,
                );
            }
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGPIPE);
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Parse arguments and run the chosen command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        end_quietly_on_closed_stdout();
    }
    let code = match cli.command {
        Command::Run {
            log_format,
            no_timestamps,
        } => crate::supervisor::run_command(
            &cli.fleet,
            log_format,
            !no_timestamps && std::env::var_os("JOURNAL_STREAM").is_none(),
        ),
        Command::Check => crate::check::check_command(&cli.fleet),
        Command::Quarantine { json } => crate::quarantine_cmd::quarantine_command(&cli.fleet, json),
        Command::Release { agent } => crate::quarantine_cmd::release_command(&cli.fleet, &agent),
        Command::Status { json } => crate::control::client::status_command(&cli.fleet, json),
        Command::Reload => crate::control::client::reload_command(&cli.fleet),
        Command::Start { agent } => agent_command(&cli.fleet, Control::Start { agent }),
        Command::Stop { agent } => agent_command(&cli.fleet, Control::Stop { agent }),
        Command::Restart { agent } => agent_command(&cli.fleet, Control::Restart { agent }),
        Command::Tune {
            json,
            apply,
            headroom,
            min_days,
        } => crate::tune::tune_command(
            &cli.fleet,
            json,
            apply,
            crate::tune::Options {
                headroom_percent: headroom,
                min_days,
            },
        ),
        Command::Rotate {
            agent,
            secret,
            history,
            json,
        } => match (history, agent) {
            (true, agent) => {
                crate::rotation::cmd::history_command(&cli.fleet, agent.as_deref(), json)
            }
            (false, Some(agent)) => {
                crate::rotation::cmd::rotate_command(&cli.fleet, &agent, secret.as_deref())
            }
            (false, None) => exit::USAGE,
        },
        Command::Usage { month, json } => {
            crate::usage_report::usage_command(&cli.fleet, month, json)
        }
    };
    ExitCode::from(code)
}
