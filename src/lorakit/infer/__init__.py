"""Generation: a continuous-batching engine with one LoRA adapter (or the base model) per request."""

from .engine import Engine, EngineClosed, InvalidRequest, QueueFull
from .handle import Event, RequestHandle, Usage
from .sampling import LimitExceeded, RequestLimits, SamplingParams

__all__ = ["Engine", "EngineClosed", "Event", "InvalidRequest", "LimitExceeded", "QueueFull", "RequestHandle",
           "RequestLimits", "SamplingParams", "Usage"]
