"""The port of Opacus's ``examples/dcgan.py`` (``scripts/dcgan.py``): a GAN whose
discriminator trains privately while the generator's loss backpropagates through it."""

import pytest

import privgrad.opacus
from tests.opacus.conftest import trained


@pytest.mark.slow
def test_dcgan_trains_both_networks_and_accounts_only_the_discriminator(
        run_script, engines, tmp_path):
    engines.watch(privgrad.opacus)  # the script imports PrivacyEngine from privgrad.opacus
    g = run_script("dcgan", [
        "--data-root", str(tmp_path), "--workers", "0", "--batch-size", "16", "--nz", "8",
        "--ngf", "8", "--ndf", "8", "--epochs", "2", "--device", "cpu",
        "--outf", str(tmp_path / "out"), "--manualSeed", "1"])
    (engine,) = engines.built
    # 48 images, batch 16: q = 1/3, 3 steps an epoch. The generator's backward passes through
    # the private discriminator (after its step) release nothing and are not accounted.
    assert engine.accountant.history == [(1.0, 16 / 48, 6)]
    assert trained(engine)
    assert g["epsilon"] == pytest.approx(engine.get_epsilon(1e-5))
    assert (tmp_path / "out" / "netG_epoch_1.pth").exists()
    assert (tmp_path / "out" / "fake_samples_epoch_001.png").exists()
    # the generator trained too (its optimizer is a plain Adam, outside the engine)
    assert g["optimizerG"].state and all(p.grad is not None for p in g["netG"].parameters())
