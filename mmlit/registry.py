"""Registries: short names for the classes at mmlit's extension points, one mechanism for all of them.

Each kind (tasks, objectives, modalities, fusions, sources) is filled by its decorator (``@register_task("vqa")``)
and by its entry-point group (``mmlit.tasks``, ``mmlit.objectives``, ``mmlit.modalities``, ``mmlit.fusions``,
``mmlit.sources``), so a class shipped in another package is found without any edit to mmlit (the timm
``register_model`` / ``list_models`` pattern). ``list_*`` and ``get_*`` import the group's modules and mmlit's own
ones on first use; the tests parametrize over every registered name.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Callable, TypeVar

__all__ = ["get_fusion", "get_modality", "get_objective", "get_source", "get_task", "is_modality", "list_fusions",
           "list_modalities", "list_objectives", "list_sources", "list_tasks", "register_fusion", "register_modality",
           "register_objective", "register_source", "register_task"]

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
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"{self.kind} name {name!r} is taken by {known.__module__}.{known.__qualname__}")
            setattr(cls, self.attribute, name)
            self.classes[name] = cls
            return cls

        return wrap

    def _discover(self) -> None:
        """Import every module named in the entry-point group (once), then the built-in ones."""
        if self.discovered:
            return
        self.discovered = True  # first: a plugin that looks a name up while it loads must not recurse
        try:
            for ep in entry_points(group=self.group):
                try:
                    ep.load()
                except Exception as err:  # a broken plugin must not hide the others
                    log.warning("%s entry point %r (%s) failed to load: %s", self.group, ep.name, ep.value, err)
            importlib.import_module(self.builtin)  # also when mmlit is not pip-installed
        except BaseException:  # the built-ins failed to import: the next lookup tries again and shows the error
            self.discovered = False
            raise

    def names(self) -> list[str]:
        self._discover()
        return sorted(self.classes)

    def get(self, name: str) -> type:
        if name not in self.classes:
            self._discover()
        try:
            return self.classes[name]
        except KeyError:
            raise KeyError(f"no {self.kind} named {name!r}; registered {self.kind}s: "
                           f"{', '.join(sorted(self.classes))}") from None

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self.classes

    def api(self) -> tuple[Callable, Callable, Callable]:
        """``register_x``, ``list_x`` and ``get_x`` of this kind."""
        kind = self.kind

        def register(name: str) -> Callable[[T], T]:
            return self.register(name)

        def names() -> list[str]:
            return self.names()

        def get(name: str) -> type:
            return self.get(name)

        register.__doc__ = f"Class decorator: make a {kind} class available under ``name``."
        names.__doc__ = f"Names of every registered {kind}, sorted."
        get.__doc__ = f"The {kind} class registered as ``name``; the error lists the known names."
        return register, names, get


_TASKS = _Registry("task", "mmlit.tasks", "mmlit.tasks", "task_name")
_OBJECTIVES = _Registry("objective", "mmlit.objectives", "mmlit.objectives", "objective_name")
_MODALITIES = _Registry("modality", "mmlit.modalities", "mmlit.modalities", "modality_name")
_FUSIONS = _Registry("fusion", "mmlit.fusions", "mmlit.models", "fusion_name")
_SOURCES = _Registry("source", "mmlit.sources", "mmlit.data.sources", "format")

register_task, list_tasks, get_task = _TASKS.api()
register_objective, list_objectives, get_objective = _OBJECTIVES.api()
register_modality, list_modalities, get_modality = _MODALITIES.api()
register_fusion, list_fusions, get_fusion = _FUSIONS.api()
register_source, list_sources, get_source = _SOURCES.api()


def is_modality(name: str) -> bool:
    """Whether ``name`` is a registered modality (a task field so named reads any entry of it)."""
    return name in _MODALITIES
