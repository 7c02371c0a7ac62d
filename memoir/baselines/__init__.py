"""Baselines for lifelong editing, at the same layer as MEMOIR: FT-L and GRACE."""
from memoir.baselines.ft import FTConfig, FTEditor
from memoir.baselines.grace import GraceConfig, GraceEditor, GraceLayer

__all__ = ["FTConfig", "FTEditor", "GraceConfig", "GraceEditor", "GraceLayer"]
