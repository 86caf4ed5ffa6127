"""PrivacyEngine's interface: the user's own objects come back, hooks not wrappers, the loop is
unchanged, the update is exactly the clipped sum (sigma = 0), and bad input is refused before
anything is attached."""

from __future__ import annotations

import copy
import weakref
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from privgrad import PrivacyEngine
from privgrad.errors import ConfigError, ConfigTypeError, ModelValidationError, PrivacyStateError
from privgrad.privacy_engine import PrivacyWarning
from tests.helpers import classification_data, drawn, loader, mlp
from tests.reference import assert_close, func_per_example


def private(model=None, *, data=None, batch_size=8, engine=None, lr=0.1, **kwargs):
    model = model if model is not None else mlp()
    data = data if data is not None else classification_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    engine = engine or PrivacyEngine(accountant="rdp")
    kwargs.setdefault("noise_multiplier", 1.0)
    kwargs.setdefault("max_grad_norm", 1.0)
    out = engine.make_private(module=model, optimizer=optimizer,
                              data_loader=loader(data, batch_size), **kwargs)
    return engine, model, optimizer, out


# -- identity and hooks -----------------------------------------------------------------------
def test_returns_exactly_the_users_objects_and_three_values():
    model = mlp()
    keys = list(model.state_dict())
    engine, model, optimizer, out = private(model)
    assert len(out) == 3
    assert out[0] is model and out[1] is optimizer and type(out[0]) is nn.Sequential
    assert list(model.state_dict()) == keys
    assert isinstance(out[2], DataLoader) and len(out[2]) == 5  # round(1 / q) = 40 / 8


def test_scheduler_still_drives_the_optimizer():
    engine, model, optimizer, (_, _, dl) = private(lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for x, y in dl:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 ** len(dl))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(dl))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    for p, b in zip(model.parameters(), before):  # the update used the scheduled learning rate
        assert_close(p.detach(), b - lr * p.grad, 1e-6)


def test_detach_gives_the_plain_model_back():
    engine, model, optimizer, _ = private()
    engine.detach()
    assert not model[0]._forward_hooks and not model._forward_pre_hooks
    x, y = classification_data()[:8]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()  # ordinary SGD now: the gradient is the autograd one
    assert all(g is not None for g in grads)
    PrivacyEngine().make_private(module=model, optimizer=optimizer,
                                 data_loader=loader(classification_data()),
                                 noise_multiplier=1.0, max_grad_norm=1.0)  # can attach again


def test_epsilon_is_zero_before_the_first_step_and_grows():
    engine, model, optimizer, (_, _, dl) = private()
    assert engine.get_epsilon(1e-5) == 0.0
    batches = iter(dl)
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    e1 = engine.get_epsilon(1e-5)
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert 0 < e1 < engine.get_epsilon(1e-5) and engine.steps == 2


# -- the update is exactly the clipped sum ----------------------------------------------------
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_gradient_the_user_keeps_is_never_overwritten_by_a_later_step(set_to_none):
    # the noise buffer is refilled step after step only while nothing else uses its memory
    engine, model, optimizer, (_, _, data_loader) = private(lr=0.0)
    x, y = next(iter(data_loader))
    kept, snapshots = [], []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=set_to_none)
        drawn(engine, len(x))  # the same batch each step: only the noise differs
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        kept.append(model[0].weight.grad)
        snapshots.append(model[0].weight.grad.clone())
    for k, s in zip(kept[:-1], snapshots):
        # set_to_none=False: the user's own zero_grad() zeroed it in place (PyTorch's meaning),
        # and no later step wrote noise into it
        assert torch.equal(k, s if set_to_none else torch.zeros_like(s))
    assert torch.equal(kept[-1], snapshots[-1])
    assert not torch.equal(snapshots[0], snapshots[1])  # fresh noise every step


def per_example_grads(model, x, y):
    return func_per_example(model, lambda i: ((x[i:i + 1],), {}),
                            lambda i, out: F.cross_entropy(out, y[i:i + 1]), len(x))


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_sigma_zero_huge_bound_is_plain_sgd(mode):
    model = mlp().double()
    reference = copy.deepcopy(model)
    data = TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)))
    engine, model, optimizer, _ = private(model, data=data, noise_multiplier=0.0,
                                          max_grad_norm=1e9, loss_reduction="sum",
                                          grad_sample_mode=mode)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in [data[:8], data[8:13]]:
        drawn(engine, len(x))
        for m, opt in ((model, optimizer), (reference, ref_opt)):
            opt.zero_grad()
            F.cross_entropy(m(x), y, reduction="sum").backward()
            opt.step()
    for p, r in zip(model.parameters(), reference.parameters()):
        assert_close(p.detach(), r.detach(), 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["auto", "materialize"])
def test_sigma_zero_small_bound_gives_the_clipped_sum(reduction, mode):
    model = mlp().double()
    data = TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)))
    c = 0.05
    engine, model, optimizer, _ = private(model, data=data, noise_multiplier=0.0, max_grad_norm=c,
                                          loss_reduction=reduction, grad_sample_mode=mode)
    x, y = data[:11]  # realised batch size 11, expected 8
    ref = per_example_grads(model, x, y)
    norms = torch.stack([g.reshape(11, -1).square().sum(1) for g in ref.values()]).sum(0).sqrt()
    factors = (c / norms).clamp(max=1)
    assert (factors < 1).all()  # the bound binds for every example
    optimizer.zero_grad()
    drawn(engine, len(x))
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    optimizer.step()
    normaliser = 8.0 if reduction == "mean" else 1.0
    for name, p in model.named_parameters():
        expected = torch.einsum("b,b...->...", factors, ref[name]) / normaliser
        assert_close(p.grad, expected, 1e-10, name)


def test_per_layer_bounds_compose_to_c():
    model = mlp().double()
    data = TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)))
    engine, model, optimizer, _ = private(model, data=data, noise_multiplier=0.0, max_grad_norm=0.1,
                                          clipping="per_layer", loss_reduction="sum")
    x, y = data[:6]
    ref = per_example_grads(model, x, y)
    drawn(engine, len(x))
    F.cross_entropy(model(x), y, reduction="sum").backward()
    optimizer.step()
    each = 0.1 / math.sqrt(4)
    for name, p in model.named_parameters():
        n = ref[name].reshape(6, -1).norm(dim=1)
        expected = torch.einsum("b,b...->...", (each / n).clamp(max=1), ref[name])
        assert_close(p.grad, expected, 1e-10, name)
    assert engine.settings.total_bound == pytest.approx(0.1)


def test_empty_batch_still_steps_with_noise():
    engine, model, optimizer, _ = private(sample_rate=0.01, expected_batch_size=0.4)
    x, y = torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)
    optimizer.zero_grad()
    drawn(engine, 0)
    F.cross_entropy(model(x), y).backward()  # NaN loss over nothing; gradients of nothing
    optimizer.step()
    assert all(torch.isfinite(p).all() and p.grad.abs().sum() > 0 for p in model.parameters())
    assert engine.steps == 1 and engine.last_step_stats.examples == 0


def test_make_private_with_epsilon_meets_the_target():
    model = mlp()
    engine = PrivacyEngine(accountant="rdp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, dl = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader(classification_data(n=400), 20),
        target_epsilon=2.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)
    for _ in range(3):
        for x, y in dl:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    eps = engine.get_epsilon(1e-5)
    assert engine.steps == 60 and 1.9 < eps <= 2.0


# -- bad input: a clear error, nothing attached -----------------------------------------------
BAD = [
    (dict(noise_multiplier=-1.0), ConfigError, "noise_multiplier must be finite and >= 0; got noise_multiplier=-1.0"),
    (dict(noise_multiplier=float("nan")), ConfigError, "noise_multiplier must be finite"),
    (dict(noise_multiplier=float("inf")), ConfigError, "noise_multiplier must be finite"),
    (dict(noise_multiplier="1"), ConfigTypeError, "noise_multiplier must be a real number"),
    (dict(max_grad_norm=0.0), ConfigError, "max_grad_norm must be > 0 and finite; got max_grad_norm=0.0"),
    (dict(max_grad_norm=-1.0), ConfigError, "max_grad_norm must be > 0"),
    (dict(clipping="layer"), ConfigError, "clipping must be one of 'flat', 'per_layer', 'automatic', 'adaptive', 'per_layer_adaptive'; got clipping='layer'"),
    (dict(loss_reduction="avg"), ConfigError, "loss_reduction must be one of 'mean', 'sum'"),
    (dict(grad_sample_mode="fast"), ConfigError, "grad_sample_mode must be one of"),
    (dict(max_grad_norm=[1.0, 2.0]), ConfigError, "a list of bounds needs clipping='per_layer'"),
    (dict(max_grad_norm=[1.0], clipping="per_layer"), ConfigError, "per-layer bounds must number"),
    (dict(sample_rate=0.1), ConfigError, "sample_rate and expected_batch_size go together"),
    (dict(sample_rate=1.5, expected_batch_size=4), ConfigError, "sample_rate must be in"),
]


@pytest.mark.parametrize("kwargs,kind,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_are_refused_and_nothing_is_attached(kwargs, kind, message):
    model = mlp()
    with pytest.raises(kind, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        private(model, **kwargs)
    assert not model[0]._forward_hooks  # nothing half-applied
    PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=loader(classification_data()), noise_multiplier=1.0,
                                 max_grad_norm=1.0)


def test_batch_larger_than_the_data_set():
    with pytest.raises(ConfigError, match="batch_size must be at most the data set's size"):
        private(data=classification_data(n=5), batch_size=8)


def test_empty_data_set():
    with pytest.raises(ConfigError, match="the data set must not be empty"):
        private(data=TensorDataset(torch.zeros(0, 6)))


def test_make_private_twice_on_one_model():
    engine, model, optimizer, _ = private()
    with pytest.raises(PrivacyStateError, match="already called on this module"):
        private(model)
    with pytest.raises(PrivacyStateError, match="already called on this PrivacyEngine"):
        engine.make_private(module=mlp(), optimizer=optimizer, data_loader=loader(classification_data()),
                            noise_multiplier=1.0, max_grad_norm=1.0)


def test_optimizer_parameters_outside_the_module():
    model, other = mlp(), mlp()
    optimizer = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ConfigError, match="every optimizer parameter must belong to the module"):
        PrivacyEngine().make_private(module=model, optimizer=optimizer,
                                     data_loader=loader(classification_data()),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


def test_trainable_parameter_missing_from_the_optimizer():
    model = mlp()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"2\.weight, 2\.bias left out"):
        PrivacyEngine().make_private(module=model, optimizer=optimizer,
                                     data_loader=loader(classification_data()),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


def test_batch_norm_is_refused_with_its_path():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ModelValidationError, match=r"1 \(BatchNorm1d\).*GroupNorm") as info:
        private(model)
    assert info.value.findings[0].path == "1"


def test_frozen_batch_norm_switched_to_train_mode_is_caught_at_forward():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    model[1].requires_grad_(False)
    model.eval()
    engine, model, optimizer, (_, _, dl) = private(model)
    before = model[1].running_mean.clone()
    model.train()
    x, y = next(iter(dl))
    with pytest.raises(ModelValidationError,
                       match=r"1 \(BatchNorm1d\) about to normalise with batch statistics"):
        model(x)
    assert torch.equal(model[1].running_mean, before)  # refused before the forward touched them


def test_instance_norm_with_running_stats_switched_to_train_mode_is_caught_at_forward():
    norm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    model = nn.Sequential(nn.Linear(6, 8), nn.Unflatten(1, (4, 2)), norm, nn.Flatten(),
                          nn.Linear(8, 3))
    model.eval()  # passes validation: eval-mode InstanceNorm uses its stored statistics
    engine, model, optimizer, (_, _, dl) = private(model)
    before = norm.running_mean.clone()
    model.train()
    x, y = next(iter(dl))
    with pytest.raises(ModelValidationError, match=r"2 \(InstanceNorm1d\).*track_running_stats"):
        model(x)
    assert torch.equal(norm.running_mean, before)  # refused before the forward touched them


def test_custom_sampler_refused_unless_poisson_is_off():
    model = mlp()
    data = classification_data()
    weighted = DataLoader(data, batch_size=8, sampler=WeightedRandomSampler([1.0] * 40, 40))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="custom sampler"):
        PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=weighted,
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.warns(PrivacyWarning, match="accounting assumes Poisson sampling"):
        _, _, dl = PrivacyEngine().make_private(module=model, optimizer=optimizer,
                                                data_loader=weighted, noise_multiplier=1.0,
                                                max_grad_norm=1.0, poisson_sampling=False)
    assert dl is weighted


def test_iterable_dataset_needs_poisson_off_and_a_declared_rate():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            data = classification_data()
            for i in range(len(data)):
                yield data[i]

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = DataLoader(Stream(), batch_size=8)
    with pytest.raises(ConfigError, match="IterableDataset"):
        PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=stream,
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="must have a length.*sample_rate= and expected_batch"):
        PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=stream,
                                     noise_multiplier=1.0, max_grad_norm=1.0,
                                     poisson_sampling=False)
    engine = PrivacyEngine()
    with pytest.warns(PrivacyWarning, match="accounting assumes Poisson sampling"):
        _, _, dl = engine.make_private(module=model, optimizer=optimizer, data_loader=stream,
                                       noise_multiplier=1.0, max_grad_norm=1.0,
                                       poisson_sampling=False, sample_rate=0.2,
                                       expected_batch_size=8)
    assert dl is stream
    for x, y in dl:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert engine.steps == 5 and 0 < engine.get_epsilon(1e-5) < math.inf


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_epsilon=0.0), "target_epsilon must be > 0"),
    (dict(target_epsilon=-1.0), "target_epsilon must be > 0"),
    (dict(target_delta=0.0), "target_delta must be in \\(0, 1\\)"),
    (dict(target_delta=1.0), "target_delta must be in \\(0, 1\\)"),
])
def test_bad_targets(kwargs, message):
    model = mlp()
    args = dict(target_epsilon=1.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0) | kwargs
    with pytest.raises(ConfigError, match=message):
        PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(classification_data()), **args)


def test_large_delta_warns():
    engine, *_ = private()
    with pytest.warns(PrivacyWarning, match="at least 1/N"):
        engine.get_epsilon(0.05)


# -- one backward pass per step ---------------------------------------------------------------
def test_two_backward_passes_before_a_step_are_refused():
    engine, model, optimizer, _ = private()
    x, y = classification_data()[:8]
    drawn(engine, len(x))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(PrivacyStateError, match="one backward pass per optimizer.step"):
        F.cross_entropy(model(x), y).backward()


def test_backward_twice_on_one_forward_is_refused():
    engine, model, optimizer, _ = private()
    x, y = classification_data()[:8]
    drawn(engine, len(x))
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(PrivacyStateError, match="clip them twice"):
        loss.backward()


def test_generic_rule_use_is_reported(caplog):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(Scale(), mlp())
    with caplog.at_level("INFO", logger="privgrad"):
        engine, *_ = private(model)
    assert engine.layer_rules == {"0": "GenericRule", "1.0": "LinearRule", "1.2": "LinearRule"}
    assert "generic torch.func rule serves 0" in caplog.text


# -- memory: nothing of a step outlives it ------------------------------------------------------
class _Watched(nn.Module):
    """An MLP over a sequence with a LayerNorm (materialised during backward) and Linear layers
    (ghost norms), that keeps weak references to the activations its layers were called on."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 16)
        self.seen = []

    def forward(self, x):
        h = torch.relu(self.fc1(x.unsqueeze(1).expand(-1, 4, -1)))
        n = self.ln(h)
        self.seen += [weakref.ref(h), weakref.ref(n)]
        return self.fc2(n).mean(1)[:, :3]  # fc2: T (p + d) < p d, a ghost norm


def test_a_kept_loss_does_not_keep_the_steps_activations():
    # A loop that keeps `loss` (to print it, say) keeps the autograd graph, whose hooks refer to
    # the layers' captures, until its next forward pass; the captures must let go of the
    # activations and output gradients once the clipped sums are formed.
    import gc

    engine, model, optimizer, (_, _, dl) = private(_Watched(), noise_multiplier=0.0)
    x, y = next(iter(dl))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    gc.collect()
    assert loss.grad_fn is not None  # the graph is still alive ...
    assert [r() for r in model.seen] == [None, None]  # ... but holds none of the activations


def test_a_layer_unfrozen_outside_the_optimizer_is_refused_at_the_step():
    # check_ownership runs at every step (keyed by id): a careless unfreeze that the optimizer
    # never sees would leave a raw gradient in .grad; the step is refused and spends nothing
    model = mlp()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    _, _, data = engine.make_private(module=model, optimizer=optimizer,
                                     data_loader=loader(classification_data()),
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(data))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert engine.steps == 1
    model[0].requires_grad_(True)
    x, y = next(iter(data))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ConfigError, match=r"0\.weight, 0\.bias left out"):
        optimizer.step()
    assert engine.steps == 1 and engine.accountant.steps == 1
