#!/usr/bin/env python3
"""The OpenAI Python SDK through ProxyPal: plain and streaming chat, and the model list.

    pip install openai
    cargo run --release -p proxypal-server -- --dev      # in another terminal
    python3 examples/openai_client.py

Environment: PROXYPAL_URL (default http://127.0.0.1:8080/v1), PROXYPAL_TOKEN
(your ProxyPal client token if auth.tokens is set; any string otherwise), MODEL.
Exits non-zero if anything is off, so CI can run it against --dev.
"""

import os
import sys

from openai import OpenAI

base_url = os.environ.get("PROXYPAL_URL", "http://127.0.0.1:8080/v1")
token = os.environ.get("PROXYPAL_TOKEN", "not-needed-without-auth-tokens")
model = os.environ.get("MODEL", "meta/llama-3.1-8b-instruct")

client = OpenAI(base_url=base_url, api_key=token, max_retries=2, timeout=60)

models = client.models.list()
print("models:", ", ".join(m.id for m in models.data[:3]), "…")

reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello in five words."}],
)
text = reply.choices[0].message.content
print("plain:", text)

chunks = 0
streamed = []
stream = client.chat.completions.create(
    model=model,
    stream=True,
    messages=[{"role": "user", "content": "Count to five."}],
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        streamed.append(chunk.choices[0].delta.content)
        chunks += 1
print(f"streamed ({chunks} chunks):", "".join(streamed))

if not text or chunks < 2:
    sys.exit("unexpected reply: empty text or no streaming chunks")
