"""The plugin contract: every extension point agentbench-npu has, one hook each.

Hooks are called with keyword arguments. `register` hooks receive a callback; call it once per
thing you add (an object with a `name` attribute). Built-ins register through these same hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("agentbench_npu")
hookimpl = pluggy.HookimplMarker("agentbench_npu")


@hookspec
def register_scenarios(register):
    """Add scenarios: objects with `name`, `checklist_item`, `recipe`, `tasks`, `rollout`, `reward`."""


@hookspec
def register_devices(register):
    """Add devices (cpu, cuda, npu, ...): see devices/base.py for the interface."""


@hookspec
def register_engines(register):
    """Add inference engines: classes with `name` and a classmethod `create(model_dir, *, tokenizer, dtype, device,
    seed, attn_implementation, options)` that builds an EngineClient (`options`: the run's [engine] section)."""


@hookspec
def register_sandboxes(register):
    """Add sandboxes for tool execution: classes with `name`."""


@hookspec
def register_gates(register):
    """Add acceptance gates: objects with `name` that judge a run record."""


@hookspec
def register_faults(register):
    """Add injectable faults (gates/faults.py `Fault`): each names the gate that must catch it."""


@hookspec
def register_commands(cli):
    """Add commands to the `agentbench-npu` click group."""


@hookspec
def run_started(run):
    """A run is about to take its first step; `run` is the live Run."""


@hookspec
def step_finished(run, step, metrics):
    """A step finished; `metrics` is its StepMetrics."""


@hookspec
def run_finished(run, report):
    """A run finished (passed, failed or error); `report` is the report.json dict."""
