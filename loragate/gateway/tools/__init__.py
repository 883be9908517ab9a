"""OpenAI tool calling on top of structured outputs: request validation and the grammar of forced
calls (`plan.py`), the `--tool-call-parser` parsers of free text (`parsers.py`), and reading a
choice's output back as calls, streamed or whole (`reader.py`). The engine only sees grammars."""
from loragate.gateway.tools.parsers import PARSERS, get_parser
from loragate.gateway.tools.plan import ToolPlan, plan_tools
from loragate.gateway.tools.reader import ToolOutputReader, reader_for

__all__ = ["PARSERS", "ToolOutputReader", "ToolPlan", "get_parser", "plan_tools", "reader_for"]
