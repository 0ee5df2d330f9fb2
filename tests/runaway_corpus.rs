//! The runaway trace corpus (`tests/traces/*.json`, written by
//! `tests/traces/generate.py`): every trace runs through the summariser and
//! the detector exactly as the proxy would drive them, and must meet its
//! expected outcome. Runaway shapes must trip within `failing_retries + 1`
//! looping calls (or `no_progress_repeats` for the no-progress wire); healthy
//! shapes must run 40+ calls and never trip. Time is simulated: each step may say how long the
//! agent waited after the previous answer (`wait_ms`), and each answer takes
//! `latency_ms` (default 1.2 s) — the detector only sees the timestamps. Prints the table the README quotes
//! (`cargo test --test runaway_corpus -- --nocapture`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use agent_supervisor::runaway::{
    Api, Detector, Evidence, Fingerprint, InputUsage, RequestSummary, ResponseSummary,
    RunawayConfig, ToolCall, TripReason, Verdict,
};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Trace {
    name: String,
    #[allow(dead_code)]
    story: String,
    api: Api,
    #[serde(default)]
    config: RunawayConfig,
    expect: Expect,
    steps: Vec<Step>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    never_trips: bool,
    trips_by_step: Option<usize>,
    loop_starts_at_step: Option<usize>,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    #[serde(default = "main_conversation")]
    conversation: String,
    request: Option<Value>,
    append: Option<Vec<Value>>,
    #[serde(default)]
    retry_count: u32,
    /// Milliseconds the agent waited after the previous answer.
    #[serde(default)]
    wait_ms: u64,
    answer: Answer,
}

fn main_conversation() -> String {
    "main".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    status: u16,
    body: Option<Value>,
    stream: Option<Stream>,
    #[serde(default = "default_latency")]
    latency_ms: u64,
}

fn default_latency() -> u64 {
    1_200
}

/// What the SSE usage tap hands over for a streamed answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stream {
    tool_calls: Vec<StreamCall>,
    usage: Option<InputUsage>,
    /// The answer's id (`response.created`), for Responses streams.
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamCall {
    name: String,
    arguments: Value,
}

struct Outcome {
    steps: usize,
    trip: Option<(usize, Evidence)>,
    /// Input tokens of every answered request before the trip (or in all).
    tokens_forwarded: u64,
    /// Input tokens answered from the loop's first step up to the trip.
    loop_tokens_forwarded: u64,
    /// The largest answered request.
    peak_request_tokens: u64,
}

fn messages_field(api: Api) -> &'static str {
    match api {
        Api::OpenAiResponses => "input",
        _ => "messages",
    }
}

fn run(trace: &Trace) -> Result<Outcome, String> {
    let mut detector = Detector::new(trace.config);
    let mut bodies: HashMap<&str, Value> = HashMap::new();
    let loop_start = trace.expect.loop_starts_at_step.unwrap_or(usize::MAX);
    let mut out = Outcome {
        steps: trace.steps.len(),
        trip: None,
        tokens_forwarded: 0,
        loop_tokens_forwarded: 0,
        peak_request_tokens: 0,
    };
    let mut clock = 0u64;
    for (i, step) in trace.steps.iter().enumerate() {
        let n = i + 1;
        clock += step.wait_ms;
        let body = match (&step.request, &step.append) {
            (Some(request), None) => {
                bodies.insert(&step.conversation, request.clone());
                &bodies[step.conversation.as_str()]
            }
            (None, Some(append)) => {
                let body = bodies
                    .get_mut(step.conversation.as_str())
                    .ok_or(format!("step {n}: `append` before any `request`"))?;
                body[messages_field(trace.api)]
                    .as_array_mut()
                    .ok_or(format!("step {n}: no message array to append to"))?
                    .extend(append.iter().cloned());
                &*body
            }
            _ => {
                return Err(format!(
                    "step {n}: give exactly one of `request` and `append`"
                ));
            }
        };
        let summary = RequestSummary::from_json(trace.api, body, step.retry_count)
            .map_err(|e| format!("step {n}: {e}"))?
            .at(clock);
        if let Verdict::Tripped(evidence) = detector.observe_request(&summary) {
            // The proxy refuses this request: it never reaches upstream.
            out.trip = Some((n, evidence));
            return Ok(out);
        }
        let answer = match (&step.answer.body, &step.answer.stream) {
            (Some(b), None) => ResponseSummary::from_json(trace.api, step.answer.status, b),
            (None, Some(s)) => ResponseSummary {
                status: step.answer.status,
                tool_calls: s
                    .tool_calls
                    .iter()
                    .map(|c| ToolCall::new(&c.name, &c.arguments))
                    .collect(),
                usage: s.usage,
                response_id: s.id.as_deref().map(Fingerprint::of_str),
                ..ResponseSummary::default()
            },
            _ => return Err(format!("step {n}: give exactly one of `body` and `stream`")),
        };
        clock += step.answer.latency_ms;
        let answer = ResponseSummary {
            at_ms: Some(clock),
            ..answer
        };
        let tokens = answer.usage.map_or(0, |u| u.total());
        out.tokens_forwarded += tokens;
        if n >= loop_start {
            out.loop_tokens_forwarded += tokens;
        }
        out.peak_request_tokens = out.peak_request_tokens.max(tokens);
        detector.observe_response(summary.conversation, &answer);
    }
    Ok(out)
}

/// Checks an outcome against the trace's expectation and the design's bounds.
fn judge(trace: &Trace, out: &Outcome) -> Result<(), String> {
    let e = &trace.expect;
    match (&out.trip, e.never_trips) {
        (None, true) => Ok(()),
        (Some((n, ev)), true) => Err(format!("false positive: tripped at step {n}: {ev}")),
        (None, false) => Err("never tripped".into()),
        (Some((n, ev)), false) => {
            let by = e.trips_by_step.ok_or("expect needs `trips_by_step`")?;
            let start = e
                .loop_starts_at_step
                .ok_or("expect needs `loop_starts_at_step`")?;
            let reason = match ev.reason {
                TripReason::FailingRetries => "failing_retries",
                TripReason::NoProgress => "no_progress",
                TripReason::PollBudget => "poll_budget",
                TripReason::PollCount => "poll_count",
            };
            if e.reason.as_deref().unwrap_or("failing_retries") != reason {
                return Err(format!("tripped for `{reason}`, expected {:?}", e.reason));
            }
            let bound = match ev.reason {
                TripReason::FailingRetries => trace.config.failing_retries as usize + 1,
                TripReason::NoProgress => trace.config.no_progress_repeats as usize,
                // Bounded by tokens, not calls: the trace states its own bound.
                TripReason::PollBudget | TripReason::PollCount => by + 1 - start,
            };
            if by + 1 - start > bound {
                return Err(format!(
                    "trace expects up to {} looping calls, the design allows {bound}",
                    by + 1 - start
                ));
            }
            if *n < start || *n > by {
                return Err(format!(
                    "tripped at step {n}, expected within {start}..={by}"
                ));
            }
            for s in &ev.steps {
                if let Some(f) = &s.failure
                    && (f.chars().count() > 201
                        || f.as_bytes()
                            .windows(4)
                            .any(|w| w.iter().all(u8::is_ascii_digit)))
                {
                    return Err(format!("evidence excerpt not normalised/bounded: {f:?}"));
                }
            }
            Ok(())
        }
    }
}

fn trace_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/traces");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_trace_meets_its_expected_outcome() {
    let files = trace_files();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| trace | api | expected | outcome | looping calls (refused one incl.) | loop calls forwarded | loop input tokens forwarded | all input tokens forwarded | largest request (tokens) |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|");
    let mut evidence = String::new();
    let mut problems = Vec::new();
    let mut names = Vec::new();
    let (mut runaways, mut healthy, mut false_positives) = (0, 0, 0);
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable trace");
        let trace: Trace = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not a trace: {e}", file.display()));
        assert_eq!(
            file.file_stem().and_then(|s| s.to_str()),
            Some(trace.name.as_str()),
            "file name and trace name differ"
        );
        names.push(trace.name.clone());
        let out = match run(&trace) {
            Ok(out) => out,
            Err(e) => {
                problems.push(format!("{}: {e}", trace.name));
                continue;
            }
        };
        if let Err(e) = judge(&trace, &out) {
            problems.push(format!("{}: {e}", trace.name));
        }
        if trace.expect.never_trips && trace.steps.len() < 40 {
            problems.push(format!(
                "{}: a healthy trace must run 40+ calls, this one has {}",
                trace.name,
                trace.steps.len()
            ));
        }
        if trace.expect.never_trips {
            healthy += 1;
            false_positives += usize::from(out.trip.is_some());
        } else {
            runaways += 1;
        }
        let expected = if trace.expect.never_trips {
            "never trips".to_owned()
        } else {
            format!("trips by step {}", trace.expect.trips_by_step.unwrap_or(0))
        };
        let start = trace.expect.loop_starts_at_step;
        let (outcome, looping, forwarded) = match (&out.trip, start) {
            (Some((n, ev)), Some(s)) => (
                format!("tripped at step {n} ({} × {:?})", ev.count, ev.reason),
                (n + 1 - s).to_string(),
                (n - s).to_string(),
            ),
            (Some((n, _)), None) => (
                format!("FALSE POSITIVE at step {n}"),
                "-".into(),
                "-".into(),
            ),
            (None, _) => (
                format!("no trip in {} steps", out.steps),
                "-".into(),
                "-".into(),
            ),
        };
        let _ = writeln!(
            table,
            "| {} | {:?} | {expected} | {outcome} | {looping} | {forwarded} | {} | {} | {} |",
            trace.name,
            trace.api,
            if out.trip.is_some() {
                out.loop_tokens_forwarded.to_string()
            } else {
                "-".into()
            },
            out.tokens_forwarded,
            out.peak_request_tokens,
        );
        if let Some((_, ev)) = &out.trip {
            let _ = writeln!(evidence, "- {}: {ev}", trace.name);
        }
    }
    println!("\n{table}\nEvidence at the trip:\n{evidence}");
    println!(
        "runaway traces: {runaways}, healthy traces: {healthy}, false positives: {false_positives}\n"
    );

    for required in [
        "notes_summarizer_incident",
        "is_error_tool_results",
        "error_text_changing_ids",
        "failure_as_user_text",
        "streaming_answers",
        "upstream_400_repeated",
        "alternating_failures_abab",
        "openai_chat_tool_messages",
        "openai_responses_function_call_output",
        "healthy_long_tool_loop",
        "healthy_transient_error_then_recovery",
        "healthy_polling_changing_results",
        "healthy_parallel_conversations",
        "healthy_compaction",
        "healthy_sdk_transport_retries",
        "anthropic_cache_breakpoints_malformed_output",
        "healthy_cache_breakpoints_long_tool_loop",
        "openai_responses_previous_response_id",
        "openai_responses_conversation_id",
        "healthy_responses_previous_response_id_chain",
        "random_ids_seed_1",
        "random_ids_seed_8",
        "healthy_pytest_shared_banner",
        "pytest_same_failure_repeated",
        "healthy_ci_polling_with_waits",
        "ci_polling_back_to_back",
        "ci_polling_over_budget",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "missing trace `{required}`"
        );
    }
    assert!(
        problems.is_empty(),
        "corpus failures:\n{}",
        problems.join("\n")
    );
}
