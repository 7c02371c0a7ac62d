"""Evaluation harness: benchmark loaders, EasyEdit-style metrics, the sequential protocol."""
from memoir.eval.datasets import EditRecord, detect_format, load_dataset, load_records
from memoir.eval.runner import evaluate, run_sequential, summarise

__all__ = ["EditRecord", "detect_format", "load_dataset", "load_records", "evaluate", "run_sequential", "summarise"]
