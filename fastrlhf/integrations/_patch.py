"""Shared machinery of the ``patch()`` functions: swap functions inside an installed trainer package.

A trainer's hot functions are reached by several names: the module that defines them
(``trl.trainer.utils.selective_log_softmax``), every module that imported them by name
(``from .utils import selective_log_softmax``), aliases (``_ChunkedLogProbFunction``) and
registries (verl's ``POLICY_LOSS_REGISTRY["vanilla"]``). :func:`apply_patch` finds the
original object in its home module, then replaces every reference to that *same object*
(identity, not name) in the module dicts of the package, and in plain dicts stored at
module level, across ``sys.modules``. Closures, default arguments and objects that already
copied the reference (e.g. a ``torch.compile`` wrapper built before ``patch()``) keep the
original: call ``patch()`` before the trainer is built.

Version awareness: each :class:`Target` carries a ``check`` that reads the installed
object (its signature, usually) and says why it is incompatible; such targets, and targets
the installed version does not have, are skipped with an :class:`IntegrationWarning`,
never an exception. Only a missing package raises (``ImportError``).

Idempotent and thread-safe: ``apply_patch`` and ``undo`` hold one process-wide lock, so of
several threads patching at once exactly one replaces each target and the others skip it as
"already patched". ``undo`` restores every recorded site and then sweeps the package's loaded
modules once more, so a module imported while the patch was active (which copied a
replacement by name) gets the original back too.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = ["IntegrationWarning", "PatchHandle", "Target", "apply_patch", "param_names", "check_params"]

# Set on every replacement: the object it replaced (and marks "already patched").
ORIGINAL_ATTR = "__fastrlhf_original__"

# One lock for every patch() / undo() in the process: the "already patched" check and the swap
# must be one step, or two threads would both find the original and both replace it.
_LOCK = threading.RLock()


class IntegrationWarning(UserWarning):
    """A target of ``patch()`` was skipped (missing or incompatible in the installed version)."""


@dataclass(frozen=True)
class Target:
    """One object to replace: ``<root>.<module>.<name>``.

    ``make(original) -> replacement``; ``check(original) -> reason it is incompatible | None``.
    """

    module: str
    name: str
    make: Callable[[Any], Any]
    check: Optional[Callable[[Any], Optional[str]]] = None


def param_names(obj: Any, skip_first: bool = False) -> Optional[list[str]]:
    """Named parameters of a callable (``*args``/``**kwargs`` left out); None if not introspectable."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    names = [
        p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return names[1:] if skip_first else names


def check_params(ours: Sequence[str], *, exact: bool = False, skip_first: bool = False, attr: Optional[str] = None):
    """A ``check`` accepting an original whose parameters are a prefix of ``ours`` (or equal with ``exact``).

    A prefix is enough for a positional call to mean the same thing in both; ``exact`` is for
    functions whose extra parameters in ``ours`` came with a change of semantics.
    ``attr``: check ``original.<attr>`` (e.g. ``"forward"``) instead of the original itself.
    """
    ours = list(ours)

    def check(original: Any) -> Optional[str]:
        obj = getattr(original, attr, None) if attr else original
        theirs = param_names(obj, skip_first=skip_first) if obj is not None else None
        if theirs is None:
            return "its signature cannot be read"
        ok = theirs == ours if exact else theirs == ours[: len(theirs)]
        if not ok:
            what = f"{attr} " if attr else ""
            rel = "" if exact else " (a prefix of it)"
            return f"its {what}parameters {theirs} differ from the ones fastrlhf implements {ours}{rel}"
        return None

    return check


class PatchHandle:
    """What ``patch()`` did; ``undo()`` restores the originals. Also a context manager.

    Attributes:
        package: root package name, e.g. ``"trl"``.
        version: its ``__version__`` (or ``"unknown"``).
        patched: ``"module.name"`` of each replaced object.
        skipped: ``{"module.name": reason}`` for the targets left alone.
        sites: every ``"module.attr"`` / ``"module.dict[key]"`` rewritten.
    """

    def __init__(self, package: str, version: str):
        self.package = package
        self.version = version
        self.patched: list[str] = []
        self.skipped: dict[str, str] = {}
        self.sites: list[str] = []
        self._records: list[tuple[Any, str, Any, Any, bool]] = []  # (container, key, original, new, is_dict)
        self._replacements: dict[int, tuple[Any, Any]] = {}  # id(replacement) -> (replacement, original)
        self.active = False

    def _record(self, container, key, original, new, is_dict: bool, site: str) -> None:
        self._records.append((container, key, original, new, is_dict))
        self.sites.append(site)

    def undo(self) -> None:
        """Put every original back (idempotent, thread-safe). A recorded site changed by someone else
        since is left alone; a module of the package imported after ``patch()`` that holds a
        replacement gets the original back as well."""
        with _LOCK:
            if not self.active:
                return
            for container, key, original, new, is_dict in reversed(self._records):
                current = container.get(key) if is_dict else getattr(container, key, None)
                if current is not new:
                    warnings.warn(
                        f"fastrlhf: {getattr(container, '__name__', 'a dict')}[{key!r}] changed after patch(); "
                        "left as it is",
                        IntegrationWarning,
                        stacklevel=2,
                    )
                    continue
                if is_dict:
                    container[key] = original
                else:
                    setattr(container, key, original)
            # Modules imported while the patch was active copied the replacements by name.
            _rewrite_package(self.package, self._replacements, lambda *site: None)
            self._records.clear()
            self._replacements.clear()
            self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return (
            f"PatchHandle({self.package} {self.version}, {state}, patched={self.patched}, "
            f"skipped={list(self.skipped)})"
        )


def _import_root(module: Union[str, types.ModuleType], label: str, install_hint: str, caller: str):
    if isinstance(module, types.ModuleType):
        return module
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{caller}.patch() needs {label} installed (`{install_hint}`), but `import {module}` failed: {e}. "
            f"The replacement functions in {caller} work without it; pass module=<package> to patch a "
            "stand-in tree."
        ) from e


def apply_patch(
    module: Union[str, types.ModuleType],
    targets: Sequence[Target],
    *,
    label: str,
    install_hint: str,
    caller: str,
) -> PatchHandle:
    """Replace each target in every loaded module of the package ``module``; see the module docstring."""
    root = _import_root(module, label, install_hint, caller)
    with _LOCK:
        return _apply_patch_locked(root, targets, label)


def _apply_patch_locked(root: types.ModuleType, targets: Sequence[Target], label: str) -> PatchHandle:
    root_name = root.__name__
    handle = PatchHandle(root_name, str(getattr(root, "__version__", "unknown")))

    def skip(where: str, reason: str) -> None:
        handle.skipped[where] = reason
        warnings.warn(
            f"fastrlhf: {label} {handle.version}: {where} not patched: {reason}", IntegrationWarning, stacklevel=4
        )

    swaps: dict[int, tuple[Any, Any]] = {}  # id(original) -> (original, replacement)
    for t in targets:
        modname = f"{root_name}.{t.module}" if t.module else root_name
        where = f"{modname}.{t.name}"
        try:
            home = importlib.import_module(modname)
        except Exception as e:  # absent in this version, or its own imports fail (e.g. Triton missing)
            skip(where, f"`import {modname}` failed ({type(e).__name__}: {e})")
            continue
        original = getattr(home, t.name, None)
        if original is None:
            skip(where, "the installed version does not have it")
            continue
        if getattr(original, ORIGINAL_ATTR, None) is not None:
            skip(where, "already patched by fastrlhf (undo the earlier handle first)")
            continue
        reason = t.check(original) if t.check is not None else None
        if reason is not None:
            skip(where, reason)
            continue
        if id(original) in swaps:  # two targets naming one object (an alias): the first wins
            continue
        replacement = t.make(original)
        swaps[id(original)] = (original, replacement)
        handle.patched.append(where)

    def record(container, key, original, new, is_dict, site):
        handle._record(container, key, original, new, is_dict, site)

    _rewrite_package(root_name, swaps, record)
    handle._replacements = {id(new): (new, orig) for orig, new in swaps.values()}
    handle.active = True
    return handle


def _rewrite_package(root_name: str, swaps: dict, record: Callable) -> None:
    """In every loaded module of ``root_name`` (and every plain dict at module level), replace each value
    ``v`` with ``swaps[id(v)] = (v, new)`` by ``new`` (identity, not name); ``record`` each site."""
    prefix = root_name + "."
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == root_name or name.startswith(prefix)):
            continue
        namespace = getattr(mod, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for key, value in list(namespace.items()):
            hit = swaps.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(mod, key, hit[1])
                record(mod, key, hit[0], hit[1], False, f"{name}.{key}")
            elif type(value) is dict:  # registries such as verl's POLICY_LOSS_REGISTRY
                for k, v in list(value.items()):
                    hit = swaps.get(id(v))
                    if hit is not None and hit[0] is v:
                        value[k] = hit[1]
                        record(value, k, hit[0], hit[1], True, f"{name}.{key}[{k!r}]")


def mark_replacement(replacement: Any, original: Any) -> Any:
    """Tag ``replacement`` with the object it replaces (``undo`` does not need it; users and tests do)."""
    try:
        setattr(replacement, ORIGINAL_ATTR, original)
    except (AttributeError, TypeError):  # a builtin or slotted object; only the "already patched" check is lost
        pass
    return replacement


def fresh_function(fn: Callable) -> Callable:
    """A new function object with ``fn``'s code, so that tagging it does not tag ``fn`` (patched twice)."""
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__doc__ = fn.__doc__
    new.__module__ = fn.__module__
    new.__qualname__ = fn.__qualname__
    new.__wrapped__ = fn
    new.__annotations__ = dict(fn.__annotations__)
    return new


def replace_with(fn: Callable) -> Callable[[Any], Any]:
    """``make`` for a target whose replacement is the module-level function ``fn``."""

    def make(original: Any) -> Any:
        return mark_replacement(fresh_function(fn), original)

    return make


def replace_with_class(cls: type) -> Callable[[Any], Any]:
    """``make`` for a class target: a subclass of ``cls`` (so ``cls`` itself is never tagged)."""

    def make(original: Any) -> Any:
        sub = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                          "__doc__": cls.__doc__})
        return mark_replacement(sub, original)

    return make


def ensure_tensor(x: Any, name: str) -> None:
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
