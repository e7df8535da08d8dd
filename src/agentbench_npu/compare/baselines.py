"""A baseline archive: passed runs kept with the fingerprint that says what they can be compared with.

Layout: `ARCHIVE/<scenario>/<name>/report.json` plus `baseline.json` (the fingerprint). ARCHIVE is `--archive`,
else `$AGENTBENCH_NPU_BASELINES`, else `./baselines`: a directory a team keeps next to its recipes or on shared
storage.

The fingerprint: scenario, device (and its name), model, and the *comparable digest*. That is a hash of the
resolved config without what may differ between a GPU baseline and an NPU candidate of the same experiment:
the device, engine dtype, executor and placement, thread count, output dir, gate settings and injected faults.
A candidate matches the newest baseline of its scenario with the same comparable digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..paths import atomic_directory
from .diff import load_reports

# config keys that describe where and how a run ran, not what it computed
_PLACE = {"run": ("device", "out", "threads", "faults", "deterministic", "compare_to", "baselines",
                  "compare_tolerances"),
          "model": ("engine_dtype",), "cluster": None, "gates": None, "sandbox": None, "checkpoint": None}


def archive_dir(archive: str | Path | None = None) -> Path:
    return Path(archive or os.environ.get("AGENTBENCH_NPU_BASELINES") or "baselines")


def comparable_digest(config: dict[str, Any]) -> str:
    """A hash of the config as an experiment: equal for a GPU and an NPU run of the same recipe and seed."""
    data = {section: dict(body) if isinstance(body, dict) else body for section, body in config.items()}
    for section, keys in _PLACE.items():
        if keys is None:
            data.pop(section, None)
        elif isinstance(data.get(section), dict):
            for key in keys:
                data[section].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fingerprint(report: dict[str, Any]) -> dict[str, Any]:
    env = report.get("environment") or {}
    config = report.get("config") or {}
    return {"scenario": report["scenario"], "device": env.get("device"), "device_name": env.get("device_name"),
            "model": (config.get("model") or {}).get("name"), "comparable_digest": comparable_digest(config),
            "config_digest": report.get("config_digest"), "agentbench_npu": env.get("agentbench_npu")}


def save(run: Path, name: str | None = None, archive: str | Path | None = None) -> Path:
    """Copy a passed run's report into the archive under `name` (default: device-model-digest-time)."""
    reports = load_reports(run)
    if len(reports) != 1:
        raise UserError(f"'{run}' holds {len(reports)} runs; save one run dir or report.json at a time")
    ((scenario, (where, report)),) = reports.items()
    if report.get("status") != "passed":
        raise UserError(f"{where}: the run's status is {report.get('status')}; a baseline must be a passed run")
    print_ = fingerprint(report)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S")
    name = name or f"{print_['device']}-{_slug(str(print_['model']))}-{print_['comparable_digest']}-{stamp}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"baseline name '{name}': use letters, digits, '.', '_' and '-'")
    target = archive_dir(archive) / scenario / name
    if target.exists():
        raise UserError(f"baseline '{target}' exists; pick another --name or remove it")
    with atomic_directory(target) as tmp:
        shutil.copy(where, tmp / "report.json")
        (tmp / "baseline.json").write_text(json.dumps(
            {**print_, "name": name, "saved_at": now.isoformat(timespec="microseconds"),
             "source": str(Path(where).resolve())}, indent=2) + "\n")
    return target


def entries(archive: str | Path | None = None, scenario: str | None = None) -> list[dict[str, Any]]:
    """Every baseline in the archive (oldest first), with its `path`."""
    root = archive_dir(archive)
    out = []
    for meta in sorted(root.glob(f"{scenario or '*'}/*/baseline.json")):
        if any(part.startswith(".") for part in meta.relative_to(root).parts):
            continue  # a save in flight, or the temp dir of one a crash cut short (paths.atomic_directory)
        try:
            entry = json.loads(meta.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta}: not a baseline record (invalid JSON); remove or fix it") from None
        out.append({**entry, "path": str(meta.parent)})
    return sorted(out, key=lambda e: e.get("saved_at", ""))


def matching(report: dict[str, Any], archive: str | Path | None = None) -> dict[str, Any] | None:
    """The newest baseline of the report's scenario with the same comparable digest, or None."""
    digest = comparable_digest(report.get("config") or {})
    found = [e for e in entries(archive, report["scenario"]) if e.get("comparable_digest") == digest]
    return found[-1] if found else None


def find(name_or_path: str, archive: str | Path | None = None) -> dict[str, Any]:
    path = Path(name_or_path)
    if (path / "baseline.json").is_file():
        return {**json.loads((path / "baseline.json").read_text()), "path": str(path)}
    named = [e for e in entries(archive) if e["name"] == name_or_path]
    if not named:
        raise UserError(f"no baseline '{name_or_path}' in {archive_dir(archive)}; `agentbench-npu baseline list` "
                        "shows them")
    if len(named) > 1:
        raise UserError(f"baseline name '{name_or_path}' is used by {len(named)} scenarios; give its path: "
                        + ", ".join(e["path"] for e in named))
    return named[0]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name or text)[:40]
