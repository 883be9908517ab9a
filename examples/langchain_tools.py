"""Tool calling and structured output with LangChain against loragate.

`bind_tools(..., tool_choice="any")` (OpenAI's "required") makes the server force a well-formed
call whose arguments validate against the tool's schema, on any model, so an agent loop works even
with the demo model: call the tool, send the result back as a ToolMessage, get the final answer.
`with_structured_output` goes through the same grammars. (With tool_choice "auto", the model
decides, and its text is read with the server's --tool-call-parser.)

Start the demo server (`loragate serve`), then run `python examples/langchain_tools.py`.
LORAGATE_BASE_URL and LORAGATE_API_KEY point it elsewhere.
"""
import json
import os
from typing import Literal

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


@tool
def get_weather(city: Literal["paris", "tokyo", "lima"], days: Literal[1, 2, 3]) -> str:
    """Weather forecast for a city."""
    return f"sunny in {city} for the next {days} day(s)"


class Forecast(BaseModel):
    city: Literal["paris", "tokyo", "lima"]
    days: int = Field(ge=1, le=3)


llm = ChatOpenAI(
    model="loragate-demo",
    base_url=os.environ.get("LORAGATE_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("LORAGATE_API_KEY", "none"),
    temperature=0,
    max_tokens=100,
)

messages = [HumanMessage("weather in tokyo")]
ai = llm.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False).invoke(messages)
call = ai.tool_calls[0]
print("tool call:", call["name"], json.dumps(call["args"]))
result = get_weather.invoke(call["args"])
print("tool result:", result)

messages += [ai, ToolMessage(result, tool_call_id=call["id"])]
print("final answer:", repr(llm.invoke(messages, max_tokens=24).content))  # the demo's context is 256 tokens

for method in ("function_calling", "json_schema"):
    forecast = llm.with_structured_output(Forecast, method=method).invoke("weather in lima")
    print(f"structured ({method}):", forecast.model_dump_json())
