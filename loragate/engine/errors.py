"""Engine-level exceptions. The gateway maps each to an OpenAI error and HTTP status."""


class EngineError(Exception):
    """Base class of every error the engine raises towards its callers."""


class EngineDeadError(EngineError):
    """The step loop died; nothing more will be served (HTTP 503)."""


class QueueFullError(EngineError):
    """Too many waiting requests (HTTP 429)."""


class PromptTooLongError(EngineError):
    """Prompt plus max_tokens exceeds the model's context (HTTP 400)."""


class AdapterNotFoundError(EngineError):
    """No adapter by that name (HTTP 404)."""


class AdapterLoadError(EngineError):
    """The adapter exists but was refused or failed to load (HTTP 400/422)."""
