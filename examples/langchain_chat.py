"""LangChain's ChatOpenAI against a loragate adapter: invoke once, then stream.

Start the demo server (`loragate serve`), then run `python examples/langchain_chat.py`.
LORAGATE_BASE_URL and LORAGATE_API_KEY point it elsewhere.
"""
import os

from langchain_openai import ChatOpenAI

llm = ChatOpenAI(
    model="title",  # an adapter name; "loragate-demo" would be the base model
    base_url=os.environ.get("LORAGATE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("LORAGATE_API_KEY", "none"),
    temperature=0,
    max_tokens=128,  # the demo model writes one character per token
)
MESSAGE = "the quick brown fox, 3 lazy dogs!"

print(f"message: {MESSAGE!r}")
print(f"invoke:  {llm.invoke(MESSAGE).content!r}")

print("stream:  ", end="", flush=True)  # "|" marks where one streamed chunk ends
for chunk in llm.stream(MESSAGE):
    if chunk.content:
        print(chunk.content, end="|", flush=True)
print()
