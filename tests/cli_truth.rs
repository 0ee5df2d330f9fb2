//! README "Commands": each command says exactly what it did — `release` of a
//! name the fleet lacks says so, `rotate` of an agent without secrets claims
//! nothing, `usage` explains tokens charged at a reservation — and every
//! command that prints ends quietly, as `cat` does, when its reader goes away.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};

use agent_supervisor::budget::Month;
use agent_supervisor::ledger::{Ledger, unix_millis_now};
use common::*;
use nix::sys::signal::Signal;

fn cli(fleet: &FleetDir, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const TWO_AGENTS: &str = "version: 1
agents:
  alpha:
    command: [sleep, '1000']
  beta:
    command: [sleep, '1000']
";

#[test]
fn release_of_an_unknown_agent_says_unknown_and_lists_the_fleet() {
    let fleet = FleetDir::new();
    fleet.write_fleet(TWO_AGENTS);
    let out = cli(&fleet, &["release", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: unknown agent \"nosuch\": the fleet has no agent of that name\n\
         hint: the fleet's agents are \"alpha\", \"beta\"; no agent is quarantined\n"
    );
    // A known agent that is not quarantined is told apart.
    let out = cli(&fleet, &["release", "alpha"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: agent \"alpha\" is not quarantined\n\
         hint: no agent is quarantined (`supervisor quarantine` shows why)\n"
    );
}

#[test]
fn rotate_of_an_agent_without_secrets_claims_nothing() {
    let fleet = FleetDir::new();
    fleet.write_fleet(TWO_AGENTS);
    let mut sup = fleet.run(&[]);
    sup.wait_log("started");
    let out = cli(&fleet, &["rotate", "alpha"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "agent `alpha` declares no secrets (no `secrets:`, no LLM key): nothing to rotate\n"
    );
    assert!(
        !sup.log().contains("INFO reloading"),
        "no reload was asked for"
    );
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}

#[test]
fn usage_explains_tokens_charged_at_a_reservation() {
    let fleet = FleetDir::new();
    fleet.write_fleet(TWO_AGENTS);
    let state = fleet.file(".supervisor");
    std::fs::create_dir_all(&state).unwrap();
    drop(Ledger::open(&state).unwrap());
    let conn = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
    let now = unix_millis_now();
    let month = Month::from_unix_secs(now / 1000).to_string();
    // alpha: one answer metered exactly (100 in, 20 out) and one in flight,
    // held at its 5,000-token reservation; beta: one cut at 3,000.
    for (agent, settled, outcome, reserved, input, output, charged) in [
        ("alpha", 1, "ok", 4_000, 100, 20, 120),
        ("alpha", 0, "in_flight", 5_000, 0, 0, 0),
        ("beta", 1, "cut", 3_000, 0, 0, 3_000),
    ] {
        conn.execute(
            "INSERT INTO requests (agent, provider, model, month, started_at_ms, reserved_tokens,
                                   reserved_micro_usd, settled, outcome, status, input_tokens,
                                   output_tokens, charged_tokens, charged_micro_usd)
             VALUES (?1, 'sim', 'claude-sonnet-4-5', ?2, ?3, ?4, 0, ?5, ?6, 200, ?7, ?8, ?9, 0)",
            rusqlite::params![
                agent, month, now, reserved, settled, outcome, input, output, charged
            ],
        )
        .unwrap();
    }
    let out = cli(&fleet, &["usage"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "\
AGENT  MONTH    REQUESTS  INPUT  OUTPUT  CACHE WRITE  CACHE READ  TOKENS   COST  UNSETTLED
alpha  {month}         2    100      20            0           0   5,120  $0.00          1
beta   {month}         1      0       0            0           0   3,000  $0.00          1
UNSETTLED: requests whose usage is not known (in flight, or cut before it arrived), charged at their full reservation; TOKENS and COST include those reservations, so TOKENS can exceed INPUT + OUTPUT + CACHE
"
        )
    );
    let json = usage_json(&fleet);
    assert_eq!(json[0]["unsettled_requests"], 1);
    assert_eq!(json[0]["cut_requests"], 0);
    assert_eq!(json[1]["cut_requests"], 1);
}

/// Runs `args` with stdout a pipe whose reading end is already closed.
fn with_closed_stdout(fleet: &FleetDir, args: &[&str]) -> Output {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    Command::new(bin())
        .args(args)
        .arg("-f")
        .arg(fleet.file("fleet.yaml"))
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn every_command_ends_quietly_when_its_reader_goes_away() {
    let fleet = FleetDir::new();
    fleet.write_fleet(TWO_AGENTS);
    let mut sup = fleet.run(&[]);
    sup.wait_log("started");
    for args in [
        &["tune", "--json"][..],
        &["tune"],
        &["usage"],
        &["usage", "--json"],
        &["status"],
        &["status", "--json"],
        &["quarantine"],
        &["quarantine", "--json"],
        &["check"],
        &["rotate", "--history"],
        &["rotate", "alpha"],
    ] {
        let out = with_closed_stdout(&fleet, args);
        assert_eq!(
            (out.status.signal(), text(&out.stderr)),
            (Some(Signal::SIGPIPE as i32), String::new()),
            "`supervisor {}` should end as `cat` does: {:?}",
            args.join(" "),
            out.status
        );
    }
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit().success());
}

#[test]
fn the_exit_codes_are_one_table_in_the_top_level_help() {
    let help = |args: &[&str]| text(&Command::new(bin()).args(args).output().unwrap().stdout);
    let top = help(&["--help"]);
    assert_eq!(top.matches("Exit codes:").count(), 1, "{top}");
    assert!(
        top.contains("\n  78  `run`: fleet.yaml is not valid"),
        "{top}"
    );
    for sub in ["run", "status", "tune", "release", "rotate"] {
        let text = help(&[sub, "--help"]);
        assert!(
            text.trim_end()
                .ends_with("Exit codes: see `supervisor --help`.")
                && !text.contains("  78  "),
            "{sub}: {text}"
        );
    }
}
