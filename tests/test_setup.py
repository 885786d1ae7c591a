"""The first-run setup (issue 12): `make run`/`make test` build the virtualenv, r-nacos and the gateway in parallel,
each step through scripts/setup_step.sh (its output in a log, a line when it starts and ends, the log's tail when
it fails). The Makefile is checked with `make -n` (nothing is built); the step script runs real commands."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import ROOT

STEP = ROOT / "scripts" / "setup_step.sh"


def _env() -> dict:
    """This process's environment without an enclosing make's flags (`make -j4 test` runs pytest inside make)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}


def step(tmp_path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(STEP), "demo", "a demo step", "1 min", command], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=60)


def test_a_step_logs_its_output_and_says_when_it_starts_and_ends(tmp_path):
    done = step(tmp_path, "echo compiling; echo more; true")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "[setup] demo: a demo step (usually 1 min on 2 cores; log .run/setup/demo.log)"
    assert lines[-1].startswith("[setup] demo: done in 0m0")
    assert "compiling" not in done.stdout  # the step's own output goes to its log only
    assert (tmp_path / ".run" / "setup" / "demo.log").read_text() == "compiling\nmore\n"


def test_a_failed_step_stops_at_the_first_error_and_shows_the_end_of_its_log(tmp_path):
    failed = step(tmp_path, "echo first; echo 'error: no space left' >&2; exit 7; echo never")
    assert failed.returncode == 7
    assert "[setup] demo: FAILED (exit 7) after 0m0" in failed.stdout
    assert "    first\n    error: no space left" in failed.stdout
    failed = step(tmp_path, "false; echo reached")  # several commands: the first failure ends the step
    assert failed.returncode == 1 and "reached" not in (tmp_path / ".run" / "setup" / "demo.log").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_run_and_test_set_up_the_three_parts_in_parallel():
    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=60, check=True).stdout

    for target in ("run", "test"):
        assert "make --no-print-directory -j3 setup-parts" in dry_run(target)
    # inside the caller's own make -jN the sub-make shares its job slots rather than forcing -j3
    assert "-j3" not in dry_run("-j2", "setup")
