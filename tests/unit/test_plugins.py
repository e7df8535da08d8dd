"""The plugin manager: built-ins plus entry points of group `agentbench_npu`, found through real
importlib metadata; allow/deny lists by env var; every failure a one-line PluginError naming the plugin."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from agentbench_npu import __version__
from agentbench_npu.errors import PluginError, UserError
from agentbench_npu.plugins import load_plugins

SCENARIO_PLUGIN = '''
from agentbench_npu.hookspecs import hookimpl


class MyScenario:
    """Counts to three."""

    name = "my-scenario"
    checklist_item = "third-party example"


@hookimpl
def register_scenarios(register):
    register(MyScenario())
'''


class FakeSite:
    """A directory on sys.path that looks like site-packages after `pip install` of some distributions."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, write) -> None:
        self.root = root
        self._write = write
        self.modules: list[str] = []
        root.mkdir()
        monkeypatch.syspath_prepend(str(root))

    def install(self, dist: str, version: str, module: str, source: str, entry_name: str) -> None:
        """A package `module` whose __init__ is `source`, and a dist-info declaring it as plugin `entry_name`."""
        self._write(self.root, dist, version, module, source, entry_name)
        self.modules.append(module)
        importlib.invalidate_caches()

    def forget_imports(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)


@pytest.fixture
def site(tmp_path, monkeypatch, fake_distribution):
    monkeypatch.delenv("AGENTBENCH_NPU_PLUGINS", raising=False)
    monkeypatch.delenv("AGENTBENCH_NPU_DISABLE_PLUGINS", raising=False)
    fake = FakeSite(tmp_path / "site", monkeypatch, fake_distribution)
    yield fake
    fake.forget_imports()  # the next test's module of the same name must be imported afresh
    importlib.invalidate_caches()


def plugin_error() -> str:
    """The message of the PluginError that loading plugins raises (checked to be one line)."""
    with pytest.raises(PluginError) as info:
        load_plugins()
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- built-ins -------------------------------------------------------------------------------------
def test_builtins_are_registered_by_the_core_distribution(site):
    plugins = load_plugins()
    expected = {("scenario", "base"), ("device", "cpu"), ("device", "cuda"), ("device", "npu"),
                ("engine", "reference")}
    for kind, name in expected:
        item = plugins.get(kind, name)
        assert (item.kind, item.name) == (kind, name)
        assert (item.distribution, item.version) == ("agentbench-npu", __version__)
        assert item.plugin.startswith("agentbench_npu.")


def test_builtin_plugins_are_listed_with_the_hooks_they_implement(site):
    infos = {info.name: info for info in load_plugins().plugins()}
    assert infos["agentbench_npu.devices.plugin"].hooks == ("register_devices",)
    assert infos["agentbench_npu.builtin.plugin"].distribution == "agentbench-npu"


def test_get_of_an_unknown_name_suggests_a_close_one_and_lists_what_exists(site):
    with pytest.raises(UserError) as info:
        load_plugins().get("scenario", "bsae")
    message = str(info.value)
    assert message.startswith("unknown scenario 'bsae' (did you mean: base?)")
    assert "available: " in message and "base" in message and "agentbench-npu list" in message


# -- a third-party distribution ---------------------------------------------------------------------
def test_an_installed_distribution_adds_its_scenario_named_by_plugin_distribution_and_version(site):
    site.install("thirdparty_scn", "0.3.1", "thirdparty_scn", SCENARIO_PLUGIN, "thirdparty")
    plugins = load_plugins()
    item = plugins.get("scenario", "my-scenario")
    assert (item.plugin, item.distribution, item.version) == ("thirdparty", "thirdparty_scn", "0.3.1")
    assert item.description == "Counts to three."
    assert "base" in plugins.items("scenario")  # built-ins still there
    info = next(i for i in plugins.plugins() if i.name == "thirdparty")
    assert (info.distribution, info.version, info.hooks) == ("thirdparty_scn", "0.3.1", ("register_scenarios",))


def test_an_empty_allow_list_loads_no_external_plugins_but_keeps_the_builtins(site, monkeypatch):
    site.install("thirdparty_scn", "0.3.1", "thirdparty_scn", SCENARIO_PLUGIN, "thirdparty")
    monkeypatch.setenv("AGENTBENCH_NPU_PLUGINS", "")
    plugins = load_plugins()
    assert "my-scenario" not in plugins.items("scenario")
    assert "base" in plugins.items("scenario")
    assert "thirdparty" not in {info.name for info in plugins.plugins()}
    assert "thirdparty_scn" not in sys.modules  # not even imported


@pytest.mark.parametrize("allowed", ["thirdparty_scn", "thirdparty-scn", "other, Thirdparty_Scn"])
def test_an_allow_list_naming_the_distribution_loads_it(site, monkeypatch, allowed):
    site.install("thirdparty_scn", "0.3.1", "thirdparty_scn", SCENARIO_PLUGIN, "thirdparty")
    monkeypatch.setenv("AGENTBENCH_NPU_PLUGINS", allowed)
    assert "my-scenario" in load_plugins().items("scenario")


def test_an_allow_list_not_naming_the_distribution_leaves_it_out(site, monkeypatch):
    site.install("thirdparty_scn", "0.3.1", "thirdparty_scn", SCENARIO_PLUGIN, "thirdparty")
    monkeypatch.setenv("AGENTBENCH_NPU_PLUGINS", "something_else")
    assert "my-scenario" not in load_plugins().items("scenario")


def test_a_disabled_distribution_is_not_loaded(site, monkeypatch):
    site.install("thirdparty_scn", "0.3.1", "thirdparty_scn", SCENARIO_PLUGIN, "thirdparty")
    monkeypatch.setenv("AGENTBENCH_NPU_DISABLE_PLUGINS", "thirdparty_scn")
    assert "my-scenario" not in load_plugins().items("scenario")


def test_the_deny_list_wins_over_the_allow_list(site, monkeypatch):
    site.install("thirdparty_scn", "0.3.1", "thirdparty_scn", SCENARIO_PLUGIN, "thirdparty")
    monkeypatch.setenv("AGENTBENCH_NPU_PLUGINS", "thirdparty_scn")
    monkeypatch.setenv("AGENTBENCH_NPU_DISABLE_PLUGINS", "thirdparty_scn")
    assert "my-scenario" not in load_plugins().items("scenario")


# -- failures ---------------------------------------------------------------------------------------
def test_a_plugin_that_fails_to_import_is_named_with_its_distribution_and_how_to_disable_it(site):
    site.install("broken_dist", "1.0", "broken_plugin", "raise ImportError('no module named numpyy')\n", "broken")
    message = plugin_error()
    assert message.startswith("plugin 'broken' (distribution broken_dist 1.0) failed to import: ")
    assert "ImportError: no module named numpyy" in message
    assert "AGENTBENCH_NPU_DISABLE_PLUGINS=broken_dist" in message


def test_a_broken_plugin_that_is_disabled_no_longer_errors(site, monkeypatch):
    site.install("broken_dist", "1.0", "broken_plugin", "raise ImportError('no module named numpyy')\n", "broken")
    monkeypatch.setenv("AGENTBENCH_NPU_DISABLE_PLUGINS", "broken_dist")
    assert "base" in load_plugins().items("scenario")


def test_a_broken_plugin_left_out_of_the_allow_list_no_longer_errors(site, monkeypatch):
    site.install("broken_dist", "1.0", "broken_plugin", "raise ImportError('boom')\n", "broken")
    site.install("thirdparty_scn", "0.3.1", "thirdparty_scn", SCENARIO_PLUGIN, "thirdparty")
    monkeypatch.setenv("AGENTBENCH_NPU_PLUGINS", "thirdparty_scn")
    assert "my-scenario" in load_plugins().items("scenario")


def test_a_hook_that_raises_is_named_with_its_plugin_distribution_and_hook(site):
    source = '''
    from agentbench_npu.hookspecs import hookimpl

    @hookimpl
    def register_scenarios(register):
        raise RuntimeError("dataset\\nnot found")
    '''
    site.install("raising_dist", "2.0", "raising_plugin", source, "raising")
    message = plugin_error()
    assert message == ("plugin 'raising' (distribution raising_dist 2.0) raised in register_scenarios: "
                       "RuntimeError: dataset not found")


def test_a_scenario_with_the_name_of_a_builtin_is_a_duplicate_naming_both_owners(site):
    source = '''
    from agentbench_npu.hookspecs import hookimpl

    class Impostor:
        name = "base"

    @hookimpl
    def register_scenarios(register):
        register(Impostor())
    '''
    site.install("impostor_dist", "0.1", "impostor_plugin", source, "impostor")
    message = plugin_error()
    assert message.startswith("scenario 'base' is registered twice: ")
    assert "plugin 'agentbench_npu.builtin.plugin' (distribution agentbench-npu" in message
    assert "plugin 'impostor' (distribution impostor_dist 0.1)" in message
    assert "AGENTBENCH_NPU_DISABLE_PLUGINS=impostor_dist" in message


@pytest.mark.parametrize("registered", ["object()", "type('NoName', (), {'name': ''})()",
                                        "type('IntName', (), {'name': 3})()"])
def test_an_object_without_a_string_name_is_refused_naming_the_plugin(site, registered):
    source = f'''
    from agentbench_npu.hookspecs import hookimpl

    @hookimpl
    def register_devices(register):
        register({registered})
    '''
    site.install("nameless_dist", "0.0.1", "nameless_plugin", source, "nameless")
    message = plugin_error()
    assert message.startswith("plugin 'nameless' (distribution nameless_dist 0.0.1) registered a device "
                              "without a string `name`")


def test_a_plugin_with_the_name_of_a_builtin_plugin_is_refused(site):
    site.install("shadow_dist", "0.1", "shadow_plugin", SCENARIO_PLUGIN, "agentbench_npu.builtin.plugin")
    message = plugin_error()
    assert "(distribution shadow_dist 0.1) has the same plugin name as one from agentbench-npu" in message
