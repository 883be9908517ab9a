"""LoRA adapters: PEFT loading and validation, name -> path registry, and the disk/CPU/device tiers."""
from loragate.engine.adapters.cache import AdapterCache
from loragate.engine.adapters.peft_loader import BaseModelInfo, LoadedAdapter, load_peft_adapter
from loragate.engine.adapters.registry import AdapterRegistry, is_valid_name

__all__ = ["AdapterCache", "AdapterRegistry", "BaseModelInfo", "LoadedAdapter", "is_valid_name", "load_peft_adapter"]
