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

__all__ = ["Objective", "build_objective", "CAGrad", "DynamicWeightAverage", "FAMO", "GradNorm", "MGDA", "PCGrad", "RandomWeighting",
           "StaticWeights", "UncertaintyWeighting", "gram", "mean_over_ranks", "step_generator"]


def build_objective(objective: Objective | str | None, tasks: list[str]) -> Objective:
    """The recipe's objective bound to its tasks: an instance, a registered name (built with its defaults), or None
    (static weights of 1)."""
    from mmlit.registry import get_objective

    if isinstance(objective, str):
        try:
            objective = get_objective(objective)()
        except KeyError as err:
            raise ValueError(f"model.objective: {err.args[0]}") from None
    objective = objective if objective is not None else StaticWeights()
    objective.bind(tasks)
    return objective
