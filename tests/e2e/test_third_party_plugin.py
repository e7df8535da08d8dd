"""A third-party distribution adds a scenario through the entry-point group, and `run` runs it."""

from __future__ import annotations

import json

SCENARIO_MODULE = '''
from agentbench_npu.config import Layer
from agentbench_npu.hookspecs import hookimpl
from agentbench_npu.types import Task, Trajectory


class CountScenario:
    """Say a number: reward 1 when the response contains the asked digit."""

    name = "count-up"
    checklist_item = "third-party example"

    def recipe(self):
        return Layer({"run": {"steps": 2}, "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4,
                                                        "max_new_tokens": 8}, "task": {"digit": 7}},
                     "count_up recipe")

    def tasks(self, options, seed, cursor, count):
        return [Task(id=f"count-{i}", prompt=f"Say {options['digit']}.", label=str(options["digit"]))
                for i in range(cursor, cursor + count)]

    async def rollout(self, ctx, task):
        ids = ctx.prompt_ids(task.prompt)
        result = await ctx.engine.generate_one(ids, ctx.sampling)
        traj = Trajectory(prompt_ids=ids, task_id=task.id)
        traj.append_model_tokens(result.output_ids, result.output_logprobs)
        traj.response_text = result.text
        return traj

    def reward(self, task, traj):
        return 1.0 if task.label in traj.response_text else 0.0


@hookimpl
def register_scenarios(register):
    register(CountScenario())
'''


def test_a_third_party_scenario_is_listed_and_runs(cli, tmp_path, fake_distribution):
    site = tmp_path / "site"
    fake_distribution(site, "count_up", "0.2.0", "count_up_plugin", SCENARIO_MODULE, "count-up")
    env = {"PYTHONPATH": str(site)}
    listing = cli("list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    scenario = next(i for i in json.loads(listing.stdout)["items"]["scenario"] if i["name"] == "count-up")
    assert (scenario["plugin"], scenario["distribution"], scenario["version"]) == ("count-up", "count_up", "0.2.0")

    proc = cli("run", "count-up", "--out", "r", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["scenario"] == "count-up" and report["status"] == "passed"
    assert len(report["steps"]) == 2
    assert all(s["weights_checksum_match"] for s in report["steps"])
    # the gates know nothing about the scenario: the same four judge a third party's run
    assert {g["name"]: g["passed"] for g in report["gates"]} == {
        "logprob_alignment": True, "weight_sync": True, "reproducibility": True, "checkpoint_continuity": True}


def test_a_broken_plugin_is_named_in_a_one_line_error_and_can_be_disabled(cli, tmp_path, fake_distribution):
    site = tmp_path / "site"
    fake_distribution(site, "broken_dist", "1.0", "broken_plugin", "import no_such_module_anywhere\n", "broken")
    proc = cli("list", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "plugin 'broken' (distribution broken_dist 1.0) failed to import" in lines[0]
    assert "AGENTBENCH_NPU_DISABLE_PLUGINS=broken_dist" in lines[0]

    disabled = cli("list", env={"PYTHONPATH": str(site), "AGENTBENCH_NPU_DISABLE_PLUGINS": "broken_dist"})
    assert disabled.returncode == 0, disabled.stderr
    allow_none = cli("list", env={"PYTHONPATH": str(site), "AGENTBENCH_NPU_PLUGINS": ""})
    assert allow_none.returncode == 0, allow_none.stderr
