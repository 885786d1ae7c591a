"""The one configuration of the model service.

Every option is a field here; pydantic-settings makes each one settable as a CLI flag
(``--http-port``) and as an environment variable (``MODEL_SERVICE_HTTP_PORT``). CLI wins over env.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUILTIN_DEFAULT_MODEL = "smollm2-135m-instruct"


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> (1, 2, 4, 8); ``""`` -> () (the engine's default buckets). ValueError on anything else."""
    text = text.strip()
    if not text:
        return ()
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"expected positive integers separated by commas, not {text!r}") from None
    if any(size < 1 for size in sizes):
        raise ValueError(f"expected positive integers separated by commas, not {text!r}")
    return tuple(sorted(set(sizes)))


class Settings(BaseSettings):
    """Serve a local LLM over an OpenAI-compatible HTTP API and gRPC."""

    model_config = SettingsConfigDict(
        env_prefix="MODEL_SERVICE_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="python -m model_service serve",
        extra="ignore",
        protected_namespaces=(),
    )

    # --- network ---
    host: str = Field("127.0.0.1", description="Interface to bind HTTP and gRPC to.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free port and logs it.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port and logs it.")

    # --- model ---
    model: str = Field(
        BUILTIN_DEFAULT_MODEL,
        description="A built-in model name (smollm2-135m-instruct), a local Hugging Face model directory, "
        "or a .gguf file.",
    )
    served_model_name: str | None = Field(
        None, description="The model id clients send and /v1/models lists (default: derived from --model)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code shipped in the model directory (architectures transformers lacks). "
        "Opt-in; ChatGLM2/ChatGLM3/GLM-4 need it not: they are converted to native GLM without running their code."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and activations dtype. 'auto': bfloat16 where the hardware computes in it "
        "(a GPU with bf16, a CPU with avx512_bf16 or AMX), else float32. float32 is the default because only "
        "there a greedy answer does not depend on the requests it is batched with."
    )
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Where the model runs: cpu, cuda or cuda:N. Sampling and batch bookkeeping stay on the CPU.",
    )
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 uses every available core.")
    max_model_len: int | None = Field(
        None, ge=16, description="Context length to enforce (default: the model's max_position_embeddings)."
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="max_tokens when a request gives none (further capped by the context length)."
    )

    # --- engine: admission and batching ---
    max_running_requests: int = Field(32, ge=1, description="Sequences decoded together in one batch.")
    max_waiting_requests: int = Field(
        128, ge=0, description="Requests queued beyond the running batch; past this, 429 / RESOURCE_EXHAUSTED."
    )
    max_prefill_tokens: int = Field(
        0, ge=0, description="Prompt tokens prefilled per engine step: arrivals are admitted in groups of this "
        "size, and a longer prompt is prefilled in chunks of it between decode steps. 0: 256 on a CPU, 4096 on a "
        "GPU (where an eager prefill step costs tens of ms of kernel launches whatever its size, so small groups "
        "would keep a burst's last request waiting for seconds). Else at least 16."
    )
    max_decode_stall_s: float = Field(
        1.0, ge=0, description="While a burst of requests is prefilled first, the longest running streams may "
        "wait for their next token (0: always alternate prefill and decode)."
    )
    kv_cache: Literal["auto", "padded", "slots"] = Field(
        "auto", description="KV cache layout. 'slots': one fixed slot per running request, preallocated at start-up "
        "and written in place; 'padded': one left-padded cache that grows with use; 'auto': slots on a GPU, padded "
        "on the CPU (as fast there, and it takes only the memory in use)."
    )
    kv_cache_tokens: int = Field(
        0, ge=0, description="Tokens per KV slot (prompt + output; longer prompts get a 400). 0: the context length, "
        "on a GPU capped to what --gpu-memory-utilization of its free memory holds."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of the GPU's free memory (after the weights) the KV slots may take."
    )
    cuda_graphs: Literal["auto", "on", "off", "eager"] = Field(
        "auto", description="Decode steps of fixed shape over the KV slots, captured as CUDA graphs at start-up (one "
        "per batch-size bucket and read length; a capture that fails is logged and decoding runs eagerly). 'auto': on "
        "where the slots are on a CUDA device; 'on': the same, an error without CUDA; 'eager': the same fixed-shape "
        "steps without capture (any device); 'off': eager steps shaped to the batch."
    )
    cuda_graph_batch_sizes: str = Field(
        "", description="Batch-size buckets of the captured decode steps, comma-separated (e.g. 1,2,4,8,16,32); a "
        "batch runs in the smallest bucket that holds its highest slot. Default: 1,2,4,8,16,24,32,48,64,96,... up "
        "to --max-running-requests, which is always one."
    )
    torch_compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Compile the fixed-shape decode step with torch.compile before its CUDA graphs are "
        "captured: the graphs then replay fused kernels instead of every small kernel of every layer (on an H100, "
        "GLM-4-9B decodes 1.2x faster at 1 request and 2.6x at 64). Start-up takes longer: two compiles, whatever "
        "the batch buckets (about 3 min for GLM-4-9B, cold; see --compile-cache-dir). 'auto': on where the "
        "decode steps are captured as CUDA graphs; 'on': also on a CPU (the compiled steps, uncaptured); 'off': "
        "never. A compile that fails is logged and the step runs uncompiled."
    )
    compile_cache_dir: str = Field(
        "", description="Where torch.compile keeps its compiled kernels, so that a restart finds them and skips "
        "most of the compile (put it on a volume that outlives the pod). Default: torch-compile/ in the service's "
        "cache folder (MODEL_SERVICE_CACHE_DIR, else ~/.cache/model-service). A TORCHINDUCTOR_CACHE_DIR you set "
        "wins; a folder that cannot be written is logged and torch's temp folder is used."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest a request may queue and generate before it is ended."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On shutdown, how long running requests may finish before they are cut."
    )

    # --- HTTP ---
    api_key: SecretStr | None = Field(
        None, description="When set, /v1/* requires 'Authorization: Bearer <key>' (health/metrics stay open)."
    )
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body (413 past it).")
    http_keep_alive_timeout_s: int = Field(
        30, ge=1, description="Idle HTTP keep-alive connections are closed after this many seconds (keep the "
        "gateway's connection-pool idle time below it).")
    http_read_timeout_s: float = Field(
        30.0, gt=0, description="A request's headers, and then its body, must each arrive within this many "
        "seconds; else 408 and the connection is closed.")

    # --- logging ---
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "text"] = Field("json", description="Structured JSON logs or plain text.")

    # --- Nacos ---
    nacos_server: str | None = Field(
        None, description="Nacos HOST:PORT; registration is off when unset."
    )
    nacos_service_name: str = Field("model-service", min_length=1, description="Service name to register as.")
    nacos_group: str = Field("DEFAULT_GROUP", min_length=1, description="Nacos group of the service and the config.")
    nacos_namespace: str = Field("", description="Nacos namespace id ('' is the public namespace).")
    nacos_username: str | None = Field(None, description="Nacos username, when Nacos has auth on.")
    nacos_password: SecretStr | None = Field(None, description="Nacos password, when Nacos has auth on.")
    nacos_config_data_id: str = Field(
        "model-service.yaml", min_length=1,
        description="Nacos config data id of the hot-reloaded policy (YAML: system_prompt, blocked_patterns, "
        "default_generation, max_running_requests, max_waiting_requests).",
    )
    advertise_host: str | None = Field(
        None, description="IP registered in Nacos (default: --host when it is a concrete address, else the "
        "primary outbound interface's IP).",
    )
    policy_file: str | None = Field(
        None, description="Local YAML file with the same settings as the Nacos config (used when Nacos has "
        "none); re-read when it changes.",
    )

    @field_validator("cuda_graph_batch_sizes")
    @classmethod
    def _batch_sizes(cls, value: str) -> str:
        return ",".join(map(str, parse_batch_sizes(value)))  # a clear error now for anything but 1,2,4...

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _torch_compile(cls, value):
        # MODEL_SERVICE_TORCH_COMPILE=true (a boolean before 'auto' existed) still means on
        if isinstance(value, bool) or str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
            return "on" if str(value).lower() in ("true", "1", "yes") else "off"
        return value

    @field_validator("max_prefill_tokens")
    @classmethod
    def _prefill_tokens(cls, value: int) -> int:
        if 0 < value < 16:
            raise ValueError("must be 0 (by device) or at least 16")
        return value

    def resolved_prefill_tokens(self) -> int:
        return self.max_prefill_tokens or (4096 if self.device.startswith("cuda") else 256)

    def resolved_threads(self) -> int:
        import os

        return self.threads or len(os.sched_getaffinity(0))
