"""The edges a first hour meets (issue 20): Opacus's keywords, a re-run notebook cell, a loader
privgrad returned, a string where a flag belongs. Each gets one line saying what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privgrad
from privgrad import PrivacyEngine
from privgrad.errors import ConfigError, ConfigTypeError, PrivacyStateError


def _parts():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(
        TensorDataset(torch.randn(40, 3)), batch_size=8)


@pytest.mark.parametrize("keyword, hint", [
    ("criterion", "needs no loss object.*privgrad.opacus"),
    ("noise_generator", "its own generator.*PrivacyEngine\\(noise=...\\)"),
    ("batch_first", "batch-first tensors"),
    ("wrap_model", "never wraps the model"),
    ("nosie_multiplier", "Check the spelling"),
])
@pytest.mark.parametrize("call", ["make_private", "make_private_with_epsilon"])
def test_opacus_keywords_get_one_line_saying_what_to_do(keyword, hint, call):
    model, opt, dl = _parts()
    engine = PrivacyEngine()
    kwargs = dict(noise_multiplier=1.0) if call == "make_private" else dict(
        target_epsilon=3.0, target_delta=1e-5, epochs=1)
    with pytest.raises(ConfigTypeError, match=f"{call} takes no {keyword}= argument; got "
                                              f"{keyword}=.*{hint}"):
        getattr(engine, call)(module=model, optimizer=opt, data_loader=dl, max_grad_norm=1.0,
                              **kwargs, **{keyword: True})
    assert engine.module is None  # nothing attached


def test_a_string_is_not_a_flag():
    with pytest.raises(ConfigTypeError, match="secure_mode must be True or False; got "
                                              "secure_mode='no'"):
        PrivacyEngine(secure_mode="no")


@pytest.mark.parametrize("name", ["prv", "gdp"])
def test_opacus_accountant_names_say_what_to_pass(name):
    with pytest.raises(ConfigError, match=f"got accountant='{name}'.*accountant='pld'"):
        PrivacyEngine(accountant=name)


def test_a_rerun_notebook_cell_has_a_way_out():
    model, opt, dl = _parts()
    PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=dl,
                                 noise_multiplier=1.0, max_grad_norm=1.0)  # engine lost
    with pytest.raises(PrivacyStateError, match=r"privgrad.detach\(module\)"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=dl,
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    assert privgrad.detach(model) is True
    assert privgrad.detach(model) is False  # nothing attached any more
    engine = PrivacyEngine()
    _, _, loader = engine.make_private(module=model, optimizer=opt, data_loader=dl,
                                       noise_multiplier=1.0, max_grad_norm=1.0)
    assert engine.module is model
    with pytest.raises(ConfigTypeError, match="privgrad.detach takes the model or optimizer"):
        privgrad.detach(3)


def test_make_private_takes_a_loader_privgrad_returned():
    """A second run on the same data (new noise, say) reuses the loader variable: same data set,
    same q, a fresh Poisson sampler for the new engine."""
    model, opt, dl = _parts()
    first = PrivacyEngine()
    _, _, loader = first.make_private(module=model, optimizer=opt, data_loader=dl,
                                      noise_multiplier=1.0, max_grad_norm=1.0)
    first.detach()
    second = PrivacyEngine()
    _, _, again = second.make_private(module=model, optimizer=opt, data_loader=loader,
                                      noise_multiplier=2.0, max_grad_norm=1.0)
    assert second.settings.sample_rate == first.settings.sample_rate == 8 / 40
    assert second.settings.expected_batch_size == 8
    assert again is not loader and again.dataset is dl.dataset
    for (x,), _ in zip(again, range(2)):  # trains: the new engine's own sampler and checks
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert second.steps == 2 and first.steps == 0
