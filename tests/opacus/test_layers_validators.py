"""``privgrad.opacus.layers``, ``.validators``, ``.distributed``, ``.grad_sample``,
``.utils.uniform_sampler`` and ``.data_loader``: the pieces Opacus code imports by name."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privgrad.opacus as opacus
from privgrad.errors import ConfigError, ModelValidationError
from privgrad.layers import RuleRegistry
from privgrad.opacus.data_loader import DPDataLoader
from privgrad.opacus.grad_sample.functorch import make_functional
from privgrad.opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from privgrad.opacus.utils.uniform_sampler import UniformWithReplacementSampler


# -- layers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", [(DPLSTM, nn.LSTM), (DPGRU, nn.GRU), (DPRNN, nn.RNN),
                                          (DPMultiheadAttention, nn.MultiheadAttention)])
def test_dp_layers_are_the_torch_layers_with_privgrads_exact_rule(ours, theirs):
    layer = ours(8, 2) if ours is DPMultiheadAttention else ours(8, 4, batch_first=True)
    assert isinstance(layer, theirs) and type(layer).forward is theirs.forward
    assert RuleRegistry.default().dedicated(layer) is RuleRegistry.default().dedicated(
        theirs(8, 2) if theirs is nn.MultiheadAttention else theirs(8, 4))


@pytest.mark.parametrize("name, build, inputs", [
    ("DPLSTM", lambda m: m(3, 4, num_layers=2, bidirectional=True, batch_first=True),
     lambda: (torch.randn(2, 5, 3),)),
    ("DPGRU", lambda m: m(3, 4, batch_first=True), lambda: (torch.randn(2, 5, 3),)),
    ("DPRNN", lambda m: m(3, 4, nonlinearity="relu"), lambda: (torch.randn(5, 2, 3),)),
    ("DPMultiheadAttention", lambda m: m(8, 2, kdim=3, vdim=5, add_bias_kv=True),
     lambda: (torch.randn(4, 2, 8), torch.randn(6, 2, 3), torch.randn(6, 2, 5))),
])
def test_a_state_dict_saved_from_opacus_loads_and_computes_the_same(name, build, inputs):
    opacus_layers = pytest.importorskip("opacus.layers")
    torch.manual_seed(0)
    theirs = build(getattr(opacus_layers, name))
    ours = build(getattr(opacus.layers, name))
    ours.load_state_dict(theirs.state_dict())  # strict: the keys are the same
    args = inputs()
    out_theirs, out_ours = theirs(*args)[0], ours(*args)[0]
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)


# -- validators ----------------------------------------------------------------------------------
def test_validate_lists_findings_as_errors_and_strict_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    errors = opacus.ModuleValidator.validate(model, strict=False)
    assert len(errors) == 1 and isinstance(errors[0], ModelValidationError)
    assert errors[0].findings[0].path == "1" and "BatchNorm" in str(errors[0])
    with pytest.raises(ModelValidationError, match=r"(?s)1 finding\(s\).*ModuleValidator.fix"):
        opacus.ModuleValidator.validate(model, strict=True)
    assert not opacus.ModuleValidator.is_valid(model)


def test_fix_returns_a_repaired_copy_and_leaves_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fixed = opacus.ModuleValidator.fix(model)
    assert isinstance(fixed, nn.Module) and isinstance(fixed[1], nn.GroupNorm)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert opacus.ModuleValidator.is_valid(fixed)
    assert opacus.ModuleValidator.validate(fixed, strict=True) == []
    assert opacus.ModuleValidator.fix_and_validate(model) is not model


def test_validator_input_errors():
    with pytest.raises(ConfigError, match=r"module must be a torch.nn.Module; got module='str'"):
        opacus.ModuleValidator.validate("model")
    with pytest.raises(ConfigError, match=r"got keywords=\['num_groups'\]"):
        opacus.ModuleValidator.fix(nn.Linear(2, 2), num_groups=2)


# -- DPDDP, make_functional ----------------------------------------------------------------------
def test_dpddp_needs_a_process_group():
    with pytest.raises(ConfigError, match=r"got torch.distributed.is_initialized\(\)=False"):
        opacus.DPDDP(nn.Linear(2, 2))
    assert opacus.DPDDP is opacus.distributed.DifferentiallyPrivateDistributedDataParallel


def test_make_functional_runs_the_model_with_given_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fmodel, params = make_functional(model)
    x = torch.randn(5, 3)
    torch.testing.assert_close(fmodel(params, x), model(x))
    zeros = [torch.zeros_like(p) for p in params]
    assert torch.equal(fmodel(zeros, x), torch.zeros(5, 2))
    _, detached = make_functional(model, disable_autograd_tracking=True)
    assert not any(p.requires_grad for p in detached)


# -- samplers and the data loader of hand-assembled runs ----------------------------------------
def test_uniform_sampler_draws_poisson_batches_reproducibly():
    def batches(seed):
        sampler = UniformWithReplacementSampler(num_samples=200, sample_rate=0.1,
                                                generator=torch.Generator().manual_seed(seed))
        return [b for _ in range(20) for b in sampler]

    drawn = batches(1)
    assert len(drawn) == 200 and drawn == batches(1) and drawn != batches(2)
    sizes = torch.tensor([len(b) for b in drawn], dtype=torch.float)
    assert abs(sizes.mean().item() - 20) < 1.5  # q N = 20 (sd of the mean 0.3)
    assert all(b == sorted(set(b)) and all(0 <= i < 200 for i in b) for b in drawn)


def test_dp_data_loader_yields_empty_batches_with_the_datas_structure():
    data = TensorDataset(torch.randn(40, 3), torch.arange(40))
    loader = DPDataLoader(data, sample_rate=0.01, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 100 and any(len(x) == 0 for x, _ in batches)
    assert all(x.shape[1:] == (3,) for x, _ in batches)
    with pytest.raises(ConfigError, match="custom sampler"):
        DPDataLoader.from_data_loader(DataLoader(data, batch_size=4, sampler=list(range(40))))


def test_grad_sample_module_wraps_and_refuses_sequence_first_and_batch_norm():
    gsm = opacus.GradSampleModule(nn.Linear(3, 2), loss_reduction="sum")
    assert set(gsm.state_dict()) == {"_module.weight", "_module.bias"}  # Opacus's wrapping
    x = torch.randn(4, 3)
    gsm(x).sum().backward()
    torch.testing.assert_close(gsm.weight.grad_sample.sum(0), gsm.weight.grad)
    assert gsm.to_standard_module().weight.grad_sample is None
    with pytest.raises(ConfigError, match="got batch_first=False"):
        opacus.GradSampleModule(nn.Linear(3, 2), batch_first=False)
    with pytest.raises(ModelValidationError, match="BatchNorm"):
        opacus.GradSampleModule(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
