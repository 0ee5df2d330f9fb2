"""A healthy agent for the end-to-end tests (official `anthropic` SDK): one
short conversation after another, each line of `<name>.log` a success."""

import os
import time

import anthropic

name = os.environ["SUPERVISOR_AGENT"]
open(f"{name}.pid", "w").write(str(os.getpid()))
log = open(f"{name}.log", "a", buffering=1)
client = anthropic.Anthropic()
n = 0
while True:
    n += 1
    try:
        answer = client.messages.create(model="claude-sonnet-4-5", max_tokens=128,
                                        messages=[{"role": "user", "content": f"status report {n}"}])
        log.write(f"ok {answer.usage.input_tokens}\n")
    except anthropic.APIError as err:
        log.write(f"error {err}\n")
    time.sleep(0.2)
