"""Prefix caching with the openai SDK: requests that share a system prompt reuse its KV blocks.

Start the demo server (`loragate serve`; caching is on by default), then run
`python examples/prefix_caching.py`. LORAGATE_BASE_URL and LORAGATE_API_KEY point it elsewhere.
`usage.prompt_tokens_details.cached_tokens` says how many prompt tokens were not prefilled again
(whole KV blocks of the prompt's start, computed earlier by the same model or adapter weights).
"""
import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("LORAGATE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("LORAGATE_API_KEY", "none"),
)
SYSTEM = "You are the assistant of a small bakery. Answer in a few words, about bread and cakes only."

for model, text in (("shout", "moon river cat"), ("shout", "cat moon river"), ("reverse", "cat moon river")):
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        temperature=0,
        max_tokens=16,
    )
    usage = response.usage
    print(f"{model:>8} {text!r}: prompt_tokens={usage.prompt_tokens} "
          f"cached_tokens={usage.prompt_tokens_details.cached_tokens}")
