"""The exception types that cross layers: raised by the engine, sessions and chat rendering, mapped to
HTTP statuses by adapters/openai and to gRPC codes by service/. They live at the bottom of the import
graph so that chat rendering and the adapters never import the engine (and torch) just to name them.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional


class FailureKind(str, Enum):
    """Whose fault it is that a request finished with an error (RequestOutput.error_kind): its own
    input (a constraint that does not compile, or one its own token restrictions contradict: HTTP 400 /
    INVALID_ARGUMENT), or the server's (a step that failed, a matcher or detokenizer that broke: HTTP 500
    / INTERNAL)."""
    INVALID_REQUEST = "invalid_request"
    INTERNAL = "internal"


class InvalidRequestError(ValueError):
    """Bad input from a caller; the message says what to fix (HTTP 400 / INVALID_ARGUMENT)."""


class ModelLoadError(ValueError):
    """A model directory or checkpoint that cannot be served, with what is wrong in it."""


class EngineDeadError(RuntimeError):
    """The engine's step thread has stopped; no request can be served (HTTP 503 / UNAVAILABLE)."""


class QueueFullError(RuntimeError):
    """More requests are pending than the engine admits (HTTP 503 / RESOURCE_EXHAUSTED)."""


class SessionError(Exception):
    """Base of the session errors; `code` names the gRPC status they map to."""
    code = "INTERNAL"


class FieldError(InvalidRequestError):
    """Bad input in one request field: `field` is the field to fix (OpenAI's `param`, e.g.
    "messages[2].content"); `code` OpenAI's error code, when there is one."""

    def __init__(self, message: str, field: Optional[str], code: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class ContextLengthError(FieldError):
    """A prompt that, with the room its reply asks for, does not fit max_model_len (OpenAI's
    context_length_exceeded): `tokens` in the prompt, `max_tokens` of reply room when that is what overflowed
    (None: the prompt alone does not fit), `limit` max_model_len."""

    def __init__(self, message: str, field: Optional[str], tokens: int, limit: int,
                 max_tokens: Optional[int] = None) -> None:
        super().__init__(message, field, "context_length_exceeded")
        self.tokens, self.limit, self.max_tokens = tokens, limit, max_tokens


class AdapterNotFoundError(LookupError):
    """A LoRA adapter name that is not loaded (HTTP 404 / NOT_FOUND)."""


class AdapterInUseError(RuntimeError):
    """Unloading or replacing a LoRA adapter that requests or sessions still use (HTTP 409 /
    FAILED_PRECONDITION); the message names them."""


class LoRANotEnabledError(RuntimeError):
    """A LoRA operation on an engine started without enable_lora (HTTP 404 / gRPC UNIMPLEMENTED)."""


class AdapterNameTakenError(RuntimeError):
    """Loading a LoRA adapter under a name already taken: by the base model (requests naming it would
    never reach the adapter) or by a loaded adapter without an explicit replace (HTTP 409 /
    ALREADY_EXISTS)."""


class AdapterNameError(InvalidRequestError):
    """A LoRA adapter name no client could use reliably (empty, padded, control characters, too
    long): HTTP 400 naming lora_name / INVALID_ARGUMENT."""
