"""Recipes (one TOML per scenario) and profiles, shipped inside the package as data."""
