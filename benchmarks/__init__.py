"""Declarative benchmark definitions (one YAML file per benchmark)."""
