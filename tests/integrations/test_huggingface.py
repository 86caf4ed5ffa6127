"""DPTrainer on a tiny BERT classifier (random weights, CPU, a few steps)."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from privgrad.errors import ConfigError
from privgrad.integrations.huggingface import DPTrainer
from privgrad.monitoring import epsilon_after

DELTA = 1e-5


class Examples(torch.utils.data.Dataset):
    def __init__(self, n=96, length=8):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(1, 50, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


def arguments(tmp_path, **kwargs):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=32, num_train_epochs=2,
                   logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                   disable_tqdm=True, learning_rate=1e-3)
    options.update(kwargs)
    return TrainingArguments(**options)


def test_training_is_private_and_logs_epsilon(tmp_path):
    model = tiny_bert()
    keys = list(model.state_dict())
    trainer = DPTrainer(model=model, args=arguments(tmp_path), train_dataset=Examples(),
                        target_epsilon=4.0, target_delta=DELTA, max_grad_norm=1.0, accountant="rdp")
    trainer.train()
    engine = trainer.engine
    assert engine.steps == trainer.state.global_step > 0
    assert engine.settings.sample_rate == pytest.approx(32 / 96)
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert len(logged) >= engine.steps and logged == sorted(logged)
    assert logged[-1] == pytest.approx(engine.get_epsilon(DELTA))
    assert 0 < logged[-1] <= 4.0
    assert list(model.state_dict()) == keys
    trainer.detach()


def test_update_is_clipped_per_example(tmp_path):
    model = tiny_bert()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = DPTrainer(model=model, args=arguments(tmp_path, max_steps=1),
                        train_dataset=Examples(), optimizers=(optimizer, None),
                        noise_multiplier=0.0, max_grad_norm=1e-4)
    trainer.train()
    change = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    assert trainer.engine.steps == 1
    assert 0 < change.norm() <= 1e-4 * (1 + 1e-5)  # lr * C: the mean of clipped gradients, no noise


def test_budget_stop(tmp_path):
    trainer = DPTrainer(model=tiny_bert(), args=arguments(tmp_path, num_train_epochs=50),
                        train_dataset=Examples(), noise_multiplier=1.0, max_grad_norm=1.0,
                        max_epsilon=4.0)
    trainer.train()
    assert trainer.state.global_step < 50 * 3
    assert trainer.engine.get_epsilon(DELTA) <= 4.0 < epsilon_after(trainer.engine, DELTA, 1)
    trainer.detach()


def test_refuses_accumulation_and_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        DPTrainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=Examples(),
                  max_grad_norm=1.0)
    trainer = DPTrainer(model=tiny_bert(), args=arguments(tmp_path, gradient_accumulation_steps=2),
                        train_dataset=Examples(), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be 1; got gradient_accumulation_steps=2"):
        trainer.train()


@pytest.mark.parametrize("resume", [True, "checkpoint-3"])
def test_resume_from_a_checkpoint_without_the_engine_state_is_refused(tmp_path, resume):
    """A plain Trainer checkpoint has no accountant or sampler: resuming would restart epsilon
    at 0 and replay the first run's batches and noise."""
    (tmp_path / "checkpoint-3").mkdir()
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = DPTrainer(model=model, args=arguments(tmp_path), train_dataset=Examples(),
                        noise_multiplier=1.0, max_grad_norm=1.0)
    folder = str(tmp_path / "checkpoint-3") if resume != True else True  # noqa: E712
    with pytest.raises(ConfigError, match="must hold privgrad's engine state.*got "
                                          "resume_from_checkpoint="):
        trainer.train(resume_from_checkpoint=folder)
    assert trainer.engine.settings is None  # nothing attached, nothing trained
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_a_resumed_run_continues_exactly_where_the_checkpoint_stopped(tmp_path):
    """Resumed from step 2 in a process seeded like the first: the same final model as an
    uninterrupted run (the same batches and noise at steps 3 and 4), which a replay of steps 1
    and 2 would not give."""
    def run(folder, resume=None):
        torch.manual_seed(0)
        trainer = DPTrainer(model=tiny_bert(), args=arguments(folder, max_steps=4, save_steps=2,
                                                              save_strategy="steps"),
                            train_dataset=Examples(), noise_multiplier=1.0, max_grad_norm=1.0)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.engine.steps == whole.engine.steps == 4
    assert resumed.engine.get_epsilon(1e-5) == pytest.approx(whole.engine.get_epsilon(1e-5))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_logged_grad_norm_is_the_released_gradients(tmp_path):
    """The Trainer measures p.grad before optimizer.step(), i.e. before privgrad writes the private
    gradient there: DPTrainer logs the norm of what the step released instead. With plain SGD at
    lr 1 that is exactly the size of the first update."""
    model = tiny_bert()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = DPTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=Examples(),
                        optimizers=(optimizer, None), noise_multiplier=1.0, max_grad_norm=1.0)
    trainer.train()
    change = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    (logged,) = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx(change.norm().item(), rel=1e-5)
    trainer.detach()
    assert not optimizer._optimizer_step_post_hooks  # detach removed the hook too


def test_noise_is_calibrated_for_the_steps_given(tmp_path):
    """``DPTrainer(steps=)`` sets the calibration horizon: after that many steps the run has
    spent the target (to the search's 0.1% in sigma), never more."""
    from privgrad.accounting import get_noise_multiplier

    trainer = DPTrainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=4),
                        train_dataset=Examples(), target_epsilon=4.0, target_delta=DELTA,
                        steps=4, max_grad_norm=1.0, accountant="rdp")
    trainer.train()
    assert trainer.engine.steps == 4
    assert trainer.engine.settings.noise_multiplier == get_noise_multiplier(
        target_epsilon=4.0, target_delta=DELTA, sample_rate=32 / 96, steps=4, accountant="rdp")
    assert 3.9 < trainer.engine.get_epsilon(DELTA) <= 4.0
    trainer.detach()


def test_epochs_and_steps_together_are_refused():
    with pytest.raises(ConfigError, match=r"at most one of epochs and steps may be given"):
        DPTrainer(model=tiny_bert(), args=None, max_grad_norm=1.0, target_epsilon=4.0,
                  epochs=2, steps=4)


@pytest.mark.parametrize("target", [None, 4.0], ids=["noise", "epsilon"])
def test_a_correlated_mechanism_is_planned_for_the_trainers_run(tmp_path, target):
    """``DPTrainer(privacy_kwargs={"mechanism": BandMF(...)})``: the noise is planned for the steps the trainer
    takes (max_steps or its epochs), with or without a target epsilon, and the run is
    accounted as BandMF's rounds."""
    from privgrad.mechanisms import BandMF

    noise = {"noise_multiplier": 1.0} if target is None else {"target_epsilon": target,
                                                              "target_delta": DELTA}
    trainer = DPTrainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=6),
                        train_dataset=Examples(), max_grad_norm=1.0,
                        privacy_kwargs={"mechanism": BandMF(num_bands=2)}, **noise)
    trainer.train()
    engine = trainer.engine
    assert engine.steps == 6 and engine.settings.planned_steps == 6
    (entry,) = engine.accountant.history
    assert (entry.num_steps, entry.sample_rate) == (3, pytest.approx(2 * 32 / 96))
    if target is not None:
        assert 3.9 < engine.get_epsilon(DELTA) <= 4.0
    trainer.detach()
