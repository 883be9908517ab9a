"""The official openai SDK against loragate: every adapter is just another model name.

Start the demo server (`loragate serve`), then run `python examples/openai_sdk.py`.
LORAGATE_BASE_URL and LORAGATE_API_KEY point it elsewhere.
"""
import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("LORAGATE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("LORAGATE_API_KEY", "none"),
)
MESSAGE = "Hello, how are you?"


def chat(model: str, text: str) -> str:
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        temperature=0,
        max_tokens=128,  # the demo model writes one character per token
    )
    return response.choices[0].message.content


print("models:", ", ".join(m.id for m in client.models.list()))

print(f"\nmessage: {MESSAGE!r}")
for model in ("shout", "reverse"):
    print(f"{model:>8}: {chat(model, MESSAGE)!r}")

print("\npig-latin, streamed (| marks token boundaries): ", end="", flush=True)
stream = client.chat.completions.create(
    model="pig-latin",
    messages=[{"role": "user", "content": MESSAGE}],
    temperature=0,
    max_tokens=128,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="|", flush=True)
print()
