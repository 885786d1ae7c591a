"""--dtype auto: bfloat16 only where the hardware computes in it, float32 elsewhere, and the log says why."""

from __future__ import annotations

import logging

from model_service.llm.loader import _cpu_flags, load_model, resolve_auto_dtype
from tiny_models import build_tiny_glm

EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
EPYC_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"


def test_cpu_without_bf16_instructions_gets_float32():
    dtype, why = resolve_auto_dtype("cpu", _cpu_flags(EPYC_AVX2))
    assert dtype == "float32" and "no bf16 instructions" in why


def test_cpu_with_avx512_bf16_or_amx_gets_bfloat16():
    assert resolve_auto_dtype("cpu", _cpu_flags(EPYC_BF16)) == (
        "bfloat16", "the CPU has bf16 instructions (avx512_bf16)")
    assert resolve_auto_dtype("cpu", _cpu_flags(SAPPHIRE_RAPIDS))[0] == "bfloat16"
    assert _cpu_flags("no flags line here") == set()


def test_load_with_auto_follows_this_cpu_and_logs_why(tmp_path, caplog):
    build_tiny_glm(tmp_path)
    expected, _ = resolve_auto_dtype("cpu")
    with caplog.at_level(logging.INFO, logger="model_service.llm.loader"):
        loaded = load_model(str(tmp_path), dtype="auto")
    assert loaded.dtype == expected
    assert any(r.getMessage().startswith(f"--dtype auto chose {expected}") for r in caplog.records)
