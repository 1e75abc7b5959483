"""mmlit: multi-task multimodal training with PyTorch Lightning on streaming WebDataset shards."""

from mmlit.registry import (get_objective, get_task, list_objectives, list_tasks, register_objective,
                            register_task)

__all__ = ["get_objective", "get_task", "list_objectives", "list_tasks", "register_objective", "register_task",
           "__version__"]
__version__ = "0.1.0"
