"""Multi-task objectives: how per-task losses (or per-task gradients) become one update. One file per method, each
registered by name (``mmlit objectives`` lists them)."""

from mmlit.objectives.base import Objective, gram, mean_over_ranks, step_generator
from mmlit.objectives.cagrad import CAGrad
from mmlit.objectives.dwa import DynamicWeightAverage
from mmlit.objectives.famo import FAMO
from mmlit.objectives.gradnorm import GradNorm
from mmlit.objectives.mgda import MGDA
from mmlit.objectives.pcgrad import PCGrad
from mmlit.objectives.rlw import RandomWeighting
from mmlit.objectives.static import StaticWeights
from mmlit.objectives.uncertainty import UncertaintyWeighting

__all__ = ["Objective", "CAGrad", "DynamicWeightAverage", "FAMO", "GradNorm", "MGDA", "PCGrad", "RandomWeighting",
           "StaticWeights", "UncertaintyWeighting", "gram", "mean_over_ranks", "step_generator"]
