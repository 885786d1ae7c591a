"""python -m model_service serve [--flags]  (every flag also as a MODEL_SERVICE_* variable)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m model_service serve [--help] [options]

commands:
  serve    run the model service (HTTP + gRPC) on one model
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "serve":
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from pydantic import ValidationError

    from model_service.config import Settings

    try:
        settings = Settings(_cli_parse_args=rest)
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2

    from model_service.server.main import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
