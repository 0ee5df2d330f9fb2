"""An agent for the SDK tests: the official `anthropic` and `openai` SDKs,
configured only by the environment the supervisor gives it (scoped token and
base URL), make JSON and streaming calls through the metering proxy. Writes
what each SDK reported to `sdk-report.json`, then idles."""

import json
import os
import time

import anthropic
import openai

report = {"anthropic": [], "openai": []}
a = anthropic.Anthropic()      # ANTHROPIC_API_KEY + ANTHROPIC_BASE_URL from the env
o = openai.OpenAI()            # OPENAI_API_KEY + OPENAI_BASE_URL from the env
ask = [{"role": "user", "content": "How many notes are there today?"}]

m = a.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=ask)
report["anthropic"].append([m.usage.input_tokens, m.usage.output_tokens])
with a.messages.stream(model="claude-sonnet-4-5-cache-read-24", max_tokens=64, messages=ask) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
report["anthropic"].append([final.usage.input_tokens, final.usage.output_tokens])
assert text, "streamed text arrived"

c = o.chat.completions.create(model="gpt-4.1", messages=ask)
report["openai"].append([c.usage.prompt_tokens, c.usage.completion_tokens])
chunks = list(o.chat.completions.create(model="gpt-4.1", messages=ask, stream=True))
assert all(ch.usage is None for ch in chunks), "no usage chunk the client did not ask for"
report["openai"].append(len(chunks))
chunks = list(o.chat.completions.create(model="gpt-4.1", messages=ask, stream=True,
                                        stream_options={"include_usage": True}))
report["openai"].append([chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens])
r = o.responses.create(model="gpt-4.1", input="Summarize the notes.")
report["openai"].append([r.usage.input_tokens, r.usage.output_tokens])

try:
    a.with_options(max_retries=0).messages.create(
        model="claude-sonnet-4-5-fake-529", max_tokens=64, messages=ask)
except anthropic.APIStatusError as err:
    report["anthropic"].append(["error", err.status_code])

with open("sdk-report.json.tmp", "w") as f:
    json.dump(report, f)
os.rename("sdk-report.json.tmp", "sdk-report.json")
while True:
    time.sleep(60)
