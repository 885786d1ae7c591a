"""Decode steps of fixed shape (decode_runner.py): the path CUDA graphs replay, run eagerly on the CPU.

``--cuda-graphs eager`` runs the very steps a graph records (preallocated buffers, batch padded to a bucket,
keys read up to a length bucket, the mask computed from the position buffer) without capturing them, so
everything but the capture itself is checked here, token for token; tests/test_gpu.py checks the capture.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import httpx
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import chat_ids, start_server
from engine_runs import generate, staggered_jobs, staggered_run
from model_service.config import Settings, parse_batch_sizes
from model_service.llm import decode_runner
from model_service.llm.decode_runner import default_batch_sizes, length_buckets
from model_service.llm.engine import Engine, EngineLimits
from model_service.server.main import engine_limits
from tiny_models import build_tiny_glm, load_spread_glm


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm-static")
    build_tiny_glm(path)
    return path


@pytest.fixture(scope="module")
def glm(glm_dir):
    return load_spread_glm(glm_dir)


def test_buckets():
    assert default_batch_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert default_batch_sizes(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert default_batch_sizes(100)[-3:] == (64, 96, 100)
    assert default_batch_sizes(3) == (1, 2, 3)
    assert default_batch_sizes(1) == (1,)
    assert length_buckets(448) == (256, 448)
    assert length_buckets(2048) == (256, 512, 1024, 2048)
    assert length_buckets(100) == (100,)


def test_batch_sizes_flag_and_env(monkeypatch):
    assert parse_batch_sizes("") == ()
    assert parse_batch_sizes(" 8,1,2,2 ") == (1, 2, 8)
    for bad in ("1,two", "0,4", "1,,2"):
        with pytest.raises(ValueError):
            parse_batch_sizes(bad)
    settings = Settings(_cli_parse_args=["--cuda-graphs", "eager", "--cuda-graph-batch-sizes", "4,1,2"])
    assert settings.cuda_graphs == "eager" and settings.cuda_graph_batch_sizes == "1,2,4"
    monkeypatch.setenv("MODEL_SERVICE_CUDA_GRAPHS", "off")
    monkeypatch.setenv("MODEL_SERVICE_CUDA_GRAPH_BATCH_SIZES", "1,3")
    settings = Settings(_cli_parse_args=[])
    assert settings.cuda_graphs == "off" and settings.cuda_graph_batch_sizes == "1,3"
    with pytest.raises(ValueError, match="comma"):
        Settings(_cli_parse_args=["--cuda-graph-batch-sizes", "1;2"])
    default = engine_limits(Settings(_cli_parse_args=[]))
    assert default.torch_compile == "auto" and default.compile_cache_dir == ""
    limits = engine_limits(Settings(_cli_parse_args=["--torch-compile", "on", "--cuda-graph-batch-sizes", "1,4",
                                                     "--compile-cache-dir", "/var/cache/kernels"]))
    assert limits.torch_compile == "on" and limits.cuda_graph_batch_sizes == (1, 4)
    assert limits.compile_cache_dir == "/var/cache/kernels"
    for value, meant in (("true", "on"), ("false", "off"), ("off", "off")):  # true/false: the flag was a boolean
        monkeypatch.setenv("MODEL_SERVICE_TORCH_COMPILE", value)
        assert engine_limits(Settings(_cli_parse_args=[])).torch_compile == meant
    with pytest.raises(ValueError, match="torch_compile"):
        Settings(_cli_parse_args=["--torch-compile", "always"])


def test_static_decode_is_off_on_the_cpu_by_default_and_refused_where_it_cannot_run(glm):
    assert Engine(glm, EngineLimits())._runner is None  # auto: the CPU keeps its padded cache, unchanged
    assert Engine(glm, EngineLimits(kv_cache="slots"))._runner is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(glm, EngineLimits(cuda_graphs="on"))
    with pytest.raises(ValueError, match="--kv-cache slots or auto"):
        Engine(glm, EngineLimits(cuda_graphs="eager", kv_cache="padded"))
    engine = Engine(glm, EngineLimits(max_running_requests=5, cuda_graphs="eager",
                                      cuda_graph_batch_sizes=(2, 4, 16)))
    assert engine._slots is not None  # eager static steps imply the slot cache
    assert engine._runner.batch_sizes == (2, 4, 5) and engine._runner.graphs == 0
    assert not engine._runner.compiled  # --torch-compile auto compiles only steps captured as CUDA graphs
    assert Engine(glm, EngineLimits(torch_compile="auto", cuda_graphs="off"))._runner is None
    with pytest.raises(ValueError, match="--torch-compile on compiles the fixed-shape decode step"):
        Engine(glm, EngineLimits(torch_compile="on", cuda_graphs="off"))
    with pytest.raises(ValueError, match="--torch-compile on decodes over the slot cache"):
        Engine(glm, EngineLimits(torch_compile="on", kv_cache="padded"))
    with pytest.raises(ValueError, match="torch_compile must be auto, on or off"):
        Engine(glm, EngineLimits(torch_compile=True))


def test_tiny_glm_fixed_shape_steps_give_the_tokens_of_each_request_alone(glm, monkeypatch):
    """Staggered joins and leaves through 3 slots reused by later requests; the batch moves between row
    buckets (1, 2, 3) and read lengths (16, 32, 64, ...) mid-stream; every request's greedy tokens equal its
    tokens alone and the padded cache's (an independent implementation)."""
    monkeypatch.setattr(decode_runner, "SHORTEST_READ", 16)
    jobs = staggered_jobs(glm.tokenizer, long_extra_tokens=20)
    limits = EngineLimits(max_running_requests=3, max_waiting_requests=16, max_prefill_tokens=16,
                          cuda_graphs="eager", cuda_graph_batch_sizes=(1, 2))
    alone, together, slots, engine = staggered_run(glm, jobs, limits)
    runner = engine._runner
    assert runner is not None and runner.batch_sizes == (1, 2, 3) and not runner.compiled
    assert_staggered_run_moved_through_buckets(jobs, alone, together, slots, runner)
    padded, _, _, _ = staggered_run(glm, jobs, EngineLimits(max_running_requests=3, max_prefill_tokens=16,
                                                             kv_cache="padded"))
    assert padded == alone


def assert_staggered_run_moved_through_buckets(jobs, alone, together, slots, runner) -> None:
    """Every request got its tokens alone, through 3 reused slots, in several row and length buckets."""
    assert together == alone
    assert all(len(t) == n for t, (_, n) in zip(together, jobs))
    assert len(slots) == len(jobs) and {slot for _, slot in slots} == {0, 1, 2}  # slots reused
    rows_used = {rows for rows, _ in runner.steps}
    lengths_used = {length for _, length in runner.steps}
    assert {1, 3} <= rows_used, runner.steps  # alone: 1 row; three at once: 3
    assert {16, 32, 64} <= lengths_used, runner.steps
    assert runner.replays == 0  # nothing captured on the CPU


def test_compiled_fixed_shape_steps_give_the_same_tokens_with_two_compiles_for_every_bucket(glm, monkeypatch):
    """--torch-compile on the CPU: the compiled step (uncaptured) serves the same staggered run token for token
    (the eager fixed-shape steps and the padded cache are checked against the same tokens above), and the batch
    moving through row buckets 1..3 and read lengths 16..128 costs two compiles (one row; 2 rows and more), not
    one per bucket: with 20 buckets on a GPU, that is minutes of start-up saved."""
    monkeypatch.setattr(decode_runner, "SHORTEST_READ", 16)
    jobs = staggered_jobs(glm.tokenizer, long_extra_tokens=20)
    compiles = counters["stats"]["unique_graphs"]
    limits = EngineLimits(max_running_requests=3, max_waiting_requests=16, max_prefill_tokens=16,
                          cuda_graph_batch_sizes=(1, 2), torch_compile="on")  # no capture on the CPU
    alone, together, slots, engine = staggered_run(glm, jobs, limits)
    runner = engine._runner
    assert runner.compiled and runner.compile_seconds is not None
    assert_staggered_run_moved_through_buckets(jobs, alone, together, slots, runner)
    with torch.inference_mode():  # and every other bucket, on idle rows (they write to the scratch column only)
        for rows in runner.batch_sizes:
            for length in runner.lengths:
                runner._forward(rows, length)
    assert counters["stats"]["unique_graphs"] - compiles <= 2  # none at all when an earlier test compiled it
    eager, _, _, _ = staggered_run(glm, jobs, dataclasses.replace(limits, torch_compile="off", cuda_graphs="eager"))
    assert eager == alone


def test_a_failed_compile_is_logged_and_the_step_runs_uncompiled(glm, monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("inductor broke")

    monkeypatch.setattr(decode_runner.StaticDecodeRunner, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="model_service.llm.engine"):
        engine = Engine(glm, EngineLimits(max_running_requests=2, torch_compile="on"))
    assert "torch.compile of the decode step failed; running it uncompiled: RuntimeError: inductor broke" in (
        caplog.text)
    assert engine._runner is not None and not engine._runner.compiled
    ids = glm.tokenizer("hello world", add_special_tokens=False).input_ids
    alone, _, _, _ = staggered_run(glm, [(ids, 5)], EngineLimits(max_running_requests=2, cuda_graphs="eager"))
    engine.start()
    try:
        assert asyncio.run(generate(engine, ids, 5)) == alone[0]
    finally:
        engine.shutdown()


def test_embedded_model_fixed_shape_steps_batched_equal_alone(smollm):
    assert smollm.dtype == "float32"  # batch invariance is a float32 guarantee
    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
                 "What is 2+2?"]
    jobs = [(chat_ids(smollm.tokenizer, q), 8 + 4 * i) for i, q in enumerate(questions)]
    alone, together, slots, engine = staggered_run(
        smollm, jobs, EngineLimits(max_running_requests=3, max_waiting_requests=8, kv_cache_tokens=256,
                                   cuda_graphs="eager"))
    assert together == alone
    assert len({slot for _, slot in slots}) == 3
    assert len({rows for rows, _ in engine._runner.steps}) > 1
    # and transformers' own greedy generate (its own cache and masks) gives the same tokens
    with torch.inference_mode():
        for (ids, n), tokens in zip(jobs, alone):
            out = smollm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=n, do_sample=False, pad_token_id=smollm.eos_token_ids[0])
            reference = out[0, len(ids):].tolist()  # up to its end of turn (the engine ignored eos and went on)
            assert len(reference) >= 4 and tokens[:len(reference)] == reference


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_graphs_on_without_a_gpu_is_a_clear_startup_error():
    """The engine's settings are checked when the model has loaded: a clear line and exit 2, no traceback."""
    from test_models import run_serve

    result = run_serve("--cuda-graphs", "on", "--log-format", "text")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot start: --cuda-graphs on needs a CUDA device" in result.stderr
    assert "Traceback" not in result.stderr


def test_grouped_decode_attention_equals_attention_over_repeated_kv_heads():
    """The compiled step's attention (one query token per row, GLM-4's grouped KV heads read as they are) gives
    what transformers computes with the KV heads copied once per query head."""
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    rows, heads, kv_heads, length, dim = 3, 8, 2, 20, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    mask = (torch.arange(length)[None, :] <= torch.tensor([[4], [19], [0]]))[:, None, None, :]
    out, _ = decode_runner.grouped_decode_sdpa(module, query, key, value, mask, scaling=dim ** -0.5)
    groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=dim ** -0.5)
    assert out.shape == (rows, 1, heads, dim)  # transformers' layout: [rows, tokens, heads, dim]
    torch.testing.assert_close(out, expected.transpose(1, 2))
    # a prompt (several query tokens) goes to transformers' own sdpa unchanged
    prompt = torch.randn(1, heads, 5, dim)
    out, _ = decode_runner.grouped_decode_sdpa(module, prompt, key[:1, :, :5], value[:1, :, :5], None)
    expected = torch.nn.functional.scaled_dot_product_attention(
        prompt, repeat_kv(key[:1, :, :5], groups), repeat_kv(value[:1, :, :5], groups), is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_compiled_kernels_go_to_the_services_cache_folder_unless_the_user_chose_one_or_it_cannot_be_written(
        glm, tmp_path, monkeypatch, caplog):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # restored afterwards: torch set it when imported
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("MODEL_SERVICE_CACHE_DIR", str(tmp_path / "service"))
    limits = EngineLimits(max_running_requests=2, torch_compile="on")
    assert Engine(glm, limits)._runner.compiled
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "service" / "torch-compile")
    assert any((tmp_path / "service" / "torch-compile").rglob("*"))

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's wins over the flag
    Engine(glm, dataclasses.replace(limits, compile_cache_dir=str(tmp_path / "flag")))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine") and not (tmp_path / "flag").exists()

    # a folder that cannot be made (a read-only root file system, in a pod): logged, and the step still compiles
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.WARNING, logger="model_service.llm.engine"):
        engine = Engine(glm, dataclasses.replace(limits, compile_cache_dir=str(tmp_path / "a-file" / "kernels")))
    assert engine._runner.compiled
    assert f"compile cache {tmp_path / 'a-file' / 'kernels'} cannot be used" in caplog.text
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.abspath(default_cache_dir())


@pytest.mark.slow
def test_a_restarted_service_takes_its_compiled_step_from_the_compile_cache_dir(glm_dir, tmp_path, monkeypatch):
    """--compile-cache-dir keeps torch.compile's kernels where a restart finds them (a volume that outlives the
    pod): the first start compiles both graphs, the next one finds both there, logs so, and serves the same
    tokens. (On this CPU SmolLM2's step compiles in 98 s cold and 17 s from the cache.)"""
    # torch sets this to its temp default when imported; a service started from here would inherit it
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cache = tmp_path / "kernels"
    answers = []
    for start in ("cold", "warm"):
        srv = start_server(tmp_path, "--model", str(glm_dir), "--served-model-name", "glm", "--torch-compile", "on",
                           "--compile-cache-dir", str(cache), "--max-running-requests", "2")
        try:
            reply = httpx.post(f"{srv.base_url}/v1/completions", timeout=60, json={
                "model": "glm", "prompt": "hello world", "max_tokens": 6, "temperature": 0})
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["text"])
        finally:
            srv.stop()
        found = "0 of 2" if start == "cold" else "2 of 2"
        assert f"({found} graphs from the cache)" in srv.log(), (
            srv.log()[-3000:])
        assert str(cache) in srv.log() and any(cache.rglob("*")), "the kernels are kept in --compile-cache-dir"
    assert answers[0] == answers[1]
