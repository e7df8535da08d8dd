"""Where config values come from: recipe files, the recipes and profiles shipped in scenarios/, `--set`.

Each source becomes a Layer (nested values + where they came from, for error messages); config.resolve
merges layers over the typed defaults.
"""

from __future__ import annotations

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


def profile_layer(name: str) -> Layer:
    layer = packaged_recipe(f"profiles/{name}.toml")
    if layer is None:
        available = sorted(p.name[:-5] for p in resources.files("agentbench_npu.scenarios").joinpath("profiles").iterdir()
                           if p.name.endswith(".toml"))
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
