"""scaling.fewshot without training: the closed-form probe against reference solves, the k-shot
draws, the features (and the resize on a copy), the RNG guard, and the checks of a downstream
dir (real shards)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from scaling import downstream, fewshot, results
from scaling.data import make_builtin_shards
from scaling.model import create_model
from scaling.train import main as train_main


def _features(n, d, c, seed):
    """Class-dependent gaussian features with very different scales per dimension."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = rng.normal(size=(c, d))
    x = (centres[y] + rng.normal(size=(n, d))) * rng.uniform(0.01, 30, d) + rng.normal(size=d)
    return x, y


def _reference(train_x, train_y, test_x, c, l2):
    """sklearn's Ridge (intercept not penalised) on the same standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    targets = np.where(np.arange(c) == train_y[:, None], 1.0, -1.0)
    ridge = Ridge(alpha=l2, fit_intercept=True, solver="cholesky")
    ridge.fit((train_x - mean) / std, targets)
    return ridge.predict((test_x - mean) / std)


@pytest.mark.parametrize("n, d, c, dual", [(300, 24, 5, False), (40, 200, 8, True)])
@pytest.mark.parametrize("l2", [fewshot.L2, 3.0])
def test_probe_equals_sklearn_ridge_in_the_primal_and_the_dual(n, d, c, dual, l2):
    x, y = _features(n + 97, d, c, seed=n)
    train_x, train_y, test_x, test_y = x[:n], y[:n], x[n:], y[n:]
    probe = fewshot.fit_probe(train_x, train_y, l2=l2, num_classes=c)
    assert probe.dual is dual  # the smaller system was solved
    want = _reference(train_x, train_y, test_x, c, l2)
    got = probe.scores(test_x)
    assert np.abs(got - want).max() < 1e-6 * max(1.0, np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()
    acc = fewshot.linear_probe(train_x, train_y, test_x, test_y, l2=l2)
    assert acc == pytest.approx((want.argmax(1) == test_y).mean(), abs=0)
    assert acc > 1.5 / c  # the features carry the class: far above chance
    other = fewshot.fit_probe(train_x, train_y, l2=l2, solve="primal" if dual else "dual")
    assert np.abs(other.scores(test_x) - got).max() < 1e-8 * max(1.0, np.abs(got).max())


def test_bias_is_not_regularised():
    """An explicit solve of [Z 1] with a penalty on W only gives the same bias and scores;
    penalising the bias as well would not (targets here have a mean far from 0)."""
    x, y = _features(80, 10, 3, seed=7)
    train_x, train_y, test_x = x[:60], y[:60], x[60:]
    l2 = 50.0
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    z = np.hstack([(train_x - mean) / std, np.ones((60, 1))])
    t = np.where(np.arange(3) == train_y[:, None], 1.0, -1.0)
    penalty = np.diag([l2] * 10 + [0.0])
    wb = np.linalg.solve(z.T @ z + penalty, z.T @ t)
    probe = fewshot.fit_probe(train_x, train_y, l2=l2)
    np.testing.assert_allclose(probe.bias, wb[-1], atol=1e-10)
    zt = np.hstack([(test_x - mean) / std, np.ones((20, 1))])
    np.testing.assert_allclose(probe.scores(test_x), zt @ wb, atol=1e-9)
    both = np.linalg.solve(z.T @ z + l2 * np.eye(11), z.T @ t)
    assert np.abs(both[-1] - probe.bias).max() > 0.1


def test_k_shot_draws_are_balanced_nested_and_seeded():
    labels = np.repeat(np.arange(4), [7, 9, 5, 30])
    draws = [downstream.draw_shots(labels, [1, 2, 5], seed, 4) for seed in range(3)]
    for d in draws:
        for k, idx in d.items():
            assert np.bincount(labels[idx], minlength=4).tolist() == [k] * 4
            assert len(set(idx.tolist())) == len(idx)
        assert set(d[1]) <= set(d[2]) <= set(d[5])
    again = downstream.draw_shots(labels, [1, 2, 5], 1, 4)
    assert all((again[k] == draws[1][k]).all() for k in again)
    assert any((draws[0][5] != draws[s][5]).any() for s in (1, 2))


@pytest.mark.parametrize("pool, rep", [("cls", None), ("gap", None), ("cls", 16)])
def test_features_are_the_pre_logits_and_a_resize_uses_a_copy(pool, rep):
    torch.manual_seed(0)
    model = create_model("mu/4", image_size=8, num_classes=10, pool=pool,
                         representation_size=rep, zero_init_head=False)
    model.train()
    images = torch.randint(0, 256, (11, 3, 8, 8), dtype=torch.uint8)
    aug = fewshot.default_augment("digits")
    feats = fewshot.extract_features(model, images, aug, device=torch.device("cpu"),
                                     batch_size=4)
    assert model.training  # mode restored
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(aug.std).view(1, 3, 1, 1) * 255
    model.eval()
    with torch.no_grad():
        x = model.forward_features((images.float() - mean) / std)
        if rep:
            x = torch.tanh(model.pre_logits(x))
        assert x.shape[1] != 10  # not the logits
    np.testing.assert_allclose(feats, x.double().numpy(), atol=1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    big = fewshot.at_size(model, 16)
    assert big is not model and big.config.image_size == 16
    assert model.config.image_size == 8 and fewshot.at_size(model, 8) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = fewshot.extract_features(big, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), aug,
                                   device=torch.device("cpu"))
    assert out.shape == (2, feats.shape[1])


def test_rng_kept_restores_every_generator():
    torch.manual_seed(1)
    np.random.seed(1)
    with fewshot.rng_kept(torch.device("cpu")):
        torch.rand(5), np.random.rand(5), create_model("mu/4", image_size=8)
    after = torch.rand(3), np.random.rand(3)
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(after[0], torch.rand(3)) and (after[1] == np.random.rand(3)).all()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot_data")
    return {"digits": str(make_builtin_shards("digits", root / "digits").root),
            "digits2": str(make_builtin_shards("digits", root / "other" / "digits").root),
            "noval": str(make_builtin_shards("digits", root / "noval", val_fraction=0.0).root),
            "shapes18": str(make_builtin_shards("shapes", root / "shapes18", image_size=18,
                                                num_samples=200).root)}


def test_downstream_dir_reads_every_train_label(data):
    (ds,) = fewshot.open_downstream([data["digits"]], [1, 5], 3)
    assert ds.name == "digits" and len(ds.labels) == ds.info.split("train").num_samples
    ds.load([1, 5], 3)
    assert len(ds.sets) == 6 and ds.val[0].shape == (180, 3, 8, 8)
    assert ds.val[0].dtype == torch.uint8 and len(ds.val[1]) == 180
    assert sorted(ds.rows) == sorted(set(np.concatenate(list(ds.sets.values())).tolist()))


@pytest.mark.parametrize("extra, message", [
    (["--fewshot", "/nonexistent/fs"], "/nonexistent/fs does not exist"),
    (["--fewshot", "{noval}"], "has no val split"),
    (["--fewshot", "{digits}", "--fewshot-shots", "1,500"], "fewer than 500 train images"),
    (["--fewshot", "{digits}", "--fewshot-shots", "0,5"], "--fewshot-shots '0,5'"),
    (["--fewshot", "{digits}", "--fewshot-shots", "1,x"], "--fewshot-shots '1,x'"),
    (["--fewshot", "{digits},", "--fewshot-shots", "1"], "--fewshot"),
    (["--fewshot", "{digits}", "--fewshot-seeds", "0"], "fewshot_seeds=0"),
    (["--fewshot", "{shapes18}", "--fewshot-shots", "1"], "not a multiple of mu/4's patch"),
    (["--fewshot", "{digits},{digits2}", "--fewshot-shots", "1"], "share a basename"),
])
def test_bad_fewshot_flags_fail_before_training(data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    args = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
            "--data", data["digits"], "--out", str(out), "--steps", "5",
            *[a.format(**data) for a in extra]]
    assert train_main(args) == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()  # refused before the run dir was made


def test_corrupt_transfer_line_stops_training_with_one_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    row = {"kind": "fewshot", "dataset": "digits", "shots": 1, "seed": 0, "top1": 0.5,
           "step": 5, "images_seen": 160, "flops_seen": 1.0, "num_train": 10, "num_test": 180}
    results.append_transfer(out, row)
    with open(out / results.TRANSFER_FILE, "a") as f:
        f.write('{"kind": "fewshot"}\n')  # valid JSON, not a row
    results.append_transfer(out, {**row, "step": 10})
    before = (out / results.TRANSFER_FILE).read_bytes()
    args = ["--model", "mu/4", "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
            "--data", data["digits"], "--out", str(out), "--steps", "5"]
    assert train_main(args) == results.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{results.TRANSFER_FILE}:2" in err[0], err
    assert (out / results.TRANSFER_FILE).read_bytes() == before
