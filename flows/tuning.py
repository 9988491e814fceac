"""What the campaign's flows ask of Prefect per task and per subflow, cut to what they use.

Profiled on the demo campaign (py-spy on the flow process, ``benchmarks/orchestration.py``), the
flow process's own Prefect CPU went mostly to two things that buy this campaign nothing:

- **the task cache key.** A task made without a cache policy gets Prefect's default one
  (inputs + task source + flow run id) and computes its key on every run, even though no result
  is persisted and so nothing is ever read back from that cache. For a stage, whose callable
  is a `functools.partial`, the "task source" is ``inspect.getsource(functools.partial)``:
  ``functools.py`` read and parsed by `ast` on every stage run (1.3 % of the process's CPU,
  the largest Prefect item). Stages are idempotent through the ledger, never through Prefect's
  cache, so `stage_task` makes them with ``NO_CACHE``. Task and flow run states, their logs
  and the artifacts are unchanged: nothing an operator sees in the UI goes.
- **settings rebuilt per subflow.** ``temporary_settings`` validates a whole new `Settings`
  object (environment, ``.env``, profiles and ``prefect.toml`` read again) on every subflow
  call; `no_heartbeat` builds that object once per base settings and re-enters it.

The task objects themselves are cached too (`stage_task`), so that a site-step run creates no
`Task` per stage.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.context import SettingsContext, get_settings_context
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Settings

__all__ = ["no_heartbeat", "stage_task"]

R = TypeVar("R")

# The callable the running stage task calls: set by `stage_task` around the task's call, so
# that one `Task` object serves every call with the same names (a sync task runs in the
# caller's thread and context).
_STAGE_FN: contextvars.ContextVar[Callable[[], Any]] = contextvars.ContextVar("_STAGE_FN")


def _run_stage() -> Any:
    return _STAGE_FN.get()()


@functools.lru_cache(maxsize=4096)
def _stage_task(name: str, run_name: str) -> Task[[], Any]:
    # NO_CACHE: see the module docstring. Without persisted results Prefect never reads a
    # cached result back, so the key is pure cost; with ``NO_CACHE`` it is not computed.
    return Task(_run_stage, name=name, task_run_name=run_name, cache_policy=NO_CACHE)


def stage_task(name: str, run_name: str) -> Callable[[Callable[[], R]], Callable[[], R]]:
    """A Prefect task named ``name`` (task run ``run_name``) that runs the callable it is given.

    ``stage_task(name, run_name)(fn)()`` runs ``fn()`` as one task run, like
    ``task(name=name, task_run_name=run_name)(fn)()``, but without a `Task` made per call and
    without a cache key computed per run. ``fn`` takes no arguments (bind them with
    `functools.partial`): the task run records no parameters, as before.
    """
    prefect_task = _stage_task(name, run_name)

    def bind(fn: Callable[[], R]) -> Callable[[], R]:
        def call() -> R:
            token = _STAGE_FN.set(fn)
            try:
                return prefect_task()  # type: ignore[return-value]
            finally:
                _STAGE_FN.reset(token)

        return call

    return bind


_NO_HEARTBEAT: dict[int, tuple[Settings, Settings]] = {}
_NO_HEARTBEAT_LOCK = threading.Lock()


@contextlib.contextmanager
def no_heartbeat() -> Iterator[Settings]:
    """The current settings without the flow heartbeat, for a subflow run in its parent's process.

    Same effect as ``temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})``,
    but the new `Settings` is built once per base settings object, not on every call.
    """
    context = get_settings_context()
    base = context.settings
    with _NO_HEARTBEAT_LOCK:
        cached = _NO_HEARTBEAT.get(id(base))
        if cached is None or cached[0] is not base:
            # The base is kept in the entry, so that its id cannot be reused by another object.
            cached = (
                base,
                base.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
            )
            _NO_HEARTBEAT[id(base)] = cached
    with SettingsContext(profile=context.profile, settings=cached[1]):
        yield cached[1]
