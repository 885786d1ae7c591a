"""Protocol-neutral request parameters and their validation, shared by the HTTP and gRPC adapters.

Both adapters parse their wire format into ``GenerationOptions`` and call ``to_sampling_params``,
so limits and error messages are the same whichever way a request arrives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .chat import PromptError, check_encodable
from .sampling import SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256


class UnknownModel(Exception):
    def __init__(self, requested: str, served: str):
        super().__init__(f"the model '{requested}' does not exist; this server serves '{served}'")
        self.requested = requested


@dataclass
class GenerationOptions:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None


def _check_range(name: str, value: float | int | None, low: float, high: float) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise PromptError(f"'{name}' must be a finite number", name)
    if not low <= value <= high:
        raise PromptError(f"'{name}' must be between {low} and {high}, got {value}", name)


def to_sampling_params(
    options: GenerationOptions,
    *,
    prompt_tokens: int,
    context_length: int,
    default_max_tokens: int,
    defaults: GenerationOptions | None = None,
) -> SamplingParams:
    """Validate ``options`` (falling back to operator ``defaults``) and fit them to the context."""
    if defaults is not None:
        options = GenerationOptions(**{
            k: (v if v is not None else getattr(defaults, k)) for k, v in vars(options).items()
        })
    _check_range("temperature", options.temperature, 0.0, 2.0)
    _check_range("top_p", options.top_p, 0.0, 1.0)
    _check_range("presence_penalty", options.presence_penalty, -2.0, 2.0)
    _check_range("frequency_penalty", options.frequency_penalty, -2.0, 2.0)
    _check_range("repetition_penalty", options.repetition_penalty, 0.01, 10.0)
    _check_range("top_k", options.top_k, -1, 1_000_000)
    _check_range("seed", options.seed, -(2**63), 2**64 - 1)
    if options.top_p == 0.0:
        raise PromptError("'top_p' must be greater than 0", "top_p")

    stop = options.stop
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise PromptError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", "stop")
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
            raise PromptError(f"each 'stop' sequence must be a non-empty string of at most {MAX_STOP_LENGTH} "
                              "characters", "stop")
        check_encodable(s, "stop")

    room = context_length - prompt_tokens
    if room <= 0:
        raise PromptError(
            f"the prompt is {prompt_tokens} tokens, but this model's context length is {context_length}",
            "messages",
        )
    if options.max_tokens is not None:
        if options.max_tokens < 1:
            raise PromptError(f"'max_tokens' must be at least 1, got {options.max_tokens}", "max_tokens")
        if options.max_tokens > room:
            raise PromptError(
                f"this model's context length is {context_length} tokens; the prompt takes {prompt_tokens}, "
                f"so 'max_tokens' can be at most {room} (got {options.max_tokens})",
                "max_tokens",
            )
        max_tokens = options.max_tokens
    else:
        max_tokens = min(default_max_tokens, room)

    seed = options.seed
    if seed is not None:
        seed &= 2**64 - 1  # torch.Generator takes unsigned 64-bit seeds
    top_k = options.top_k or 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if options.temperature is None else float(options.temperature),
        top_p=1.0 if options.top_p is None else float(options.top_p),
        top_k=max(top_k, 0),
        seed=seed,
        stop=tuple(stop),
        presence_penalty=float(options.presence_penalty or 0.0),
        frequency_penalty=float(options.frequency_penalty or 0.0),
        repetition_penalty=float(options.repetition_penalty or 1.0),
        ignore_eos=bool(options.ignore_eos),
    )
