"""Shared test set-up: one tiny-model cache per test session, and a CLI runner in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Built tiny models and warm starts are cached here for the whole session (they are
    # deterministic, so sharing them between tests changes no result, only the time).
    os.environ.setdefault("AGENTBENCH_NPU_CACHE", tempfile.mkdtemp(prefix="agentbench-npu-cache-"))


@pytest.fixture
def cli(tmp_path: Path):
    """Run `agentbench-npu ARGS...` in a fresh process, in tmp_path; returns CompletedProcess."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
