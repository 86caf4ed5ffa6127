"""Which models and optimizers have a privacy engine attached: one engine each, and a way out.

``make_private`` refuses a model or optimizer that another engine already holds (two engines on
one model would each clip and noise, and each release would go unaccounted by the other).
Re-running a notebook cell is the usual way to get there, with the first engine's variable
already overwritten: ``detach()`` takes that engine off through the model or the optimizer.
"""

from __future__ import annotations

import weakref

from privgrad.errors import ConfigTypeError, PrivacyStateError

__all__ = ["attach", "detach", "engine_of", "forget", "refuse_attached"]

# model or optimizer -> its engine (weak both ways: a dropped model leaves no trace)
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_of(obj):
    """The engine attached to the model or optimizer ``obj``, or ``None``."""
    ref = _ENGINES.get(obj)
    return ref() if ref is not None else None


def refuse_attached(module, optimizer) -> None:
    for obj, name in ((module, "module"), (optimizer, "optimizer")):
        if engine_of(obj) is not None:
            raise PrivacyStateError(
                f"make_private was already called on this {name}; got the same "
                f"{type(obj).__name__} object again. Detach the first engine: engine.detach(), "
                f"or privgrad.detach({name}) if you no longer hold it (a re-run notebook cell).")


def attach(engine, *objs) -> None:
    for obj in objs:
        _ENGINES[obj] = weakref.ref(engine)


def forget(*objs) -> None:
    for obj in objs:
        if obj is not None:
            _ENGINES.pop(obj, None)


def detach(obj) -> bool:
    """Detach the privacy engine attached to ``obj`` (a model or optimizer passed to
    ``make_private``): every hook comes off and both are plain PyTorch objects again.

    Returns:
        ``True`` if an engine was attached, ``False`` if none was.

    Privacy:
        Detaching ends the private run: the engine's accountant keeps the budget spent so far,
        and a new ``make_private`` starts a new accounting (load the old engine's
        ``state_dict()`` into it to continue the same budget).
    """
    if obj is None or not hasattr(obj, "__weakref__"):
        raise ConfigTypeError(
            f"privgrad.detach takes the model or optimizer passed to make_private; got "
            f"{type(obj).__name__}. Pass that model or optimizer.")
    engine = engine_of(obj)
    if engine is None:
        return False
    engine.detach()
    return True
