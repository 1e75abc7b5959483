"""mmlit: multi-task multimodal training with PyTorch Lightning on streaming WebDataset shards."""

from mmlit.registry import get_task, list_tasks, register_task

__all__ = ["get_task", "list_tasks", "register_task", "__version__"]
__version__ = "0.1.0"
