"""notes-summarizer: the incident this project exists for.

It summarizes meeting notes with a `fetch_notes` tool. From its third task on,
the notes service starts returning malformed JSON. The agent does what many
real agents do: it appends the failure to the conversation and asks the model
again, and the model retries the tool — a bigger prompt every time, forever.
The supervisor sees the retry-with-growing-context pattern and quarantines it.
"""

import json
import signal
import sys
import time

from llm import ApiError, anthropic_messages

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

TOOLS = [{
    "name": "fetch_notes",
    "description": "Fetch the meeting notes of a folder as JSON.",
    "input_schema": {"type": "object", "properties": {"folder": {"type": "string"}}},
}]


def fetch_notes(folder, task, attempt):
    if task < 3:
        return json.dumps({"folder": folder, "notes": [
            {"id": task * 10 + i, "title": f"weekly sync {task}.{i}"} for i in range(3)]})
    # The service broke: truncated JSON with a fresh request id each time.
    return '{"folder": "%s", "request_id": "req_%06d", "notes": [{"id": 3%d, "title": "bud' % (
        folder, attempt * 7919 % 999983, attempt)


task = 0
while True:
    task += 1
    messages = [{"role": "user", "content": f"Summarize the notes of meeting folder {task}."}]
    attempt = 0
    try:
        while True:
            answer = anthropic_messages(messages, "You summarize meeting notes.", TOOLS)
            messages.append({"role": "assistant", "content": answer["content"]})
            calls = [b for b in answer["content"] if b["type"] == "tool_use"]
            if not calls:
                print(f"task {task} summarized")
                break
            results = []
            for call in calls:
                attempt += 1
                raw = fetch_notes(call["input"].get("folder", "inbox"), task, attempt)
                try:
                    notes = json.loads(raw)
                    results.append({"type": "tool_result", "tool_use_id": call["id"],
                                    "content": f"{len(notes['notes'])} notes"})
                except ValueError as err:
                    print(f"task {task}: fetch_notes returned malformed JSON ({err}); retrying "
                          f"with the error in context ({len(json.dumps(messages))} bytes)")
                    results.append({"type": "tool_result", "tool_use_id": call["id"], "is_error": True,
                                    "content": f"malformed response from notes service: {err}: {raw}"})
            messages.append({"role": "user", "content": results})
            time.sleep(0.5)
    except ApiError as err:
        print(f"task {task} stopped: {err}")
        if err.status == 403:
            time.sleep(60)
    time.sleep(1)
