"""The data position of a run, saved in its checkpoints: rank-independent (every rank takes the same steps, and
Lightning saves the data module's state from rank 0 only), from which each rank and worker derives its own place.

It holds the step and, per task, the task epoch and the samples of it that every rank together consumed, what the
epoch order depends on (seed, mode, shuffle buffer, samples per epoch) and how it was read (ranks, workers, batch
size). The epoch order does not depend on how it is read (``mmlit/data/reading.py``), so a run resumed on other ranks,
workers or batch sizes continues each task epoch where it was: every sample of the epoch once across the two parts
(a line in the log says what changed). With another epoch order (seed, mode, shuffle buffer or samples changed) a
task restarts its current task epoch, with a warning.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.utilities import rank_zero_info

__all__ = ["resumed_position", "saved_position"]


def saved_position(step: int, positions: dict[str, tuple[int, int]], samples: dict[str, int], settings: dict,
                   layout: dict[str, dict]) -> dict:
    """The state after ``step`` steps, each task at ``positions[task]``: (epoch, samples of it consumed)."""
    return {"step": step, "settings": settings, "tasks": {
        name: {"epoch": epoch, "sample": sample, "epoch_samples": samples[name], **layout[name]}
        for name, (epoch, sample) in positions.items()}}


def resumed_position(state: dict, samples: dict[str, int], settings: dict, layout: dict[str, dict],
                     groups: dict[str, list[str]]) -> tuple[int, dict[str, tuple[int, int]]]:
    """The step, and the position each task's stream starts at: where it was saved, or the start of its task epoch
    when its epoch order changed; a task new in this run joins the tasks of its source (or starts at the start).
    Tasks of one source read the same batches."""
    start = {}
    for name, saved in state["tasks"].items():
        if name not in samples:
            continue
        if "sample" in saved and (state["settings"], saved["epoch_samples"]) == (settings, samples[name]):
            start[name] = (saved["epoch"], saved["sample"])
            changed = {key: f"{saved.get(key)} -> {value}" for key, value in layout[name].items()
                       if saved.get(key) != value}
            if changed and saved["sample"]:
                rank_zero_info(f"data: task '{name}' resumes with other {', '.join(f'{k} ({v})' for k, v in changed.items())}"
                               f" than it was saved with; it continues task epoch {saved['epoch']} at sample "
                               f"{saved['sample']} of {samples[name]}")
        else:
            start[name] = (saved["epoch"], 0)
            warnings.warn(f"data: task '{name}' resumes with another epoch order (seed, mode, shuffle buffer or "
                          f"samples) than it was saved with; it restarts its task epoch {saved['epoch']}, so some "
                          f"samples of that epoch are seen twice", stacklevel=3)
    for names in groups.values():
        known = sorted({start[name] for name in names if name in start})
        if len(known) > 1:
            warnings.warn(f"data: tasks {', '.join(names)} read one source but were saved at different positions "
                          f"({known}); they continue from {known[0]}", stacklevel=3)
        if known:  # (a task new in this run joins where the others are)
            start.update(dict.fromkeys(names, known[0]))
    return state["step"], start
