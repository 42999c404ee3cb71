"""Per-instance parameter names for the zoo's models.

Every zoo model registers its networks with ``pyro.module(f"{prefix}.<part>", ...)``. Pyro's
parameter store is global and hands back the tensor it already holds under a name, so two
models with the same prefix would share (and train) the first one's tensors. :func:`claim`
gives each instance a prefix of its own: the requested name when no live zoo model holds it
and the parameter store has nothing under it, else the name with the first free suffix
``_1``, ``_2``, ... (``vae``, ``vae_1``, ...). Names are released when a model is garbage
collected, and ``pyro.clear_param_store()`` frees the names of models that are gone, so a
process that clears the store and builds one model gets the plain name (checkpoints written
by such runs name the same parameters in every process).

No global Pyro setting is touched: a user's own ``pyro.module``/``pyro.param`` code is
unaffected.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pyro

__all__ = ["claim"]

_LIVE: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def _in_store(prefix: str) -> bool:
    start = prefix + "."
    return any(key.startswith(start) for key in pyro.get_param_store().keys())


def claim(name: str, owner: object) -> str:
    """A parameter-name prefix for ``owner`` that no other live model or stored parameter uses.

    :param name: the requested prefix (a non-empty string).
    :param owner: the model; it holds the returned prefix until it is garbage collected.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in _LIVE:
        # A model that is unreachable but caught in a reference cycle still holds its name
        # until the cycle collector runs: collect now, so that names do not depend on when
        # it last ran (a process that drops its models and clears the store reuses the name).
        gc.collect()
    with _LOCK:
        candidate, suffix = name, 0
        while candidate in _LIVE or _in_store(candidate):
            suffix += 1
            candidate = f"{name}_{suffix}"
        _LIVE[candidate] = owner
    return candidate
