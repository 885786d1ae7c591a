"""What the adapters share in one process: settings, the model and engine, and the service phase."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from model_service.config import Settings
from model_service.llm.chat import encode_completion, normalize_messages
from model_service.llm.engine import Engine, EngineNotReady, RequestStream
from model_service.llm.loader import LoadedModel
from model_service.llm.metrics import EngineMetrics
from model_service.llm.requests import GenerationOptions, UnknownModel, to_sampling_params
from model_service.llm.tools import ChatPrompt, ChatStream, ToolRequest, encode_chat_prompt

from .dynamic_config import ActivePolicy


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServiceState:
    settings: Settings
    model_name: str
    phase: Phase = Phase.LOADING
    engine: Engine | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # operator policy (persona, blocked content, defaults); replaced whole by DynamicConfig on change
    policy: ActivePolicy = field(default_factory=ActivePolicy)
    metrics: EngineMetrics = field(init=False)

    def __post_init__(self) -> None:
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.metrics = EngineMetrics(self.registry, self.model_name)

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and self.engine is not None and self.engine.accepting

    def ready_engine(self) -> Engine:
        """The engine, if the service takes work now; else EngineNotReady (503 / UNAVAILABLE)."""
        if not self.ready:
            raise EngineNotReady(f"the model service is {self.phase.value}; not accepting requests")
        return self.engine

    # ------------------------------------------------------------------ the one request path
    # HTTP and gRPC both come through here, so model checks, prompt building, limits and
    # operator policy are applied identically whichever protocol a request used.
    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.model_name:
            raise UnknownModel(requested, self.model_name)

    def start_chat(self, messages: list[dict], options: GenerationOptions,
                   tools: ToolRequest | None = None) -> ChatStream:
        """A chat; with ``tools``, in the model's tool format, its answer parsed into tool calls."""
        engine = self.ready_engine()
        policy = self.policy  # one snapshot for the whole request, whatever reloads meanwhile
        messages = normalize_messages(messages)
        policy.check_input([(f"messages.{i}.content", m["content"]) for i, m in enumerate(messages)])
        prompt = _chat_prompt(engine.model_info, policy, messages, tools)
        return ChatStream(self._submit(engine, prompt.ids, options, policy), prompt)

    def start_completion(self, prompt: str | list[int], options: GenerationOptions) -> RequestStream:
        engine = self.ready_engine()
        policy = self.policy
        info = engine.model_info
        prompt_ids = _completion_ids(info, prompt)
        if policy.blocker is not None:
            policy.check_input([("prompt", prompt if isinstance(prompt, str) else info.tokenizer.decode(prompt_ids))])
        return self._submit(engine, prompt_ids, options, policy)

    def count_prompt_tokens(self, messages: list[dict] | None = None, prompt: str | list[int] | None = None,
                            tools: ToolRequest | None = None) -> int:
        """The prompt tokens start_chat(messages) / start_completion(prompt) would use (persona included).

        Needs the model loaded, not the service ready: counting works while draining too.
        """
        if self.engine is None:
            raise EngineNotReady(f"the model service is {self.phase.value}; the model is not loaded yet")
        info = self.engine.model_info
        if messages is not None:
            return len(_chat_prompt(info, self.policy, normalize_messages(messages), tools).ids)
        return len(_completion_ids(info, prompt or ""))

    def _submit(self, engine: Engine, prompt_ids: list[int], options: GenerationOptions,
                policy: ActivePolicy) -> RequestStream:
        params = to_sampling_params(
            options,
            prompt_tokens=len(prompt_ids),
            context_length=engine.model_info.context_length,
            default_max_tokens=policy.default_max_tokens(self.settings.default_max_tokens),
            defaults=policy.sampling_defaults(),
        )
        return policy.filter_output(engine.submit(prompt_ids, params))


# How a request's prompt becomes token ids: one place, so CountTokens counts what generation will use.
def _chat_prompt(info: LoadedModel, policy: ActivePolicy, messages: list[dict],
                 tools: ToolRequest | None) -> ChatPrompt:
    return encode_chat_prompt(info.tokenizer, info.chat_family, info.architecture, policy.apply_persona(messages),
                              tools)


def _completion_ids(info: LoadedModel, prompt: str | list[int]) -> list[int]:
    return encode_completion(info.tokenizer, prompt, info.model.config.get_text_config().vocab_size)
