#!/usr/bin/env python3
"""Writes the runaway trace corpus (tests/traces/*.json). Deterministic.

Each trace: {name, story, api, expect, steps}. A step either sets a full
request body (`request`) or appends messages to its conversation's previous
request (`append`; `[]` resends the identical body), optionally with an SDK
`retry_count` and the milliseconds the agent waited after the previous answer
(`wait_ms`, default 0), and gives the upstream answer: `{"status", "body"}`
for JSON answers or `{"status", "stream": {"tool_calls", "usage", "id"}}` for
the summary the SSE tap assembles, optionally with its `latency_ms` (default
1200). A trace may set `config` (the `runaway:` settings, interval in ms). `expect` is `{"never_trips": true}` or
`{"trips_by_step": N, "loop_starts_at_step": M, "reason": ...}` (1-based).

Regenerate with: python3 tests/traces/generate.py
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(4)


def rid(prefix, n=24):
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    s = "".join(rng.choice(alphabet) for _ in range(n))
    return prefix + "01" + s  # ids in the wild carry digits


def ts(minute, second):
    return f"2025-06-03T14:{minute:02d}:{second:02d}.{rng.randint(100, 999)}Z"


def tokens(body):
    # ~4 characters per token plus tool definitions and framing.
    return len(json.dumps(body)) // 4 + 900


def write(trace):
    path = os.path.join(HERE, trace["name"] + ".json")
    with open(path, "w") as f:
        json.dump(trace, f, indent=1, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------- Anthropic

ANTHROPIC_TOOLS = [
    {"name": n, "description": d, "input_schema": {"type": "object", "properties": {}}}
    for n, d in [
        ("list_notes", "List note files."),
        ("read_notes", "Read a note file."),
        ("write_summary", "Write the summary."),
        ("search", "Search the web."),
        ("fetch", "Fetch a URL."),
        ("run_tests", "Run the test suite."),
        ("apply_patch", "Apply a unified diff."),
        ("start_export", "Start an export job."),
        ("poll_export", "Poll an export job."),
    ]
]


class Anthropic:
    api = "anthropic_messages"

    def __init__(self, system, task, stream=False):
        self.body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "system": system,
            "tools": ANTHROPIC_TOOLS,
            "messages": [{"role": "user", "content": task}],
        }
        if stream:
            self.body["stream"] = True
        self.stream = stream
        self.steps = []
        self.pending = None  # assistant message of the last answer
        self.cached = 0

    def _usage(self):
        total = tokens(self.body)
        read = min(self.cached, total)
        create = max(total - read - 30, 0)
        self.cached = read + create
        return {"input_tokens": total - read - create, "cache_creation_input_tokens": create,
                "cache_read_input_tokens": read, "output_tokens": rng.randint(40, 160)}

    def _answer(self, content):
        self.pending = {"role": "assistant", "content": content}
        usage = self._usage()
        if self.stream:
            calls = [{"name": b["name"], "arguments": b["input"]} for b in content if b["type"] == "tool_use"]
            return {"status": 200, "stream": {"tool_calls": calls, "usage": usage}}
        stop = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
        return {"status": 200, "body": {"id": rid("msg_"), "type": "message", "role": "assistant",
                                         "model": "claude-sonnet-4-5", "content": content,
                                         "stop_reason": stop, "usage": usage}}

    def call(self, name, args, thought=None):
        """Answer to the current request: the model calls `name`."""
        content = [{"type": "text", "text": thought}] if thought else []
        content.append({"type": "tool_use", "id": rid("toolu_"), "name": name, "input": args})
        return self._answer(content)

    def text(self, text):
        return self._answer([{"type": "text", "text": text}])

    def error(self, status, etype, message):
        self.pending = None
        return {"status": status, "body": {"type": "error", "error": {"type": etype, "message": message}}}

    def first(self, answer_fn, conversation=None):
        step = {"request": json.loads(json.dumps(self.body))}
        self._finish(step, answer_fn, conversation)

    def result(self, text, answer_fn, is_error=False, conversation=None):
        """Appends the pending tool call and its result, then answers."""
        call = self.pending["content"][-1]
        block = {"type": "tool_result", "tool_use_id": call["id"], "content": text}
        if is_error:
            block["is_error"] = True
        self.append([self.pending, {"role": "user", "content": [block]}], answer_fn, conversation)

    def append(self, messages, answer_fn, conversation=None, retry_count=0):
        self.body["messages"].extend(messages)
        step = {"append": messages}
        if retry_count:
            step["retry_count"] = retry_count
        self._finish(step, answer_fn, conversation)

    def _finish(self, step, answer_fn, conversation):
        if conversation:
            step["conversation"] = conversation
        step["answer"] = answer_fn()
        self.steps.append(step)


def trace(name, story, conv, expect, steps=None):
    write({"name": name, "story": story, "api": conv.api, "expect": expect,
           "steps": steps if steps is not None else conv.steps})


def trips(by, loop_start, reason="failing_retries"):
    return {"trips_by_step": by, "loop_starts_at_step": loop_start, "reason": reason}


NEVER = {"never_trips": True}


def notes_incident():
    c = Anthropic("You are notes-summarizer. Today is 2025-06-03.", "Summarise today's meeting notes into notes/summary.md.")
    c.first(lambda: c.call("list_notes", {"dir": "notes"}, "Let me list the notes."))
    c.result('["standup.md", "design-review.md"]', lambda: c.call("read_notes", {"path": "notes/standup.md"}))
    for i in range(9):
        col = 512 + 37 * i
        text = ("Traceback (most recent call last):\n"
                '  File "/srv/tools/notes.py", line 88, in read_notes\n'
                "    return json.loads(raw)\n"
                f"json.decoder.JSONDecodeError: Expecting ',' delimiter: line 1 column {col} (char {col - 1})\n"
                f"(tool run {rid('run_', 10)} at {ts(2 + i, 7 * i % 60)}; raw output was 14,{300 + 97 * i} bytes: "
                f'{{"notes": [{{"title": "Standup", "body": "Ship v2 Fri\\u00')
        c.result(text, lambda: c.call("read_notes", {"path": "notes/standup.md"}, "The tool output was malformed; retrying."))
    trace("notes_summarizer_incident",
          "The incident: a notes tool starts returning malformed output; the agent appends the "
          "parse failure (is_error false, changing offsets and run ids) and retries, every "
          "request bigger than the last.", c, trips(7, 3))


def is_error_results():
    c = Anthropic("You are an email triage agent.", "Label the unread messages in the inbox.")
    c.first(lambda: c.call("fetch", {"url": "imap://inbox?unread=1"}))
    c.result("3 unread: [7781, 7782, 7783]", lambda: c.call("fetch", {"url": "imap://inbox/7781"}))
    for i in range(9):
        c.result(f"IMAP error: NO [UNAVAILABLE] Mailbox is locked by another session (tag A{100 + i})",
                 lambda: c.call("fetch", {"url": "imap://inbox/7781"}), is_error=True)
    trace("is_error_tool_results", "Tool results flagged `is_error: true`, the same call each time.",
          c, trips(7, 3))


def changing_ids():
    c = Anthropic("You are a CRM sync agent.", "Push today's new leads to the CRM.")
    c.first(lambda: c.call("search", {"q": "new leads today"}))
    c.result("leads: ana@example.com, bo@example.com", lambda: c.call("fetch", {"url": "https://crm.example.com/api/leads", "method": "POST", "n": 1}))
    for i in range(9):
        text = (f"Error: request {rid('req_', 16)} to crm.example.com failed at {ts(10 + i, 3 * i)}: "
                f"503 Service Unavailable (upstream connect error, trace {rid('', 32)})")
        # The agent varies an argument each time, so only the failure text repeats.
        c.result(text, lambda i=i: c.call("fetch", {"url": "https://crm.example.com/api/leads", "method": "POST", "n": i + 2}))
    trace("error_text_changing_ids", "Error text with changing request ids, traces and timestamps, "
          "`is_error` false, and a slightly different call each time.", c, trips(7, 3))


def user_text_failure():
    c = Anthropic("Reply only with a JSON object {\"summary\": string, \"tags\": [string]}.",
                  "Summarise: 'Q3 planning moved to Thursday; budget review pending.'")
    c.first(lambda: c.text('{"summary": "Q3 planning moved to Thursday, budget review pend'))
    for i in range(9):
        col = 60 + 3 * i
        msg = {"role": "user", "content": f"Your reply was not valid JSON (JSONDecodeError: Unterminated string "
                                          f"starting at: line 1 column {col} (char {col - 1})). Reply again with only the JSON object."}
        c.append([c.pending, msg], lambda: c.text('{"summary": "Q3 planning moved to Thursday; budget review pending", "tags": ["plan'))
    trace("failure_as_user_text", "No tools: the agent's own parser fails and appends the failure as a "
          "user text message.", c, trips(6, 2))


def streaming():
    c = Anthropic("You are a research agent.", "Collect the changelog of tokio 1.54.", stream=True)
    c.first(lambda: c.call("search", {"q": "tokio 1.54 changelog"}))
    c.result("1. https://github.com/tokio-rs/tokio/releases", lambda: c.call("fetch", {"url": "https://github.com/tokio-rs/tokio/releases"}))
    for i in range(9):
        page = (f"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
                f"<p>Request ID: {rid('', 20)}</p><p>{ts(20 + i, i)}</p><hr>nginx/1.25.{i}</body></html>")
        c.result(page, lambda: c.call("fetch", {"url": "https://github.com/tokio-rs/tokio/releases"}))
    trace("streaming_answers", "Streaming: answers are the SSE tap's summary (tool calls, usage with cache "
          "tokens); the fetched page is an HTTP 502 error page.", c, trips(7, 3))


def upstream_400():
    c = Anthropic("You are a calendar agent.", "Move my 3pm to 4pm.")
    c.first(lambda: c.call("search", {"q": "calendar events today 15:00"}))
    # The agent's framework drops the tool_result: every request is invalid.
    c.append([c.pending, {"role": "user", "content": "Here is the result: event id 88, 'Design sync'."}],
             lambda: c.error(400, "invalid_request_error", "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_01AbC. Each `tool_use` block must have a corresponding `tool_result` block in the next message."))
    first_bad = len(c.body["messages"])
    for i in range(8):
        c.append([{"role": "user", "content": "Please continue with the task."}],
                 lambda i=i: c.error(400, "invalid_request_error", f"messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_01AbC. Each `tool_use` block must have a corresponding `tool_result` block in the next message. (request_id: req_{i}x{first_bad + i})"))
    trace("upstream_400_repeated", "The same upstream 400 (invalid_request_error) every time while the agent "
          "appends \"continue\" and retries.", c, trips(7, 3))


def alternating():
    c = Anthropic("You are a coding agent.", "Make the failing API test pass.")
    c.first(lambda: c.call("run_tests", {"filter": "test_api"}))
    c.result("1 failed: tests/test_api.py::test_create", lambda: c.call("apply_patch", {"diff": "--- a/src/api.py\n+++ b/src/api.py\n@@ -40 +40 @@\n-    return 500\n+    return 201\n"}))
    for i in range(10):
        if i % 2 == 0:
            c.result(f"error: patch failed: src/api.py:{40 + i}\nerror: src/api.py: patch does not apply",
                     lambda: c.call("run_tests", {"filter": "test_api"}), is_error=True)
        else:
            c.result(f"FAILED tests/test_api.py::test_create - AssertionError: expected 201, got 500 ({0.01 * i:.2f}s)",
                     lambda: c.call("apply_patch", {"diff": "--- a/src/api.py\n+++ b/src/api.py\n@@ -40 +40 @@\n-    return 500\n+    return 201\n"}))
    # The loop starts at step 2: the first test run already fails.
    trace("alternating_failures_abab", "Two failing calls alternating: the same failing test, then a "
          "patch that does not apply (A-B-A-B).", c, trips(6, 2))


def no_progress():
    c = Anthropic("You are a notes agent.", "Find the action items in notes/standup.md.")
    c.first(lambda: c.call("read_notes", {"path": "notes/standup.md"}))
    for i in range(12):
        c.result("# Standup\n- Ana: ship v2 on Friday\n- Bo: review the budget\n",
                 lambda: c.call("read_notes", {"path": "notes/standup.md"}, "Let me read the notes again."))
    trace("no_progress_identical_results", "No error words: the same call answered with a byte-identical "
          "result again and again (the slower no-progress trip wire).", c, trips(9, 2, "no_progress"))


def long_loop():
    c = Anthropic("You are a research agent.", "Write a report on Rust async runtimes.")
    c.first(lambda: c.call("search", {"q": "rust async runtime comparison"}))
    topics = ["tokio", "async-std", "smol", "glommio", "monoio", "embassy", "bastion", "actix-rt",
              "futures-executor", "compio", "may", "nuclei", "tokio-uring"]
    n = 0
    for t in topics:
        for kind in ("search", "fetch", "write_summary"):
            n += 1
            if kind == "search":
                res = f"{n + 3} results for {t}: https://docs.rs/{t}, https://github.com/{t}-rs/{t}"
                nxt = lambda t=t: c.call("fetch", {"url": f"https://docs.rs/{t}"})
            elif kind == "fetch":
                res = (f"{t}: an async runtime. Scheduler: {['work-stealing', 'thread-per-core', 'single-threaded'][n % 3]}. "
                       f"Latest release {n % 5}.{n}.0. " + ("Chapter 4 covers error handling and error budgets. " if t == "smol" else ""))
                nxt = lambda t=t: c.call("write_summary", {"section": t, "text": f"{t} summary"})
            else:
                res = f"wrote section {t} ({120 + 7 * n} words)"
                nxt = lambda t=t: c.call("search", {"q": f"{t} benchmarks"})
            c.result(res, nxt)
    c.result("done", lambda: c.text("The report is written."))
    trace("healthy_long_tool_loop", "41 steps of novel calls with successful, changing results (one page "
          "mentions error handling).", c, NEVER)


def polling():
    c = Anthropic("You are a data agent.", "Export the orders table and tell me when it is ready.")
    c.first(lambda: c.call("start_export", {"table": "orders"}))
    c.result("export exp_7f3a started", lambda: c.call("poll_export", {"id": "exp_7f3a"}))
    total = 13005
    for i in range(38):
        done = min(total, 330 * (i + 1))
        c.result(f"status: running, {100 * done // total}% ({done:,}/{total:,} rows), updated {ts(30 + i // 4, (i * 13) % 60)}",
                 lambda: c.call("poll_export", {"id": "exp_7f3a"}, "Still running; polling again."))
    c.result("status: done, file: s3://exports/orders.csv", lambda: c.text("The export is ready."))
    trace("healthy_polling_changing_results", "Polling the same job 39 times; each answer differs "
          "(progress, timestamp).", c, NEVER)


def transport_retries():
    c = Anthropic("You are a notes agent.", "Tidy up the notes folder.")
    steps = c.steps
    c.first(lambda: c.error(529, "overloaded_error", "Overloaded"))
    # The SDK retries the identical body: retry counts 1 and 2.
    c.append([], lambda: c.error(529, "overloaded_error", "Overloaded"), retry_count=1)
    c.append([], lambda: c.call("list_notes", {"dir": "notes"}), retry_count=2)
    files = [f"note-{i}.md" for i in range(32)]
    c.result(json.dumps(files), lambda: c.call("read_notes", {"path": "notes/note-0.md"}))
    for i, f in enumerate(files[:-1]):
        result = f"# Note {i}\nitem {i * 3}: follow up with team {chr(65 + i)}"
        if i in (2, 5):
            # Upstream hiccups on this request; the SDK resends it unchanged.
            c.result(result, lambda: c.error(500, "api_error", "Internal server error"))
            for r in (1, 2, 3):
                last = r == 3
                c.append([], (lambda f=f: c.call("read_notes", {"path": f"notes/{files[i + 1]}"})) if last
                         else (lambda: c.error(500, "api_error", "Internal server error")), retry_count=r)
        else:
            c.result(result, lambda: c.call("read_notes", {"path": f"notes/{files[i + 1]}"}))
    trace("healthy_sdk_transport_retries", "SDK transport retries of an identical body "
          "(`x-stainless-retry-count` 1..3) after 529 and 500 answers, inside a healthy loop.", c, NEVER, steps)


def compaction():
    system = "You are a support agent."
    task = "Work through the open support tickets."
    c = Anthropic(system, task)
    c.first(lambda: c.call("search", {"q": "open tickets"}))
    for i in range(14):
        if i in (4, 9):
            c.result(f"HTTP 503 Service Unavailable (retry after {i}s)", lambda i=i: c.call("fetch", {"url": f"https://desk.example.com/t/{100 + i}"}), is_error=True)
        else:
            c.result(f"ticket {100 + i}: customer asks about invoice {2000 + 17 * i}; answered.",
                     lambda i=i: c.call("fetch", {"url": f"https://desk.example.com/t/{101 + i}"}))
    # Compaction: the agent replaces its history with a summary.
    compacted = {"role": "assistant", "content": "Summary of work so far: tickets 100-113 handled; 104 and 109 were retried."}
    cont = {"role": "user", "content": "Continue with the remaining tickets."}
    c.body["messages"] = [c.body["messages"][0], compacted, cont]
    c.cached = 0
    c.steps.append({"request": json.loads(json.dumps(c.body)),
                    "answer": c.call("fetch", {"url": "https://desk.example.com/t/114"})})
    for i in range(14, 40):
        c.result(f"ticket {100 + i}: customer asks about invoice {2000 + 17 * i}; answered.",
                 lambda i=i: c.call("fetch", {"url": f"https://desk.example.com/t/{101 + i}"}))
    trace("healthy_compaction", "A long support session whose history is compacted (prefix broken, "
          "same first message); the chain restarts and work goes on.", c, NEVER)


# ---------------------------------------------------------------- OpenAI chat

CHAT_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
              for n in ("get_ticket", "create_ticket", "post_comment")]


class Chat:
    api = "openai_chat"

    def __init__(self, system, task):
        self.body = {"model": "gpt-4.1", "tools": CHAT_TOOLS,
                     "messages": [{"role": "system", "content": system}, {"role": "user", "content": task}]}
        self.pending = None

    def call(self, name, args):
        tc = {"id": rid("call_"), "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        self.pending = {"role": "assistant", "content": None, "tool_calls": [tc]}
        t = tokens(self.body)
        return {"status": 200, "body": {"id": rid("chatcmpl-"), "object": "chat.completion",
                "choices": [{"index": 0, "message": self.pending, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": t, "completion_tokens": 30,
                          "prompt_tokens_details": {"cached_tokens": max(0, t - 400) // 128 * 128}}}}

    def first(self, steps, answer_fn, conversation=None):
        step = {"request": json.loads(json.dumps(self.body)), "answer": answer_fn()}
        if conversation:
            step["conversation"] = conversation
        steps.append(step)

    def result(self, steps, text, answer_fn, conversation=None):
        msgs = [self.pending, {"role": "tool", "tool_call_id": self.pending["tool_calls"][0]["id"], "content": text}]
        self.body["messages"].extend(msgs)
        step = {"append": msgs, "answer": answer_fn()}
        if conversation:
            step["conversation"] = conversation
        steps.append(step)


def chat_runaway():
    c = Chat("You file bug reports.", "File a ticket for the login outage.")
    steps = []
    c.first(steps, lambda: c.call("create_ticket", {"title": "Login outage", "priority": "high"}))
    for i in range(9):
        c.result(steps, f'{{"error": {{"code": 500, "message": "Internal Server Error", "request_id": "{rid("", 12)}", "time": "{ts(40, i * 5)}"}}}}',
                 lambda: c.call("create_ticket", {"title": "Login outage", "priority": "high"}))
    write({"name": "openai_chat_tool_messages", "story": "OpenAI chat completions: `tool` messages carry a "
           "JSON 500 error with changing request ids; the agent repeats the call.", "api": c.api,
           "expect": trips(6, 2), "steps": steps})


def chat_parallel():
    steps = []
    convs = {k: Chat("You triage support tickets.", f"Triage ticket #{k}.") for k in ("101", "102", "103")}
    for k, c in convs.items():
        c.first(steps, lambda c=c, k=k: c.call("get_ticket", {"id": int(k)}), conversation=k)
    # The same flaky backend fails each conversation twice, interleaved:
    # merged, that would be six repeated failures in a row.
    for _round in range(2):
        for k, c in convs.items():
            c.result(steps, "HTTP 503 Service Unavailable: ticket backend overloaded",
                     lambda c=c, k=k: c.call("get_ticket", {"id": int(k)}), conversation=k)
    for r in range(11):
        for k, c in convs.items():
            c.result(steps, f"ticket {k} page {r}: {['billing', 'login', 'export'][r % 3]} issue, {r + int(k) % 7} comments",
                     lambda c=c, k=k, r=r: c.call("post_comment", {"id": int(k), "text": f"step {r}"}), conversation=k)
    write({"name": "healthy_parallel_conversations", "story": "Three conversations of one OpenAI chat agent, "
           "interleaved; a flaky backend fails each twice with the same text, then all recover.",
           "api": Chat.api, "expect": NEVER, "steps": steps})


# ---------------------------------------------------------------- OpenAI Responses

class Responses:
    api = "openai_responses"

    def __init__(self, instructions, task):
        self.body = {"model": "gpt-4.1", "instructions": instructions,
                     "tools": [{"type": "function", "name": "sync_calendar", "parameters": {"type": "object"}}],
                     "input": [{"role": "user", "content": task}]}
        self.pending = None

    def call(self, name, args):
        self.pending = {"type": "function_call", "call_id": rid("call_"), "name": name, "arguments": json.dumps(args)}
        t = tokens(self.body)
        return {"status": 200, "body": {"id": rid("resp_"), "object": "response", "output": [self.pending],
                "usage": {"input_tokens": t, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 25}}}

    def first(self, steps, answer_fn):
        steps.append({"request": json.loads(json.dumps(self.body)), "answer": answer_fn()})

    def result(self, steps, text, answer_fn):
        items = [self.pending, {"type": "function_call_output", "call_id": self.pending["call_id"], "output": text}]
        self.body["input"].extend(items)
        steps.append({"append": items, "answer": answer_fn()})


def responses_runaway():
    c = Responses("You keep calendars in sync.", "Sync the team calendar with the shared one.")
    steps = []
    c.first(steps, lambda: c.call("sync_calendar", {"source": "team", "target": "shared"}))
    for i in range(9):
        c.result(steps, f"sync failed: invalid calendar id 'cal_{rid('', 8)}' (attempt {i + 1}, {ts(50, i)})",
                 lambda: c.call("sync_calendar", {"source": "team", "target": "shared"}))
    write({"name": "openai_responses_function_call_output", "story": "OpenAI Responses: `function_call_output` "
           "items report the same failure with changing ids.", "api": c.api, "expect": trips(6, 2), "steps": steps})


def responses_transient():
    c = Responses("You keep calendars in sync.", "Sync each team calendar once.")
    steps = []
    c.first(steps, lambda: c.call("sync_calendar", {"team": "t0"}))
    for i in range(40):
        if i == 3:
            c.result(steps, "sync failed: 503 Service Unavailable", lambda: c.call("sync_calendar", {"team": "t3"}))
        else:
            nxt = i + 1 if i != 2 else 3
            c.result(steps, f"synced team t{i}: {5 + i} events, {i % 3} conflicts resolved",
                     lambda nxt=nxt: c.call("sync_calendar", {"team": f"t{nxt}"}))
    write({"name": "healthy_transient_error_then_recovery", "story": "OpenAI Responses: one transient 503, the "
           "call is retried once and succeeds, work goes on.", "api": c.api, "expect": NEVER, "steps": steps})



# ---------------------------------------------------------------- v2 shapes

class AnthropicCached(Anthropic):
    """An Anthropic agent written the cache-aware way: `cache_control` on the
    system block, the last tool and the last two user turns (moved every call
    and taken off older turns, string content turned into a text block to
    carry it), extended thinking with signatures kept only on the latest
    assistant turn, and older assistant text trimmed. Every step is a full
    request, since earlier messages change each time."""

    def call(self, name, args, thought=None):
        content = [{"type": "thinking", "thinking": f"The user wants progress; calling {name}.",
                    "signature": rid("EqQBCkgIARABGAIiQ", 40)}]
        content.append({"type": "text", "text": (thought or f"Calling {name}.") + "\n"})
        content.append({"type": "tool_use", "id": rid("toolu_"), "name": name, "input": args})
        return self._answer(content)

    def view(self):
        b = json.loads(json.dumps(self.body))
        b["system"] = [{"type": "text", "text": self.body["system"], "cache_control": {"type": "ephemeral"}}]
        b["tools"][-1]["cache_control"] = {"type": "ephemeral"}
        msgs = b["messages"]
        assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        for i in assistants[:-1]:
            blocks = [blk for blk in msgs[i]["content"] if blk["type"] != "thinking"]
            for blk in blocks:
                if blk["type"] == "text":
                    blk["text"] = blk["text"].strip()
            msgs[i]["content"] = blocks
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        for i in users[-2:]:
            m = msgs[i]
            if isinstance(m["content"], str):
                m["content"] = [{"type": "text", "text": m["content"]}]
            m["content"][-1]["cache_control"] = {"type": "ephemeral"}
        return b

    def _finish(self, step, answer_fn, conversation):
        step.pop("append", None)
        step["request"] = self.view()
        Anthropic._finish(self, step, answer_fn, conversation)


def cached_malformed():
    c = AnthropicCached("You are notes-summarizer.", "Summarise today's meeting notes into notes/summary.md.")
    c.first(lambda: c.call("list_notes", {"dir": "notes"}, "Let me list the notes."))
    c.result('["standup.md", "design-review.md"]', lambda: c.call("read_notes", {"path": "notes/standup.md"}))
    for i in range(9):
        col = 700 + 41 * i
        text = ("Traceback (most recent call last):\n"
                '  File "/srv/tools/notes.py", line 88, in read_notes\n'
                "    return json.loads(raw)\n"
                f"json.decoder.JSONDecodeError: Expecting ',' delimiter: line 1 column {col} (char {col - 1})")
        c.result(text, lambda: c.call("read_notes", {"path": "notes/standup.md"}, "The tool output was malformed; retrying."))
    trace("anthropic_cache_breakpoints_malformed_output",
          "The malformed-tool-output loop written the cache-aware way: cache_control moves to the last two "
          "user turns each call (string content turned into blocks), sits on the system block and the last "
          "tool, thinking blocks with signatures are kept only on the latest turn, older text is trimmed.",
          c, trips(7, 3))


def cached_long_loop():
    c = AnthropicCached("You are a research agent.", "Write a report on Rust async runtimes.")
    c.first(lambda: c.call("search", {"q": "rust async runtime comparison"}))
    topics = ["tokio", "async-std", "smol", "glommio", "monoio", "embassy", "bastion", "actix-rt",
              "futures-executor", "compio", "may", "nuclei", "rayon", "crossbeam"]
    n = 0
    for t in topics:
        for kind in ("search", "fetch", "write_summary"):
            n += 1
            if kind == "search":
                res = f"{n + 3} results for {t}: https://docs.rs/{t}, https://github.com/{t}-rs/{t}"
                nxt = lambda t=t: c.call("fetch", {"url": f"https://docs.rs/{t}"})
            elif kind == "fetch":
                res = f"{t}: an async runtime. Scheduler: {['work-stealing', 'thread-per-core', 'single-threaded'][n % 3]}."
                nxt = lambda t=t: c.call("write_summary", {"section": t, "text": f"{t} summary"})
            else:
                res = f"wrote section {t} ({120 + 7 * n} words)"
                nxt = lambda t=t: c.call("search", {"q": f"{t} benchmarks"})
            c.result(res, nxt)
    c.result("done", lambda: c.text("The report is written."))
    trace("healthy_cache_breakpoints_long_tool_loop", "A 44-step tool loop of novel calls written the "
          "cache-aware way (moving cache_control, thinking blocks dropped from older turns).", c, NEVER)


class ResponsesChain:
    """An OpenAI Responses agent keeping state on the provider: after the first
    request it sends only `previous_response_id` and the new items. The
    provider bills the whole chain's context as input."""
    api = "openai_responses"

    def __init__(self, instructions, task, tools, conversation=None, stream=False):
        self.base = {"model": "gpt-4.1", "instructions": instructions, "tools": tools}
        if stream:
            self.base["stream"] = True
        self.conversation = conversation
        self.stream = stream
        self.prev = None
        self.context = 0
        self.pending = None
        self.steps = []
        self._next_input = [{"role": "user", "content": task}]

    def _request(self, items):
        body = dict(self.base)
        if self.conversation:
            body["conversation"] = self.conversation
        elif self.prev:
            body["previous_response_id"] = self.prev
        body["input"] = items
        return json.loads(json.dumps(body))

    def _bill(self, body):
        self.context += len(json.dumps(body["input"])) // 4 + (0 if self.prev else 900)
        return self.context

    def call(self, body, name, args):
        rid_ = rid("resp_")
        self.pending = {"type": "function_call", "id": rid("fc_"), "call_id": rid("call_"), "name": name,
                        "arguments": json.dumps(args), "status": "completed"}
        t = self._bill(body)
        self.context += 40
        self.prev = rid_
        usage = {"input_tokens": t, "input_tokens_details": {"cached_tokens": max(0, t - 500) // 128 * 128},
                 "output_tokens": 25}
        if self.stream:
            return {"status": 200, "stream": {"tool_calls": [{"name": name, "arguments": args}],
                                              "usage": {"input_tokens": t}, "id": rid_}}
        return {"status": 200, "body": {"id": rid_, "object": "response", "status": "completed",
                                         "output": [self.pending], "usage": usage}}

    def error(self, status, message):
        return {"status": status, "body": {"error": {"message": message, "type": "server_error", "code": None}}}

    def step(self, items, answer, wait_ms=0):
        body = self._request(items)
        st = {"request": body, "answer": answer(body)}
        if wait_ms:
            st["wait_ms"] = wait_ms
        self.steps.append(st)

    def first(self, name, args):
        self.step(self._next_input, lambda b: self.call(b, name, args))

    def result(self, text, name, args):
        out = [{"type": "function_call_output", "call_id": self.pending["call_id"], "output": text}]
        self.step(out, lambda b: self.call(b, name, args))


SYNC_TOOLS = [{"type": "function", "name": "sync_calendar", "parameters": {"type": "object"}}]


def responses_chain_loop():
    c = ResponsesChain("You keep calendars in sync.", "Sync the team calendar with the shared one.", SYNC_TOOLS)
    c.first("sync_calendar", {"source": "team", "target": "shared"})
    for i in range(9):
        c.result(f"sync failed: invalid calendar id 'cal_{rid('', 8)}' (attempt {i + 1}, {ts(51, i)})",
                 "sync_calendar", {"source": "team", "target": "shared"})
    write({"name": "openai_responses_previous_response_id", "story": "OpenAI Responses with server-side state: "
           "each request sends only `previous_response_id` and the new `function_call_output`; the "
           "failure repeats with changing ids.", "api": c.api, "expect": trips(6, 2), "steps": c.steps})


def responses_conversation_loop():
    c = ResponsesChain("You file expense reports.", "File my taxi receipt.",
                       [{"type": "function", "name": "submit_expense", "parameters": {"type": "object"}}],
                       conversation="conv_" + rid("", 20), stream=True)
    c.first("submit_expense", {"amount": 42.5, "currency": "EUR"})
    for i in range(9):
        c.result(f'{{"error": {{"type": "invalid_request", "message": "receipt image is malformed", '
                 f'"trace": "{rid("", 16)}"}}}}', "submit_expense", {"amount": 42.5, "currency": "EUR", "try": i})
    write({"name": "openai_responses_conversation_id", "story": "OpenAI Responses with a `conversation` object "
           "(streamed answers): the provider appends every turn; the agent sends only the failing "
           "`function_call_output`.", "api": c.api, "expect": trips(6, 2), "steps": c.steps})


def responses_chain_healthy():
    c = ResponsesChain("You keep calendars in sync.", "Sync each team calendar once.", SYNC_TOOLS)
    c.first("sync_calendar", {"team": "t0"})
    for i in range(44):
        if i == 5:
            c.result("sync failed: 503 Service Unavailable", "sync_calendar", {"team": "t5"})
        else:
            nxt = i + 1 if i != 4 else 5
            c.result(f"synced team t{i}: {5 + i % 7} events, {i % 3} conflicts resolved",
                     "sync_calendar", {"team": f"t{nxt}"})
    write({"name": "healthy_responses_previous_response_id_chain", "story": "A 45-step OpenAI Responses chain "
           "on `previous_response_id` with novel successful results and one transient 503.",
           "api": c.api, "expect": NEVER, "steps": c.steps})


B62 = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def random_ids_seeded(seed):
    """Random ids the way real tools print them, digit-free ones included:
    uuid4 groups without digits, tempfile and mktemp names, base62 ids."""
    r = random.Random(1000 + seed)

    def pick(alpha, n):
        return "".join(r.choice(alpha) for _ in range(n))

    def uuid4():
        groups = []
        for n in (8, 4, 4, 4, 12):
            groups.append(pick("abcdef", n) if r.random() < 0.5 else pick("0123456789abcdef", n))
        return "-".join(groups)

    def tempname():
        return "tmp" + pick("abcdefghijklmnopqrstuvwxyz_" if r.random() < 0.6 else "abcdefghijklmnopqrstuvwxyz0123456789_", 8)

    def mktemp():
        return "tmp." + pick(LETTERS if r.random() < 0.6 else B62, 10)

    def req_id():
        return "req_" + pick(LETTERS if r.random() < 0.6 else B62, r.choice([16, 20, 24]))

    c = Anthropic("You are a data agent.", "Export the orders table to the warehouse.")
    c.first(lambda: c.call("start_export", {"table": "orders"}))
    for i in range(9):
        tmp = tempname()
        if seed % 2:
            text = (f"upload failed: request {req_id()} for object {uuid4()} rejected "
                    f"(scratch /tmp/{tmp}/orders.csv, part {mktemp()})")
        else:
            text = ("Traceback (most recent call last):\n"
                    f'  File "/srv/agent/tools/export.py", line {80 + i}, in export_table\n'
                    f'    shutil.copy(src, os.path.join(tmpdir, "orders.csv"))\n'
                    f"OSError: [Errno 28] No space left on device: '/tmp/{tmp}/orders.csv'\n"
                    f"(job {uuid4()}, request {req_id()}, scratch {mktemp()})")
        # The agent varies an argument each time, so only the failure text repeats.
        c.result(text, lambda i=i: c.call("start_export", {"table": "orders", "chunk": i + 1}), is_error=seed % 3 == 0)
    trace(f"random_ids_seed_{seed}", f"Seed {seed}: the same failure with random ids the normaliser must "
          "strip — uuids with digit-free groups, tempfile and mktemp names, base62 ids without digits; "
          "a different call each time.", c, trips(6, 2))


BANNER = """============================= test session starts ==============================
platform linux -- Python 3.12.3, pytest-8.3.2, pluggy-1.5.0 -- /home/dev/shop/.venv/bin/python3
cachedir: .pytest_cache
hypothesis profile 'default' -> database=DirectoryBasedExampleDatabase(PosixPath('/home/dev/shop/.hypothesis/examples'))
rootdir: /home/dev/shop
configfile: pyproject.toml
testpaths: tests
plugins: anyio-4.4.0, hypothesis-6.112.0, cov-5.0.0, xdist-3.6.1, asyncio-0.24.0, mock-3.14.0, timeout-2.3.1
asyncio: mode=Mode.STRICT, default_loop_scope=function
timeout: 60.0s
timeout method: signal
timeout func_only: False
"""

TESTS = {
    "test_create_order": ('resp = client.post("/orders", json={"sku": "A-1", "qty": 2})', "assert resp.status_code == 201",
                          "assert 500 == 201", "AssertionError"),
    "test_cancel_order": ('order = make_order(db, status="paid")', "assert cancel(order).status == \"cancelled\"",
                          "KeyError: 'refund_id'", "KeyError"),
    "test_refund_total": ("order = make_order(db, items=3)", "assert refund(order).total == order.total",
                          "AttributeError: 'NoneType' object has no attribute 'total'", "AttributeError"),
    "test_list_orders": ('resp = client.get("/orders?page=2")', "assert len(resp.json[\"items\"]) == 20",
                         "assert 0 == 20", "AssertionError"),
}


def pytest_output(failing, passing=0, secs=0.4):
    out = [BANNER + f"collecting ... collected {len(failing) + passing} items\n"]
    for name in failing:
        out.append(f"tests/test_orders.py::{name} FAILED")
    for k in range(passing):
        out.append(f"tests/test_orders.py::test_ok_{k} PASSED")
    if failing:
        out.append("\n=================================== FAILURES ===================================")
    for name in failing:
        setup, check, err, kind = TESTS[name]
        line = 10 + 7 * list(TESTS).index(name)
        out.append(f"_______________________________ {name} _______________________________\n\n"
                   f"client = <FlaskClient <Flask 'shop'>>\n\n    def {name}(client, db):\n        {setup}\n"
                   f">       {check}\nE       {err}\n\ntests/test_orders.py:{line}: {kind}")
    if failing:
        out.append("=========================== short test summary info ============================")
        for name in failing:
            out.append(f"FAILED tests/test_orders.py::{name} - {TESTS[name][2]}")
        out.append(f"============================== {len(failing)} failed, {passing} passed in {secs:.2f}s ===============================")
    else:
        out.append(f"============================== {passing} passed in {secs:.2f}s ===============================")
    return "\n".join(out)


def pytest_healthy():
    c = Anthropic("You are a coding agent working in /home/dev/shop.", "Make the order tests pass.")
    names = list(TESTS)
    c.first(lambda: c.call("run_tests", {"args": "tests/test_orders.py"}))
    failing = names[:]
    step = 0
    while len(c.steps) < 44:
        step += 1
        # The whole file, then each failing test alone, then --lf: all failing differently.
        c.result(pytest_output(failing, 12 - len(failing), 0.3 + 0.01 * step),
                 lambda f=failing: c.call("run_tests", {"args": f"tests/test_orders.py::{f[0]}"}), is_error=True)
        for k, name in enumerate(failing):
            nxt = (lambda f=failing, k=k: c.call("run_tests", {"args": f"tests/test_orders.py::{f[k + 1]}"})) \
                if k + 1 < len(failing) else (lambda: c.call("run_tests", {"args": "--lf"}))
            c.result(pytest_output([name], 0, 0.1 + 0.01 * k), nxt, is_error=True)
        c.result(pytest_output(failing, 0, 0.2), lambda f=failing: c.call("read_notes", {"path": f"src/shop/{f[0]}.py"}), is_error=True)
        c.result(f"def handler():\n    ...  # {failing[0]} ({step})", lambda f=failing: c.call("apply_patch", {"diff": f"fix {f[0]} {step}"}))
        c.result("patch applied: 1 file changed", lambda: c.call("run_tests", {"args": "tests/test_orders.py"}))
        failing = failing[1:] or names[:]
    trace("healthy_pytest_shared_banner", "A coding agent runs the test file, each failing test alone, then "
          "`--lf`, then patches: five failing runs in a row, all different, under one long pytest session "
          "banner (repeated cycles, 44+ calls).", c, NEVER)


def pytest_same_failure():
    c = Anthropic("You are a coding agent working in /home/dev/shop.", "Make test_create_order pass.")
    c.first(lambda: c.call("run_tests", {"args": "tests/test_orders.py::test_create_order"}))
    spellings = ["tests/test_orders.py::test_create_order", "tests/test_orders.py -k test_create_order"]
    for i in range(9):
        text = pytest_output(["test_create_order"], 0, 0.1 + 0.037 * i).replace(
            "tests/test_orders.py:10:", f"tests/test_orders.py:{10 + i}:")
        text += f"\n(tmp_path: /tmp/pytest-of-dev/pytest-{40 + i}/test_create_order0, hypothesis seed {rng.randint(10**9, 10**10)})"
        c.result(text, lambda i=i: c.call("run_tests", {"args": spellings[i % 2]}), is_error=True)
    trace("pytest_same_failure_repeated", "The same pytest failure again and again (line number, durations, "
          "tmp_path and seed change) while the agent alternates two spellings of the call.", c, trips(6, 2))


def ci_polling(name, story, wait_ms, polls, expect, config=None):
    c = Anthropic("You are a merge agent.", "Merge PR 4821 once CI is green.")
    c.first(lambda: c.call("fetch", {"url": "https://ci.example.com/pr/4821"}))
    steps = c.steps
    c.result("PR 4821: checks queued", lambda: c.call("poll_export", {"id": "ci-pr-4821"}, "Waiting for CI."))
    for i in range(polls):
        c.result("status: pending", lambda: c.call("poll_export", {"id": "ci-pr-4821"}, "Still pending; waiting."))
        steps[-1]["wait_ms"] = wait_ms
    t = {"name": name, "story": story, "api": c.api, "expect": expect, "steps": steps}
    if config:
        t["config"] = config
    write(t)


def polls():
    ci_polling("healthy_ci_polling_with_waits", "A merge agent polls CI 46 times with 20 s between polls; every "
               "answer is a byte-identical `status: pending`.", 20_000, 46, NEVER)
    ci_polling("ci_polling_back_to_back", "The same poll fired back to back (150 ms of tool time, no wait): a "
               "stuck model, not a poller.", 150, 14, trips(10, 3, "no_progress"))
    ci_polling("ci_polling_over_budget", "Identical polls with waits, under a small `poll_budget_tokens` "
               "(4k, cache reads at a tenth): capped by what they cost.", 20_000, 40, trips(18, 3, "poll_budget"),
               {"poll_budget_tokens": 4_000})

def cached_ci_polling():
    # A real merge agent: system prompt and tool schemas of ~40k tokens, all
    # cached; polls every 20 s for 35 minutes (105 polls).
    system = "You are a merge agent. " + " ".join(
        f"Rule {k}: keep the branch green, check the required status checks, never force-push." for k in range(1800))
    c = Anthropic(system, "Merge PR 4821 once CI is green.")
    c.first(lambda: c.call("fetch", {"url": "https://ci.example.com/pr/4821"}))
    c.result("PR 4821: checks queued", lambda: c.call("poll_export", {"id": "ci-pr-4821"}, "Waiting for CI."))
    for i in range(105):
        c.result("status: pending", lambda: c.call("poll_export", {"id": "ci-pr-4821"}, "Still pending; waiting."))
        c.steps[-1]["wait_ms"] = 20_000
    trace("healthy_ci_polling_cached_40k_context", "A merge agent with a ~40k-token cached context polls CI "
          "every 20 s for 35 minutes (105 byte-identical `status: pending`): charged at the cache-read price, "
          "well inside the poll budget.", c, NEVER)


def slow_tool_rerun():
    c = Anthropic("You are a data agent.", "Rebuild the search index.")
    c.first(lambda: c.call("fetch", {"url": "https://search.example.com/rebuild"}))
    c.result("rebuild requested", lambda: c.call("poll_export", {"id": "index-rebuild"}))
    for i in range(206):
        # A 30 s tool re-run, fired again as soon as it returns: the gap looks like a wait.
        c.result("index: 18220 documents, last rebuild 2025-06-03", lambda: c.call("poll_export", {"id": "index-rebuild"}))
        c.steps[-1]["wait_ms"] = 30_000
    trace("slow_tool_rerun_identical_results", "A stuck model re-runs a 30 s tool that returns a byte-identical, "
          "error-free result: the tool time reads as a wait, so only `max_polls` (200) stops it.",
          c, trips(204, 3, "poll_count"))


def pytest_walker():
    c = Anthropic("You are a coding agent working in /home/dev/api.", "Find which API tests fail.")
    c.first(lambda: c.call("run_tests", {"args": "tests/test_api.py::test_case_1"}))
    for n in range(1, 46):
        out = (BANNER + "collecting ... collected 1 item\n\n"
               f"tests/test_api.py::test_case_{n} FAILED\n\n"
               "=================================== FAILURES ===================================\n"
               f"_______________________________ test_case_{n} _______________________________\n\n"
               "    def test_case(client):\n>       assert client.get(url).status_code == 404\n"
               "E       assert 200 == 404\n\ntests/test_api.py:12: AssertionError\n"
               "=========================== short test summary info ============================\n"
               f"FAILED tests/test_api.py::test_case_{n} - assert 200 == 404\n"
               f"============================== 1 failed in {0.1 + 0.01 * n:.2f}s ===============================")
        c.result(out, lambda n=n: c.call("run_tests", {"args": f"tests/test_api.py::test_case_{n + 1}"}), is_error=True)
    trace("healthy_pytest_walking_test_ids", "A coding agent runs test_case_1 … test_case_45 one by one; each fails "
          "with `assert 200 == 404` under one banner: different tests, not a retry (46 calls).", c, NEVER)


if __name__ == "__main__":
    for f in os.listdir(HERE):
        if f.endswith(".json"):
            os.remove(os.path.join(HERE, f))
    notes_incident()
    is_error_results()
    changing_ids()
    user_text_failure()
    streaming()
    upstream_400()
    alternating()
    no_progress()
    chat_runaway()
    responses_runaway()
    long_loop()
    polling()
    transport_retries()
    compaction()
    chat_parallel()
    responses_transient()
    cached_malformed()
    cached_long_loop()
    responses_chain_loop()
    responses_conversation_loop()
    responses_chain_healthy()
    for seed in range(1, 9):
        random_ids_seeded(seed)
    pytest_healthy()
    pytest_same_failure()
    polls()
    cached_ci_polling()
    slow_tool_rerun()
    pytest_walker()
