"""Errors of the node agent. Third-party errors are translated where they enter."""


class NodeAgentError(Exception):
    """Base class."""


class EngineError(NodeAgentError):
    """The engine failed to serve a request; the message says why."""

    code = "engine_error"


class ModelLoadError(EngineError):
    code = "model_load_error"


class RequestTooLong(EngineError):
    code = "context_length_exceeded"


class CoordinatorRejected(NodeAgentError):
    """The coordinator refused a registration or heartbeat."""
