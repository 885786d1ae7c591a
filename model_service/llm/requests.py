"""Protocol-neutral request parameters: the one list of sampling fields, and their validation.

``SAMPLING_FIELDS`` is the single place a generation parameter is declared, with its kind and bounds.
Derived from it: ``GenerationOptions`` (below), the range checks of ``to_sampling_params`` (below), the
policy document's ``default_generation`` (``server.policy``), the OpenAI request schema
(``server.openai_schema``) and the gRPC translation (``server.grpc_api``). Adding a parameter such as
``min_p``: an entry here, a field of ``SamplingParams`` and its use in the sampler (``llm.sampling``,
mapped in ``to_sampling_params``), and a field in ``proto/llm/v1``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from .chat import check_encodable
from .errors import InvalidRequest
from .sampling import SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class SamplingField:
    name: str
    kind: Literal["int", "float", "bool", "stop"]
    description: str
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False  # the value must be greater than ``low`` (top_p > 0)
    operator_default: bool = True  # the policy document may set a default for it (default_generation)


SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_tokens", "int", "Most tokens to generate (further capped by the context length).", low=1),
    SamplingField("temperature", "float", "Sampling temperature; 0 is greedy.", 0.0, 2.0),
    SamplingField("top_p", "float", "Nucleus sampling: the smallest set of tokens with this much probability.",
                  0.0, 1.0, low_exclusive=True),
    SamplingField("top_k", "int", "Sample from the k most likely tokens; 0 or -1: all.", -1, 1_000_000),
    SamplingField("seed", "int", "Makes sampling reproducible.", -(2**63), 2**64 - 1, operator_default=False),
    SamplingField("stop", "stop", f"Up to {MAX_STOP_SEQUENCES} strings that end generation; never emitted."),
    SamplingField("presence_penalty", "float", "OpenAI semantics, over generated tokens.", -2.0, 2.0),
    SamplingField("frequency_penalty", "float", "OpenAI semantics, over generated tokens.", -2.0, 2.0),
    SamplingField("repetition_penalty", "float", "Hugging Face semantics, over prompt and output.", 0.01, 10.0),
    SamplingField("ignore_eos", "bool", "Generate past end-of-sequence up to max_tokens (vLLM's, for benchmarks).",
                  operator_default=False),
)

# One attribute per field of SAMPLING_FIELDS, None when the request leaves it out.
GenerationOptions = dataclasses.make_dataclass(
    "GenerationOptions",
    [(f.name, "int | float | bool | str | list[str] | None", dataclasses.field(default=None))
     for f in SAMPLING_FIELDS],
)
GenerationOptions.__module__ = __name__
GenerationOptions.__doc__ = "A request's sampling parameters, one attribute per SAMPLING_FIELDS entry (None: unset)."


def check_range(field: SamplingField, value: float | int | None) -> None:
    """Raise InvalidRequest (naming the field) when ``value`` is outside the field's bounds."""
    if value is None or field.kind in ("bool", "stop"):
        return
    name = field.name
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"'{name}' must be a finite number", name)
    low, high = field.low, field.high
    if low is not None and field.low_exclusive and value <= low:
        raise InvalidRequest(f"'{name}' must be greater than {low}, got {value}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"'{name}' must be {bounds}, got {value}", name)


def check_stop(stop: list[str] | str | None) -> tuple[str, ...]:
    """The stop sequences as a tuple; InvalidRequest naming 'stop' when they break the limits."""
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", "stop")
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"each 'stop' sequence must be a non-empty string of at most {MAX_STOP_LENGTH} "
                                 "characters", "stop")
        check_encodable(s, "stop")
    return tuple(stop)


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
    for field in SAMPLING_FIELDS:
        check_range(field, getattr(options, field.name))
    stop = check_stop(options.stop)

    room = context_length - prompt_tokens
    if room <= 0:
        raise InvalidRequest(
            f"the prompt is {prompt_tokens} tokens, but this model's context length is {context_length}",
            "messages",
        )
    if options.max_tokens is not None:
        if options.max_tokens > room:
            raise InvalidRequest(
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
        stop=stop,
        presence_penalty=float(options.presence_penalty or 0.0),
        frequency_penalty=float(options.frequency_penalty or 0.0),
        repetition_penalty=float(options.repetition_penalty or 1.0),
        ignore_eos=bool(options.ignore_eos),
    )
