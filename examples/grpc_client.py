"""A small gRPC client of the model service: asks one question and streams the answer.

    make proto        # once: generate the Python stubs from proto/ into model_service/gen
    python examples/grpc_client.py --target 127.0.0.1:50051 "What is the capital of France?"

Options: --api-key (default: $MODEL_SERVICE_API_KEY) when the service requires one, --max-tokens,
--temperature, --system, --timeout (the call's deadline, seconds), --no-stream (one unary Chat call),
--info (print the model's description and exit). The answer goes to stdout as it is generated;
the finish reason and token usage go to stderr.

In your own project, generate stubs from proto/llm/v1/llm_service.proto with grpcio-tools (Python)
or protoc / the protobuf Maven plugin (Java, see docs/grpc.md) instead of importing this repository's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

GEN_DIR = Path(__file__).resolve().parent.parent / "model_service" / "gen"
sys.path.insert(0, str(GEN_DIR))
try:
    from llm.v1 import llm_service_pb2 as pb
    from llm.v1 import llm_service_pb2_grpc as pb_grpc
except ImportError:
    sys.exit(f"the gRPC stubs are missing in {GEN_DIR}: run `make proto` first")

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
          pb.FINISH_REASON_CONTENT_FILTER: "content_filter"}

# Client-side keepalive for long streams: ping every 30 s when idle (the server accepts pings every
# 10 s or slower), and allow the largest reply the server sends.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", help="what to ask the model")
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    parser.add_argument("--api-key", default=os.environ.get("MODEL_SERVICE_API_KEY"),
                        help="the service's API key (default: $MODEL_SERVICE_API_KEY)")
    parser.add_argument("--system", help="an optional system message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of the call in seconds")
    parser.add_argument("--no-stream", action="store_true", help="one unary Chat call instead of ChatStream")
    parser.add_argument("--info", action="store_true", help="print the served model's description and exit")
    args = parser.parse_args(argv)

    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    messages = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
    messages.append(pb.ChatMessage(role="user", content=args.question))
    request = pb.ChatRequest(messages=messages, max_tokens=args.max_tokens, temperature=args.temperature)

    with grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.LlmServiceStub(channel)
        try:
            if args.info:
                print(stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=args.timeout))
                return 0
            if args.no_stream:
                reply = stub.Chat(request, metadata=metadata, timeout=args.timeout)
                print(reply.text)
                finish, usage = reply.finish_reason, reply.usage
            else:
                call = stub.ChatStream(request, metadata=metadata, timeout=args.timeout)
                try:
                    for message in call:
                        if message.text:
                            print(message.text, end="", flush=True)
                        if message.finish_reason:  # the final message: finish reason and usage
                            finish, usage = message.finish_reason, message.usage
                except KeyboardInterrupt:
                    call.cancel()  # the server stops generating and frees the batch slot
                    print(file=sys.stderr)
                    return 130
                print()
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(f"[finish_reason={FINISH.get(finish, finish)} prompt_tokens={usage.prompt_tokens} "
          f"completion_tokens={usage.completion_tokens}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
