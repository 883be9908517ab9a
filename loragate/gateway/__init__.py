"""The HTTP gateway: OpenAI-compatible routes over an engine; never touches tensors."""
from loragate.gateway.app import create_app
from loragate.gateway.settings import GatewaySettings

__all__ = ["create_app", "GatewaySettings"]
