"""`agentbench-npu`: run gated scenarios, list what is installed, serve the engine."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import resolve
from .recipes import (Layer, load_toml, model_layers, parse_set, profile_layer, shipped_recipes,
                      split_profiles)
from .errors import UserError, one_line
from .gates.base import SECOND_RUN_ENV
from .plugins import KINDS, Plugins, load_plugins
from .terminal import RichProgress, err_console, out_console, print_summary


EXIT_OK, EXIT_GATE_FAILED, EXIT_ERROR = 0, 1, 2


def _kind_fields(kind: str, obj: Any) -> dict[str, Any]:
    if kind == "scenario":
        return {"checklist_item": getattr(obj, "checklist_item", "")}
    if kind == "fault":
        return {"caught_by": obj.caught_by, "also_affects": list(obj.also_affects)}
    return {}


def _plugins(ctx: click.Context) -> Plugins:
    return ctx.find_root().obj


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentbench-npu")
def cli() -> None:
    """Every item of the Ascend RL bring-up checklist as a runnable, gated scenario."""


# -- run -----------------------------------------------------------------------------------------
@cli.command()
@click.argument("scenario")
@click.option("--device", help="cpu | cuda | npu | auto (default: the recipe's, auto)")
@click.option("--model", help="a tiny model name (tiny, tiny-moe) or a local HF checkpoint dir")
@click.option("--engine-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="the engine's weights' dtype (default: the trainer's, float32)")
@click.option("--steps", type=int, help="total training steps (a resumed run continues up to this)")
@click.option("--seed", type=int, help="run seed: tasks, sampling and init follow from it")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="run dir (default runs/<scenario>-<time>)")
@click.option("--resume", type=click.Path(exists=True, path_type=Path), help="a checkpoint dir or a run dir to continue")
@click.option("--profile", help="tiny, or a profile under scenarios/profiles (default: tiny for tiny models)")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="a TOML recipe over the scenario's own")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="any recipe key, e.g. train.lr=1e-4")
@click.option("--executor", type=click.Choice(["local", "ray"]), help="where trainer and engine run (default local)")
@click.option("--ray-address", help="a running Ray cluster: auto or HOST:PORT (default: start a local one)")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["train", "eval", "colocate", "disaggregated"]),
              help="train (default) or eval (rollout and scoring only: pass^k per task); colocate (default) or "
                   "disaggregated (trainer and engine on separate devices). Give it twice for both")
@click.option("--policy", type=click.Choice(["model", "gold"]),
              help="model (default), or gold: replay the scenario's gold actions (with --mode eval)")
@click.option("--train-devices", type=int, help="data-parallel trainer ranks (ray)")
@click.option("--rollout-devices", type=int, help="engine workers (ray)")
@click.option("--gates", "gates", metavar="all|none|NAME,...", help="gates to evaluate (default: all that apply)")
@click.option("--engine", help="reference (default: in-process) | sglang (a server per engine worker, see "
              "docs/accelerators.md) | a plugin's")
@click.option("--trainer", type=click.Choice(["torch", "megatron"]),
              help="torch (default: a transformers model) | megatron (Megatron-core's GPT model, split per [megatron])")
@click.option("--sandbox", help="where agent tools run code: local | docker | modal | a plugin's (default local)")
@click.option("--inject-fault", "faults", multiple=True, metavar="NAME",
              help="break the run on purpose to prove a gate catches it (see `list`)")
@click.option("--compare-to", metavar="baseline|PATH",
              help="diff the run against the matching archived baseline, or a run dir: the `baseline` gate")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@click.option("--dry-run", is_flag=True, help="resolve the recipe and check the memory plan; print both, start nothing")
@click.pass_context
def run(ctx: click.Context, scenario: str, device: str | None, model: str | None, engine_dtype: str | None,
        steps: int | None,
        seed: int | None, out: Path | None, resume: Path | None, profile: str | None, recipe: Path | None,
        overrides: tuple[str, ...], executor: str | None, ray_address: str | None, modes: tuple[str, ...],
        policy: str | None, train_devices: int | None, rollout_devices: int | None, gates: str | None,
        engine: str | None, trainer: str | None, sandbox: str | None,
        faults: tuple[str, ...], compare_to: str | None, quiet: bool, dry_run: bool) -> None:
    """Run SCENARIO: rollout, reward, training step and weight sync per step; then gates and a report.

    Exit status: 0 passed, 1 a gate failed, 2 error.
    """
    from .runner import Runner

    plugins = _plugins(ctx)
    entry = plugins.get("scenario", scenario)
    run_mode, mode = _split_modes(modes)
    own, per_profile = split_profiles(entry.obj.recipe())
    layers: list[Layer] = [own]
    flags: dict[str, dict[str, Any]] = {}
    for section, key, value in (("run", "device", device), ("model", "name", model),
                                ("model", "engine_dtype", engine_dtype), ("run", "steps", steps),
                                ("run", "seed", seed), ("gates", "enabled", gates),
                                ("run", "faults", list(faults) or None), ("cluster", "executor", executor),
                                ("cluster", "ray_address", ray_address), ("cluster", "mode", mode),
                                ("run", "mode", run_mode), ("run", "policy", policy), ("run", "compare_to", compare_to),
                                ("cluster", "train_devices", train_devices),
                                ("cluster", "rollout_devices", rollout_devices), ("sandbox", "backend", sandbox),
                                ("run", "engine", engine), ("run", "trainer", trainer)):
        if value is not None:
            flags.setdefault(section, {})[key] = value
    user_layers = ([load_toml(recipe)] if recipe else []) + [Layer(flags, "command-line flags"), parse_set(list(overrides))]
    from .models.tiny import is_tiny

    model_name = _model_name(layers + user_layers)
    chosen_profile = profile or ("tiny" if is_tiny(model_name) else "")
    if chosen_profile:
        layers.append(profile_layer(chosen_profile))
        if chosen_profile in per_profile:
            layers.append(per_profile[chosen_profile])
    if chosen_profile and chosen_profile != "tiny":  # a hardware profile: the model's recipe for it too
        layers += model_layers(model_name, chosen_profile)
    task_defaults = dict(layers[0].values.get("task", {}))
    config = resolve(entry.name, layers + user_layers, task_defaults)
    config = dataclasses.replace(config, profile=chosen_profile or "")
    if dry_run:
        from .plan import describe

        for line in describe(config, model_name):
            out_console.print(escape(line), highlight=False)
        ctx.exit(EXIT_OK)

    out_dir = out or (Path(config.run.out) if config.run.out else _default_out(entry.name, resume))
    if out_dir.exists() and not resume and any(out_dir.iterdir()):
        raise UserError(f"run dir '{out_dir}' exists and is not empty; pass another --out or --resume it")
    runner = Runner(config, plugins, out_dir, resume=resume, progress=None if quiet else RichProgress())
    runner.prepare()
    try:
        report = runner.execute()
    finally:  # an errored run with steps is one people most want to read
        if not os.environ.get(SECOND_RUN_ENV) and (runner.run.out_dir / "report.json").is_file():
            render_report(runner.run.out_dir)  # (a gate's second run is read by its gate, not by people)
    print_summary(report)
    ctx.exit(EXIT_OK if report["status"] == "passed" else EXIT_GATE_FAILED)


def render_report(run_dir: Path) -> None:
    """report.md and report.html next to report.json; a plotting failure is reported, the run stands."""
    from .report.render import render_run

    try:
        render_run(run_dir)
    except Exception as exc:
        err_console.print(f"[yellow]warning:[/] report.md / report.html not written: {escape(one_line(exc))}; "
                          f"`agentbench-npu report {escape(str(run_dir))}` retries")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def report(run_dir: Path) -> None:
    """Write RUN_DIR's report.md and self-contained report.html (with its curves) from its report.json."""
    from .report.render import render_run

    for path in render_run(run_dir):
        out_console.print(f"wrote {escape(str(path))}")


def _split_modes(modes: tuple[str, ...]) -> tuple[str | None, str | None]:
    """`--mode` values as (run.mode, cluster.mode): what the run does, and how trainer and engine are placed."""
    chosen: dict[str, str] = {}
    for value in modes:
        kind = "run" if value in ("train", "eval") else "cluster"
        if chosen.get(kind, value) != value:
            raise UserError(f"--mode given both '{chosen[kind]}' and '{value}'; give one of them")
        chosen[kind] = value
    return chosen.get("run"), chosen.get("cluster")


def _model_name(layers: list[Layer]) -> str:
    model = "tiny"
    for layer in layers:
        value = layer.values.get("model", {}).get("name")
        if value is not None:
            model = str(value)
    return model


def _default_out(scenario: str, resume: Path | None) -> Path:
    if resume is not None:
        from .training.checkpoint import find_checkpoint

        run_dir = find_checkpoint(resume).parent.parent
        if (run_dir / "report.json").is_file():
            return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{scenario}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{scenario}-{stamp}-{n}"
    return path


TRAINERS = {
    "torch": "a transformers model; data parallel over trainer ranks (--trainer torch, the default)",
    "megatron": "Megatron-core's GPT model (the megatron extra): tensor parallel x data parallel, MoE experts "
                "expert parallel (--trainer megatron, [megatron] tensor_parallel, expert_parallel)",
}
EXECUTORS = {
    "local": "trainer and engine in this process, weights copied in memory (colocate)",
    "ray": "trainer ranks and engines as Ray actors (colocate or disaggregated, one node or many), "
           "weights broadcast over a gloo process group",
}
PARALLELISM = ("data parallel over trainer ranks (torch.distributed: gloo / nccl / hccl); tensor parallel with "
               "--trainer megatron (megatron.tensor_parallel), and expert parallel for MoE experts "
               "(megatron.expert_parallel). Pipeline parallelism is not built yet.")


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Scenarios, devices, engines, sandboxes, gates and faults (with the plugin and distribution behind each),
    executors, trainers, profiles and model recipes."""
    plugins = _plugins(ctx)
    rows = {kind: [
        {"name": r.name, "plugin": r.plugin, "distribution": r.distribution, "version": r.version,
         "description": r.description, **_kind_fields(kind, r.obj)}
        for r in sorted(plugins.items(kind).values(), key=lambda r: r.name)
    ] for kind in KINDS}
    plugin_rows = [{"plugin": p.name, "distribution": p.distribution, "version": p.version, "hooks": list(p.hooks)}
                   for p in plugins.plugins()]
    recipes = {"profiles": shipped_recipes("profiles"), "model_recipes": shipped_recipes("models")}
    if as_json:
        click.echo(json.dumps({"items": rows, "plugins": plugin_rows, "executors": EXECUTORS, "trainers": TRAINERS,
                               "parallelism": PARALLELISM, **recipes}, indent=2))
        return
    for kind, items in rows.items():
        table = Table(title="sandboxes" if kind == "sandbox" else f"{kind}s", title_justify="left")
        extra = {"scenario": "checklist_item", "fault": "caught_by"}.get(kind)
        for col in ("name", "plugin", "distribution", "description") + ((extra,) if extra else ()):
            table.add_column(col.replace("_", " "))
        for item in items:
            table.add_row(item["name"], item["plugin"], f"{item['distribution']} {item['version']}", item["description"],
                          *([item[extra]] if extra else []))
        if not items:
            table.add_row("(none yet)", "", "", "")
        out_console.print(table)
    for title, described in (("executors", EXECUTORS), ("trainers", TRAINERS)):
        table = Table(title=title, title_justify="left")
        for col in ("name", "description"):
            table.add_column(col)
        for name, text in described.items():
            table.add_row(name, text)
        out_console.print(table)
    out_console.print(f"parallelism: {PARALLELISM}")
    out_console.print(f"profiles (--profile): {', '.join(recipes['profiles'])}; model recipes (scenarios/models, "
                      f"with a hardware profile): {', '.join(recipes['model_recipes'])}")
    table = Table(title="plugins", title_justify="left")
    for col in ("plugin", "distribution", "hooks"):
        table.add_column(col)
    for p in plugin_rows:
        table.add_row(p["plugin"], f"{p['distribution']} {p['version']}", ", ".join(p["hooks"]))
    out_console.print(table)


# -- serve ---------------------------------------------------------------------------------------
@cli.command()
@click.option("--model", default="tiny", show_default=True, help="a tiny model name or a local HF checkpoint dir")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=30000, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
def serve(ctx: click.Context, model: str, device: str, dtype: str, host: str, port: int, seed: int) -> None:
    """Serve the reference engine over HTTP: SGLang's native API subset and OpenAI chat completions."""
    from .devices import resolve_device
    from .engines.reference import ReferenceEngine
    from .engines.server import serve as serve_http
    from .models.loading import load_tokenizer, resolve_model_dir

    plugins = _plugins(ctx)
    dev = resolve_device(device, {name: r.obj for name, r in plugins.items("device").items()})
    path = resolve_model_dir(model)
    engine = ReferenceEngine.create(path, tokenizer=load_tokenizer(path), dtype=dtype, device=dev.torch_device(),
                                    seed=seed)
    err_console.print(f"serving {path} on http://{host}:{port} ({dev.name}, {dtype})")
    serve_http(engine, host=host, port=port)


def _add_builtin_groups() -> None:
    from .checklist import checklist_command
    from .compare.commands import baseline_group, diff_command
    from .doctor import doctor
    from .retrieval.commands import search_index, search_server
    from .sandbox.commands import sandbox

    cli.add_command(diff_command)
    cli.add_command(baseline_group)
    cli.add_command(checklist_command)
    cli.add_command(doctor)
    cli.add_command(sandbox)
    cli.add_command(search_server)
    cli.add_command(search_index)


_add_builtin_groups()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and exit 2 for anything the user can fix."""
    try:
        plugins = load_plugins()
        cli.obj = plugins
        plugins.add_commands(cli)
        code = cli.main(args=argv, prog_name="agentbench-npu", obj=plugins, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else EXIT_OK)
    except UserError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_ERROR)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # a crash is an error (2), never "a gate failed" (1)
        err_console.print(f"[red]error:[/] {escape(one_line(exc))} (unexpected; the run's report.json has the "
                          "status; set AGENTBENCH_NPU_TRACEBACK=1 for the traceback)", highlight=False, soft_wrap=True)
        if os.environ.get("AGENTBENCH_NPU_TRACEBACK"):
            raise
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
