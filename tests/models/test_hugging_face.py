"""Hugging Face transformers built from tiny configs with random weights (no download): GPT-2
(Conv1D, tied input/output embeddings, position ids with a batch dimension of 1), BERT (padding
mask, token types), ViT (raw class-token and position parameters on a container module, served
by the generic rule) and a Llama-style decoder (RMSNorm, rotary embeddings). Per-sample
gradients against torch.func and one-example references, one private step against the reference
clipped sum, and the model stays a Hugging Face model (generate, config, save_pretrained)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

from privgrad import PrivacyEngine
from privgrad.layers import GenericRule, RuleRegistry
from privgrad.layers.registry import BUILTIN_RULES
from privgrad.validation import validate
from tests.layers.cases import check_module
from tests.helpers import drawn
from tests.models.harness import check_per_sample, check_private_step

D = torch.float64
B, T, VOCAB, WIDTH = 3, 6, 40, 32
TINY = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=WIDTH, intermediate_size=64)


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0  # right padding on the first example
    return ids, mask


def gpt2(dropout=0.0):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2,
                                     n_head=2, resid_pdrop=dropout, embd_pdrop=dropout,
                                     attn_pdrop=dropout, bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(config).double()


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     pad_token_id=0, **TINY)
    return transformers.BertForSequenceClassification(config).double()


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=3, **TINY)
    return transformers.ViTForImageClassification(config).double()


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=16,
                                      num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, **TINY)
    return transformers.LlamaForCausalLM(config).double()


def rows_of(kwargs, i):
    return {k: v[i:i + 1] for k, v in kwargs.items()}


def logits_case(model, kwargs, seed=0):
    """Loss ``sum(logits * R)``: every logit of every example enters the check."""
    with torch.no_grad():
        shape = model(**kwargs).logits.shape
    r = torch.randn(shape, dtype=D, generator=torch.Generator().manual_seed(seed))

    def loss(rows, output):
        return (output.logits * r[rows]).sum()

    return model, (), kwargs, lambda i: ((), rows_of(kwargs, i)), loss, B


def language_model_case(model, ids, mask):
    """Next-token cross-entropy summed over each example's real tokens."""
    def loss(rows, output):
        logits, target, keep = output.logits[:, :-1], ids[rows][:, 1:], mask[rows][:, 1:]
        each = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        return (each * keep).sum()

    kwargs = {"input_ids": ids, "attention_mask": mask}
    return model, (), kwargs, lambda i: ((), rows_of(kwargs, i)), loss, B


# -- GPT-2 ------------------------------------------------------------------------------------
def test_gpt2_per_sample_with_tied_embeddings_and_padding():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, mask = tokens()
    ref = check_per_sample(*logits_case(model, {"input_ids": ids, "attention_mask": mask}))
    assert "lm_head.weight" not in ref  # one tied parameter, one per-sample gradient
    assert ref["transformer.wpe.weight"].shape == (B, 16, WIDTH)  # per example, not batch of 1


def test_gpt2_private_step():
    check_private_step(*language_model_case(gpt2(), *tokens()))


def test_gpt2_stays_a_hugging_face_model(tmp_path):
    model = gpt2(dropout=0.1).train()  # dropout outside the leaf layers is fine
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask = tokens()
    data = torch.utils.data.TensorDataset(ids, mask)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        noise_multiplier=1.0, max_grad_norm=1.0)
    _, _, _, _, loss, _ = language_model_case(model, ids, mask)
    drawn(engine, len(ids))
    loss(slice(None), model(input_ids=ids, attention_mask=mask)).backward()
    optimizer.step()
    assert isinstance(model, transformers.GPT2LMHeadModel) and model.config.n_layer == 2
    out = model.generate(ids[:1, :3], max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 6)
    model.save_pretrained(tmp_path)
    engine.detach()
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert list(model.state_dict()) == keys
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0)


@given(b=st.integers(0, 3), t=st.integers(1, 4), n_in=st.integers(1, 4), n_out=st.integers(1, 4))
def test_conv1d_stores_its_weight_transposed(b, t, n_in, n_out):
    layer = Conv1D(n_out, n_in).double()
    torch.nn.init.normal_(layer.bias)
    assert layer.weight.shape == (n_in, n_out)
    check_module(layer, (torch.randn(b, t, n_in, dtype=D),))


# -- BERT -------------------------------------------------------------------------------------
def bert_case():
    ids, mask = tokens(1)
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    y = torch.tensor([0, 2, 1])

    def loss(rows, output):
        return F.cross_entropy(output.logits, y[rows], reduction="sum")

    kwargs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return bert(), (), kwargs, lambda i: ((), rows_of(kwargs, i)), loss, B


def test_bert_per_sample():
    model, args, kwargs, *_ = bert_case()
    ref = check_per_sample(*logits_case(model, kwargs))
    assert ref["bert.embeddings.position_embeddings.weight"].shape == (B, 16, WIDTH)


def test_bert_private_step():
    check_private_step(*bert_case())


# -- ViT --------------------------------------------------------------------------------------
def vit_case():
    pixels = torch.randn(B, 3, 8, 8, dtype=D)
    y = torch.tensor([1, 0, 2])

    def loss(rows, output):
        return F.cross_entropy(output.logits, y[rows], reduction="sum")

    return vit(), (), {"pixel_values": pixels}, lambda i: ((), {"pixel_values": pixels[i:i + 1]}), loss, B


def test_vit_container_parameters_use_the_generic_rule_alongside_its_children():
    model, args, kwargs, example, loss, b = vit_case()
    embeddings = model.vit.embeddings
    assert isinstance(RuleRegistry.default().lookup(embeddings), GenericRule)
    assert validate(model) == []
    ref = check_per_sample(model, args, kwargs, example, loss, b)
    # the generic rule differentiates only the container's own parameters; the patch
    # convolution inside it keeps its own (conv) rule and its own entries
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
            "vit.embeddings.patch_embeddings.projection.weight"} <= set(ref)


def test_vit_private_step():
    check_private_step(*vit_case())


def test_vit_with_dropout_in_the_container_is_a_finding():
    model = vit()
    model.config.hidden_dropout_prob = 0.1
    model.vit.embeddings.dropout.p = 0.1
    (finding,) = [f for f in validate(model) if f.path == "vit.embeddings"]
    assert "generic torch.func rule" in finding.problem and "dropout" in finding.problem
    assert not finding.fixable


# -- Llama ------------------------------------------------------------------------------------
def test_llama_per_sample():
    ids, mask = tokens(2)
    check_per_sample(*logits_case(llama(), {"input_ids": ids, "attention_mask": mask}))


def test_llama_private_step():
    check_private_step(*language_model_case(llama(), *tokens(2)))


RMS_NORMS = [name for name in BUILTIN_RULES if isinstance(name, str) and "Norm" in name]


@pytest.mark.parametrize("qualified", RMS_NORMS, ids=[n.rpartition(".")[2] for n in RMS_NORMS])
def test_every_registered_rms_norm(qualified):
    module_name, _, class_name = qualified.rpartition(".")
    kind = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    norm = kind(6).double()
    torch.nn.init.normal_(norm.weight)
    assert type(RuleRegistry.default().lookup(norm)).__name__ == "NeutralWeightNormRule"
    check_module(norm, (torch.randn(4, 3, 6, dtype=D),))


def test_privgrad_never_imports_transformers():
    code = ("import sys, torch, privgrad, privgrad.layers, privgrad.validation, privgrad.engine; "
            "torch.nn.Linear(2, 2); privgrad.layers.RuleRegistry.default(); "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_matches_optional_types_by_name_and_their_plain_subclasses():
    registry = RuleRegistry.default()
    assert Conv1D in registry and "transformers.pytorch_utils.Conv1D" in registry

    class Plain(Conv1D):
        pass

    class Changed(Conv1D):
        def forward(self, x):
            return super().forward(x) * 2

    assert registry.dedicated(Plain(2, 3)) is registry.dedicated(Conv1D(2, 3)) is not None
    assert registry.dedicated(Changed(2, 3)) is None
