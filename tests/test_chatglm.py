"""ChatGLM3 and original GLM-4 checkpoints as users have them on disk, converted to native GlmForCausalLM.

The fixtures (tests/fixtures/glm, see its README) are tiny random-weight checkpoints in THUDM's layouts with
golden.json: the prompt ids, greedy tokens and logits the official remote-code implementation produces. The
conversion must reproduce them exactly (ids) and within 1e-4 (float32 logits), in process and over HTTP.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from conftest import ROOT, start_server

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "glm"
GOLDEN = json.loads((FIXTURES / "golden.json").read_text())["fixtures"]
LAYOUTS = ["chatglm3-tiny", "chatglm3-tiny-notemplate", "glm4-chat-tiny"]
FAMILY = {"chatglm3-tiny": "chatglm3", "chatglm3-tiny-notemplate": "chatglm3", "glm4-chat-tiny": "glm4"}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private conversion cache: the tests never read or fill the user's ~/.cache/model-service."""
    path = tmp_path_factory.mktemp("model-cache")
    saved = os.environ.get("MODEL_SERVICE_CACHE_DIR")
    os.environ["MODEL_SERVICE_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("MODEL_SERVICE_CACHE_DIR", None)
    else:
        os.environ["MODEL_SERVICE_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def loaded(cache_dir):
    from model_service.llm.loader import load_model

    models = {}

    def get(layout: str):
        if layout not in models:
            models[layout] = load_model(str(FIXTURES / layout), dtype="float32")
        return models[layout]

    return get


def conversations():
    return [(layout, name) for layout in LAYOUTS for name in GOLDEN[layout]["conversations"]]


# ------------------------------------------------------------------------------------------------ in process

@pytest.mark.parametrize("layout", LAYOUTS)
def test_conversion_is_native_glm_with_the_official_eos_ids(loaded, layout):
    model = loaded(layout)
    golden = GOLDEN[layout]
    assert model.architecture == "GlmForCausalLM"
    assert type(model.model).__name__ == "GlmForCausalLM"
    assert model.chat_family == FAMILY[layout]
    assert model.eos_token_ids == golden["eos_token_ids"]
    assert model.context_length == golden["model"]["seq_length"]
    vocab = model.tokenizer.get_vocab()
    for token, token_id in golden["special_token_ids"].items():
        # ChatGLM3's "sop"/"eop" are spelled "<sop>"/"<eop>" (see chatglm_convert.CHATGLM2_SPECIAL_TOKENS)
        spelled = f"<{token}>" if token in ("sop", "eop") else token
        assert vocab[spelled] == token_id, token
    assert model.tokenizer.chat_template


@pytest.mark.parametrize("layout,conversation", conversations())
def test_prompt_ids_greedy_ids_and_logits_equal_the_official_implementation(loaded, layout, conversation):
    from model_service.llm.chat import encode_chat

    model = loaded(layout)
    golden = GOLDEN[layout]["conversations"][conversation]
    prompt = encode_chat(model.tokenizer, golden["messages"])
    assert prompt == golden["prompt_ids"]

    with torch.no_grad():
        logits = model.model(torch.tensor([prompt])).logits[0, -1].float()
    assert torch.allclose(logits[:8], torch.tensor(golden["logits_first8"]), atol=TOLERANCE, rtol=0)
    top_ids = [token_id for token_id, _ in golden["logits_top5"]]
    assert logits.topk(5).indices.tolist() == top_ids
    assert torch.allclose(logits[top_ids], torch.tensor([v for _, v in golden["logits_top5"]]), atol=TOLERANCE, rtol=0)

    # greedy with the KV cache, as the engine decodes (the golden ids re-ran the whole sequence each step)
    out = model.model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                               min_new_tokens=16, pad_token_id=model.tokenizer.pad_token_id)
    greedy = out[0, len(prompt):].tolist()
    assert greedy == golden["greedy_ids"]
    assert model.tokenizer.decode(greedy, skip_special_tokens=True) == golden["greedy_text"]


def test_chatglm3_tokenizer_equals_sentencepiece_on_random_text(loaded):
    """Beyond the golden prompts: the fast tokenizer must encode and decode any text as SentencePiece does."""
    from sentencepiece import SentencePieceProcessor

    tokenizer = loaded("chatglm3-tiny").tokenizer
    sp = SentencePieceProcessor(model_file=str(FIXTURES / "chatglm3-tiny" / "tokenizer.model"))
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?'\"\t\n你好世界产有é€😀")
    alphabet += ["  ", "   ", "\n\n"]
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = sp.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False) == ids, repr(text)
        assert tokenizer.decode(ids) == sp.decode(ids), repr(text)
    # a word containing "sop" is text, not ChatGLM's start token
    assert 603 not in tokenizer.encode("isopropyl sop", add_special_tokens=False)
    # tokenizer(text), as the official one, starts with [gMASK] sop (raw /v1/completions prompts)
    assert tokenizer("hello")["input_ids"] == [601, 603, *sp.encode("hello")]


def test_glm4_tokenizer_round_trips_text(loaded):
    tokenizer = loaded("glm4-chat-tiny").tokenizer
    rng = random.Random(11)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABC0123456789.,!?'\"\t\n你好世界éß€😀") + ["  ", "'s", "\r\n"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert all(i < 151329 for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hello world", add_special_tokens=False) == [14978, 1879]  # tiktoken ranks of the words


def test_conversion_is_cached_by_content_and_reused(cache_dir, tmp_path):
    from model_service.llm.chatglm_convert import convert_once

    source = tmp_path / "chatglm3"
    shutil.copytree(FIXTURES / "chatglm3-tiny", source)
    first = convert_once(source, cache_dir)
    files = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    started = time.monotonic()
    again = convert_once(source, cache_dir)
    assert again.reused and again.path == first.path
    assert time.monotonic() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == files
    # a copy elsewhere (a re-download of the same files) reuses the conversion; changed weights do not
    copy = tmp_path / "elsewhere" / "chatglm3"
    shutil.copytree(source, copy)
    assert convert_once(copy, cache_dir).path == first.path
    _make_model_emit(copy, token_id=608)
    changed = convert_once(copy, cache_dir)
    assert not changed.reused and changed.path != first.path
    assert not list(cache_dir.glob("converted/*.tmp*"))  # the atomic rename left no partial directory


def test_no_code_from_the_model_directory_runs(cache_dir, tmp_path):
    """The remote .py files are never imported, and .bin shards are unpickled with weights_only."""
    from model_service.llm.loader import ModelLoadError, load_model

    source = tmp_path / "chatglm3-with-code"
    shutil.copytree(FIXTURES / "chatglm3-tiny-notemplate", source)
    marker = tmp_path / "code-ran"
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        (source / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n# <|observation|>\n")
    model = load_model(str(source))
    assert model.chat_family == "chatglm3" and not marker.exists()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shard = source / "pytorch_model-00001-of-00002.bin"
    torch.save({"transformer.embedding.word_embeddings.weight": Payload()}, shard)
    with pytest.raises(ModelLoadError, match="cannot read weights .*pytorch_model-00001-of-00002.bin"):
        load_model(str(source))
    assert not marker.exists()


def test_chatglm2_is_converted_with_its_round_prompt(cache_dir, tmp_path):
    from model_service.llm.chat import encode_chat
    from model_service.llm.loader import load_model

    source = tmp_path / "chatglm2"
    shutil.copytree(FIXTURES / "chatglm3-tiny-notemplate", source)
    config = json.loads((source / "config.json").read_text())
    config["_name_or_path"] = "THUDM/chatglm2-6b"
    (source / "config.json").write_text(json.dumps(config))
    model = load_model(str(source))
    assert model.chat_family is None  # no tool format of its own
    assert model.eos_token_ids == [2]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "[gMASK]<sop>[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：bye\n\n答："
    ids = encode_chat(model.tokenizer, messages)
    assert ids[:2] == [601, 603] and 606 not in ids  # ChatGLM2 has no role tokens
    with pytest.raises(Exception, match="no system role"):
        encode_chat(model.tokenizer, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_native_glm4_is_the_glm4_family(tmp_path):
    from tiny_models import build_tiny_glm

    from model_service.llm.loader import load_model

    build_tiny_glm(tmp_path / "glm4-hf")
    assert load_model(str(tmp_path / "glm4-hf")).chat_family == "glm4"


# ------------------------------------------------------------------------------------------------ the real server

def _make_model_emit(directory: Path, token_id: int) -> None:
    """Rewrite the output layer so that greedy decoding picks ``token_id`` first: its row becomes 10x the row of
    the first golden greedy token (whose logit is positive for every golden prompt)."""
    from safetensors.torch import load_file, save_file

    name = "transformer.output_layer.weight"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][name]
    tensors = load_file(str(shard))
    first = GOLDEN["chatglm3-tiny" if token_id < 1000 else "glm4-chat-tiny"]["conversations"]["single_turn"]
    tensors[name][token_id] = tensors[name][first["greedy_ids"][0]] * 10
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.fixture(scope="module", params=LAYOUTS)
def glm_server(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glm-server")
    srv = start_server(tmp, "--model", str(FIXTURES / request.param), "--served-model-name", request.param,
                       env={"MODEL_SERVICE_CACHE_DIR": str(tmp / "cache")})
    yield request.param, srv
    assert srv.stop() == 0


def _chat(base_url: str, model: str, messages: list[dict], **extra) -> dict:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 16, "ignore_eos": True, **extra}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _answer(greedy_text: str) -> str:
    """A chat answer as the official chat() / API server return it: the reply's metadata line and surrounding
    whitespace dropped (the golden greedy texts have no newline, so that is strip())."""
    return greedy_text.strip()


def test_server_greedy_equals_golden_alone_and_batched(glm_server):
    layout, srv = glm_server
    golden = GOLDEN[layout]["conversations"]
    for conv in golden.values():
        # the raw continuation of the official prompt ids, decoded, is exactly the golden text
        r = httpx.post(f"{srv.base_url}/v1/completions", timeout=120, json={
            "model": layout, "prompt": conv["prompt_ids"], "temperature": 0, "max_tokens": 16, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == conv["greedy_text"]
        body = _chat(srv.base_url, layout, conv["messages"])
        assert body["choices"][0]["message"]["content"] == _answer(conv["greedy_text"])
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] == conv["prompt_len"]
        assert body["usage"]["completion_tokens"] == 16
    # batched: every conversation twice, all at once
    jobs = [conv for conv in golden.values() for _ in range(2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        bodies = list(pool.map(lambda conv: _chat(srv.base_url, layout, conv["messages"]), jobs))
    for conv, body in zip(jobs, bodies):
        assert body["choices"][0]["message"]["content"] == _answer(conv["greedy_text"])
        assert body["usage"]["prompt_tokens"] == conv["prompt_len"]
    # streamed, the deltas add up to the same text
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", timeout=120, json={
            "model": layout, "messages": jobs[0]["messages"], "temperature": 0, "max_tokens": 16, "ignore_eos": True,
            "stream": True}) as r:
        deltas = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"]) == \
        _answer(jobs[0]["greedy_text"])
    log = srv.log()
    assert "no code from the model directory runs" in log


@pytest.mark.parametrize("layout,eos_token", [("chatglm3-tiny", "<|observation|>"), ("glm4-chat-tiny", "<|user|>")])
def test_server_stops_at_the_familys_extra_eos_ids(tmp_path, layout, eos_token):
    """A model whose first greedy token is <|observation|> (ChatGLM3) / <|user|> (GLM-4): a non-primary eos id."""
    source = tmp_path / layout
    shutil.copytree(FIXTURES / layout, source)
    token_id = GOLDEN[layout]["special_token_ids"][eos_token]
    assert token_id in GOLDEN[layout]["eos_token_ids"][1:]
    _make_model_emit(source, token_id)
    srv = start_server(tmp_path, "--model", str(source), "--served-model-name", "m",
                       env={"MODEL_SERVICE_CACHE_DIR": str(tmp_path / "cache")})
    try:
        messages = GOLDEN[layout]["conversations"]["single_turn"]["messages"]
        body = _chat(srv.base_url, "m", messages, ignore_eos=False)
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 1
        assert body["choices"][0]["message"]["content"] == ""
        # control: with eos ignored, the same model keeps emitting the token and runs to max_tokens
        body = _chat(srv.base_url, "m", messages, ignore_eos=True, max_tokens=3)
        assert body["choices"][0]["finish_reason"] == "length"
    finally:
        assert srv.stop() == 0


def _log_events(srv) -> list[dict]:
    events = []
    for line in srv.log().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_second_start_reuses_the_conversion(tmp_path):
    cache = tmp_path / "cache"
    times = []
    for attempt in range(2):
        started = time.monotonic()
        srv = start_server(tmp_path, "--model", str(FIXTURES / "glm4-chat-tiny"),
                           env={"MODEL_SERVICE_CACHE_DIR": str(cache)})
        times.append(time.monotonic() - started)
        try:
            events = _log_events(srv)
            event = next(e for e in events if "GlmForCausalLM; no code" in e.get("event", ""))
            converting = [e for e in events if e.get("event", "").startswith("converting a ChatGLM checkpoint")]
            assert len(converting) == (1 if attempt == 0 else 0)
            assert event["cache"] == ("new" if attempt == 0 else "reused")
            if attempt == 0:
                converted = Path(event["converted"])
                stamp = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
                conversion_seconds = event["conversion_seconds"]
            else:
                assert Path(event["converted"]) == converted
                assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == stamp
                assert event["conversion_seconds"] == 0
        finally:
            assert srv.stop() == 0
    assert conversion_seconds > 0
    assert len(list((cache / "converted").iterdir())) == 1
    print(f"start with conversion {times[0]:.1f}s (conversion {conversion_seconds}s), from the cache {times[1]:.1f}s")


# ------------------------------------------------------------------------------------------------ startup errors

def _run_serve(model: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL_SERVICE_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "model_service", "serve", "--http-port", "0", "--grpc-port", "0",
                           "--model", str(model), "--log-format", "text"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


def _break_chatglm_weights(d: Path):
    for p in d.glob("model*.safetensors*"):
        p.unlink()


def _truncate_config(d: Path):
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[: len(text) // 2])


def _truncate_shard(d: Path):
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])


def _native_glm(d: Path):
    from tiny_models import build_tiny_glm

    shutil.rmtree(d)
    build_tiny_glm(d)


def _native_without_weights(d: Path):
    _native_glm(d)
    for p in d.glob("*.safetensors"):
        p.unlink()


def _native_without_tokenizer(d: Path):
    _native_glm(d)
    (d / "tokenizer.json").unlink()


def _native_truncated_config(d: Path):
    _native_glm(d)
    _truncate_config(d)


@pytest.mark.parametrize("layout,breaks,expected", [
    ("chatglm3-tiny", _break_chatglm_weights, "no weights"),
    ("chatglm3-tiny", lambda d: (d / "model-00002-of-00002.safetensors").unlink(),
     "missing: model-00002-of-00002.safetensors"),
    ("chatglm3-tiny", _truncate_shard, "cannot read weights"),
    ("glm4-chat-tiny", _truncate_config, "config.json is not valid JSON"),
    ("chatglm3-tiny-notemplate", lambda d: (d / "tokenizer.model").unlink(),
     "tokenizer.model (the ChatGLM tokenizer file) is missing"),
    ("glm4-chat-tiny", lambda d: (d / "tokenizer_config.json").write_text('{"added_tokens_decoder": {}}'),
     "GLM-4 special tokens"),
    ("chatglm3-tiny", _native_without_weights, "cannot load the weights of"),
    ("chatglm3-tiny", _native_without_tokenizer, "cannot load the tokenizer of"),
    ("chatglm3-tiny", _native_truncated_config, "config.json is not valid JSON"),
], ids=["chatglm-no-weights", "chatglm-missing-shard", "chatglm-truncated-shard", "glm4-truncated-config",
        "chatglm-no-tokenizer", "glm4-no-special-tokens", "native-no-weights", "native-no-tokenizer",
        "native-truncated-config"])
def test_broken_checkpoints_fail_with_one_clear_line(tmp_path, layout, breaks, expected):
    model = tmp_path / "model"
    shutil.copytree(FIXTURES / layout, model)
    breaks(model)
    result = _run_serve(model, tmp_path / "cache")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot start: " in errors[0] and expected in errors[0], result.stderr[-3000:]
    assert str(model) in errors[0]
    assert not list((tmp_path / "cache").glob("converted/*"))  # nothing half-converted left behind
