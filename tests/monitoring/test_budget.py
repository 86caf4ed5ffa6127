import pytest

from privgrad import PrivacyEngine
from privgrad.accounting import get_max_steps
from privgrad.errors import ConfigError, PrivacyBudgetError, PrivacyStateError
from privgrad.monitoring import BudgetStop, epsilon_after

DELTA = 1e-5


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_training_stops_before_the_step_that_would_exceed(tiny_run, accountant):
    run = tiny_run(noise_multiplier=2.0, accountant=accountant)
    budget = BudgetStop(run.engine, max_epsilon=2.0, delta=DELTA)
    for _ in range(100):  # epochs; the budget ends the run long before
        for batch in budget.batches(run.loader):
            run.step(batch)
        if budget.exhausted:
            break
    spent = run.engine.get_epsilon(DELTA)
    assert 0 < spent <= 2.0
    assert epsilon_after(run.engine, DELTA, 1) > 2.0  # one more step would overspend
    s = run.engine.settings
    expected = get_max_steps(target_epsilon=2.0, target_delta=DELTA, noise_multiplier=s.noise_multiplier,
                             sample_rate=s.sample_rate, accountant=accountant)
    assert run.engine.steps == expected
    assert budget.steps_left == 0
    with pytest.raises(PrivacyBudgetError, match="the next step must keep epsilon <= max_epsilon=2"):
        budget.check()


def test_forecast_leaves_the_engine_accountant_alone(tiny_run):
    run = tiny_run()
    run.step(next(iter(run.loader)))
    before = run.engine.accountant.history
    assert epsilon_after(run.engine, DELTA, 10) > run.engine.get_epsilon(DELTA) > 0
    assert BudgetStop(run.engine, 50.0, DELTA).steps_left > 0
    assert run.engine.accountant.history == before


def test_steps_left_counts_down_and_follows_an_outside_change(tiny_run):
    run = tiny_run(noise_multiplier=1.5)
    budget = BudgetStop(run.engine, max_epsilon=3.0, delta=DELTA)
    first = budget.steps_left
    batches = iter(run.loader)
    run.step(next(batches))
    run.step(next(batches))
    assert budget.steps_left == first - 2
    # steps recorded at other settings (e.g. a resumed checkpoint): the forecast is redone
    run.engine.accountant.step(noise_multiplier=0.8, sample_rate=0.5, num_steps=3)
    assert budget.steps_left == BudgetStop(run.engine, 3.0, DELTA).steps_left < first - 2


def test_no_noise_allows_no_step(tiny_run):
    run = tiny_run(noise_multiplier=0.0)
    budget = BudgetStop(run.engine, max_epsilon=100.0, delta=DELTA)
    assert budget.exhausted
    assert list(budget.batches(run.loader)) == []


def test_arguments_are_checked(tiny_run):
    run = tiny_run()
    with pytest.raises(ConfigError, match=r"max_epsilon must be > 0 and finite; got max_epsilon=0"):
        BudgetStop(run.engine, max_epsilon=0, delta=DELTA)
    with pytest.raises(ConfigError, match=r"delta must be in \(0, 1\); got delta=1"):
        BudgetStop(run.engine, max_epsilon=1.0, delta=1)
    with pytest.raises(PrivacyStateError, match="before make_private"):
        BudgetStop(PrivacyEngine(), max_epsilon=1.0, delta=DELTA)
