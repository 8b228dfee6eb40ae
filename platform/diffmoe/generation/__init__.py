"""Generation for masked-diffusion LMs: the LLaDA sampler, parallel decoding, KV caches, and a
continuous-batching engine. Imports no Ray or HTTP code: the server wraps ``Engine``."""

from .config import DecodingConfig, check_prompt
from .dispatch import generate
from .engine import Engine
from .sampler import add_gumbel_noise, select_transfer, transfer_schedule
from .sequence import RequestOutput, StreamEvent
from .streaming import TextStream

__all__ = [
    "DecodingConfig",
    "Engine",
    "RequestOutput",
    "StreamEvent",
    "TextStream",
    "add_gumbel_noise",
    "check_prompt",
    "generate",
    "select_transfer",
    "transfer_schedule",
]
