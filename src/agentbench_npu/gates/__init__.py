"""Acceptance gates (log-prob alignment, weight sync, reproducibility, checkpoint continuity) and faults."""
