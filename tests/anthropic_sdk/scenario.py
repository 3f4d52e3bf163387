"""Scenarios run with the official `anthropic` Python SDK against ProxyPal.

Called by bins/proxypal-server/tests/integration/anthropic.rs:

    python scenario.py <name>...

with ANTHROPIC_BASE_URL (the proxy, no /v1) and ANTHROPIC_API_KEY (a client
token) set. Prints one JSON object per scenario, one per line: what the SDK saw. The Rust test asserts
on it (and on what the simulated upstream received).
"""

import base64
import json
import os
import sys

import anthropic

MODEL = os.environ.get("SCENARIO_MODEL", "claude-sonnet-4-5-20250929")
client = anthropic.Anthropic(max_retries=0, timeout=20)

WEATHER = {
    "name": "get_weather",
    "description": "The weather at a place.",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["location"],
    },
}
TIME = {
    "name": "get_time",
    "description": "The time in a zone.",
    "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
}
# A 1x1 PNG.
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
).decode()


def blocks(message):
    out = []
    for b in message.content:
        if b.type == "text":
            out.append({"type": "text", "text": b.text})
        elif b.type == "tool_use":
            out.append({"type": "tool_use", "id": b.id, "name": b.name, "input": b.input})
    return out


def summary(message):
    return {
        "id": message.id,
        "model": message.model,
        "content": blocks(message),
        "stop_reason": message.stop_reason,
        "stop_sequence": message.stop_sequence,
        "usage": {"input": message.usage.input_tokens, "output": message.usage.output_tokens},
    }


def user(text):
    return [{"role": "user", "content": text}]


def plain():
    return summary(client.messages.create(model=MODEL, max_tokens=256, messages=user("Hello")))


def streaming():
    with client.messages.stream(model=MODEL, max_tokens=256, messages=user("Hello")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return {"text": text, "final": summary(final)}


def tool_round_trip():
    history = user("What is the weather in Paris?")
    first = client.messages.create(model=MODEL, max_tokens=256, tools=[WEATHER], messages=history)
    calls = [b for b in first.content if b.type == "tool_use"]
    history.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    history.append(
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny, 21 C"}],
        }
    )
    second = client.messages.create(model=MODEL, max_tokens=256, tools=[WEATHER], messages=history)
    return {"first": summary(first), "second": summary(second)}


def parallel_tools_streamed():
    with client.messages.stream(
        model=MODEL, max_tokens=256, tools=[WEATHER, TIME], messages=user("Use parallel tools please")
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    return {"events": events, "final": summary(final)}


def stop_sequences():
    return summary(
        client.messages.create(model=MODEL, max_tokens=256, stop_sequences=["simulated"], messages=user("Hello"))
    )


def image():
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "text", "text": "What is in this picture?"},
    ]
    return summary(client.messages.create(model=MODEL, max_tokens=256, messages=[{"role": "user", "content": content}]))


def rate_limited():
    try:
        client.messages.create(model=MODEL, max_tokens=16, messages=user("Hello"))
        return {"error": None}
    except anthropic.RateLimitError as e:
        return {
            "error": type(e).__name__,
            "status": e.status_code,
            "retry_after": e.response.headers.get("retry-after"),
            "type": e.body.get("error", {}).get("type") if isinstance(e.body, dict) else None,
        }


def broken_stream():
    seen = []
    try:
        with client.messages.stream(model=MODEL, max_tokens=256, messages=user("Hello")) as stream:
            for event in stream:
                seen.append(event.type)
        return {"error": None, "events": seen}
    except anthropic.APIError as e:
        return {"error": type(e).__name__, "message": str(e), "events": seen}


def raw_headers():
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=user("Hello"))
    message = raw.parse()
    return {
        "route": raw.headers.get("x-proxypal-route"),
        "attempts": raw.headers.get("x-proxypal-attempts"),
        "message": summary(message),
    }


def count_tokens():
    return {"input_tokens": client.messages.count_tokens(model=MODEL, messages=user("Hello there")).input_tokens}


if __name__ == "__main__":
    # One JSON line per scenario named, in order (one interpreter start for several).
    for name in sys.argv[1:]:
        print(json.dumps(globals()[name]()), flush=True)
