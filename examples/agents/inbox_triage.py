"""soundwave: triages the support inbox through the OpenAI Chat Completions
API: reads new mail with a tool, then files a one-line summary."""

import json
import signal
import sys
import time

from llm import ApiError, openai_chat

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

TOOLS = [{"type": "function", "function": {
    "name": "read_inbox",
    "description": "Read unread support mail.",
    "parameters": {"type": "object", "properties": {"limit": {"type": "integer"}}},
}}]

batch = 0
while True:
    batch += 1
    messages = [{"role": "user", "content": f"Triage inbox batch {batch}."}]
    try:
        for _ in range(6):
            answer = openai_chat(messages, TOOLS)
            message = answer["choices"][0]["message"]
            messages.append(message)
            if not message.get("tool_calls"):
                print(f"batch {batch} triaged: {message['content'][:60]}")
                break
            for call in message["tool_calls"]:
                mail = [{"from": f"user{batch * 3 + i}@example.com", "subject": f"ticket {batch}-{i}"}
                        for i in range(3)]
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(mail)})
    except ApiError as err:
        print(f"batch {batch} failed: {err}")
    time.sleep(3)
