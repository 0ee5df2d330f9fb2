"""A cache-aware runaway for the end-to-end tests, written against the official
`anthropic` SDK the way cache-aware agent loops are: `cache_control` on the
system block, the last tool and the last two user turns — moved every call and
taken off older turns, a string content turned into a text block to carry it.
Its tool always returns malformed output; it appends the parse failure and
retries. Writes its pid to `<name>.pid` and each outcome to `<name>.log`; after
12 calls it logs `gave up` and idles, so a loop the supervisor misses fails the
test instead of running forever."""

import copy
import os
import signal
import sys
import time

import anthropic

# Finish the call in flight before exiting, so the refusal that stopped us is logged.
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

name = os.environ["SUPERVISOR_AGENT"]
open(f"{name}.pid", "w").write(str(os.getpid()))
log = open(f"{name}.log", "a", buffering=1)
client = anthropic.Anthropic(max_retries=0)
TOOLS = [
    {"name": "write_summary", "description": "write the summary",
     "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}},
    {"name": "read_notes", "description": "read a notes file",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}},
]
SYSTEM = [{"type": "text", "text": "You summarise meeting notes.", "cache_control": {"type": "ephemeral"}}]
messages = [{"role": "user", "content": "Summarise notes/standup.md."}]


def with_breakpoints(history):
    """The request's messages: breakpoints on the last two user turns only."""
    out = copy.deepcopy(history)
    users = [m for m in out if m["role"] == "user"]
    for m in users[-2:]:
        if isinstance(m["content"], str):
            m["content"] = [{"type": "text", "text": m["content"]}]
        m["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return out


tools = copy.deepcopy(TOOLS)
tools[-1]["cache_control"] = {"type": "ephemeral"}
for attempt in range(1, 13):
    try:
        answer = client.messages.create(model="claude-sonnet-4-5", max_tokens=256, system=SYSTEM,
                                        tools=tools, messages=with_breakpoints(messages))
    except anthropic.APIStatusError as err:
        log.write(f"refused {err.status_code} {err.body}\n")
        sys.exit(1)
    log.write(f"ok {answer.usage.input_tokens}\n")
    if stopping:
        sys.exit(0)
    messages.append({"role": "assistant",
                     "content": [b.model_dump(exclude_none=True) for b in answer.content]})
    col = 500 + 37 * attempt
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": b.id,
         "content": "Traceback (most recent call last):\n"
                    '  File "/srv/tools/notes.py", line 88, in read_notes\n'
                    "    return json.loads(raw)\n"
                    f"json.decoder.JSONDecodeError: Expecting ',' delimiter: line 1 column {col} (char {col - 1})"}
        for b in answer.content if b.type == "tool_use"]})
log.write("gave up\n")
while not stopping:
    time.sleep(0.2)
