"""Scenario services in the runner, in-process on the tiny profile: built at prepare, entered before the first
rollout (agent loops get what they yield in `ctx.services`), exited after the last step, described in the
report; a service that fails to start or to stop never keeps the cluster up."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from agentbench_npu import runner as runner_module
from agentbench_npu.builtin.base import BaseScenario
from agentbench_npu.config import Layer, resolve
from agentbench_npu.errors import UserError
from agentbench_npu.hookspecs import hookimpl
from agentbench_npu.plugins import Plugins
from agentbench_npu.recipes import packaged_recipe, profile_layer
from agentbench_npu.runner import Runner

NAME = "services-probe"
STEPS, PROMPTS, SAMPLES = 2, 1, 2
# the tiny profile without its warm start, gates, or checkpoints: a few seconds a run
SMALL = Layer({"run": {"steps": STEPS}, "warm_start": {"steps": 0}, "gates": {"enabled": "none"},
               "checkpoint": {"save": False},
               "rollout": {"prompts_per_step": PROMPTS, "samples_per_prompt": SAMPLES, "max_new_tokens": 4}}, "test")


class Service:
    """A context manager that records its enter/exit in the run's log and yields `client`."""

    def __init__(self, name: str, log: list, client: Any, *, enter_error: Exception | None = None,
                 exit_error: Exception | None = None):
        self.name, self.log, self.client = name, log, client
        self.enter_error, self.exit_error = enter_error, exit_error

    def __enter__(self) -> Any:
        self.log.append(("enter", self.name))
        if self.enter_error is not None:
            raise self.enter_error
        return self.client

    def __exit__(self, *exc_info: Any) -> None:
        self.log.append(("exit", self.name))
        if self.exit_error is not None:
            raise self.exit_error


class DescribedService(Service):
    """A service whose description is only known once it has started (a server's port, say)."""

    def __enter__(self) -> Any:
        client = super().__enter__()
        self.url = "http://127.0.0.1:43210"
        return client

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "external": False, "documents": 3}


class ServicesScenario(BaseScenario):
    """`base`, plus the services the test hands it; every rollout records the `ctx.services` it saw."""

    def __init__(self, log: list, make_services: Callable[[list], dict[str, Any]]):
        super().__init__(NAME, "services test", "base with test services")
        self.log, self.make_services = log, make_services
        self.rollout_error: Exception | None = None

    def recipe(self) -> Layer:
        return packaged_recipe("base.toml")

    def services(self, options: Any) -> dict[str, Any]:
        self.log.append(("build",))
        return self.make_services(self.log)

    async def rollout(self, ctx: Any, task: Any) -> Any:
        self.log.append(("rollout", dict(ctx.services)))
        if self.rollout_error is not None:
            raise self.rollout_error
        return await super().rollout(ctx, task)


class ServicesPlugin:

    def __init__(self, scenario: ServicesScenario):
        self.scenario = scenario

    @hookimpl
    def register_scenarios(self, register):
        register(self.scenario)

    @hookimpl
    def step_finished(self, run, step, metrics):
        self.scenario.log.append(("step", step))


@dataclass
class Outcome:
    runner: Runner
    out: Path
    log: list
    log_after_prepare: list = field(default_factory=list)
    clusters: list = field(default_factory=list)
    error: BaseException | None = None

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.out / "report.json").read_text())

    def events(self, *kinds: str) -> list[tuple]:
        return [e for e in self.log if e[0] in kinds]


def run_with(tmp: Path, make_services: Callable[[list], dict[str, Any]], *,
             rollout_error: Exception | None = None) -> Outcome:
    """Prepare and execute a Runner of the services scenario; the cluster's shutdown is logged too."""
    log: list = []
    scenario = ServicesScenario(log, make_services)
    scenario.rollout_error = rollout_error
    plugins = Plugins()
    plugins.pm.register(ServicesPlugin(scenario), name="services-test")
    plugins.load()
    recipe = scenario.recipe()
    config = resolve(NAME, [recipe, profile_layer("tiny"), SMALL], recipe.values["task"])
    outcome = Outcome(runner=Runner(config, plugins, tmp / "run"), out=tmp / "run", log=log)
    real_make_cluster = runner_module.make_cluster

    def make_cluster(*args: Any, **kwargs: Any) -> Any:
        cluster = real_make_cluster(*args, **kwargs)
        shutdown = cluster.shutdown

        def logged_shutdown() -> None:
            log.append(("cluster shutdown",))
            shutdown()

        cluster.shutdown = logged_shutdown
        outcome.clusters.append(cluster)
        return cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_module, "make_cluster", make_cluster)
        outcome.runner.prepare()
        outcome.log_after_prepare = list(log)
        try:
            outcome.runner.execute()
        except Exception as exc:
            outcome.error = exc
    return outcome


SEARCH_CLIENT, CACHE_CLIENT = object(), object()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Outcome:
    """One run whose services behave: `search` (described) is entered first, then `cache`."""
    outcome = run_with(tmp_path_factory.mktemp("services"), lambda log: {
        "search": DescribedService("search", log, SEARCH_CLIENT), "cache": Service("cache", log, CACHE_CLIENT)})
    if outcome.error is not None:
        raise outcome.error
    return outcome


def test_a_service_that_cannot_be_built_fails_prepare_before_the_run_dir_exists(tmp_path):
    def bad(log):
        raise UserError("task.search_url: nothing answers at http://127.0.0.1:9")

    with pytest.raises(UserError, match="task.search_url: nothing answers"):
        run_with(tmp_path, bad)
    assert not (tmp_path / "run").exists()


def test_services_are_built_at_prepare_and_not_entered_until_execute(good):
    assert good.log_after_prepare == [("build",)]
    assert good.clusters and good.log.count(("build",)) == 1


def test_every_rollout_sees_what_each_service_yielded(good):
    rollouts = good.events("rollout")
    assert len(rollouts) == STEPS * PROMPTS * SAMPLES
    for _, services in rollouts:
        assert set(services) == {"search", "cache"}
        assert services["search"] is SEARCH_CLIENT and services["cache"] is CACHE_CLIENT


def test_each_service_is_entered_once_before_the_first_rollout_and_exited_once_after_the_last_step(good):
    assert good.report["status"] == "passed"
    per_step = [("rollout",)] * (PROMPTS * SAMPLES)
    flow = [e[:1] if e[0] == "rollout" else e for e in good.events("build", "enter", "exit", "rollout", "step")]
    assert flow == [("build",), ("enter", "search"), ("enter", "cache"),
                    *per_step, ("step", 0), *per_step, ("step", 1),
                    ("exit", "cache"), ("exit", "search")]  # last entered, first exited


def test_the_cluster_is_shut_down_once_after_a_run_with_services(good):
    assert good.log.count(("cluster shutdown",)) == 1
    assert good.runner.run.cluster is None


def test_describe_of_a_started_service_lands_in_the_report_environment(good):
    services = good.report["environment"]["services"]
    assert services["search"] == {"url": "http://127.0.0.1:43210", "external": False, "documents": 3}
    assert services.get("cache", {}) == {}  # no describe(): nothing to say


def assert_cluster_released(outcome: Outcome) -> None:
    assert len(outcome.clusters) == 1
    assert outcome.log.count(("cluster shutdown",)) == 1
    assert outcome.runner.run.cluster is None
    # the local cluster drops its trainer and engine at shutdown, so the devices' memory comes back
    assert not {"trainer", "engine_worker", "engine"} & set(vars(outcome.clusters[0]))


def test_a_service_whose_exit_raises_still_exits_the_others_shuts_the_cluster_down_and_surfaces(tmp_path):
    outcome = run_with(tmp_path, lambda log: {
        "first": Service("first", log, "first-client"),
        "flaky": Service("flaky", log, "flaky-client", exit_error=RuntimeError("flaky would not stop"))})
    assert isinstance(outcome.error, RuntimeError) and "flaky would not stop" in str(outcome.error)
    assert outcome.events("exit") == [("exit", "flaky"), ("exit", "first")]
    assert len(outcome.events("step")) == STEPS
    assert_cluster_released(outcome)
    report = outcome.report
    assert report["status"] == "error"
    assert "flaky would not stop" in report["error"]


def test_a_service_whose_enter_raises_exits_those_entered_shuts_the_cluster_down_and_surfaces(tmp_path):
    outcome = run_with(tmp_path, lambda log: {
        "first": Service("first", log, "first-client"),
        "broken": Service("broken", log, "never", enter_error=UserError("task.corpus: cannot open 'x.jsonl'")),
        "never": Service("never", log, "never")})
    assert isinstance(outcome.error, UserError) and "cannot open 'x.jsonl'" in str(outcome.error)
    # the one that failed to enter is not exited; the one never reached is not entered
    assert outcome.events("enter", "exit") == [("enter", "first"), ("enter", "broken"), ("exit", "first")]
    assert outcome.events("rollout", "step") == []
    assert_cluster_released(outcome)
    report = outcome.report
    assert report["status"] == "error"
    assert report["error"] == "task.corpus: cannot open 'x.jsonl'"



def run_failing_at_rollout_with_a_flaky_service(tmp: Path) -> Outcome:
    return run_with(tmp, lambda log: {
        "flaky": Service("flaky", log, "flaky-client", exit_error=RuntimeError("flaky would not stop"))},
        rollout_error=UserError("the agent loop broke"))


def test_a_service_whose_exit_raises_after_a_failed_step_still_shuts_the_cluster_down(tmp_path):
    # the services are then closed by the runner's last-chance clean-up, not by the normal end of the steps
    outcome = run_failing_at_rollout_with_a_flaky_service(tmp_path)
    assert outcome.error is not None
    assert outcome.events("exit") == [("exit", "flaky")]
    assert outcome.events("step") == []
    assert_cluster_released(outcome)
    report = outcome.report
    assert report["status"] == "error"
    assert report["error"] == "the agent loop broke"  # the cause, not the clean-up's failure


def test_a_failed_run_raises_its_own_error_even_when_a_service_then_fails_to_stop(tmp_path):
    outcome = run_failing_at_rollout_with_a_flaky_service(tmp_path)
    assert isinstance(outcome.error, UserError) and str(outcome.error) == "the agent loop broke"
    assert outcome.events("exit") == [("exit", "flaky")]
    assert_cluster_released(outcome)
