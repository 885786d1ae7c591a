"""Where the operator policy comes from, hot-reloaded: the Nacos config document, or a local file.

Sources, highest first: the Nacos config ``--nacos-config-data-id`` (``model-service.yaml``) when Nacos
has one, ``--policy-file`` (re-read when the file changes), nothing. Every document is validated whole
(``policy.parse_policy``); an invalid one is refused with a log line and the previous policy stays. The
policy in force is handed to ``on_policy`` (``ModelService.apply_policy``) at start and on every change.
What a policy means and how it applies to requests is ``policy.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .policy import Policy, PolicyError, parse_policy

if TYPE_CHECKING:
    from model_service.config import Settings

log = logging.getLogger("model_service.policy")

FILE_POLL_S = 2.0


# ---------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class _Document:
    """A validated policy and where it came from. ``origin`` is logged, the content never is."""

    policy: Policy
    origin: dict


def _fingerprint(text: str) -> str:
    # MD5 because the Nacos console and its config history show each version's MD5: from the pod's log
    # line an operator finds the exact version, and in the history when and from where it was published.
    return hashlib.md5(text.encode("utf-8", "surrogatepass")).hexdigest()  # noqa: S324 - an id, not security


class DynamicConfig:
    """Follows the policy sources and hands the policy in force to ``on_policy`` whenever it changes.

    ``apply_nacos`` is the Nacos listener; the file is polled for changes.
    """

    def __init__(self, settings: Settings, on_policy: Callable[[Policy], None]):
        self.settings = settings
        self._on_policy = on_policy
        self._nacos: _Document | None = None
        self._file: _Document | None = None
        self._file_stamp: tuple[float, int] | None = None
        self._task: asyncio.Task | None = None
        if settings.policy_file:
            self._file = self._read_file(strict=True)
        self._activate("startup")

    # -- sources
    def _nacos_origin(self, text: str | None) -> dict:
        s = self.settings
        origin = {"source": "nacos", "namespace": s.nacos_namespace or "public", "group": s.nacos_group,
                  "data_id": s.nacos_config_data_id}
        return {**origin, "md5": _fingerprint(text)} if text is not None else origin

    def apply_nacos(self, text: str | None) -> bool:
        """A Nacos config document (None or empty: the document was removed). False when refused."""
        if text is None or not text.strip():
            if self._nacos is None:
                return True
            self._nacos = None
            log.info("policy document removed from Nacos; falling back", extra=self._nacos_origin(None))
            self._activate("nacos")
            return True
        origin = self._nacos_origin(text)
        try:
            policy = parse_policy(text)
        except PolicyError as exc:
            log.error("invalid policy document refused; keeping the current policy",
                      extra={**origin, "error": str(exc)})
            return False
        if self._nacos is not None and policy == self._nacos.policy:
            return True
        self._nacos = _Document(policy, origin)
        self._activate("nacos")
        return True

    def _read_file(self, strict: bool) -> _Document | None:
        path = self.settings.policy_file
        origin = {"source": "file", "path": os.path.abspath(path)}
        try:
            st = os.stat(path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            self._file_stamp = (st.st_mtime, st.st_size)
            origin["md5"] = _fingerprint(text)
            return _Document(parse_policy(text), origin)
        except (OSError, ValueError, PolicyError) as exc:  # ValueError: not UTF-8
            if strict:
                raise PolicyError(f"policy file {path}: {exc}") from None
            log.error("invalid policy file refused; keeping the current policy", extra={**origin, "error": str(exc)})
            return self._file

    async def _watch_file(self) -> None:
        path = self.settings.policy_file
        while True:
            await asyncio.sleep(FILE_POLL_S)
            try:
                st = os.stat(path)
                stamp = (st.st_mtime, st.st_size)
            except OSError:
                continue  # being replaced, or gone: keep what we have
            if stamp == self._file_stamp:
                continue
            document = self._read_file(strict=False)
            if document is not self._file and (self._file is None or document.policy != self._file.policy):
                self._file = document
                self._activate("file")

    # -- effect
    def _activate(self, trigger: str) -> None:
        document = self._nacos or self._file or _Document(Policy(), {"source": "none"})
        policy = document.policy
        self._on_policy(policy)
        # which version is in force and where it came from; a summary of what it sets, never its text
        log.info("policy applied", extra={
            **document.origin, "trigger": trigger, "system_prompt": bool(policy.system_prompt),
            "blocked_patterns": len(policy.blocked_patterns),
            "default_generation": policy.default_generation.model_dump(exclude_none=True),
            "max_running_requests": policy.max_running_requests,
            "max_waiting_requests": policy.max_waiting_requests,
        })

    # -- lifecycle
    async def start(self) -> None:
        if self.settings.policy_file and self._task is None:
            self._task = asyncio.create_task(self._watch_file(), name="policy-file")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
