"""The data position of a run, saved in its checkpoints: rank-independent (every rank takes the same steps, and
Lightning saves the data module's state from rank 0 only), from which each rank and worker derives its own place.

It holds the step, and per task the batch its stream is at, the task epoch and what that position depends on (seed,
mode, ranks, workers, shuffle buffer, batch size, samples per epoch). Resumed with the same settings, a task
continues at its batch: exactly the samples an uninterrupted run sees. With other settings it restarts its current
task epoch, with a warning.
"""

from __future__ import annotations

import warnings

__all__ = ["resumed_position", "saved_position"]


def saved_position(step: int, position: dict[str, int], batches: dict[str, int], samples: dict[str, int],
                   batch_sizes: dict[str, int], settings: dict) -> dict:
    """The state after ``step`` steps, each task's stream at batch ``position[task]`` of epochs of ``batches``."""
    return {"step": step, "settings": settings, "tasks": {
        name: {"batch": position[name], "epoch": position[name] // batches[name], "batch_size": batch_sizes[name],
               "epoch_samples": samples[name]} for name in position}}


def resumed_position(state: dict, batches: dict[str, int], samples: dict[str, int], batch_sizes: dict[str, int],
                     settings: dict, groups: dict[str, list[str]]) -> tuple[int, dict[str, int]]:
    """The step, and the batch each task's stream starts at: where it was saved, or the start of its task epoch when
    the data settings changed; a task new in this run joins the tasks of its source (or starts at 0). Tasks of one
    source read the same batches."""
    start = {}
    for name, saved in state["tasks"].items():
        if name not in batches:
            continue
        if (state["settings"], saved["batch_size"], saved["epoch_samples"]) == (settings, batch_sizes[name], samples[name]):
            start[name] = saved["batch"]
        else:
            start[name] = saved["epoch"] * batches[name]
            warnings.warn(f"data: task '{name}' resumes with other data settings (seed, mode, ranks, workers, shuffle "
                          f"buffer, batch size or samples) than it was saved with; it restarts its task epoch "
                          f"{saved['epoch']}, so some samples of that epoch are seen twice", stacklevel=3)
    for names in groups.values():
        known = sorted({start[name] for name in names if name in start})
        if len(known) > 1:
            warnings.warn(f"data: tasks {', '.join(names)} read one source but were saved at different batches "
                          f"({known}); they continue from batch {known[0]}", stacklevel=3)
        if known:  # (a task new in this run joins where the others are)
            start.update(dict.fromkeys(names, known[0]))
    return state["step"], start
