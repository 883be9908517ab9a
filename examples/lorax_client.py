"""LoRAX's own Python client (`pip install --no-deps lorax-client`) against loragate, unchanged:
`adapter_id` picks an adapter, `generate_stream` streams tokens, `merged_adapters` merges
adapters for one request.

Start the demo server (`loragate serve`), then run `python examples/lorax_client.py`.
LORAGATE_BASE_URL and LORAGATE_API_KEY point it elsewhere (LoRAX's API lives at the server root,
beside /v1).
"""
import os

from lorax import Client, MergedAdapters

base_url = os.environ.get("LORAGATE_BASE_URL", "http://127.0.0.1:8000/v1").removesuffix("/v1")
client = Client(base_url, headers={"Authorization": f"Bearer {os.environ.get('LORAGATE_API_KEY', 'none')}"})
MESSAGE = "moon river cat"


def prompt(text: str) -> str:
    """LoRAX sends `inputs` to the model as they are: format them with the model's chat template
    (the demo's is `<s><|user|>\\n...<|end|>\\n<|assistant|>\\n`), as you would for LoRAX."""
    return f"<s><|user|>\n{text}<|end|>\n<|assistant|>\n"


response = client.generate(prompt(MESSAGE), adapter_id="shout", max_new_tokens=32)
print(f"shout: {response.generated_text!r} ({response.details.finish_reason.value}, "
      f"{response.details.generated_tokens} tokens)")

print("reverse, streamed: ", end="")
for event in client.generate_stream(prompt(MESSAGE), adapter_id="reverse", max_new_tokens=32):
    if not event.token.special:
        print(event.token.text, end="|", flush=True)
print()

merged = MergedAdapters(ids=["shout", "title"], weights=[1.0, 1.0], merge_strategy="linear", density=1.0)
response = client.generate(prompt(MESSAGE), merged_adapters=merged, max_new_tokens=32)
print(f"shout+title merged: {response.generated_text!r}")
