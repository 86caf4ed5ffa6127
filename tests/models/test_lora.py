"""LoRA through peft on tiny Hugging Face decoders: only the adapters train and their per-sample
gradients are exact, a private step equals the reference clipped sum, the frozen base never
changes, and the merged model computes what the adapted one does."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.validation import validate
from tests.helpers import drawn
from tests.models.harness import check_per_sample, check_private_step
from tests.models.test_hugging_face import gpt2, language_model_case, llama, logits_case, tokens

# peft 0.21 still reads PreTrainedModel.is_gradient_checkpointing, which transformers 5
# deprecates; the warning is theirs and says nothing about privgrad.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def adapted(base, targets, **options):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0,
                             init_lora_weights=False, **options)  # nonzero B: real gradients
    return peft.get_peft_model(base, config)


def llama_lora():
    return adapted(llama(), ["q_proj", "v_proj"])


def test_only_adapters_train_and_their_per_sample_gradients_are_exact():
    model = llama_lora()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids, mask = tokens(3)
    ref = check_per_sample(*logits_case(model, {"input_ids": ids, "attention_mask": mask}))
    assert set(ref) == set(trainable)


def test_gpt2_conv1d_adapters():
    model = adapted(gpt2(), ["c_attn"], fan_in_fan_out=True)
    ids, mask = tokens(4)
    check_per_sample(*logits_case(model, {"input_ids": ids, "attention_mask": mask}), func=False)


def test_private_step_equals_the_clipped_sum():
    check_private_step(*language_model_case(llama_lora(), *tokens(5)))


def test_training_leaves_the_base_alone_and_merging_is_exact():
    model = llama_lora()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids, mask = tokens(6)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = PrivacyEngine(accountant="rdp")
    _, _, loader = engine.make_private(
        module=model, optimizer=optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
        data_loader=DataLoader(TensorDataset(ids, mask), batch_size=2))
    loss = language_model_case(model, ids, mask)[4]
    for step in range(2):
        optimizer.zero_grad()
        drawn(engine, len(ids))
        loss(slice(None), model(input_ids=ids, attention_mask=mask)).backward()
        optimizer.step()
    engine.detach()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen {n} changed"
        else:
            assert not torch.equal(p, adapters[n]), f"adapter {n} did not train"
    merged = copy.deepcopy(model).merge_and_unload()
    assert not isinstance(merged, peft.PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-10, atol=1e-10)


def test_dora_magnitudes_are_served_by_the_generic_rule():
    model = adapted(llama(), ["q_proj"], use_dora=True)
    assert validate(model) == []
    ids, mask = tokens(7)
    check_per_sample(*logits_case(model, {"input_ids": ids, "attention_mask": mask}), func=False,
                     modes=("materialize",))


def test_embedding_adapters_no_module_call_covers_are_findings():
    # peft keeps embedding adapters in ParameterDicts and applies them with F.embedding: no call
    # of theirs could be hooked, so they must be reported rather than trained on noise alone.
    model = adapted(llama(), ["embed_tokens"])
    findings = [f for f in validate(model) if "lora_embedding" in f.path]
    assert {f.path.rpartition(".")[2] for f in findings} == {"lora_embedding_A", "lora_embedding_B"}
    assert all("never called" in f.problem and "freeze them" in f.fix for f in findings)
