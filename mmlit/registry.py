"""The task registry: short names for task classes, filled by ``@register_task`` and by the
``mmlit.tasks`` entry-point group, so a task shipped in another package is found without any
edit to mmlit (the timm ``register_model`` / ``list_models`` pattern)."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Callable, TypeVar

__all__ = ["register_task", "get_task", "list_tasks"]

log = logging.getLogger(__name__)
_TASKS: dict[str, type] = {}
_discovered = False
T = TypeVar("T", bound=type)


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: make a task class available under ``name``."""

    def wrap(cls: T) -> T:
        known = _TASKS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"task name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        cls.task_name = name
        _TASKS[name] = cls
        return cls

    return wrap


def _discover() -> None:
    """Import every module named in the ``mmlit.tasks`` entry-point group (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group="mmlit.tasks"):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not hide the others
            log.warning("mmlit.tasks entry point %r (%s) failed to load: %s", ep.name, ep.value, err)
    import mmlit.tasks  # noqa: F401  the built-in tasks, also when mmlit is not pip-installed


def list_tasks() -> list[str]:
    """Names of every registered task, sorted."""
    _discover()
    return sorted(_TASKS)


def get_task(name: str) -> type:
    """The task class registered as ``name``; the error lists the known names."""
    _discover()
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"no task named {name!r}; registered tasks: {', '.join(sorted(_TASKS))}") from None
