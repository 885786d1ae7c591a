"""The one request path: the HTTP and gRPC adapters translate their requests into calls here.

``ModelService`` holds what the adapters share in one process (settings, the model and engine, the
service phase, the operator policy) and owns every step of a generation, so HTTP and gRPC behave the
same: the model check, message validation, policy (content check, persona, defaults, output filter),
prompt encoding, parameter validation against the context, and the submit to the engine. Errors are
``ServiceError``s (``llm.errors``); ``errors.py`` maps them for each protocol.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from model_service.config import Settings
from model_service.llm.chat import encode_completion, normalize_messages
from model_service.llm.engine import Engine, EngineNotReady, RequestStream
from model_service.llm.errors import InvalidRequest, UnknownModel
from model_service.llm.loader import LoadedModel
from model_service.llm.metrics import EngineMetrics
from model_service.llm.requests import GenerationOptions, to_sampling_params
from model_service.llm.tools import ChatPrompt, ChatStream, ToolRequest, encode_chat_prompt, parse_tool_request

from .policy import ActivePolicy, Policy

log = logging.getLogger("model_service.service")


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ModelService:
    settings: Settings
    model_name: str
    phase: Phase = Phase.LOADING
    engine: Engine | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # operator policy (persona, blocked content, defaults); replaced whole by apply_policy on change
    policy: ActivePolicy = field(default_factory=ActivePolicy)
    metrics: EngineMetrics = field(init=False)

    def __post_init__(self) -> None:
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.metrics = EngineMetrics(self.registry, self.model_name)
        key = self.settings.api_key
        self._api_key = key.get_secret_value().encode() if key else None

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and self.engine is not None and self.engine.accepting

    def ready_engine(self) -> Engine:
        """The engine, if the service takes work now; else EngineNotReady (503 / UNAVAILABLE)."""
        if not self.ready:
            raise EngineNotReady(f"the model service is {self.phase.value}; not accepting requests")
        return self.engine

    def attach_engine(self, engine: Engine) -> None:
        """The model is loaded: requests go to ``engine``, whose admission limits follow the policy."""
        self.engine = engine
        self._apply_limits()

    def apply_policy(self, policy: Policy) -> None:
        """A new operator policy (from dynamic_config): used by every request that starts from now on."""
        self.policy = ActivePolicy.build(policy)
        self._apply_limits()

    def _apply_limits(self) -> None:
        if self.engine is None:
            return
        p = self.policy.policy
        limits = dataclasses.replace(
            self.engine.limits,
            max_running_requests=p.max_running_requests or self.settings.max_running_requests,
            max_waiting_requests=(p.max_waiting_requests if p.max_waiting_requests is not None
                                  else self.settings.max_waiting_requests),
        )
        if limits != self.engine.limits:
            self.engine.limits = limits  # a frozen dataclass, read afresh at every admission and engine step
            log.info("engine limits changed", extra={"max_running_requests": limits.max_running_requests,
                                                     "max_waiting_requests": limits.max_waiting_requests})

    # ------------------------------------------------------------------ checks both adapters need
    def authorized(self, authorization: str | None) -> bool:
        """Does an ``Authorization`` header (HTTP) / ``authorization`` metadata (gRPC) carry the API key?
        Always true when no key is configured."""
        if self._api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)

    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.model_name:
            raise UnknownModel(requested, self.model_name)

    def model_info(self, model: str | None = None) -> LoadedModel:
        """The loaded model (after the model check). Needs the model loaded, not the service ready."""
        self.check_model(model)
        if self.engine is None:
            raise EngineNotReady(f"the model service is {self.phase.value}; the model is not loaded yet")
        return self.engine.model_info

    # ------------------------------------------------------------------ the one request path
    def start_chat(self, messages: list[dict], options: GenerationOptions, *, model: str | None = None,
                   tools: list | None = None, tool_choice: str | dict | None = None) -> ChatStream:
        """Validate, apply the policy, encode and submit a chat; the stream yields the generated text and,
        with ``tools`` (OpenAI's ``tools`` / ``tool_choice``), the tool calls parsed from the answer."""
        self.check_model(model)
        engine = self.ready_engine()
        policy = self.policy  # one snapshot for the whole request, whatever reloads meanwhile
        messages = normalize_messages(messages)
        tool_request = parse_tool_request(tools, tool_choice)
        policy.check_input([(f"messages.{i}.content", m["content"]) for i, m in enumerate(messages)])
        prompt = _chat_prompt(engine.model_info, policy, messages, tool_request)
        return ChatStream(self._submit(engine, prompt.ids, options, policy), prompt)

    def start_completion(self, prompt: str | list[int], options: GenerationOptions, *,
                         model: str | None = None) -> RequestStream:
        """The same for a raw prompt (text or token ids)."""
        self.check_model(model)
        engine = self.ready_engine()
        policy = self.policy
        info = engine.model_info
        prompt_ids = _completion_ids(info, prompt)
        if policy.blocker is not None:
            policy.check_input([("prompt", prompt if isinstance(prompt, str) else info.tokenizer.decode(prompt_ids))])
        return self._submit(engine, prompt_ids, options, policy)

    def count_tokens(self, *, messages: list[dict] | None = None, prompt: str | list[int] | None = None,
                     model: str | None = None, tools: list | None = None,
                     tool_choice: str | dict | None = None) -> int:
        """The prompt tokens start_chat(messages) / start_completion(prompt) would use (persona included).

        Needs the model loaded, not the service ready: counting works while draining too.
        """
        info = self.model_info(model)
        if messages and prompt:
            raise InvalidRequest("set only one of 'messages' and 'prompt'", "messages")
        if messages:
            messages = normalize_messages(messages)
            return len(_chat_prompt(info, self.policy, messages, parse_tool_request(tools, tool_choice)).ids)
        if prompt:
            return len(_completion_ids(info, prompt))
        raise InvalidRequest("set 'messages' or 'prompt'", "messages")

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


# How a request's prompt becomes token ids: one place, so count_tokens counts what generation will use.
def _chat_prompt(info: LoadedModel, policy: ActivePolicy, messages: list[dict],
                 tools: ToolRequest | None) -> ChatPrompt:
    return encode_chat_prompt(info.tokenizer, info.chat_family, info.architecture, policy.apply_persona(messages),
                              tools)


def _completion_ids(info: LoadedModel, prompt: str | list[int]) -> list[int]:
    return encode_completion(info.tokenizer, prompt, info.model.config.get_text_config().vocab_size)
