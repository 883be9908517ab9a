"""Structured outputs with the openai SDK: `chat.completions.parse` turns a Pydantic model into a
JSON schema, the server constrains generation to it, and the SDK hands back a model instance.

This works on any model and adapter, even the tiny demo model, which has no idea what a ticket is:
the grammar guarantees the answer parses and validates, the model only picks the values. Beyond
OpenAI's response_format, vLLM-style constraints (choice, regex, grammar) ride in `extra_body`.

Start the demo server (`loragate serve`), then run `python examples/structured_output.py`.
LORAGATE_BASE_URL and LORAGATE_API_KEY point it elsewhere.
"""
import os
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(
    base_url=os.environ.get("LORAGATE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("LORAGATE_API_KEY", "none"),
)
MESSAGE = [{"role": "user", "content": "moon river cat"}]


class Ticket(BaseModel):
    title: str = Field(max_length=20)
    priority: Literal["low", "medium", "high"]
    urgent: bool
    estimate_hours: int = Field(ge=1, le=40)


for model in ("loragate-demo", "shout"):  # the base model and an adapter
    response = client.chat.completions.parse(model=model, messages=MESSAGE, response_format=Ticket,
                                             temperature=0, max_tokens=200)
    ticket = response.choices[0].message.parsed  # a Ticket instance
    print(f"{model}: {ticket.model_dump_json()}")

choice = client.chat.completions.create(model="reverse", messages=MESSAGE, temperature=0, max_tokens=8,
                                        extra_body={"structured_outputs": {"choice": ["cat", "moon", "river"]}})
print("choice:", choice.choices[0].message.content)

regex = client.completions.create(model="loragate-demo", prompt="moon river cat", temperature=0, max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": "[a-z]{1,8}-[0-9]{3}"}})
print("regex:", regex.choices[0].text)
