"""Correlated noise, one step at a time: ``w_t = (C^{-1} z)_t`` from independent draws ``z_t``.

The mechanism ``A x + sigma B z`` with ``B = A C^{-1}`` is run as ``A (x + sigma C^{-1} z)``: the
optimiser sees the usual noisy gradient ``g_t + sigma * max_grad_norm * w_t`` with
``w = C^{-1} z``. ``C`` is lower triangular, so ``w_t`` depends only on ``z_0 .. z_t``, and a
small state carries what it needs of the past:

* ``BandedNoise`` (BandMF, DP-SGD): solve ``C w = z`` forward. With ``C = T D`` (banded Toeplitz
  ``T`` with coefficients ``c``, column scaling ``D``) and ``y = D w``:
  ``y_t = (z_t - c_1 y_{t-1} - ... - c_{b-1} y_{t-b+1}) / c_0`` and ``w_t = y_t / D_t``. The
  state is the last ``b - 1`` values of ``y`` (equal to the outputs ``w`` except in the last
  ``b - 1`` steps, where ``D`` rescales). With ``b = 1`` the draws pass through untouched.
* ``BufferedNoise`` (BLT): ``C^{-1}`` has first column ``s (1, sum_i w_i, sum_i w_i t_i, ...)``
  with ``w_i = omega_hat_i``, ``t_i = theta_hat_i``; so ``w_t = s (z_t + sum_i w_i u_{i,t})`` with
  ``k`` buffers ``u_{i,t+1} = t_i u_{i,t} + z_t`` (``u_{i,0} = 0``).

Where the draws come from is the caller's choice: ``step(z)`` takes them, or ``step()`` calls the
``draw`` given at construction (a function from a template tensor to a tensor of the same shape
of independent standard normal draws, e.g. a secure source's). The state is kept in the template's
dtype promoted to at least float32, on its device; ``state_dict()`` holds plain tensors and ints,
so a run saved mid-stream continues bit for bit after ``load_state_dict()`` (which adopts
the saved strategy, so a strategy re-optimised on another machine cannot change the run).

Privacy:
    The output has covariance ``C^{-1} C^{-T}`` per coordinate only if the draws are independent
    standard normal and never reused: a resumed run must restore the state *and* continue the
    draws' generator, not restart either. The strategy is built for ``steps`` steps; a step
    beyond them is refused (its sensitivity was never analysed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from privgrad import _validate
from privgrad.errors import CheckpointError, PrivacyStateError
from privgrad.mechanisms.accounting import positive_int

__all__ = ["BandedNoise", "BufferedNoise"]

Draw = Callable[[torch.Tensor], torch.Tensor]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _flat_out(out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``out`` flattened (a view) where the work can be written into it, else ``None``."""
    if out is None or out.dtype != dtype or not out.is_contiguous():
        return None
    return out.view(-1)


class _Stream:
    """What both generators share: the template, the draws, the step count, the checks."""

    kind = ""

    def __init__(self, steps: int, like: torch.Tensor, draw: Draw | None):
        self.steps = positive_int("steps", steps, "Pass the run's total number of steps.")
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            raise _validate.fail("like must be a floating-point tensor (a parameter or gradient)",
                                 "like", type(like).__name__, "Pass e.g. the parameter itself.")
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.work_dtype = _work_dtype(like.dtype)
        self.draw = draw
        self.step_index = 0

    def _template(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def _next_draw(self, z: torch.Tensor | None) -> torch.Tensor:
        if self.step_index >= self.steps:
            raise PrivacyStateError(
                f"the noise was planned for steps={self.steps}; got a request for step "
                f"{self.step_index + 1}. Build the mechanism for the run's total number of steps "
                "(its sensitivity covers those steps only).")
        if z is None:
            if self.draw is None:
                raise _validate.fail("step() needs the draws z or a draw function", "z", None,
                                     "Pass z (standard normal, shaped like the template) or "
                                     "draw= at construction.")
            z = self.draw(self._template())
        if tuple(z.shape) != tuple(self.shape):
            raise _validate.fail(f"z must have the template's shape {tuple(self.shape)}",
                                 "z.shape", tuple(z.shape),
                                 "Draw one standard normal value per coordinate of the template.")
        return z

    # what a subclass provides: its strategy as one float64 tensor, and how to adopt one
    def strategy(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adopt(self, strategy: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state_name(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``{"kind", "steps", "step", "strategy", <state>}``: a string, two ints, the strategy
        (float64) and the noise state (``history`` or ``buffers``), all plain tensors."""
        return {"kind": self.kind, "steps": self.steps, "step": self.step_index,
                "strategy": self.strategy().clone(), self._state_name(): self._state().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output.

        The saved strategy must match this generator's to 1e-6 (the same mechanism and
        ``steps``; re-optimised on another machine it may differ in the last bits), and is then
        used as saved, so the continuation is bit for bit the saved run's.
        """
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"the noise state must come from a {self.kind} generator; got kind={got!r}. "
                "Resume with the mechanism the run was started with.")
        if state.get("steps") != self.steps:
            raise CheckpointError(
                f"the noise state must be planned for the same steps; got "
                f"steps={state.get('steps')!r}, expected {self.steps}. Resume with the number of "
                "steps the run was started with.")
        saved, mine = state.get("strategy"), self.strategy()
        if (not isinstance(saved, torch.Tensor) or saved.shape != mine.shape
                or not torch.allclose(saved.to(torch.float64), mine, rtol=1e-6, atol=1e-12)):
            raise CheckpointError(
                f"the noise state must come from the same strategy; got strategy={saved!r}, "
                f"expected {mine!r}. Resume with the mechanism the run was started with.")
        step = state.get("step")
        if not isinstance(step, int) or not 0 <= step <= self.steps:
            raise CheckpointError(f"the noise state's step must be in [0, {self.steps}]; got "
                                  f"step={step!r}. Pass the state_dict() of this generator.")
        name, tensor = self._state_name(), state.get(self._state_name())
        if not isinstance(tensor, torch.Tensor) or tensor.shape != self._state().shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
            raise CheckpointError(
                f"the noise state's {name} must have shape {tuple(self._state().shape)}; got "
                f"{name}.shape={got!r}. Resume with the same parameter shapes.")
        self._adopt(saved.to(torch.float64))
        self._state().copy_(tensor)
        self.step_index = step


class BandedNoise(_Stream):
    """``w = C^{-1} z`` for the column-normalised banded Toeplitz ``C`` (see the module docstring).

    Args:
        coefficients: the ``b`` band coefficients of ``T`` (``c_0 > 0``), e.g.
            ``BandMF(...).coefficients(steps)``.
        steps: ``n``, the number of steps the strategy is built for (sets the column scaling).
        like: a tensor whose shape, dtype and device the noise takes (e.g. the parameter).
        draw: optional ``draw(template) -> z``, standard normal draws shaped like ``template``.

    Memory: ``b - 1`` tensors of ``like``'s size (in at least float32).
    """

    kind = "banded"

    def __init__(self, coefficients: torch.Tensor, steps: int, like: torch.Tensor,
                 draw: Draw | None = None):
        super().__init__(steps, like, draw)
        c = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1)
        if c.numel() < 1 or c.numel() > self.steps or not float(c[0]) > 0:
            raise _validate.fail("coefficients must be 1 to steps numbers with c_0 > 0",
                                 "coefficients", c.tolist()[:4],
                                 "Pass BandMF(...).coefficients(steps).")
        self.bands = c.numel()
        self._adopt(c)
        self._history = torch.zeros((self.bands - 1, *self.shape),
                                    dtype=self.work_dtype, device=self.device)

    def _adopt(self, strategy: torch.Tensor) -> None:
        c = self.coefficients = strategy.clone()
        # D_t^{-1}: the norm of column t of T (n cuts the last b - 1 columns short)
        squares = torch.cumsum(c * c, 0)
        self._norm_full = float(squares[-1].sqrt())
        self._norms_last = squares[:-1].flip(0).sqrt().tolist()  # t = n-b+1 .. n-1
        self._c0 = float(c[0])
        # row r: the weight of each ring slot when t % (b - 1) == r; slot s holds y_{t-i} with
        # i = (t - s) mod (b - 1), read as b - 1 where that is 0
        lags = max(self.bands - 1, 1)
        lag = (torch.arange(lags).view(-1, 1) - torch.arange(lags).view(1, -1)) % lags
        lag = torch.where(lag == 0, torch.full_like(lag, lags), lag)
        self._weights = c[lag.clamp(max=self.bands - 1)].to(device=self.device,
                                                            dtype=self.work_dtype)

    def strategy(self) -> torch.Tensor:
        """The band coefficients, float64."""
        return self.coefficients

    def _state_name(self) -> str:
        return "history"

    def _state(self) -> torch.Tensor:
        return self._history

    def step(self, z: torch.Tensor | None = None, *, scale: float = 1.0,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The next correlated noise tensor ``w_t`` (shaped like the template), times ``scale``.

        One pass over the history: ``w_t = f (z_t / c_0 - sum_i (c_i / c_0) y_{t-i})`` is a
        single matrix-vector product with the draws as its addend (``addmv``), with ``f`` the
        column norm times ``scale`` (the caller's factor, e.g. the noise's standard deviation);
        ``y_t = w_t / f`` is stored. ``out``: a contiguous tensor of the template's size to write
        ``w_t`` into (a buffer the caller reuses: no allocation per step); not ``z``.
        """
        z = self._next_draw(z)
        t = self.step_index
        if self.bands == 1:  # DP-SGD: the draws themselves, bit for bit
            self.step_index += 1
            if out is None:
                return z if scale == 1.0 else z.mul(scale)
            return out.view(self.shape).copy_(z).mul_(scale).to(self.dtype)
        lags = self.bands - 1
        first_short = self.steps - self.bands + 1
        norm = self._norm_full if t < first_short else self._norms_last[t - first_short]
        # w_t = f y_t with f = norm * scale formed by the product itself; y_t = w_t / f stored
        f = norm * scale if norm * scale != 0 else 1.0
        w = torch.addmv(z.reshape(-1).to(self.work_dtype), self._history.view(lags, -1).t(),
                        self._weights[t % lags], beta=f / self._c0, alpha=-f / self._c0,
                        out=_flat_out(out, self.work_dtype))
        torch.div(w, f, out=self._history[t % lags].view(-1))
        if f != norm * scale:  # scale 0
            w.zero_()
        self.step_index += 1
        return w.view(self.shape).to(self.dtype)


class BufferedNoise(_Stream):
    """``w = C^{-1} z`` for a BLT strategy, with ``k`` buffers (see the module docstring).

    Args:
        theta_hat: the ``k`` buffer decays of ``C^{-1}``, in (0, 1).
        omega_hat: the ``k`` output scales of ``C^{-1}``.
        scale: ``s``, the factor that normalises the sensitivity (``C^{-1} = s C_raw^{-1}``).
        steps, like, draw: as for ``BandedNoise``.

    Memory: ``k`` tensors of ``like``'s size (in at least float32).
    """

    kind = "buffered"

    def __init__(self, theta_hat: torch.Tensor, omega_hat: torch.Tensor, scale: float,
                 steps: int, like: torch.Tensor, draw: Draw | None = None):
        super().__init__(steps, like, draw)
        theta_hat = torch.as_tensor(theta_hat, dtype=torch.float64).reshape(-1)
        omega_hat = torch.as_tensor(omega_hat, dtype=torch.float64).reshape(-1)
        self.buffers = theta_hat.numel()
        self._adopt(torch.cat([theta_hat, omega_hat, torch.tensor([float(scale)], dtype=torch.float64)]))
        self._buffers = torch.zeros((self.buffers, *self.shape), dtype=self.work_dtype,
                                    device=self.device)

    def _adopt(self, strategy: torch.Tensor) -> None:
        k = self.buffers
        self._strategy = strategy.clone()
        self.theta_hat, self.omega_hat = self._strategy[:k], self._strategy[k:2 * k]
        self.scale = float(self._strategy[2 * k])
        view = (k,) + (1,) * len(self.shape)
        self._decay = self.theta_hat.to(device=self.device, dtype=self.work_dtype).view(view)
        self._out = self.omega_hat.to(device=self.device, dtype=self.work_dtype)

    def strategy(self) -> torch.Tensor:
        """``theta_hat``, ``omega_hat`` and ``scale`` in one float64 tensor."""
        return self._strategy

    def _state_name(self) -> str:
        return "buffers"

    def _state(self) -> torch.Tensor:
        return self._buffers

    def step(self, z: torch.Tensor | None = None, *, scale: float = 1.0,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The next correlated noise tensor ``w_t`` (shaped like the template), times ``scale``
        (the caller's factor, folded into the one pass that forms ``w_t``); ``out`` as for
        ``BandedNoise.step()``."""
        z = self._next_draw(z).to(self.work_dtype)
        flat = self._buffers.view(self.buffers, -1)  # one matrix-vector product over the buffers
        s = self.scale * scale  # w = s (z + sum_i w_i u_i): the draws are addmv's addend
        w = torch.addmv(z.reshape(-1), flat.t(), self._out, beta=s, alpha=s,
                        out=_flat_out(out, self.work_dtype)).view(self.shape)
        torch.addcmul(z, self._buffers, self._decay, out=self._buffers)  # u <- decay u + z
        self.step_index += 1
        return w.to(self.dtype)
