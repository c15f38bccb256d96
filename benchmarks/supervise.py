"""The driver's side of one benchmarked subprocess: start it, step it through each
configuration (see ``benchmarks.child``), sample its process tree, enforce the timeout.

A hang or crash becomes a record (``status``: ``timeout`` / ``error``), never an exception:
the rest of the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import MIB, TreeSampler
from benchmarks.systems import RunSpec

REPO = Path(__file__).resolve().parent.parent
# After the measured window, how long teardown may take before it counts as a hang.
TEARDOWN_TIMEOUT_S = 60.0


class ChildTimeout(Exception):
    pass


@dataclass
class Message:
    kind: str
    payload: Any


class Child:
    """A ``python -m benchmarks.child`` process in its own session (so it and every worker it
    starts can be killed together), with its ``@@`` lines read by a thread."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in kill()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.child", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._lines: queue.Queue[Message | None] = queue.Queue()
        threading.Thread(target=self._read, name="child-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                kind, _, text = line[2:].rstrip("\n").partition(" ")
                try:
                    payload = json.loads(text) if text else None
                except json.JSONDecodeError:
                    payload = text
                self._lines.put(Message(kind, payload))
        self._lines.put(None)

    def expect(self, deadline: float) -> Message | None:
        """The next message; None if the child exited; ChildTimeout past ``deadline``."""
        try:
            return self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ChildTimeout from None

    def go(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()

    def log_tail(self, lines: int = 12) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def finish(self, grace_s: float) -> None:
        """Let the child exit on its own for ``grace_s``, then kill its whole session."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        # Our own child's process group: the child and the workers it started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


def run_configs(
    system: str,
    workload: str,
    specs: Sequence[RunSpec],
    elements: int,
    data_dir: Path,
    timeout_s: float,
    max_seconds: float,
    log_path: Path,
) -> list[dict[str, Any]]:
    """Run ``specs`` (all of one system module) in one subprocess; one result dict per spec,
    with the child's timing merged with the tree's memory and CPU over the measured window.
    ``max_seconds`` caps each run's consumption, ``timeout_s`` each configuration's life."""
    args = [
        f"--max-seconds={max_seconds}",
        f"--system={system}",
        f"--workload={workload}",
        f"--elements={elements}",
        f"--data-dir={data_dir}",
        f"--configs={json.dumps([s.config for s in specs])}",
    ]
    child = Child(args, log_path)
    sampler = TreeSampler(child.proc.pid)
    results: list[dict[str, Any]] = []
    try:
        for _ in specs:
            result: dict[str, Any] = {"status": "ok"}
            results.append(result)
            deadline = time.monotonic() + timeout_s
            try:
                _step_through(child, sampler, result, deadline)
            except ChildTimeout:
                if "elements_per_s" in result:
                    result["note"] = "teardown hung: killed"
                else:
                    result.update(status="timeout", error=f"no result within {timeout_s:g} s")
                break
            if result["status"] == "crashed":
                result.update(status="error", error=f"process exited:\n{child.log_tail()}")
                break
    finally:
        sampler.stop()
        child.finish(grace_s=5.0)
    skipped = {"status": "not run", "error": "an earlier configuration failed"}
    results += [dict(skipped) for _ in specs[len(results) :]]
    return results


def _step_through(
    child: Child, sampler: TreeSampler, result: dict[str, Any], deadline: float
) -> None:
    """ready -> (sample, go) -> done -> (sample, go) -> closed, filling ``result``."""
    message = child.expect(deadline)
    if not _ok(message, "ready", result):
        return
    rss0, cpu0 = sampler.sample()
    sampler.reset_peak(rss0)
    child.go()
    message = child.expect(deadline)
    if not _ok(message, "done", result):
        return
    _, cpu1 = sampler.sample()
    assert message is not None
    result.update(message.payload)
    result.update(
        baseline_rss_mib=rss0 / MIB,
        peak_rss_mib=sampler.peak / MIB,
        end_pss_mib=sampler.pss_mib(),
        cpu_s=cpu1 - cpu0,
    )
    child.go()
    message = child.expect(time.monotonic() + TEARDOWN_TIMEOUT_S)
    if message is not None and message.kind == "closed":
        result["teardown_s"] = message.payload["teardown_s"]


def _ok(message: Message | None, expected: str, result: dict[str, Any]) -> bool:
    if message is None:
        result["status"] = "crashed"
        return False
    if message.kind == "error":
        result.update(
            status="error", error=f"{message.payload['phase']}: {message.payload['error']}"
        )
        return False
    if message.kind != expected:
        result.update(status="error", error=f"protocol: expected {expected}, got {message.kind}")
        return False
    return True


def measure_limit(
    workload: str, elements: int, data_dir: Path, timeout_s: float, log_path: Path
) -> dict[str, Any] | None:
    """Single-threaded seconds per element, from its own subprocess; None if it failed."""
    child = Child(
        [f"--workload={workload}", f"--elements={elements}", f"--data-dir={data_dir}", "--limit"],
        log_path,
    )
    try:
        message = child.expect(time.monotonic() + timeout_s)
    except ChildTimeout:
        message = None
    finally:
        child.finish(grace_s=5.0)
    if message is None or message.kind != "limit":
        return None
    return dict(message.payload)
