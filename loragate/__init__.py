"""loragate: serve thousands of LoRA adapters on one base model behind an OpenAI-compatible API."""
__version__ = "0.1.0"
