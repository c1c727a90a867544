"""Task registry: `get_task(name)`; other tasks register themselves here."""

from __future__ import annotations

from vldm.tasks.base import GenerateTask, Task, TaskInputs

_REGISTRY: dict[str, type[Task]] = {"generate": GenerateTask}


def register(cls: type[Task]) -> type[Task]:
    _REGISTRY[cls.name] = cls
    return cls


def get_task(name: str, **kwargs) -> Task:
    # import side effects: the paper's other tasks live in their own modules
    try:
        import vldm.tasks.paper  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "vldm.tasks.paper":
            raise
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


__all__ = ["GenerateTask", "Task", "TaskInputs", "get_task", "register"]
