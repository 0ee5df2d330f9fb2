"""sparkles: a research assistant. Each task is a short tool loop (Anthropic
Messages API): the model asks for a search, gets fresh results, answers."""

import signal
import sys
import time

from llm import ApiError, anthropic_messages

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

TOOLS = [{
    "name": "search_notes",
    "description": "Search the team's research notes.",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}]
TOPICS = ["release notes for 2.4", "latency regressions", "customer interviews",
          "pricing experiments", "the on-call handbook"]


def search(query, n):
    return f"{3 + n % 4} notes match '{query}': newest from day {n}, tagged #{n * 7 % 50}"


task = 0
while True:
    topic = TOPICS[task % len(TOPICS)]
    messages = [{"role": "user", "content": f"Research {topic} and summarize it."}]
    try:
        for _ in range(6):
            answer = anthropic_messages(messages, "You are a careful research assistant.", TOOLS)
            messages.append({"role": "assistant", "content": answer["content"]})
            calls = [b for b in answer["content"] if b["type"] == "tool_use"]
            if not calls:
                print(f"task {task + 1} done: {topic} ({answer['usage']['input_tokens']} input tokens)")
                break
            results = [{"type": "tool_result", "tool_use_id": c["id"],
                        "content": search(c["input"].get("query", topic), task)} for c in calls]
            messages.append({"role": "user", "content": results})
    except ApiError as err:
        print(f"task {task + 1} failed: {err}")
    task += 1
    time.sleep(2)
