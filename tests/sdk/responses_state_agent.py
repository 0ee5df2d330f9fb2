"""A runaway on server-side conversation state, written against the official
`openai` SDK: it continues each answer with `responses.create(
previous_response_id=...)`, sending only its new input — the complaint that
the reply was not the JSON it wanted (with a fresh request id each time).
Writes its pid to `<name>.pid` and each outcome to `<name>.log`; after 12
calls it logs `gave up` and idles, so a loop the supervisor misses fails the
test instead of running forever."""

import json
import os
import signal
import sys
import time
import uuid

import openai

# Finish the call in flight before exiting, so the refusal that stopped us is logged.
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

name = os.environ["SUPERVISOR_AGENT"]
open(f"{name}.pid", "w").write(str(os.getpid()))
log = open(f"{name}.log", "a", buffering=1)
client = openai.OpenAI(max_retries=0)
INSTRUCTIONS = "Reply only with a JSON object {\"summary\": string}."
previous = None
new_input = "Summarise: 'Q3 planning moved to Thursday; budget review pending.'"
for attempt in range(1, 13):
    try:
        if previous is None:
            resp = client.responses.create(model="gpt-4.1", instructions=INSTRUCTIONS, input=new_input,
                                           max_output_tokens=256)
        else:
            resp = client.responses.create(model="gpt-4.1", instructions=INSTRUCTIONS, input=new_input,
                                           max_output_tokens=256, previous_response_id=previous)
    except openai.APIStatusError as err:
        log.write(f"refused {err.status_code} {err.body}\n")
        sys.exit(1)
    log.write(f"ok {resp.usage.input_tokens} {resp.id} {resp.previous_response_id}\n")
    if stopping:
        sys.exit(0)
    try:
        json.loads(resp.output_text)
        log.write("done\n")
        break
    except json.JSONDecodeError as err:
        previous = resp.id
        new_input = [{"role": "user", "content": f"Your reply was not valid JSON (JSONDecodeError: {err}; "
                                                 f"request {uuid.uuid4()}). Reply again with only the JSON object."}]
log.write("gave up\n")
while not stopping:
    time.sleep(0.2)
