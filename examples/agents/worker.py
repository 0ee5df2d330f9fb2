"""A small stand-in agent for the bundled fleet: does a unit of "work" every few
seconds and says so, exits cleanly on SIGTERM. Python standard library only.

It shows what an agent receives from the supervisor: its own name, its own
settings, and only its own secrets (reported by name and length, never value).
"""

import os
import signal
import sys
import time

AGENT = os.environ.get("SUPERVISOR_AGENT", "?")
TASK = os.environ.get("TASK", "working")
INTERVAL = float(os.environ.get("INTERVAL_SECONDS", "3"))


def on_term(signum, frame):
    print(f"received signal {signum}, finishing up", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)

secrets = sorted(k for k in os.environ if k.endswith(("_KEY", "_TOKEN", "_PASSWORD")))
print(f"{AGENT} up (pid {os.getpid()}); task: {TASK}; secrets it holds: {secrets or 'none'}")
step = 0
while True:
    step += 1
    print(f"step {step}: {TASK}")
    time.sleep(INTERVAL)
