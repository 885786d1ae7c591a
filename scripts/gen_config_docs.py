#!/usr/bin/env python3
"""Render the configuration reference, docs/configuration.md, from the code.

    python scripts/gen_config_docs.py           # rewrite docs/configuration.md (`make docs`)
    python scripts/gen_config_docs.py --check   # exit 1 when the file is stale (tests/test_config_docs.py)

Sources: ``model_service.config.Settings`` (every start-up option: CLI flag, MODEL_SERVICE_* variable, default,
constraints, description; grouped by the ``# --- group ---`` comments of config.py) and
``model_service.server.policy.Policy`` (the hot-reloaded Nacos document ``model-service.yaml``).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUTPUT = ROOT / "docs" / "configuration.md"

from pydantic import BaseModel, SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

from model_service.config import Settings  # noqa: E402


def _groups() -> dict[str, str]:
    """Field name -> its group, from the ``# --- group ---`` comments in config.py's Settings class."""
    source = (ROOT / "model_service" / "config.py").read_text()
    groups, current, in_class = {}, "general", False
    for line in source.splitlines():
        if line.startswith("class Settings("):
            in_class = True
            continue
        if in_class and line and not line.startswith((" ", "#")):
            break
        comment = re.match(r"\s+# --- (.+?) ---", line)
        if comment:
            current = comment.group(1)
            continue
        field = re.match(r"    (\w+)\s*:", line)
        if field and in_class:
            groups[field.group(1)] = current
    return groups


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if annotation is SecretStr:
        return "secret"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
                             ("max_length", "length ≤")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "empty"
        return f"`{value!r}`" if value not in ([], {}) else "empty"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_tables() -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    groups = _groups()
    by_group: dict[str, list[str]] = {}
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        if annotation is bool:
            flag_cell = f"`{flag}` / `--no-{flag[2:]}`"
        else:
            flag_cell = f"`{flag}`"
        kind = _type_name(annotation)
        constraints = _constraints(field)
        if constraints:
            kind += f" ({constraints})"
        row = (f"| {flag_cell} | `{prefix}{name.upper()}` | {_cell(kind)} | {_default(field)} | "
               f"{_cell(field.description or '')} |")
        by_group.setdefault(groups.get(name, "general"), []).append(row)
    out = []
    for group, rows in by_group.items():
        out.append(f"### {group[:1].upper()}{group[1:]}\n")
        out.append("| flag | environment variable | type | default | description |")
        out.append("|---|---|---|---|---|")
        out.extend(rows)
        out.append("")
    return "\n".join(out)


def policy_tables() -> str:
    from model_service.server.policy import GenerationDefaults, Policy

    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in Policy.model_fields.items():
        description = field.description or ""
        flag = "--" + name.replace("_", "-")
        if not description and name in Settings.model_fields:
            description = f"Overrides `{flag}` while set: {Settings.model_fields[name].description}"
        if name == "default_generation":
            description = description or "Defaults for what a request leaves out (keys below)."
        kind = _type_name(field.annotation)
        constraints = _constraints(field)
        if constraints:
            kind += f" ({constraints})"
        rows.append(f"| `{name}` | {_cell(kind)} | {_default(field)} | {_cell(description)} |")
    rows += ["", "`default_generation` keys (each used when a request leaves that parameter out):", "",
             "| key | type |", "|---|---|"]
    for name, field in GenerationDefaults.model_fields.items():
        kind = _type_name(field.annotation)
        constraints = _constraints(field)
        if constraints:
            kind += f" ({constraints})"
        rows.append(f"| `{name}` | {_cell(kind)} |")
    return "\n".join(rows) + "\n"


def render() -> str:
    return f"""<!-- Generated by scripts/gen_config_docs.py from model_service/config.py and
     model_service/server/policy.py. Do not edit: run `make docs` (tests/test_config_docs.py fails when stale). -->
# Configuration reference

## Start-up settings

Every option of `python -m model_service serve` is a CLI flag and an environment variable
`MODEL_SERVICE_<NAME>` (pydantic-settings). A flag wins over the variable, the variable over the default.
Booleans take `--flag` / `--no-flag` on the command line and `true`/`false` in the environment. Secrets
(`secret`) are never logged. `python -m model_service serve --help` prints the same list.

{settings_tables()}
## Hot-reloaded policy (Nacos `model-service.yaml`)

A YAML document in the Nacos config `--nacos-config-data-id` (default `model-service.yaml`, group
`--nacos-group`), or in `--policy-file` when Nacos has none. Changes apply to new requests within seconds,
without a restart; a document that does not validate is refused (logged) and the previous policy stays.
Unknown keys are errors. Each pod logs every version it applies (`policy applied`: the source, i.e. the
Nacos namespace/group/data id or the file path, and the document's MD5, as the Nacos console and history
show it), never the document's content.

{policy_tables()}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text() if args.output.exists() else ""
    if args.check:
        if current != text:
            diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                str(args.output), "generated", n=1))
            print(f"{args.output} is stale; run `make docs`:\n{diff}", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
