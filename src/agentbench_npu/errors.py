"""Errors a user sees. Each is one line: what was wrong, where, and what to do."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: the CLI prints the message on one line and exits 2."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe, flag or `--set` value is wrong; the message names the field path."""


class PluginError(UserError):
    """A plugin failed to import, raised in a hook, or registered a duplicate name."""


class MissingExtraError(UserError):
    """An optional stack (torch_npu, sglang, ray, ...) is needed but not installed."""

    def __init__(self, what: str, extra: str, module: str):
        super().__init__(
            f"{what} needs the '{module}' package, which is not installed: "
            f"pip install 'agentbench-npu[{extra}]'"
        )
        self.extra = extra
        self.module = module


def one_line(exc: BaseException) -> str:
    """An exception as one line, for messages that wrap another error."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def close_names(word: str, choices: list[str]) -> str:
    """' (did you mean: a, b?)' when some choices are close to `word`, else ''."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
