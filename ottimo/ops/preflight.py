"""Pre-flight of a Dask fan-out: fail in seconds, with the problem named, instead of hanging or failing deep inside
Dask ("Could not serialize object of type LLGExpr").

- `check_scheduler`: the scheduler answers within a timeout, has at least one worker, and every worker sees what
  this process sees (`Probe`: e.g. the same MLflow store, the project folder).
- `check_picklable`: a task's function and each of its arguments pickle with cloudpickle, as Dask sends them; when
  one does not, the object inside it that does not is found and named by its path (`base.recipe.hparams['act']`).

No Prefect here: tasks/runner.py calls these before it submits anything.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import FunctionType, MethodType

import cloudpickle

MAX_DEPTH, MAX_CHILDREN = 12, 1000


class PreflightError(RuntimeError):
    """A Dask fan-out cannot work; the message says what and what to do."""


@dataclass(frozen=True)
class Probe:
    """Something every worker must see as this process does: `fn()` run on each worker must equal `expected`."""

    what: str  # e.g. "the MLflow store"
    fn: Callable[[], object]  # picklable (a module-level function or a functools.partial of one)
    expected: object
    hint: str  # what to do when a worker differs
    show: Callable[[object], str] = repr  # how values appear in the message (e.g. with credentials redacted)


def check_scheduler(address: str, source: str, runner_key: str, timeout: float = 5.0,
                    probes: Iterable[Probe] = ()) -> list[str]:
    """The scheduler at `address` (set by `source`, e.g. tune.dask_address) answers within `timeout` seconds and has
    a worker; every probe agrees on every worker. Returns the workers' addresses; raises PreflightError."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    fix = f"or set {runner_key}: threads"
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError, TypeError) as err:  # unreachable (OSError/TimeoutError), malformed (ValueError)
        raise PreflightError(
            f"no Dask scheduler answers at {address!r} ({source}) within {timeout:.0f} s ({type(err).__name__}: "
            f"{err}). Start one (`make up STACK=postgres WORKERS=2`, or `dask scheduler --host 127.0.0.1` and "
            f"`dask worker <its address> --nthreads 1`), correct {source}, {fix}.") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=max(0.5, deadline - time.monotonic()))
        except TimeoutError:
            raise PreflightError(
                f"the Dask scheduler at {address} ({source}) has no workers: submitted tasks would wait forever. "
                f"Start workers (`dask worker {address} --nthreads 1`) {fix}.") from None
        for probe in probes:
            _agree(client, address, probe)
        return sorted(client.scheduler_info(n_workers=-1)["workers"])


def _agree(client, address: str, probe: Probe) -> None:
    try:
        seen = client.run(probe.fn)
    except Exception as err:  # e.g. ModuleNotFoundError: the workers cannot import this project's code
        raise PreflightError(
            f"the Dask workers of {address} could not check {probe.what} ({type(err).__name__}: {err}). Start them "
            "in this flow's environment: the same packages, with the repository root as working folder or on "
            "PYTHONPATH.") from None
    for worker, value in sorted(seen.items()):
        if value != probe.expected:
            raise PreflightError(f"Dask worker {worker} sees {probe.what} as {probe.show(value)}, this flow as "
                                 f"{probe.show(probe.expected)}: {probe.hint}.")


def check_picklable(task: str, fn: object | None, arguments: Mapping[str, object], runner_key: str) -> None:
    """`fn` (the task; None: already checked) and every argument pickle as Dask pickles them, else PreflightError
    naming the task, the argument, where in it the unpicklable object sits and its type."""
    items = ([("", fn)] if fn is not None else []) + list(arguments.items())
    for name, value in items:
        error = _pickle_error(value)
        if error is None:
            continue
        root = name or task
        path, culprit, cause = _culprit(value, root, error)
        what = f"argument `{name}` holds" if name else "the task's function refers to"
        at = "" if path == root else f" at `{path}`"
        raise PreflightError(
            f"task {task} cannot be sent to a Dask worker: {what} a {_type(culprit)}{at} that cannot be "
            f"pickled ({cause}). {_advice(bool(name))} Or set {runner_key}: threads.")


def _advice(argument: bool) -> str:
    if argument:
        return ("Pass what a worker can rebuild it from instead (paths, ids, plain records of str, numbers, lists "
                "and dicts), not a live object (lock, client, session, open file).")
    return ("A task's function travels by value with the module globals it uses: reach process-wide objects "
            "(locks, clients, open files) through their module (`module.name`), so that each worker uses its own, "
            "or create them inside the task.")


def _pickle_error(obj: object) -> str | None:
    try:
        cloudpickle.dumps(obj)
    except Exception as err:  # pickling raises TypeError, PicklingError, AttributeError... any is a no
        return f"{type(err).__name__}: {err}"
    return None


def _culprit(obj: object, path: str, error: str, depth: int = 0, seen: set[int] | None = None
             ) -> tuple[str, object, str]:
    """The innermost part of `obj` (which does not pickle, with `error`) that does not pickle: (its path, it, why)."""
    seen = set() if seen is None else seen
    seen.add(id(obj))
    if depth < MAX_DEPTH:
        for child_path, child in _children(obj, path):
            if id(child) in seen:
                continue
            child_error = _pickle_error(child)
            if child_error is not None:
                return _culprit(child, child_path, child_error, depth + 1, seen)
    return path, obj, error


def _children(obj: object, path: str) -> Iterator[tuple[str, object]]:
    """The parts pickling `obj` pickles, each with its path; at most MAX_CHILDREN."""
    n = 0
    for child_path, child in _parts(obj, path):
        yield child_path, child
        n += 1
        if n >= MAX_CHILDREN:
            return


def _parts(obj: object, path: str) -> Iterator[tuple[str, object]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield f"{path}[{k!r}]", v
    elif isinstance(obj, list | tuple | set | frozenset):
        for i, v in enumerate(obj):
            yield f"{path}[{i}]", v
    elif isinstance(obj, MethodType):
        yield f"{path}.__self__", obj.__self__
        yield f"{path}.__func__", obj.__func__
    elif isinstance(obj, FunctionType):  # pickled by value: its closure, defaults and the globals its code names
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield f"{path}.<closure {name}>", cell.cell_contents
            except ValueError:  # an empty cell
                pass
        for i, v in enumerate(obj.__defaults__ or ()):
            yield f"{path}.__defaults__[{i}]", v
        for name in _global_names(obj.__code__):
            if name in obj.__globals__:
                yield f"{path}.<global {name}>", obj.__globals__[name]
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield f"{path}.{f.name}", getattr(obj, f.name, None)
    else:
        for k, v in getattr(obj, "__dict__", {}).items():
            yield f"{path}.{k}", v
        for k in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, k):
                yield f"{path}.{k}", getattr(obj, k)


def _global_names(code) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if hasattr(const, "co_names"):  # nested functions, comprehensions
            yield from _global_names(const)


def _type(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
