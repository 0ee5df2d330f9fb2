"""A stdlib-only agent for the tuning and soft-alert tests: calls the Messages
API through the proxy and logs one line per answer to `<name>.log`
(`ok <status> <tokens>` or `refused <status> <body>`).

PROMPT_BYTES pads each prompt (to use tokens faster). MODE=loop: call every
0.1s forever. MODE=gate: one call, then wait for a file
named `go` in the working directory, then one more call, then idle."""

import json
import os
import time
import urllib.error
import urllib.request

name = os.environ["SUPERVISOR_AGENT"]
base = os.environ["ANTHROPIC_BASE_URL"].rstrip("/")
key = os.environ["ANTHROPIC_API_KEY"]
max_tokens = int(os.environ.get("MAX_TOKENS", "64"))
padding = "x" * int(os.environ.get("PROMPT_BYTES", "0"))
log = open(f"{name}.log", "a", buffering=1)
open(f"{name}.pid", "w").write(str(os.getpid()))


def call(n):
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": f"status report {n} {padding}"}]}).encode()
    req = urllib.request.Request(base + "/v1/messages", data=body, method="POST", headers={
        "x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            usage = json.load(answer)["usage"]
            log.write(f"ok {answer.status} {usage['input_tokens'] + usage['output_tokens']}\n")
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace").replace("\n", " ")
        log.write(f"refused {err.code} {text}\n")


if os.environ.get("MODE") == "gate":
    call(1)
    while not os.path.exists("go"):
        time.sleep(0.05)
    call(2)
    while True:
        time.sleep(1)
else:
    n = 0
    while True:
        n += 1
        call(n)
        time.sleep(0.1)
