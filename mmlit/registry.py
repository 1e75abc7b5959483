"""Registries: short names for task and objective classes, filled by ``@register_task`` /
``@register_objective`` and by the ``mmlit.tasks`` / ``mmlit.objectives`` entry-point groups, so a
class shipped in another package is found without any edit to mmlit (the timm ``register_model`` /
``list_models`` pattern)."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Callable, TypeVar

__all__ = ["register_task", "get_task", "list_tasks", "register_objective", "get_objective", "list_objectives"]

log = logging.getLogger(__name__)
T = TypeVar("T", bound=type)


class _Registry:
    """Names -> classes of one kind; ``attribute`` is set on each class to its registered name."""

    def __init__(self, kind: str, group: str, builtin: str, attribute: str):
        self.kind, self.group, self.builtin, self.attribute = kind, group, builtin, attribute
        self.classes: dict[str, type] = {}
        self.discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            known = self.classes.get(name)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} name {name!r} is taken by {known.__module__}.{known.__qualname__}")
            setattr(cls, self.attribute, name)
            self.classes[name] = cls
            return cls

        return wrap

    def _discover(self) -> None:
        """Import every module named in the entry-point group (once), then the built-in ones."""
        if self.discovered:
            return
        self.discovered = True
        for ep in entry_points(group=self.group):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must not hide the others
                log.warning("%s entry point %r (%s) failed to load: %s", self.group, ep.name, ep.value, err)
        importlib.import_module(self.builtin)  # also when mmlit is not pip-installed

    def names(self) -> list[str]:
        self._discover()
        return sorted(self.classes)

    def get(self, name: str) -> type:
        self._discover()
        try:
            return self.classes[name]
        except KeyError:
            raise KeyError(f"no {self.kind} named {name!r}; registered {self.kind}s: "
                           f"{', '.join(sorted(self.classes))}") from None


_TASKS = _Registry("task", "mmlit.tasks", "mmlit.tasks", "task_name")
_OBJECTIVES = _Registry("objective", "mmlit.objectives", "mmlit.objectives", "objective_name")


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: make a task class available under ``name``."""
    return _TASKS.register(name)


def list_tasks() -> list[str]:
    """Names of every registered task, sorted."""
    return _TASKS.names()


def get_task(name: str) -> type:
    """The task class registered as ``name``; the error lists the known names."""
    return _TASKS.get(name)


def register_objective(name: str) -> Callable[[T], T]:
    """Class decorator: make a multi-task objective available under ``name``."""
    return _OBJECTIVES.register(name)


def list_objectives() -> list[str]:
    """Names of every registered objective, sorted."""
    return _OBJECTIVES.names()


def get_objective(name: str) -> type:
    """The objective class registered as ``name``; the error lists the known names."""
    return _OBJECTIVES.get(name)
