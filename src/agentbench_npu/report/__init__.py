"""Run reports: report.json (versioned schema), samples.jsonl, and their rendering."""

from .schema import SCHEMA_VERSION, environment, summarise

__all__ = ["SCHEMA_VERSION", "environment", "summarise"]
