"""memoir: MEMOIR lifelong knowledge editing for HuggingFace causal LMs."""
from memoir.config import MemoirConfig
from memoir.editor import EditRequest, EditResult, MemoirEditor, Retrieval
from memoir.layer import MemoirLayer
from memoir.models import load_model, locate_target
from memoir.route import Route

__version__ = "0.1.0"
__all__ = [
    "MemoirConfig",
    "MemoirEditor",
    "MemoirLayer",
    "EditRequest",
    "EditResult",
    "Retrieval",
    "Route",
    "load_model",
    "locate_target",
]
