"""The runner in-process: lifecycle hooks reach plugins, a hook that raises is named, and an eval run scores
without training."""

from __future__ import annotations

import json

import pytest

from agentbench_npu.config import Layer, resolve
from agentbench_npu.errors import PluginError, UserError
from agentbench_npu.hookspecs import hookimpl
from agentbench_npu.plugins import load_plugins
from agentbench_npu.runner import Runner

SMALL = Layer({"run": {"steps": 2, "threads": 2}, "model": {"name": "tiny"},
               "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8}}, "test")


def small_config(plugins):
    scenario = plugins.get("scenario", "base").obj
    recipe = scenario.recipe()
    return resolve("base", [recipe, SMALL], recipe.values["task"])


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def run_started(self, run):
        self.events.append(("started", run.config.scenario))

    @hookimpl
    def step_finished(self, run, step, metrics):
        self.events.append(("step", step, metrics.weights_checksum_match))

    @hookimpl
    def run_finished(self, run, report):
        self.events.append(("finished", report["status"]))


def test_lifecycle_hooks_see_every_step_in_order(tmp_path):
    plugins = load_plugins()
    recorder = Recorder()
    plugins.pm.register(recorder, name="recorder")
    runner = Runner(small_config(plugins), plugins, tmp_path / "run")
    runner.prepare()
    report = runner.execute()
    assert recorder.events == [("started", "base"), ("step", 0, True), ("step", 1, True), ("finished", "passed")]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == report["status"] == "passed"


class Exploding:
    @hookimpl
    def step_finished(self, run, step, metrics):
        raise RuntimeError("boom")


def test_a_hook_that_raises_is_named_and_the_report_says_error(tmp_path):
    plugins = load_plugins()
    plugins.pm.register(Exploding(), name="exploding")
    runner = Runner(small_config(plugins), plugins, tmp_path / "run")
    runner.prepare()
    with pytest.raises(PluginError, match=r"plugin 'exploding' .* raised in step_finished: RuntimeError: boom"):
        runner.execute()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "error"
    assert "boom" in report["error"]


def test_an_eval_run_scores_without_training_and_refuses_to_resume_a_training_checkpoint(tmp_path):
    plugins = load_plugins()
    trained = Runner(small_config(plugins), plugins, tmp_path / "train")
    trained.prepare()
    assert trained.execute()["status"] == "passed"
    scenario = plugins.get("scenario", "base").obj
    recipe = scenario.recipe()
    eval_config = resolve("base", [recipe, SMALL, Layer({"run": {"mode": "eval", "steps": 3}}, "test")],
                          recipe.values["task"])
    evaluating = Runner(eval_config, plugins, tmp_path / "eval")
    evaluating.prepare()
    report = evaluating.execute()
    assert report["status"] == "passed" and report["checkpoints"] == []
    assert {s["weight_version"] for s in report["steps"]} == {1} and {s["weight_sync_seconds"] for s in report["steps"]} == {0.0}
    assert report["evaluation"]["trials_per_task"] >= 2 and report["evaluation"]["policy"] == "model"
    assert [g["name"] for g in report["gates"]] == ["logprob_alignment", "weight_sync", "reproducibility"]
    resuming = Runner(eval_config, plugins, tmp_path / "again", resume=tmp_path / "train")
    with pytest.raises(UserError, match=r"^--resume continues a training run; to evaluate checkpoint"):
        resuming.prepare()
