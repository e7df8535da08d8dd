"""Where config values come from: recipe files, the recipes and profiles shipped in scenarios/, `--set`.

Each source becomes a Layer (nested values + where they came from, for error messages); config.resolve
merges layers over the typed defaults.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, close_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Layer:
    """Values from one source: a nested dict and where it came from (for error messages)."""

    values: Mapping[str, Any]
    source: str
    text: str = ""  # the file's text, to find line numbers

    def where(self, section: str, key: str) -> str:
        if not self.text:
            return self.source
        line = _find_line(self.text, section, key)
        return f"{self.source}:{line}" if line else self.source


def _find_line(text: str, section: str, key: str) -> int | None:
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            current = header.group(1).strip()
            continue
        if re.match(rf"\s*{re.escape(key)}\s*=", line) and current in (section, ""):
            return number
        if re.match(rf"\s*{re.escape(section)}\.{re.escape(key)}\s*=", line):
            return number
    return None


def load_toml(path: Path, source: str | None = None) -> Layer:
    source = source or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read recipe: {exc.strerror}") from exc
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    return Layer(values, source, text)


def packaged_recipe(relative: str) -> Layer | None:
    """A TOML shipped in the package's scenarios/ folder (recipes and profiles).

    `extends = "other.toml"` at its top merges it over another shipped recipe, table by table.
    """
    ref = resources.files("agentbench_npu.scenarios").joinpath(relative)
    if not ref.is_file():
        return None
    text = ref.read_text(encoding="utf-8")
    values = tomllib.loads(text)
    parent_name = values.pop("extends", None)
    if parent_name:
        parent = packaged_recipe(parent_name)
        if parent is None:
            raise ConfigError(f"scenarios/{relative}: extends '{parent_name}', which is not shipped")
        merged = {k: dict(v) if isinstance(v, dict) else v for k, v in parent.values.items()}
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        values = merged
    return Layer(values, f"scenarios/{relative}", text)


def shipped_recipes(folder: str) -> list[str]:
    """The names of the TOMLs shipped in scenarios/FOLDER (profiles, models)."""
    return sorted(p.name[:-5] for p in resources.files("agentbench_npu.scenarios").joinpath(folder).iterdir()
                  if p.name.endswith(".toml"))


def profile_layer(name: str) -> Layer:
    layer = packaged_recipe(f"profiles/{name}.toml")
    if layer is None:
        available = shipped_recipes("profiles")
        raise ConfigError(f"unknown profile '{name}'{close_names(name, available)}; available: {', '.join(available)}")
    return layer


def split_profiles(layer: Layer) -> tuple[Layer, dict[str, Layer]]:
    """A scenario recipe's own settings, and its `[profiles.NAME.SECTION]` tables: what the scenario changes
    when it runs under profile NAME (the tiny profile's warm start, say), applied right after that profile. Its
    `[diff]` table (tolerances for `agentbench-npu diff`) is not a run setting and is left out."""
    values = dict(layer.values)
    values.pop("diff", None)  # the recipe's tolerances for `agentbench-npu diff`, not run settings
    profiles = values.pop("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ConfigError(f"{layer.source}: 'profiles' must hold tables like [profiles.tiny.warm_start]")
    return (Layer(values, layer.source, layer.text),
            {name: Layer(body, f"{layer.source} [profiles.{name}]", "") for name, body in profiles.items()})


def model_recipe(hf: Mapping[str, Any]) -> tuple[str, Layer] | None:
    """The recipe in scenarios/models/ whose `[match]` keys all equal config.json's (a VL model's text_config's),
    as (its name, its layer with `[match]` left out); None when no recipe knows the model."""
    text = hf.get("text_config") or hf
    folder = resources.files("agentbench_npu.scenarios").joinpath("models")
    for ref in sorted((p for p in folder.iterdir() if p.name.endswith(".toml")), key=lambda p: p.name):
        layer = packaged_recipe(f"models/{ref.name}")
        assert layer is not None
        values = dict(layer.values)
        match = values.pop("match", {})
        if match and all(text.get(k, hf.get(k)) == v for k, v in match.items()):
            return ref.name[:-5], Layer(values, layer.source, layer.text)
    return None


def model_layers(model: str, profile: str) -> list[Layer]:
    """For a checkpoint dir whose config.json a recipe in scenarios/models/ knows: that recipe, its
    `[profiles.PROFILE]` tables, and `model.recipe` naming it (to go after the profile, before the user's layers)."""
    config_json = Path(model).expanduser() / "config.json"
    if not config_json.is_file():  # a tiny model's name, or a path resolve_model_dir will report
        return []
    try:
        hf = json.loads(config_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_json}: unreadable config.json ({exc})") from exc
    found = model_recipe(hf)
    if found is None:
        return []
    name, layer = found
    own, per_profile = split_profiles(layer)
    return [own, *([per_profile[profile]] if profile in per_profile else []),
            Layer({"model": {"recipe": name}}, f"scenarios/models/{name}.toml")]


def parse_set(items: list[str]) -> Layer:
    """`--set section.key=value` pairs → a layer of strings (typed later against the defaults)."""
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set '{item}': keys look like section.key (e.g. rollout.temperature)")
        values.setdefault(parts[0], {})[parts[1]] = _Raw(raw.strip())
    return Layer(values, "--set")


class _Raw(str):
    """A string from the command line, to be converted to the field's type."""
