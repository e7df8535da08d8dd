"""What a run writes as it goes: samples.jsonl rows, the report dict, and the history a resumed run carries over."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ..config import RunConfig
from ..types import StepMetrics, Trajectory
from .schema import SCHEMA_VERSION, environment, summarise


def append_samples(path: Path, step: int, trajs: Sequence[Trajectory], tokenizer: Any) -> None:
    """One samples.jsonl line per trajectory: prompt and response as text, reward, status, token counts."""
    lines = [json.dumps({
        "step": step, "task_id": t.task_id, "group": t.group, "reward": t.reward, "status": t.status,
        "prompt": tokenizer.decode(t.prompt_ids, skip_special_tokens=False),
        "response": t.response_text, "response_tokens": t.response_length,
        "trainable_tokens": t.num_trainable, "weight_version": t.weight_version,
    }) for t in trajs]
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def history_before(origin: Path, upto: int) -> tuple[list[StepMetrics], list[str]]:
    """The step rows and samples.jsonl lines that run dir `origin` recorded before step `upto`."""
    steps: list[StepMetrics] = []
    rows: list[str] = []
    if (origin / "report.json").is_file():
        old = json.loads((origin / "report.json").read_text())
        steps = [_metrics_from_dict(s) for s in old.get("steps", []) if s["step"] < upto]
    if (origin / "samples.jsonl").is_file():
        rows = [r for r in (origin / "samples.jsonl").read_text().splitlines() if _step_of_row(r) < upto]
    return steps, rows


def build_report(run: Any, config: RunConfig, scenario: Any, device: Any, status: str, error: str | None,
                 evaluation: Any = None) -> dict[str, Any]:
    """report.json's content (schema.py) for `run` (the runner's `Run`) as it stands."""
    steps = [s.to_dict() for s in run.steps]
    report = {
        "schema_version": SCHEMA_VERSION,
        "scenario": config.scenario,
        "checklist_item": getattr(scenario, "checklist_item", ""),
        "status": status,
        "error": error,
        "started_at": run.started_at,
        "finished_at": None if status == "running" else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run.out_dir),
        "resumed_from": run.resumed_from,
        "model_dir": run.model_dir,
        "environment": {**environment(device), "cluster": run.cluster_info, "sandbox": run.sandbox_info,
                        "services": run.services_info},
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "steps": steps,
        "gates": [g.to_dict() for g in run.gates],
        "faults": list(config.run.faults),
        "checkpoints": run.checkpoints,
        "summary": summarise(steps),
    }
    if evaluation is not None:
        report["evaluation"] = {"policy": config.run.policy, **evaluation.summary()}
    return report


def _step_of_row(line: str) -> float:
    """The step of a samples.jsonl line; a line torn by a killed run counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _metrics_from_dict(row: dict[str, Any]) -> StepMetrics:
    names = set(StepMetrics.__dataclass_fields__) - {"extra"}
    return StepMetrics(**{k: row[k] for k in names}, extra={k: v for k, v in row.items() if k not in names})
