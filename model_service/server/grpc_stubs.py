"""The generated gRPC stubs of proto/llm/v1, importable from anywhere in the package.

``make proto`` generates them into ``model_service/gen`` (built, never committed). The generated
modules import each other as ``llm.v1...`` (their path under ``proto/``), so that directory goes on
``sys.path`` first; then ``from model_service.server.grpc_stubs import llm_pb2, llm_pb2_grpc``.
"""

from __future__ import annotations

import sys
from pathlib import Path

GEN_DIR = Path(__file__).resolve().parent.parent / "gen"


class StubsMissing(ImportError):
    pass


if not (GEN_DIR / "llm" / "v1" / "llm_service_pb2_grpc.py").is_file():
    raise StubsMissing(f"the gRPC stubs are not generated in {GEN_DIR}: run `make proto`")

if str(GEN_DIR) not in sys.path:
    sys.path.insert(0, str(GEN_DIR))

from llm.v1 import llm_service_pb2 as llm_pb2  # noqa: E402
from llm.v1 import llm_service_pb2_grpc as llm_pb2_grpc  # noqa: E402

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name  # "llm.v1.LlmService"

__all__ = ["GEN_DIR", "SERVICE_NAME", "StubsMissing", "llm_pb2", "llm_pb2_grpc"]
