"""Multi-task objectives: how per-task losses become one update."""

from mmlit.objectives.base import Objective
from mmlit.objectives.static import StaticWeights

__all__ = ["Objective", "StaticWeights"]
