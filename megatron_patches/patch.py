"""Patches as data: (name, target, replacement builder, reason), applied and restored explicitly.

A ``Patch`` names a target ``"module.path:attr.path"`` (or ``"sys.modules:<module name>"`` to pre-seed
a module before it is imported) and a ``build(original) -> replacement`` function. ``apply_patches``
is idempotent (a patch already applied is skipped), logs every change, and remembers the original so
``restore`` can put it back. ``disabled(name)`` lifts one patch temporarily; the tests use it to prove
that each patch is still needed by the installed megatron-core.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

logger = logging.getLogger("megatron_patches")

_MISSING = object()


@dataclass(frozen=True)
class Patch:
    name: str
    target: str
    build: Callable[[Any], Any]
    reason: str
    phase: str = "post_import"  # "pre_import": must run before `import megatron.core`
    condition: Callable[[], bool] | None = None  # apply only when this returns True

    def __post_init__(self):
        assert self.phase in ("pre_import", "post_import"), self.phase
        assert ":" in self.target, self.target


@dataclass
class _Applied:
    patch: Patch
    owner: Any
    attr: str
    original: Any


_applied: dict[str, _Applied] = {}


def called_from_megatron(depth: int = 2) -> bool:
    """True when the frame ``depth`` levels above the caller of this function is megatron code."""
    frame = sys._getframe(depth)
    return frame.f_globals.get("__name__", "").startswith("megatron.")


def _resolve(target: str) -> tuple[Any, str]:
    module_name, attr_path = target.split(":", 1)
    if module_name == "sys.modules":
        return sys.modules, attr_path
    owner = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr


def _get(owner: Any, attr: str) -> Any:
    return owner.get(attr, _MISSING) if isinstance(owner, dict) else getattr(owner, attr, _MISSING)


def _set(owner: Any, attr: str, value: Any) -> None:
    if isinstance(owner, dict):
        if value is _MISSING:
            owner.pop(attr, None)
        else:
            owner[attr] = value
    elif value is _MISSING:
        delattr(owner, attr)
    else:
        setattr(owner, attr, value)


def is_patch_applied(name: str) -> bool:
    return name in _applied


def apply_patches(patches: Iterable[Patch], phase: str | None = None) -> list[str]:
    """Apply the patches (optionally only one phase); returns the names newly applied."""
    done = []
    for p in patches:
        if (phase and p.phase != phase) or p.name in _applied:
            continue
        if p.condition is not None and not p.condition():
            logger.debug("megatron patch %s not needed here (condition false)", p.name)
            continue
        owner, attr = _resolve(p.target)
        original = _get(owner, attr)
        _set(owner, attr, p.build(None if original is _MISSING else original))
        _applied[p.name] = _Applied(p, owner, attr, original)
        logger.debug("megatron patch %s -> %s (%s)", p.name, p.target, p.reason)
        done.append(p.name)
    return done


def restore(names: Iterable[str] | None = None) -> list[str]:
    """Undo patches (all by default) in reverse application order."""
    order = [n for n in reversed(list(_applied)) if names is None or n in set(names)]
    for n in order:
        a = _applied.pop(n)
        _set(a.owner, a.attr, a.original)
        logger.debug("megatron patch %s restored", n)
    return order


@contextlib.contextmanager
def disabled(name: str) -> Iterator[None]:
    """Temporarily restore the original behind one applied patch."""
    if name not in _applied:
        raise KeyError(f"patch {name!r} is not applied")
    a = _applied[name]
    restore([name])
    try:
        yield
    finally:
        apply_patches([a.patch])
