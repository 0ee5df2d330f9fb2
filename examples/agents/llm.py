"""Tiny LLM clients for the example agents: Python standard library only.

They speak the providers' real wire formats to whatever base URL the
supervisor put in the environment (its metering proxy), with the scoped token
it put there. The same code works against the real APIs.
"""

import json
import os
import urllib.error
import urllib.request


class ApiError(Exception):
    def __init__(self, status, body):
        self.status = status
        self.body = body
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body[:200]
        super().__init__(f"HTTP {status}: {message}")


def _post(url, headers, payload, timeout=60):
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        raise ApiError(err.code, err.read().decode(errors="replace")) from None


def anthropic_messages(messages, system, tools, model="claude-sonnet-4-5", max_tokens=512):
    """POST /v1/messages; returns the parsed answer."""
    base = os.environ["ANTHROPIC_BASE_URL"].rstrip("/")
    return _post(
        f"{base}/v1/messages",
        {"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"},
        {"model": model, "max_tokens": max_tokens, "system": system,
         "tools": tools, "messages": messages},
    )


def openai_chat(messages, tools, model="gpt-4.1-mini", max_tokens=512):
    """POST /v1/chat/completions; returns the parsed answer."""
    base = os.environ["OPENAI_BASE_URL"].rstrip("/")
    return _post(
        f"{base}/chat/completions",
        {"authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"},
        {"model": model, "max_tokens": max_tokens, "tools": tools, "messages": messages},
    )
