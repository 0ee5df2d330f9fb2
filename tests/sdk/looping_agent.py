"""A runaway for the end-to-end tests, written against the official
`anthropic` SDK: its tool always fails, it appends the failure and retries.
Writes its pid to `<name>.pid` and each outcome to `<name>.log`."""

import os
import signal
import sys

import anthropic

# Finish the call in flight before exiting, so the refusal that stopped us is logged.
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

name = os.environ["SUPERVISOR_AGENT"]
open(f"{name}.pid", "w").write(str(os.getpid()))
log = open(f"{name}.log", "a", buffering=1)
client = anthropic.Anthropic(max_retries=0)
tools = [{"name": "fetch_notes", "description": "fetch notes",
          "input_schema": {"type": "object", "properties": {"folder": {"type": "string"}}}}]
messages = [{"role": "user", "content": "Summarize the notes."}]
attempt = 0
while True:
    try:
        answer = client.messages.create(model="claude-sonnet-4-5", max_tokens=256,
                                        tools=tools, messages=messages)
    except anthropic.APIStatusError as err:
        log.write(f"refused {err.status_code} {err.body}\n")
        sys.exit(1)
    log.write(f"ok {answer.usage.input_tokens}\n")
    if stopping:
        sys.exit(0)
    messages.append({"role": "assistant", "content": [b.model_dump() for b in answer.content]})
    calls = [b for b in answer.content if b.type == "tool_use"]
    attempt += 1
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": c.id, "is_error": True,
         "content": f"Traceback: ValueError: malformed JSON at char {attempt * 37} (request {attempt})"}
        for c in calls]})
