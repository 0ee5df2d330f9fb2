"""An alert sink for the demo: appends each alert (one JSON document on
stdin) as one line to the file named by its argument, the demo's
`.supervisor/alerts.jsonl`, creating the file (and its directory) if needed.

It prints nothing: the supervisor discards an alert command's stdout and
logs its stderr only when it exits non-zero. The event itself is already in
the supervisor's log (e.g. the `quarantined: runaway ...` line)."""

import json
import os
import sys

if len(sys.argv) != 2:
    sys.exit("usage: alert_log.py FILE  (the alert's JSON on stdin)")
alert = json.load(sys.stdin)
os.makedirs(os.path.dirname(sys.argv[1]) or ".", exist_ok=True)
with open(sys.argv[1], "a") as log:
    log.write(json.dumps(alert) + "\n")
