"""Shared test set-up: one tiny-model cache per test session, and a CLI runner in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Built tiny models and warm starts are cached here for the whole session (they are
    # deterministic, so sharing them between tests changes no result, only the time).
    os.environ.setdefault("AGENTBENCH_NPU_CACHE", tempfile.mkdtemp(prefix="agentbench-npu-cache-"))


def write_distribution(site: Path, dist: str, version: str, module: str, source: str, entry_name: str) -> None:
    """What `pip install` leaves behind that matters to plugin loading: a package and a dist-info
    whose entry_points.txt declares `entry_name = module` in the `agentbench_npu` group."""
    package = site / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[agentbench_npu]\n{entry_name} = {module}\n")


@pytest.fixture
def fake_distribution():
    """write_distribution(site, dist, version, module, source, entry_name), for plugin tests."""
    return write_distribution


@pytest.fixture
def cli(tmp_path: Path):
    """Run `agentbench-npu ARGS...` in a fresh process, in tmp_path; returns CompletedProcess."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, "-m", "agentbench_npu", *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
