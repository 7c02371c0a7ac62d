"""Integrations with inference stacks (optional dependencies, imported on use)."""
