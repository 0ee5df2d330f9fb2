"""Proves the official `anthropic` and `openai` SDKs parse the fake upstream.

Run by tests/fake_upstream_selftest.rs against a running fake:
    FAKE_URL=http://127.0.0.1:PORT ANTHROPIC_KEY=... OPENAI_KEY=... python fake_selfcheck.py
Each call is tagged with an `x-check: NAME` header so the Rust side can find its
request in the fake's log. Prints one JSON object {NAME: result} on stdout; the
Rust test holds the usage the SDK parsed against what the fake billed. Exits 1
with a message on the first check that fails.
"""

import json
import os
import sys

import anthropic
import openai

URL = os.environ["FAKE_URL"]
A_KEY = os.environ["ANTHROPIC_KEY"]
O_KEY = os.environ["OPENAI_KEY"]

results = {}


def fail(name, message):
    print(f"fake_selfcheck: {name}: {message}", file=sys.stderr)
    sys.exit(1)


def expect(name, cond, message):
    if not cond:
        fail(name, message)


def tag(name):
    return {"x-check": name}


def a_usage(u):
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens or 0,
        "cache_read_input_tokens": u.cache_read_input_tokens or 0,
    }


def chat_usage(u):
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    return {
        "input_tokens": u.prompt_tokens - cached,
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def responses_usage(u):
    cached = u.input_tokens_details.cached_tokens
    return {
        "input_tokens": u.input_tokens - cached,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


MSGS = [{"role": "user", "content": "Say hello to the fake upstream."}]

# --- Anthropic -------------------------------------------------------------

ac = anthropic.Anthropic(base_url=URL, api_key=A_KEY, max_retries=0, timeout=20)

name = "anthropic_create"
m = ac.messages.create(
    model="claude-fake-cache-read-40-cache-write-7", max_tokens=100, messages=MSGS, extra_headers=tag(name)
)
expect(name, m.stop_reason == "end_turn", f"stop_reason {m.stop_reason!r}")
results[name] = {"usage": a_usage(m.usage), "text": m.content[0].text}

name = "anthropic_stream_helper"
with ac.messages.stream(model="claude-fake", max_tokens=5, messages=MSGS, extra_headers=tag(name)) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
expect(name, final.stop_reason == "max_tokens", f"stop_reason {final.stop_reason!r}")
expect(name, final.content[0].text == text, "final text differs from streamed text")
results[name] = {"usage": a_usage(final.usage), "text": text}

name = "anthropic_stream_raw"
events = []
usage = None
for ev in ac.messages.create(
    model="claude-fake-cache-read-9", max_tokens=100, messages=MSGS, stream=True, extra_headers=tag(name)
):
    events.append(ev.type)
    if ev.type == "message_start":
        usage = a_usage(ev.message.usage)
    elif ev.type == "message_delta":
        usage["output_tokens"] = ev.usage.output_tokens
results[name] = {"usage": usage, "events": events}

name = "anthropic_error_midstream"
deltas = 0
try:
    for ev in ac.messages.create(
        model="claude-fake-error-midstream", max_tokens=100, messages=MSGS, stream=True, extra_headers=tag(name)
    ):
        if ev.type == "content_block_delta":
            deltas += 1
    fail(name, "no error raised")
except anthropic.APIStatusError as e:
    expect(name, e.body["error"]["type"] == "overloaded_error", f"body {e.body!r}")
    results[name] = {"error": type(e).__name__, "deltas": deltas}

name = "anthropic_cut"
try:
    for ev in ac.messages.create(
        model="claude-fake-cut", max_tokens=100, messages=MSGS, stream=True, extra_headers=tag(name)
    ):
        pass
    fail(name, "cut stream ended without an error")
except Exception as e:  # the transport's own error type: not wrapped by the SDK mid-stream
    results[name] = {"error": f"{type(e).__module__}.{type(e).__name__}"}

for name, model, status in [
    ("anthropic_529", "claude-fake-529", 529),
    ("anthropic_500", "claude-fake-500", 500),
    ("anthropic_400", "claude-fake-400", 400),
]:
    try:
        ac.messages.create(model=model, max_tokens=10, messages=MSGS, extra_headers=tag(name))
        fail(name, "no error raised")
    except anthropic.APIStatusError as e:
        expect(name, e.status_code == status, f"status {e.status_code}")
        results[name] = {"error": type(e).__name__, "status": e.status_code, "type": e.body["error"]["type"]}

name = "anthropic_429_retried"
try:
    ac.with_options(max_retries=1).messages.create(
        model="claude-fake-429", max_tokens=10, messages=MSGS, extra_headers=tag(name)
    )
    fail(name, "no error raised")
except anthropic.RateLimitError as e:
    results[name] = {"error": type(e).__name__, "status": e.status_code}

name = "anthropic_401"
try:
    anthropic.Anthropic(base_url=URL, api_key="sk-ant-wrong", max_retries=0).messages.create(
        model="claude-fake", max_tokens=10, messages=MSGS, extra_headers=tag(name)
    )
    fail(name, "no error raised")
except anthropic.AuthenticationError as e:
    results[name] = {"error": type(e).__name__, "status": e.status_code}

name = "anthropic_models"
ids = [model.id for model in ac.models.list(extra_headers=tag(name))]
results[name] = {"ids": ids}

# --- OpenAI ----------------------------------------------------------------

oc = openai.OpenAI(base_url=URL + "/v1", api_key=O_KEY, max_retries=0, timeout=20)

name = "chat_create"
c = oc.chat.completions.create(model="gpt-fake-cache-read-64", messages=MSGS, extra_headers=tag(name))
expect(name, c.choices[0].finish_reason == "stop", f"finish_reason {c.choices[0].finish_reason!r}")
results[name] = {"usage": chat_usage(c.usage), "text": c.choices[0].message.content}

name = "chat_stream_no_usage"
text = ""
for chunk in oc.chat.completions.create(model="gpt-fake", messages=MSGS, stream=True, extra_headers=tag(name)):
    expect(name, chunk.usage is None, "a chunk carried usage without include_usage")
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    else:
        fail(name, "a chunk without choices arrived without include_usage")
results[name] = {"text": text}

name = "chat_stream_include_usage"
chunks = list(
    oc.chat.completions.create(
        model="gpt-fake-cache-read-5",
        messages=MSGS,
        max_completion_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=tag(name),
    )
)
last = chunks[-1]
expect(name, last.choices == [] and last.usage is not None, "last chunk is not the usage chunk")
expect(name, all(ch.usage is None for ch in chunks[:-1]), "usage before the last chunk")
finish = [ch.choices[0].finish_reason for ch in chunks[:-1] if ch.choices[0].finish_reason]
expect(name, finish == ["length"], f"finish reasons {finish!r}")
text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
results[name] = {"usage": chat_usage(last.usage), "text": text}

name = "chat_stream_helper"
with oc.chat.completions.stream(
    model="gpt-fake", messages=MSGS, stream_options={"include_usage": True}, extra_headers=tag(name)
) as s:
    for _ in s:
        pass
    final = s.get_final_completion()
results[name] = {"usage": chat_usage(final.usage), "text": final.choices[0].message.content}

name = "chat_error_midstream"
try:
    for _ in oc.chat.completions.create(
        model="gpt-fake-error-midstream", messages=MSGS, stream=True, extra_headers=tag(name)
    ):
        pass
    fail(name, "no error raised")
except openai.APIError as e:
    results[name] = {"error": type(e).__name__}

name = "chat_cut"
try:
    for _ in oc.chat.completions.create(model="gpt-fake-cut", messages=MSGS, stream=True, extra_headers=tag(name)):
        pass
    fail(name, "cut stream ended without an error")
except Exception as e:  # the transport's own error type: not wrapped by the SDK mid-stream
    results[name] = {"error": f"{type(e).__module__}.{type(e).__name__}"}

for name, model, status in [("chat_429", "gpt-fake-429", 429), ("chat_529", "gpt-fake-529", 503)]:
    try:
        oc.chat.completions.create(model=model, messages=MSGS, extra_headers=tag(name))
        fail(name, "no error raised")
    except openai.APIStatusError as e:
        expect(name, e.status_code == status, f"status {e.status_code}")
        results[name] = {"error": type(e).__name__, "status": e.status_code}

name = "openai_401"
try:
    openai.OpenAI(base_url=URL + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
        model="gpt-fake", messages=MSGS, extra_headers=tag(name)
    )
    fail(name, "no error raised")
except openai.AuthenticationError as e:
    results[name] = {"error": type(e).__name__, "status": e.status_code, "code": e.code}

name = "responses_create"
r = oc.responses.create(
    model="gpt-fake-cache-read-11", instructions="Be brief.", input="Hello?", extra_headers=tag(name)
)
expect(name, r.status == "completed", f"status {r.status!r}")
results[name] = {"usage": responses_usage(r.usage), "text": r.output_text}

name = "responses_truncated"
r = oc.responses.create(model="gpt-fake", input=MSGS, max_output_tokens=3, extra_headers=tag(name))
expect(name, r.status == "incomplete", f"status {r.status!r}")
expect(name, r.incomplete_details.reason == "max_output_tokens", f"details {r.incomplete_details!r}")
results[name] = {"usage": responses_usage(r.usage), "text": r.output_text}

name = "responses_stream_raw"
events = []
usage = None
for ev in oc.responses.create(model="gpt-fake", input="Hello?", stream=True, extra_headers=tag(name)):
    events.append(ev.type)
    if ev.type == "response.completed":
        usage = responses_usage(ev.response.usage)
results[name] = {"usage": usage, "events": events}

name = "responses_stream_helper"
with oc.responses.stream(model="gpt-fake", input="Hello?", extra_headers=tag(name)) as s:
    text = "".join(ev.delta for ev in s if ev.type == "response.output_text.delta")
    final = s.get_final_response()
expect(name, final.output_text == text, "final text differs from streamed text")
results[name] = {"usage": responses_usage(final.usage), "text": text}

name = "responses_error_midstream"
seen = []
try:
    for ev in oc.responses.create(
        model="gpt-fake-error-midstream", input="Hello?", stream=True, extra_headers=tag(name)
    ):
        seen.append(ev.type)
except openai.APIError as e:
    seen.append("raised:" + type(e).__name__)
expect(name, any(t == "error" or t.startswith("raised:") for t in seen), f"no error seen in {seen!r}")
results[name] = {"events": seen}

name = "openai_models"
ids = [model.id for model in oc.models.list(extra_headers=tag(name))]
results[name] = {"ids": ids}

print(json.dumps(results))
