"""scripts/run_stack.py's restart policy for model services (PodSupervisor), on real child processes that fail
the way a pod with a broken model does: they exit before they are ever ready. A clock passed to ``step()``
stands in for the back-off waits, so this runs in a second (tests/test_run_stack_failover.py does the real
SIGKILL of a pod in the real stack)."""

from __future__ import annotations

import importlib.util
import re
import time

import pytest
from conftest import ROOT, free_port

_spec = importlib.util.spec_from_file_location("run_stack", ROOT / "scripts" / "run_stack.py")
run_stack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_stack)


def test_back_off_doubles_up_to_its_cap():
    delays = [run_stack.restart_delay(n) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_pod_that_never_gets_ready_again_is_given_up_with_its_log(tmp_path, capsys):
    part = run_stack.Part("model-service-1", ["sh", "-c", "echo 'cannot load /models/missing'; exit 3"],
                          tmp_path / "model-service-1.log")
    part.start().proc.wait(10)  # it was ready once (the stack was up), then died
    supervisor = run_stack.PodSupervisor(1, part, free_port(), ready_timeout=60, registry=None)
    clock = time.monotonic()
    with pytest.raises(run_stack.StartError) as failure:
        for _ in range(2000):  # the fake clock runs 0.5 s a step; the real processes exit in milliseconds
            supervisor.step(clock)
            if part.proc is not None and part.running:
                part.proc.wait(10)
            clock += 0.5
    said = capsys.readouterr().out
    # one restart after the crash, then three more that never got ready, with the doubling back-off
    assert re.findall(r"restarting it in (\d+)s", said) == ["1", "2", "4", "8"]
    assert said.count("restarting model-service-1 (restart") == 4
    assert "exited with code 3" in said and "cannot load /models/missing" in said
    message = str(failure.value)
    assert "4 restarts in a row: giving up" in message and "cannot load /models/missing" in message
    assert part.log_path.read_text().splitlines().count("cannot load /models/missing") == 5  # every run kept


def test_a_pod_ready_again_starts_its_back_off_afresh_after_a_stable_while(tmp_path):
    part = run_stack.Part("model-service-0", ["sh", "-c", "exit 1"], tmp_path / "model-service-0.log")
    part.start().proc.wait(10)
    supervisor = run_stack.PodSupervisor(0, part, free_port(), ready_timeout=60, registry=None)
    supervisor.crashes = 5  # it had crashed a lot before ...
    supervisor.ready_at = time.monotonic() - run_stack.STABLE_AFTER_S - 1  # ... then served for a stable while
    now = time.monotonic()
    supervisor.step(now)
    assert supervisor.crashes == 1 and supervisor.restart_at == pytest.approx(now + run_stack.RESTART_BACKOFF_S)
