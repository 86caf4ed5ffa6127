"""Checkpoints of a private training run: save, and resume exactly where it stopped.

A checkpoint holds the model, the optimizer (and LR scheduler), the engine's
[`state_dict()`][privgrad.PrivacyEngine.state_dict] (settings, accountant, sampler seed and step,
noise generators, counters, grad scaler), PyTorch's own random states and the user's ``extra`` data.
A resumed run draws the same batches, reports the same epsilon and, outside secure mode, draws the
same noise: with ``noise_multiplier = 0`` its parameters are bit-for-bit those of an
uninterrupted run, mid-epoch too. The sampler and the noise continue from the file always (see
[`privgrad.run_state`][privgrad.run_state]); ``restore_rng`` only decides whether PyTorch's own
random streams (dropout, augmentation) do too.

Format (version 2): one file written by ``torch.save`` holding plain data and tensors only, so it
loads with ``torch.load(weights_only=True)`` (no pickled code)::

    {"privgrad_checkpoint": 2, "privgrad_version": str, "digest": sha256 hex of the payload,
     "payload": {"module", "optimizer", "scheduler": state dicts (or None),
                 "engine": engine.state_dict() plus optimizer_type and scheduler_type,
                 "rng": {"cpu": ByteTensor, "cuda": [ByteTensor, ...]}, "extra": ...}}

Writes are atomic: a temporary file in the same directory, flushed to disk, then renamed over
``path`` (``os.replace``); a crash while saving leaves the previous checkpoint intact. Loading
checks everything (format, digest, privacy settings, model and optimizer structure) before it
changes anything: a truncated, corrupt or mismatched file raises
[`CheckpointError`][privgrad.errors.CheckpointError] and leaves the live training state untouched.

Privacy:
    A checkpoint is as sensitive as the training data: besides the model it holds the sampler's
    seed (which reveals every batch's membership) and the noise generator's state. Keep it where
    the data is kept; publish only the final model. In secure mode neither exists (sampling and
    noise come from the operating system), and a resumed run draws fresh batches and noise:
    the same epsilon, but not the same batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile

import numpy as np
import torch

import privgrad
from privgrad import _validate, run_state
from privgrad.errors import CheckpointError, ConfigError

__all__ = ["FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 2
_MARKER = "privgrad_checkpoint"


# -- writing -----------------------------------------------------------------------------------
def save_checkpoint(engine, path, *, module, optimizer, scheduler=None, extra=None) -> None:
    """Write the training state to ``path`` atomically (see the module docstring).

    Args:
        engine: a [`PrivacyEngine`][privgrad.PrivacyEngine] after ``make_private``.
        path: file to write (its directory must exist and be writable).
        module: the model passed to ``make_private``.
        optimizer: the optimizer passed to ``make_private``.
        scheduler: the LR scheduler, if any.
        extra: plain data of your own (numbers, strings, lists, dicts, tensors), returned by
            [`load_checkpoint()`][privgrad.checkpoint.load_checkpoint]; e.g. ``{"epoch": 3}``.

    Raises:
        PrivacyStateError: called before ``make_private`` or in the middle of a step.
        ConfigError: another model or optimizer, or a path that cannot be written.
    """
    _check_attached(engine, module, optimizer, "save_checkpoint")
    target = _writable(path)
    payload = {
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "engine": _engine_state(engine, optimizer, scheduler),
        "rng": _rng_state(),
        "extra": extra,
    }
    blob = {_MARKER: FORMAT_VERSION, "privgrad_version": privgrad.__version__,
            "digest": _digest(payload), "payload": payload}
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".privgrad-", suffix=".tmp", dir=directory)
    except OSError as e:
        raise _validate.fail("path must be in a writable directory", "path", os.fspath(path),
                             f"Pass a path in a directory you can write to ({e}).") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _writable(path) -> str:
    try:
        target = os.path.abspath(os.fspath(path))
    except TypeError as e:
        raise ConfigError(f"path must be a str or os.PathLike; got path={path!r}. Pass a file "
                          f"path such as 'run/checkpoint.pt'.") from e
    if os.path.isdir(target):
        raise _validate.fail("path must name a file, not a directory", "path", os.fspath(path),
                             "Add a file name, e.g. os.path.join(path, 'checkpoint.pt').")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise _validate.fail("path must be in an existing, writable directory", "path",
                             os.fspath(path), "Create the directory first, or pass another path.")
    return target


def _engine_state(engine, optimizer, scheduler) -> dict:
    return {**engine.state_dict(), "optimizer_type": type(optimizer).__name__,
            "scheduler_type": type(scheduler).__name__ if scheduler is not None else None}


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _digest(obj) -> str:
    """SHA-256 over the structure and bytes of ``obj`` (dicts in key order, tensors by dtype,
    shape and raw bytes): torch.load does not notice a flipped byte inside a tensor."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(np.ascontiguousarray(t.view(torch.uint8).numpy()))
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


# -- reading -----------------------------------------------------------------------------------
def load_checkpoint(engine, path, *, module, optimizer, scheduler=None, restore_rng: bool = True):
    """Restore the state that [`save_checkpoint()`][privgrad.checkpoint.save_checkpoint] wrote;
    return its ``extra`` data.

    Call it after ``make_private`` with the same settings as the run that saved the file; the
    loader that ``make_private`` returned then continues with the batch after the last one the
    saved run took.

    Args:
        engine: the [`PrivacyEngine`][privgrad.PrivacyEngine], after ``make_private``.
        path: the checkpoint file.
        module: the model passed to ``make_private`` (loaded in place).
        optimizer: the optimizer passed to ``make_private`` (loaded in place).
        scheduler: the LR scheduler, if the saved run had one.
        restore_rng: also restore PyTorch's own random states (dropout, augmentation). The
            sampler and the noise continue from the checkpoint either way: they have their own
            generators, saved in the engine's state.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or belongs to another model,
            optimizer or privacy configuration. Nothing is changed in that case.
        PrivacyStateError: the engine has released steps already (load right after
            make_private). Nothing is changed in that case.
    """
    _check_attached(engine, module, optimizer, "load_checkpoint")
    payload = _read(path)
    state = payload["engine"]
    run_state.check(engine, state)
    for key, what, live in (("optimizer_type", "optimizer type", type(optimizer).__name__),
                            ("scheduler_type", "scheduler type",
                             type(scheduler).__name__ if scheduler is not None else None)):
        if state.get(key) != live:
            raise CheckpointError(run_state.mismatch(what, state.get(key), live))
    _check_module(module, payload["module"])
    _check_optimizer(optimizer, payload["optimizer"])
    if (scheduler is None) != (payload["scheduler"] is None):
        raise CheckpointError(run_state.mismatch("use of an LR scheduler", payload["scheduler"] is not None,
                                        scheduler is not None))

    # everything checked: apply
    module.load_state_dict(payload["module"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    run_state.apply(engine, state)
    if restore_rng:
        torch.set_rng_state(payload["rng"]["cpu"])
        cuda = payload["rng"]["cuda"]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return payload["extra"]


def _read(path) -> dict:
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise CheckpointError(f"path must name an existing checkpoint file; got path={where!r}. "
                              f"Pass the path that save_checkpoint wrote.")
    try:
        blob = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and weights-only errors all mean the same here
        reason = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"the file must be a readable privgrad checkpoint; got path={where!r}, which cannot "
            f"be read ({type(e).__name__}: {reason}). It is truncated, corrupt or not a "
            f"checkpoint: use an earlier checkpoint.") from e
    fix = "Use a file written by engine.save_checkpoint."
    if not isinstance(blob, dict) or _MARKER not in blob:
        raise CheckpointError(f"the file must be a privgrad checkpoint; got path={where!r} "
                              f"without the '{_MARKER}' marker. {fix}")
    version = blob[_MARKER]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"the checkpoint format must be version {FORMAT_VERSION}; got version={version!r} "
            f"(written by privgrad {blob.get('privgrad_version')!r}). Load it with that version.")
    payload = blob.get("payload")
    if not isinstance(payload, dict) or blob.get("digest") != _digest(payload):
        raise CheckpointError(
            f"the checkpoint's contents must match its SHA-256 digest; got path={where!r}, whose "
            f"contents changed after it was written (corrupt). Use an earlier checkpoint.")
    return payload


def _check_module(module, saved: dict) -> None:
    live = module.state_dict()
    if set(saved) != set(live):
        missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        raise CheckpointError(run_state.mismatch("model (state_dict keys)",
                                        f"missing {missing[:5]}, unexpected {unexpected[:5]}",
                                        f"{len(live)} keys"))
    for name, value in live.items():
        if isinstance(value, torch.Tensor) and (
                not isinstance(saved[name], torch.Tensor) or saved[name].shape != value.shape):
            shape = getattr(saved[name], "shape", None)
            raise CheckpointError(run_state.mismatch(f"model ({name} shape)", shape, value.shape))


def _check_optimizer(optimizer, saved: dict) -> None:
    live = optimizer.state_dict()
    sizes = [len(g["params"]) for g in live["param_groups"]]
    try:
        saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
        per_param = saved["state"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state must be an optimizer "
                              f"state_dict; got keys {sorted(saved)!r}.") from e
    if saved_sizes != sizes:
        raise CheckpointError(run_state.mismatch("optimizer parameter groups (sizes)", saved_sizes, sizes))
    # (state shapes need no check of their own: the parameters' names, shapes and dtypes in
    # optimizer order were compared already, and some optimizers keep factored states)
    count = sum(sizes)
    for index, values in per_param.items():
        if not isinstance(index, int) or not 0 <= index < count or not isinstance(values, dict):
            raise CheckpointError(run_state.mismatch("optimizer state (parameter index)", index,
                                            f"0..{count - 1}"))


def _check_attached(engine, module, optimizer, what: str) -> None:
    if engine._module is not None and (module is not engine._module
                                       or optimizer is not engine._optimizer):
        which = "module" if module is not engine._module else "optimizer"
        raise ConfigError(
            f"{which} must be the object passed to make_private; got another "
            f"{type(module if which == 'module' else optimizer).__name__}. Pass the {which} this "
            f"engine made private.")
