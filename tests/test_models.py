"""Model loading: a tiny random GLM-4 through the same code path, and clear startup errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from conftest import ROOT, start_server
from tiny_models import GLM_EOS, build_tiny_glm


@pytest.fixture(scope="module")
def glm_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("glm")
    random_dir, eos_dir = base / "glm-random", base / "glm-eos"
    vocab = build_tiny_glm(random_dir)
    build_tiny_glm(eos_dir, always_emit="<|observation|>")
    return random_dir, eos_dir, vocab


def test_tiny_glm_loads_with_chat_template_and_all_eos_ids(glm_dirs):
    from model_service.llm.chat import encode_chat
    from model_service.llm.loader import load_model

    random_dir, _, vocab = glm_dirs
    loaded = load_model(str(random_dir))
    assert loaded.architecture == "Glm4ForCausalLM"
    assert loaded.context_length == 256
    assert sorted(loaded.eos_token_ids) == sorted(vocab[t] for t in GLM_EOS)
    ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": "what is the capital of france ?"}])
    expected = ["[gMASK]", "<sop>", "<|user|>", "what", "is", "the", "capital", "of", "france", "?", "<|assistant|>"]
    assert ids == [vocab[t] for t in expected]


def test_glm_generation_stops_at_its_third_eos_id(glm_dirs, tmp_path):
    """The model emits <|observation|> (GLM-4's third eos id): generation must end there."""
    _, eos_dir, _ = glm_dirs
    srv = start_server(tmp_path, "--model", str(eos_dir), "--served-model-name", "glm-4-tiny")
    try:
        r = httpx.post(f"{srv.base_url}/v1/chat/completions", json={
            "model": "glm-4-tiny", "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0, "max_tokens": 20}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 1
        assert body["choices"][0]["message"]["content"] == ""
        # with the eos id set shrunk to the tokenizer's single eos, the same model runs to max_tokens:
        # this is what a server that ignores the generation config would do.
        gen = json.loads((eos_dir / "generation_config.json").read_text())
        assert len(gen["eos_token_id"]) == 3
        ready = httpx.get(f"{srv.base_url}/v1/models").json()
        assert ready["data"][0]["id"] == "glm-4-tiny"
    finally:
        assert srv.stop() == 0


def test_glm_ignoring_generation_config_would_run_on(glm_dirs):
    """Control for the test above: the model really emits a non-primary eos id every step."""
    from model_service.llm.loader import load_model

    _, eos_dir, vocab = glm_dirs
    loaded = load_model(str(eos_dir))
    ids = torch.tensor([[vocab["[gMASK]"], vocab["<sop>"], vocab["<|user|>"], vocab["hello"]]])
    out = loaded.model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=vocab["<|endoftext|>"])
    assert out[0, 4:].tolist() == [vocab["<|observation|>"]] * 3


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_service", "serve", "--http-port", "0", "--grpc-port", "0",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("make_model,expected", [
    (lambda tmp: str(tmp / "does-not-exist"), "model directory not found"),
    (lambda tmp: str(tmp / "missing.gguf"), "model file not found"),
    (lambda tmp: _write(tmp / "noconfig", {}, name="README.md"), "has no config.json"),
    (lambda tmp: _write(tmp / "alien", {"model_type": "alien-arch-9000"}), "unsupported model"),
    (lambda tmp: _write(tmp / "chatglm-6b", {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
                                             "num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32}),
     "the first-generation ChatGLM-6B is not supported"),
    (lambda tmp: "THUDM/glm-4-9b-chat-hf", "never downloads"),
], ids=["missing-dir", "missing-gguf", "not-a-model-dir", "unknown-architecture", "chatglm-6b-v1",
        "hub-id-offline"])
def test_startup_errors_are_clear(tmp_path, make_model, expected):
    result = run_serve("--model", make_model(tmp_path), "--log-format", "text")
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def _write(directory: Path, config: dict, name: str = "config.json") -> str:
    directory.mkdir(parents=True)
    (directory / name).write_text(json.dumps(config))
    return str(directory)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_startup_error():
    result = run_serve("--device", "cuda", "--log-format", "text")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sees no CUDA device" in result.stderr and "--device cpu" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_option_is_rejected():
    result = run_serve("--http-port", "99999")
    assert result.returncode == 2
    assert "http_port" in result.stderr or "http-port" in result.stderr
    result = run_serve("--device", "tpu")
    assert result.returncode == 2
    assert "device" in result.stderr


def test_builtin_gguf_conversion_is_reused_after_a_reinstall(smollm, tmp_path):
    """A reinstall writes the same GGUF with a new mtime; the cached conversion (540 MB) must be reused."""
    import os
    import shutil

    from model_service.llm import loader

    original = loader.builtin_gguf_path("smollm2-135m-instruct")
    converted = loader._convert_gguf_once(original, "smollm2-135m-instruct")  # done by the smollm fixture
    cache = converted.parent
    before = sorted(p.name for p in cache.iterdir())

    reinstalled = tmp_path / original.name
    shutil.copyfile(original, reinstalled)
    os.utime(reinstalled, (original.stat().st_atime + 3600, original.stat().st_mtime + 3600))
    assert loader._convert_gguf_once(reinstalled, "smollm2-135m-instruct") == converted
    assert sorted(p.name for p in cache.iterdir()) == before
