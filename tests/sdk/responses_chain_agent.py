"""A healthy agent loop on server-side state, written against the official
`openai` SDK: ten turns, each continuing the last answer with
`previous_response_id` and sending only its new input, no output cap, every
other turn streamed. Writes its pid to `<name>.pid` and each outcome to
`<name>.log` (`ok <input_tokens> <id>` or `refused <status> <body>`), then
`done`, and idles until stopped."""

import os
import signal
import time

import openai

stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

name = os.environ["SUPERVISOR_AGENT"]
open(f"{name}.pid", "w").write(str(os.getpid()))
log = open(f"{name}.log", "a", buffering=1)
client = openai.OpenAI(max_retries=0)
previous = None
for turn in range(10):
    args = dict(model="gpt-5", instructions="You are a careful agent.",
                input=[{"role": "user", "content": f"Turn {turn}: the tool printed {turn * 17} lines; go on."}])
    if previous is not None:
        args["previous_response_id"] = previous
    try:
        if turn % 2:
            resp = None
            for event in client.responses.create(stream=True, **args):
                if event.type == "response.completed":
                    resp = event.response
        else:
            resp = client.responses.create(**args)
    except openai.APIStatusError as err:
        log.write(f"refused {err.status_code} {err.body}\n")
        break
    log.write(f"ok {resp.usage.input_tokens} {resp.id}\n")
    previous = resp.id
log.write("done\n")
while not stopping:
    time.sleep(0.2)
