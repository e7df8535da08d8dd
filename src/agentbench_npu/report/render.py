"""report.md and a self-contained report.html from a run's report.json, with its curves as PNGs.

The plots (matplotlib, drawn off-screen): reward (mean ± std), loss, train/rollout log-prob difference (mean and
max, log scale) and weight-sync time; for MoE runs also the mismatch with and without routing replay. They are written to `plots/` in the run dir for report.md, and embedded
in report.html as data URIs, so the HTML opens offline with nothing fetched. Both files are written atomically.
`agentbench-npu report RUN_DIR` regenerates them from report.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..paths import atomic_write_text

PLOTS = ("reward", "loss", "logprob_diff", "weight_sync", "routing")
TITLES = {"reward": "Reward", "loss": "Loss", "logprob_diff": "|log p_train − log p_rollout|",
          "weight_sync": "Weight sync (ms)", "routing": "MoE: mean |Δlogp| with / without routing replay"}


def plot_pngs(steps: list[dict[str, Any]]) -> dict[str, bytes]:
    """name -> PNG bytes of each curve; empty when there are no steps."""
    if not steps:
        return {}
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = [s["step"] for s in steps]

    def series(key: str) -> list[float]:  # null in report.json is a non-finite number: a gap in the curve
        return [math.nan if key in s and s[key] is None else float(s.get(key) or 0.0) for s in steps]

    def reward(ax: Any) -> None:
        mean, std = series("reward_mean"), series("reward_std")
        ax.plot(x, mean, marker="o", color="#1f77b4", label="mean")
        ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color="#1f77b4", alpha=0.2, label="± std")
        ax.legend(loc="best", fontsize=8)

    def loss(ax: Any) -> None:
        ax.plot(x, series("loss"), marker="o", color="#d62728")

    def logprob(ax: Any) -> None:
        for key, label, color in (("logprob_abs_diff_mean", "mean", "#2ca02c"),
                                  ("logprob_abs_diff_max", "max", "#9467bd")):
            values = [max(v, 1e-12) for v in series(key)]  # log scale: an exact 0 is drawn at the floor
            ax.plot(x, values, marker="o", color=color, label=label)
        ax.set_yscale("log")
        ax.legend(loc="best", fontsize=8)

    def sync(ax: Any) -> None:
        ax.plot(x, [v * 1000 for v in series("weight_sync_seconds")], marker="o", color="#ff7f0e")

    def routing(ax: Any) -> None:
        for key, label, color in (("logprob_abs_diff_mean_replay", "replay (R3)", "#2ca02c"),
                                  ("logprob_abs_diff_mean_no_replay", "no replay", "#d62728")):
            ax.plot(x, [max(v, 1e-12) for v in series(key)], marker="o", color=color, label=label)
        ax.set_yscale("log")
        ax.legend(loc="best", fontsize=8)

    draw: dict[str, Callable[[Any], None]] = {"reward": reward, "loss": loss, "logprob_diff": logprob,
                                              "weight_sync": sync, "routing": routing}
    measured = any("logprob_abs_diff_mean_replay" in s for s in steps)
    out = {}
    for name in PLOTS:
        if name == "routing" and not measured:
            continue
        fig = Figure(figsize=(5, 3), dpi=100)
        ax = fig.add_subplot()
        draw[name](ax)
        ax.set_title(TITLES[name], fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        out[name] = buffer.getvalue()
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _rows(report: dict[str, Any]) -> dict[str, list[list[str]]]:
    """The report's tables as rows of text: gates, steps, environment, evaluation."""
    env = report.get("environment") or {}
    tables = {
        "gates": [[g["name"], "pass" if g["passed"] else "FAIL", _fmt(g.get("value")), _fmt(g.get("threshold")),
                   str(g.get("detail", ""))] for g in report.get("gates", [])],
        "steps": [[str(s["step"]), _fmt(s.get("reward_mean")), _fmt(s.get("loss")),
                   _fmt(s.get("logprob_abs_diff_mean")), _fmt(s.get("logprob_abs_diff_max")),
                   _fmt(1000 * float(s.get("weight_sync_seconds") or 0)), "yes" if s.get("weights_checksum_match") else "NO"]
                  for s in report.get("steps", [])],
        "environment": [[k, _fmt(v)] for k, v in env.items() if not isinstance(v, dict) and v is not None],
        "routing": [[str(s["step"]), _fmt(s.get("moe_route_agreement")), _fmt(s.get("logprob_abs_diff_mean_replay")),
                     _fmt(s.get("logprob_abs_diff_mean_no_replay")), _fmt(s.get("kl_replay")),
                     _fmt(s.get("kl_no_replay")), _fmt(s.get("moe_load_imbalance")), str(s.get("moe_dead_experts")),
                     _fmt(s["moe_router_entropy"] / s["moe_router_entropy_max"])]
                    for s in report.get("steps", []) if "moe_router_entropy" in s],
    }
    evaluation = report.get("evaluation")
    if evaluation:
        tables["pass_hat_k"] = [[f"pass^{k}", _fmt(v)] for k, v in evaluation.get("pass_hat_k", {}).items()]
        tables["tasks"] = [[t["task_id"], str(t["trials"]), str(t["successes"]), _fmt(t["reward_mean"])]
                           for t in evaluation.get("tasks", [])]
    return tables


HEADERS = {"gates": ["gate", "verdict", "measured", "threshold", "detail"],
           "steps": ["step", "reward", "loss", "Δlogp mean", "Δlogp max", "sync ms", "weights synced"],
           "environment": ["", ""], "pass_hat_k": ["k", "pass^k"], "tasks": ["task", "trials", "successes", "reward"],
           "routing": ["step", "route agreement", "Δlogp replay", "Δlogp no replay", "k3 replay", "k3 no replay",
                       "load imbalance", "dead experts", "router entropy / max"]}
SECTION_TITLES = {"gates": "Gates", "steps": "Steps", "routing": "MoE routing (engine vs trainer)",
                  "pass_hat_k": "Evaluation: pass^k",
                  "tasks": "Evaluation: per task", "environment": "Environment"}


def _title(report: dict[str, Any]) -> str:
    return f"{report['scenario']}: {report.get('status')}"


def _summary_line(report: dict[str, Any]) -> str:
    c = report.get("config") or {}
    return (f"checklist item: {report.get('checklist_item') or '—'} · model {c.get('model', {}).get('name')} · "
            f"device {(report.get('environment') or {}).get('device')} · seed {c.get('run', {}).get('seed')} · "
            f"started {report.get('started_at')}" + (f" · error: {report['error']}" if report.get("error") else ""))


def to_markdown(report: dict[str, Any], plot_files: dict[str, str]) -> str:
    lines = [f"# {_title(report)}", "", _summary_line(report), ""]
    lines += [f"![{TITLES[name]}]({path})" for name, path in plot_files.items()] + [""]
    for key, rows in _rows(report).items():
        if not rows:
            continue
        header = HEADERS[key]
        lines += [f"## {SECTION_TITLES[key]}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
                  for row in rows] + [""]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}.meta{color:#555}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f3f3f3}.pass{color:#1a7f37;font-weight:600}
.fail{color:#c62828;font-weight:600}.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots img{width:480px;
border:1px solid #ddd}"""


def to_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(_title(report))}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{e(_title(report))}</h1>",
             f"<p class='meta'>{e(_summary_line(report))}</p>"]
    if pngs:
        parts.append("<div class='plots'>" + "".join(
            f"<img id='plot-{name}' alt='{e(TITLES[name])}' src='data:image/png;base64,"
            f"{base64.b64encode(data).decode()}'>" for name, data in pngs.items()) + "</div>")
    for key, rows in _rows(report).items():
        if not rows:
            continue
        parts.append(f"<h2>{e(SECTION_TITLES[key])}</h2><table id='{key}'><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in HEADERS[key]) + "</tr>")
        for row in rows:
            cells = []
            for cell in row:
                css = " class='pass'" if cell == "pass" else " class='fail'" if cell in ("FAIL", "NO") else ""
                cells.append(f"<td{css}>{e(cell)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def render_run(run_dir: Path) -> tuple[Path, Path]:
    """(report.md, report.html) of `run_dir`, from its report.json."""
    run_dir = Path(run_dir)
    source = run_dir / "report.json"
    if not source.is_file():
        raise UserError(f"'{run_dir}' has no report.json; give a run dir")
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
        report["scenario"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{source}: not a report.json ({exc})") from None
    pngs = plot_pngs(list(report.get("steps", [])))
    plot_dir = run_dir / "plots"
    plot_files = {}
    if pngs:
        plot_dir.mkdir(exist_ok=True)
        for name, data in pngs.items():
            tmp = plot_dir / f".{name}.png.tmp"
            tmp.write_bytes(data)
            tmp.replace(plot_dir / f"{name}.png")
            plot_files[name] = f"plots/{name}.png"
    atomic_write_text(run_dir / "report.md", to_markdown(report, plot_files))
    atomic_write_text(run_dir / "report.html", to_html(report, pngs))
    return run_dir / "report.md", run_dir / "report.html"
