"""ChatGLM2/ChatGLM3/GLM-4 checkpoints in THUDM's original (remote-code) layout -> a native GlmForCausalLM directory.

These directories (``config.json`` with ``model_type: "chatglm"``) ship ``modeling_chatglm.py`` and
``tokenization_chatglm.py`` written for transformers 4.x; transformers 5 cannot run them. The network itself is
the one transformers implements as ``GlmForCausalLM``, so the checkpoint is converted once, without executing
any file of the model directory, into a cached native directory:

- config: ``num_layers`` -> ``num_hidden_layers``, ``kv_channels`` -> ``head_dim``, rope base 10000 x
  ``rope_ratio`` on half of each head (``partial_rotary_factor`` 0.5), ...;
- weights: renamed, ``query_key_value`` split into q/k/v (read from safetensors, or from ``.bin`` shards with
  ``torch.load(weights_only=True)``, which unpickles tensors only);
- tokenizer: a fast tokenizer (``tokenizer.json``) rebuilt from ``tokenizer.model`` (SentencePiece for
  ChatGLM2/3, tiktoken BPE ranks for GLM-4) with the family's special tokens at their official ids;
- chat template: the directory's own, else the family's official format;
- eos ids: what the official ``chat()`` stops at, written to ``generation_config.json``.

The cache is keyed by the content of the source files, like the GGUF conversion in loader.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the converted output changes, so stale conversions in users' caches are not reused.
CONVERTER_VERSION = 1
MARKER = "chatglm_conversion.json"  # written into every converted directory

# ChatGLM2/3 register their special tokens right after the SentencePiece pieces (tokenization_chatglm.py).
# "sop"/"eop" are spelled "<sop>"/"<eop>" here (GLM-4's spelling): the plain words can be ordinary pieces of
# the SentencePiece vocabulary (they are in the tiny fixture), and a special token cannot share its text with a
# piece, nor should "sop" inside a user's word ("isopropyl") turn into a control token.
CHATGLM2_SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]
CHATGLM3_SPECIAL_TOKENS = CHATGLM2_SPECIAL_TOKENS + ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

# ChatGLM3's format as its official build_chat_input builds it: [gMASK]sop, then per message <|role|>, the
# SentencePiece of "\n" and of the content (each with SentencePiece's dummy-prefix space), then <|assistant|>.
# This is the template of the 2024 Hugging Face revision (as llama.cpp, vLLM and openvino.genai quote it);
# the 2023 revision ships none.
CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]<sop><|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# ChatGLM2's official build_prompt ("[Round N]\n\n问：...\n\n答：..."); it has no system role.
CHATGLM2_TEMPLATE = (
    "[gMASK]<sop>{% set ns = namespace(round=1) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[Round {{ ns.round }}]\n\n问：{{ message['content'] }}\n\n答："
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n\n{% set ns.round = ns.round + 1 %}"
    "{% else %}{{ raise_exception('ChatGLM2 has no ' + message['role'] + ' role; use user and assistant messages') }}"
    "{% endif %}{% endfor %}"
)
# tokenization_chatglm.py's ChatGLM4Tokenizer pat_str (the cl100k split).
GLM4_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

FAMILY_CHATGLM2, FAMILY_CHATGLM3, FAMILY_GLM4 = "chatglm2", "chatglm3", "glm4"


class ChatGLMConversionError(Exception):
    """The directory cannot be converted; the message is for the operator."""


@dataclass(frozen=True)
class Converted:
    path: Path
    family: str  # chatglm2 | chatglm3 | glm4
    reused: bool
    seconds: float


def is_chatglm_remote_layout(config: dict) -> bool:
    return config.get("model_type") == "chatglm"


def read_conversion_marker(directory: Path) -> dict | None:
    path = Path(directory) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ detection

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatGLMConversionError(f"{path.name} is missing in {path.parent}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChatGLMConversionError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ChatGLMConversionError(f"{path} is not a JSON object")
    return data


def _is_tiktoken_ranks(path: Path) -> bool:
    with path.open("rb") as f:
        first = f.readline(4096).split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None


def detect_family(directory: Path, config: dict) -> str:
    missing = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                           "padded_vocab_size") if k not in config]
    if missing:
        raise ChatGLMConversionError(
            f"config.json lacks {', '.join(missing)}: not a ChatGLM2/ChatGLM3/GLM-4 config (the first-generation "
            "ChatGLM-6B is not supported)"
        )
    tokenizer_model = directory / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise ChatGLMConversionError("tokenizer.model (the ChatGLM tokenizer file) is missing")
    if _is_tiktoken_ranks(tokenizer_model):
        return FAMILY_GLM4
    # ChatGLM2 and ChatGLM3 share the SentencePiece model; ChatGLM3's code adds the role tokens. The code is read
    # as text (never run); directories without it say which model they are in config.json's _name_or_path.
    code = directory / "tokenization_chatglm.py"
    if code.is_file():
        return FAMILY_CHATGLM3 if "<|observation|>" in code.read_text(errors="replace") else FAMILY_CHATGLM2
    return FAMILY_CHATGLM2 if "chatglm2" in str(config.get("_name_or_path", "")).lower() else FAMILY_CHATGLM3


# ------------------------------------------------------------------------------------------------ cache key

_SMALL_FILE = 16 << 20
_EDGE = 1 << 20


def _file_digest(path: Path, digest) -> None:
    """Small files by their full bytes; weight shards by size + first and last MiB (hashing 12 GB of ChatGLM3
    shards in full would take about a minute on every start; a changed checkpoint changes size or edges, since a
    shard starts with its tensor directory and ends with the last tensor's values)."""
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if size <= _SMALL_FILE:
            digest.update(f.read())
        else:
            digest.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            digest.update(f.read(_EDGE))


def _weight_files(directory: Path) -> tuple[list[Path], str]:
    """The shards to read (safetensors preferred) and their format."""
    for index_name, fmt, single in (("model.safetensors.index.json", "safetensors", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "bin", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ChatGLMConversionError(f"{index} has no weight_map")
            shards = [directory / name for name in sorted(set(weight_map.values()))]
            absent = [p.name for p in shards if not p.is_file()]
            if absent:
                raise ChatGLMConversionError(f"weight file(s) listed in {index_name} are missing: "
                                             f"{', '.join(absent)}")
            return shards, fmt
        if (directory / single).is_file():
            return [directory / single], fmt
    raise ChatGLMConversionError("no weights (no model*.safetensors or pytorch_model*.bin shards)")


def _source_files(directory: Path) -> list[Path]:
    names = ["config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
             "tokenization_chatglm.py", "model.safetensors.index.json", "pytorch_model.bin.index.json"]
    return [directory / n for n in names if (directory / n).is_file()]


def conversion_key(directory: Path) -> str:
    digest = hashlib.sha256(f"chatglm-converter-v{CONVERTER_VERSION}".encode())
    shards, _ = _weight_files(directory)
    for path in _source_files(directory) + shards:
        _file_digest(path, digest)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ config

def native_config(config: dict, eos_ids: list[int], pad_id: int | None):
    from transformers import GlmConfig

    unsupported = {
        "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
        "add_bias_linear": (False, "biases on the dense/MLP layers"),
        "apply_residual_connection_post_layernorm": (False, "residuals after the layernorm"),
        "post_layer_norm": (True, "no final layernorm"),
    }
    for key, (expected, what) in unsupported.items():
        if key in config and bool(config[key]) is not expected:
            raise ChatGLMConversionError(f"ChatGLM variant with {what} ({key}={config[key]}) is not supported")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config["multi_query_group_num"]) if config.get("multi_query_attention") else heads
    dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
    return GlmConfig(
        vocab_size=int(config["padded_vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["ffn_hidden_size"]),
        num_hidden_layers=int(config["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(config["kv_channels"]),
        max_position_embeddings=int(config.get("seq_length") or 2048),
        rms_norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
        attention_bias=bool(config.get("add_qkv_bias", False)),
        # modeling_chatglm.py: RotaryEmbedding(kv_channels // 2, base=10000 * rope_ratio), applied to the first
        # half of each head, interleaved -- exactly GLM's partial rotary embedding.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * float(config.get("rope_ratio", 1)),
                         "partial_rotary_factor": 0.5},
        tie_word_embeddings=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=None,
        dtype=dtype,
    )


# ------------------------------------------------------------------------------------------------ weights

_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate; up], the order of GLM's chunk(2)
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_IGNORED = {"transformer.rotary_pos_emb.inv_freq"}  # a buffer the official code recomputes


def convert_tensor(name: str, tensor, q_size: int, kv_size: int) -> dict:
    """One ChatGLM tensor -> its native GLM tensor(s)."""
    if name in _IGNORED:
        return {}
    if name in _TOP_NAMES:
        return {_TOP_NAMES[name]: tensor}
    match = _LAYER.fullmatch(name)
    if match:
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_NAMES:
            return {prefix + _LAYER_NAMES[rest]: tensor}
        if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            if tensor.shape[0] != q_size + 2 * kv_size:
                raise ChatGLMConversionError(f"{name} has {tensor.shape[0]} rows, expected {q_size + 2 * kv_size}")
            q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
            # clone: safetensors refuses views that share one storage
            return {f"{prefix}self_attn.{p}_proj.{kind}": t.clone() for p, t in (("q", q), ("k", k), ("v", v))}
    raise ChatGLMConversionError(
        f"unexpected tensor {name!r}: not a ChatGLM2/3/GLM-4 weight this converter knows (a quantized "
        "checkpoint such as chatglm3-6b-int4 is not supported)"
    )


def _read_shard(path: Path, fmt: str) -> dict:
    import torch

    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: the unpickler builds tensors and plain containers only, never code from the file.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ChatGLMConversionError:
        raise
    except Exception as exc:  # truncated or foreign files: report the file, not a traceback
        raise ChatGLMConversionError(f"cannot read weights {path}: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict):
        raise ChatGLMConversionError(f"{path} does not hold a state dict")
    return state


def convert_weights(directory: Path, target: Path, native) -> None:
    from safetensors.torch import save_file

    shards, fmt = _weight_files(directory)
    q_size = native.num_attention_heads * native.head_dim
    kv_size = native.num_key_value_heads * native.head_dim
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        out_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        converted: dict = {}
        for name, tensor in _read_shard(shard, fmt).items():
            converted.update(convert_tensor(name, tensor, q_size, kv_size))
        converted = {k: v.contiguous() for k, v in converted.items()}
        save_file(converted, str(target / out_name), metadata={"format": "pt"})
        for k, v in converted.items():
            weight_map[k] = out_name
            total += v.numel() * v.element_size()
        del converted
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(native.num_hidden_layers):
        p = f"model.layers.{layer}."
        expected |= {p + n for n in _LAYER_NAMES.values()}
        expected |= {f"{p}self_attn.{x}_proj.weight" for x in "qkv"}
        if native.attention_bias:
            expected |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv"}
    missing = sorted(expected - set(weight_map))
    if missing:
        raise ChatGLMConversionError(f"the weights lack {len(missing)} tensor(s), e.g. {missing[0]} "
                                     "(incomplete download?)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ------------------------------------------------------------------------------------------------ tokenizers

def sentencepiece_tokenizer(model_file: Path, special_tokens: list[str]):
    """A tokenizers BPE equal to SentencePieceProcessor.encode on ChatGLM's model, with the special tokens
    appended at ids len(pieces)..; the dummy-prefix space is added to every text segment between special
    tokens, as the official code encodes each piece of a chat separately."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:
        raise ChatGLMConversionError(f"{model_file} is not a SentencePiece model ({type(exc).__name__})") from None
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or not proto.pieces:
        raise ChatGLMConversionError(f"{model_file}: expected ChatGLM's SentencePiece BPE model")
    norm = proto.normalizer_spec
    if norm.remove_extra_whitespaces or norm.precompiled_charsmap:
        raise ChatGLMConversionError(f"{model_file}: a SentencePiece normalizer other than ChatGLM's identity "
                                     "is not supported")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=proto.pieces[0].piece,
                                   fuse_unk=True, byte_fallback=bool(proto.trainer_spec.byte_fallback)))
    replacement = "▁"
    sequence = [normalizers.Replace(" ", replacement)]
    if norm.add_dummy_prefix:
        sequence.insert(0, normalizers.Prepend(replacement))
    backend.normalizer = normalizers.Sequence(sequence)
    decode = [decoders.Replace(replacement, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(decode)
    controls = [p.piece for p in proto.pieces if p.type in (2, 3)]  # <unk>, <s>, </s>
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
    _add_specials_at(backend, special_tokens, len(proto.pieces))
    _prefix_gmask_sop(backend)
    return backend, {"unk_token": proto.pieces[proto.trainer_spec.unk_id].piece,
                     "bos_token": proto.pieces[proto.trainer_spec.bos_id].piece,
                     "eos_token": proto.pieces[proto.trainer_spec.eos_id].piece,
                     "pad_token": proto.pieces[proto.trainer_spec.unk_id].piece}  # the official pad is unk


def _prefix_gmask_sop(backend) -> None:
    """tokenizer(text) starts with [gMASK] sop, as the official build_inputs_with_special_tokens does (chat
    templates are tokenized without special tokens added, and write the prefix themselves)."""
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", backend.token_to_id("[gMASK]")), ("<sop>", backend.token_to_id("<sop>"))])


def _add_specials_at(backend, tokens: list[str], first_id: int) -> None:
    from tokenizers import AddedToken

    for offset, token in enumerate(tokens):
        if backend.token_to_id(token) is not None:
            raise ChatGLMConversionError(f"special token {token!r} is also an ordinary piece of the vocabulary")
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        if backend.token_to_id(token) != first_id + offset:
            raise ChatGLMConversionError(f"special token {token!r} landed at id {backend.token_to_id(token)}, "
                                         f"not its official id {first_id + offset}")


def read_tiktoken_ranks(model_file: Path) -> dict[bytes, int]:
    """GLM-4's tokenizer.model: one ``base64-token rank`` per line."""
    ranks: dict[bytes, int] = {}
    try:
        with model_file.open("rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
    except ValueError as exc:
        raise ChatGLMConversionError(f"{model_file} is not a tiktoken ranks file ({exc})") from None
    return ranks


def tiktoken_tokenizer(ranks: dict[bytes, int], special_tokens: list[str]):
    """A byte-level BPE equal to tiktoken on GLM-4's ranks, the special tokens at ids len(ranks)..; merges are
    recovered from the ranks as transformers' TikTokenConverter does (it needs the tiktoken package to read)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ChatGLMConversionError(f"tokenizer.model: the tiktoken ranks are not 0..{len(ranks) - 1}")
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    vocab = {to_str(t): r for t, r in ranks.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(to_str(a), to_str(b)) for a, b, _ in merges],
                                   fuse_unk=False))
    backend.model.ignore_merges = True  # tiktoken takes a whole pre-token that is in the vocabulary as is
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    _add_specials_at(backend, special_tokens, len(ranks))
    _prefix_gmask_sop(backend)
    return backend, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def _glm4_special_tokens(tokenizer_config: dict, first_id: int) -> list[str]:
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    tokens = [entry["content"] for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    ids = sorted(int(k) for k in decoder)
    if not tokens:
        tokens = tokenizer_config.get("additional_special_tokens") or []
        ids = list(range(first_id, first_id + len(tokens)))
    if not tokens or ids != list(range(first_id, first_id + len(tokens))):
        raise ChatGLMConversionError(f"tokenizer_config.json: GLM-4 special tokens expected at ids {first_id}.., "
                                     f"found {ids[:3]}...")
    return tokens


def build_tokenizer(directory: Path, family: str, config: dict):
    """(PreTrainedTokenizerFast, eos ids) for the family, with its chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_config_path = directory / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    shipped_template = tokenizer_config.get("chat_template")
    if isinstance(shipped_template, list):  # [{"name": "default", "template": ...}, ...]
        shipped_template = next((t.get("template") for t in shipped_template if t.get("name") == "default"), None)
    model_file = directory / "tokenizer.model"
    if family == FAMILY_GLM4:
        ranks = read_tiktoken_ranks(model_file)
        backend, named = tiktoken_tokenizer(ranks, _glm4_special_tokens(tokenizer_config, len(ranks)))
        template = shipped_template
        eos_ids = _glm4_eos_ids(directory, config, backend)
    else:
        specials = CHATGLM3_SPECIAL_TOKENS if family == FAMILY_CHATGLM3 else CHATGLM2_SPECIAL_TOKENS
        backend, named = sentencepiece_tokenizer(model_file, specials)
        default = CHATGLM3_TEMPLATE if family == FAMILY_CHATGLM3 else CHATGLM2_TEMPLATE
        # A shipped ChatGLM2/3 template spells the start token "sop" (see CHATGLM2_SPECIAL_TOKENS).
        template = shipped_template.replace("[gMASK]sop", "[gMASK]<sop>") if shipped_template else default
        eos = backend.token_to_id(named["eos_token"])
        # modeling_chatglm.py chat(): eos_token_id = [eos, <|user|>, <|observation|>] (ChatGLM3); ChatGLM2: eos.
        eos_ids = [eos] + ([backend.token_to_id("<|user|>"), backend.token_to_id("<|observation|>")]
                           if family == FAMILY_CHATGLM3 else [])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                        padding_side="left", **named)
    tokenizer.model_max_length = int(config.get("seq_length") or 2048)
    if template:
        tokenizer.chat_template = template
    return tokenizer, eos_ids


def _glm4_eos_ids(directory: Path, config: dict, backend) -> list[int]:
    generation = directory / "generation_config.json"
    value = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    if value is None:
        value = config.get("eos_token_id")
    if value is None:
        value = [backend.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    return [int(v) for v in (value if isinstance(value, list) else [value])]


# ------------------------------------------------------------------------------------------------ driver

def convert_once(directory: Path, cache_root: Path) -> Converted:
    """The cached native directory for a ChatGLM-layout ``directory``, converting it on first use."""
    directory = Path(directory).resolve()
    config = _read_json(directory / "config.json")
    family = detect_family(directory, config)
    key = conversion_key(directory)
    target = cache_root / "converted" / f"{directory.name}-{family}-{key}"
    if (target / MARKER).is_file():
        return Converted(target, family, reused=True, seconds=0.0)
    started = time.monotonic()
    log.info("converting a ChatGLM checkpoint to transformers' native GLM (first start only; no code from the "
             "model directory runs)", extra={"source": str(directory), "family": family, "target": str(target)})
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer, eos_ids = build_tokenizer(directory, family, config)
        pad_id = tokenizer.pad_token_id
        native = native_config(config, eos_ids, pad_id)
        native.architectures = ["GlmForCausalLM"]
        native.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        convert_weights(directory, tmp, native)
        seconds = time.monotonic() - started
        (tmp / MARKER).write_text(json.dumps({
            "family": family, "source": str(directory), "converter_version": CONVERTER_VERSION,
            "eos_token_ids": eos_ids, "seconds": round(seconds, 2)}, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("ChatGLM checkpoint converted", extra={"seconds": round(seconds, 2), "target": str(target)})
    return Converted(target, family, reused=False, seconds=seconds)
