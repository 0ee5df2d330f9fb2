"""An alert sink for the demo: appends each alert (JSON on stdin) to a file
and prints its one-line text, so it shows up in the supervisor's log."""

import json
import sys

alert = json.load(sys.stdin)
with open(sys.argv[1], "a") as log:
    log.write(json.dumps(alert) + "\n")
print(f"ALERT: {alert.get('text', alert)}")
