"""CKA estimators against an independent float64 reference written here from the equations.

Reference: Kornblith et al. 2019 (biased HSIC0 = tr(KHLH)/(n-1)^2, RBF with sigma^2 = thr^2 * median squared
distance) and Song et al. 2012 (unbiased HSIC1 on raw Grams with zeroed diagonals). Nothing here calls repsim's
centring code, so a shared mistake cannot hide.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import repsim
from repsim.cka import MinibatchCKA, gram_vector


# ------------------------------------------------------------------------------------------------ reference (float64)
def ref_linear_gram(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.longdouble if x.dtype == np.longdouble else np.float64)
    return x @ x.T


def ref_rbf_gram(x: np.ndarray, threshold: float) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def ref_hsic0(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n, dtype=k.dtype) - np.ones((n, n), dtype=k.dtype) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def ref_hsic1(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n, dtype=k.dtype)
    term = (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ kt @ lt @ one))
    return float(term / (n * (n - 3)))


EST = {False: "biased", True: "unbiased"}


def ref_cka(x: np.ndarray, y: np.ndarray, kernel: str = "linear", debiased: bool = False,
            threshold: float = 1.0) -> float:
    gram = ref_linear_gram if kernel == "linear" else (lambda a: ref_rbf_gram(a, threshold))
    k, l = gram(x), gram(y)
    hsic = ref_hsic1 if debiased else ref_hsic0
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_minibatch(batches_a: list[np.ndarray], batches_b: list[np.ndarray], debiased: bool = True) -> float:
    """Nguyen et al. 2021 Eq. 2: HSICs averaged over batches, CKA formed from the averages."""
    hsic = ref_hsic1 if debiased else ref_hsic0
    kl = np.mean([hsic(ref_linear_gram(a), ref_linear_gram(b)) for a, b in zip(batches_a, batches_b)])
    kk = np.mean([hsic(ref_linear_gram(a), ref_linear_gram(a)) for a in batches_a])
    ll = np.mean([hsic(ref_linear_gram(b), ref_linear_gram(b)) for b in batches_b])
    return float(kl / np.sqrt(kk * ll))


def related(rng: np.random.Generator, n: int, d1: int, d2: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, d1))
    y = np.tanh(x @ rng.standard_normal((d1, d2))) + noise * rng.standard_normal((n, d2))
    return x, y


# ------------------------------------------------------------------------------------------------------ full batch
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "d1", "d2"), [(12, 40, 30), (50, 7, 9), (300, 4, 6), (64, (4, 5, 3), 17)])
def test_cka_matches_reference(kernel: str, debiased: bool, n: int, d1, d2: int) -> None:
    rng = np.random.default_rng(n)
    shape = (n, *d1) if isinstance(d1, tuple) else (n, d1)
    x = rng.standard_normal(shape) + 3.0
    y = np.tanh(x.reshape(n, -1) @ rng.standard_normal((x[0].size, d2))) + rng.standard_normal((n, d2)) - 2.0
    got = repsim.cka(torch.from_numpy(x), y, kernel=kernel, estimator=EST[debiased])
    want = ref_cka(x, y, kernel, debiased)
    assert got == pytest.approx(want, abs=1e-12, rel=1e-10)


def test_rbf_threshold_changes_value() -> None:
    x, y = related(np.random.default_rng(0), 40, 5, 5)
    a = repsim.cka(x, y, kernel="rbf", threshold=0.5)
    assert a == pytest.approx(ref_cka(x, y, "rbf", threshold=0.5), rel=1e-10)
    assert a != pytest.approx(repsim.cka(x, y, kernel="rbf", threshold=2.0), rel=1e-3)


def test_feature_space_and_gram_paths_agree() -> None:
    """n >> d uses feature space; the same data transposed in width uses the Gram path."""
    rng = np.random.default_rng(1)
    x, y = related(rng, 400, 3, 4)
    pad = np.zeros((400, 500))  # zero columns change nothing mathematically but force the Gram path
    for debiased in (False, True):
        fs = repsim.cka(x, y, estimator=EST[debiased])
        gram = repsim.cka(np.hstack([x, pad]), np.hstack([y, pad]), estimator=EST[debiased])
        assert fs == pytest.approx(gram, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased: bool) -> None:
    rng = np.random.default_rng(2)
    x, y = related(rng, 60, 20, 15)
    base = repsim.cka(x, y, estimator=EST[debiased])
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    assert repsim.cka(x @ q, y, estimator=EST[debiased]) == pytest.approx(base, abs=1e-12)
    assert repsim.cka(7.5 * x, 0.01 * y, estimator=EST[debiased]) == pytest.approx(base, abs=1e-12)
    assert repsim.cka(x + 100.0, y - 3.0, estimator=EST[debiased]) == pytest.approx(base, abs=1e-9)
    a = rng.standard_normal((20, 20)) + np.diag(np.linspace(0.1, 10, 20))  # invertible, far from orthogonal
    assert abs(repsim.cka(x @ a, y, estimator=EST[debiased]) - base) > 1e-3


def test_identical_and_negative_values_are_not_clamped() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 8))
    assert repsim.cka(x, x) == pytest.approx(1.0, abs=1e-12)
    values = [repsim.cka(rng.standard_normal((6, 3)), rng.standard_normal((6, 3)), estimator="unbiased")
              for _ in range(50)]
    assert min(values) < 0  # unbiased CKA of independent data straddles 0; it must not be clamped


def test_bad_input_full_batch() -> None:
    x = np.random.default_rng(4).standard_normal((10, 3))
    with pytest.raises(ValueError, match="same number of samples"):
        repsim.cka(x, x[:9])
    with pytest.raises(ValueError, match="at least 4"):
        repsim.cka(x[:3], x[:3], estimator="unbiased")
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        repsim.cka(bad, x)
    with pytest.raises(ValueError, match="kernel"):
        repsim.cka(x, x, kernel="poly")  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(repsim.cka(np.ones((10, 3)), x))


# ------------------------------------------------------------------------------------------------------- minibatch
def _batches(seed: int, sizes: list[int], d: dict[str, int], offset: float = 0.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        base = rng.standard_normal((n, 6))
        out.append({k: np.tanh(base @ rng.standard_normal((6, w))) + 0.5 * rng.standard_normal((n, w)) + offset
                    for k, w in d.items()})
    return out


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_minibatch_matches_reference(estimator: str) -> None:
    sizes = [16, 16, 9, 16]  # a short last batch is normalised by its own size
    a = _batches(5, sizes, {"l0": 5, "l1": 40, "l2": 3})
    b = _batches(6, sizes, {"m0": 12, "m1": 7})
    mb = MinibatchCKA(estimator=estimator, label_a="A", label_b="B")
    for ba, bb in zip(a, b):
        mb.update({k: torch.from_numpy(v) for k, v in ba.items()}, {k: torch.from_numpy(v) for k, v in bb.items()})
    da = mb.compute()
    assert da.dims == ("layer_a", "layer_b")
    assert list(da.layer_a.values) == ["l0", "l1", "l2"] and list(da.layer_b.values) == ["m0", "m1"]
    assert da.attrs["n_samples"] == sum(sizes) and da.attrs["n_batches"] == 4
    assert da.attrs["model_a"] == "A" and da.attrs["model_b"] == "B"
    for la in ["l0", "l1", "l2"]:
        for lb in ["m0", "m1"]:
            want = ref_minibatch([x[la] for x in a], [y[lb] for y in b], debiased=estimator == "unbiased")
            assert float(da.sel(layer_a=la, layer_b=lb)) == pytest.approx(want, abs=1e-12)


def test_single_batch_minibatch_equals_full_batch_debiased() -> None:
    x, y = related(np.random.default_rng(7), 32, 10, 6)
    mb = MinibatchCKA()
    mb.update({"x": x}, {"y": y})
    assert float(mb.compute()[0, 0]) == pytest.approx(repsim.cka(x, y, estimator="unbiased"), abs=1e-12)


def test_cross_equals_block_of_joint() -> None:
    a = _batches(8, [20, 20, 20], {"a0": 4, "a1": 9})
    b = _batches(9, [20, 20, 20], {"b0": 5, "b1": 2, "b2": 11})
    cross, joint = MinibatchCKA(), MinibatchCKA()
    for ba, bb in zip(a, b):
        cross.update(ba, bb)
        joint.update({**ba, **bb})
    block = joint.compute().sel(layer_a=["a0", "a1"], layer_b=["b0", "b1", "b2"]).values
    np.testing.assert_allclose(cross.compute().values, block, atol=1e-14)
    full = joint.compute().values
    np.testing.assert_allclose(full, full.T, atol=1e-15)
    np.testing.assert_allclose(np.diag(full), 1.0, atol=1e-14)


def test_fp32_with_large_mean_matches_float64() -> None:
    """Post-activation features with mean ~50: centring before the Gram keeps fp32 within 1e-3 (in fact ~1e-6)."""
    batches = _batches(10, [64, 64, 64], {"relu_like": 512, "other": 256}, offset=50.0)
    f32, f64 = MinibatchCKA(), MinibatchCKA()
    for bt in batches:
        f32.update({k: torch.from_numpy(v).float() for k, v in bt.items()})
        f64.update({k: torch.from_numpy(v.astype(np.float32).astype(np.float64)) for k, v in bt.items()})
    # The raw-Gram Song form cancels at this offset even in float64 (error ~1e-8) and 80-bit (~3e-10), so the
    # reference centres features first (HSIC is invariant to it; test_invariances checks that) in extended precision.
    ext = [{k: (e := v.astype(np.float32).astype(np.longdouble)) - e.mean(0) for k, v in bt.items()} for bt in batches]
    ref = ref_minibatch([bt["relu_like"] for bt in ext], [bt["other"] for bt in ext])
    assert float(f64.compute()[0, 1]) == pytest.approx(ref, abs=1e-14)
    err = np.abs(f32.compute().values - f64.compute().values).max()
    assert err < 1e-3
    assert err < 1e-5  # the actual accuracy of the centred fp32 path


def test_half_precision_activations_promoted() -> None:
    bt = _batches(11, [32], {"x": 64, "y": 48})[0]
    mb = MinibatchCKA()
    mb.update({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in bt.items()})
    ref = repsim.cka(torch.from_numpy(bt["x"]).to(torch.bfloat16).double(),
                     torch.from_numpy(bt["y"]).to(torch.bfloat16).double(), estimator="unbiased")
    assert float(mb.compute()[0, 1]) == pytest.approx(ref, abs=1e-5)


def test_minibatch_bad_input() -> None:
    rng = np.random.default_rng(12)
    mb = MinibatchCKA()
    with pytest.raises(ValueError, match="at least 4"):
        mb.update({"x": rng.standard_normal((3, 5))})
    with pytest.raises(ValueError, match="same number of samples"):
        mb.update({"x": rng.standard_normal((8, 5))}, {"y": rng.standard_normal((9, 5))})
    bad = rng.standard_normal((8, 5))
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="blocks.3: activations contain NaN or Inf"):
        mb.update({"blocks.0": rng.standard_normal((8, 5)), "blocks.3": bad})
    mb.update({"x": rng.standard_normal((8, 5))})
    with pytest.raises(ValueError, match="layers changed"):
        mb.update({"z": rng.standard_normal((8, 5))})
    with pytest.raises(ValueError, match="estimator"):
        MinibatchCKA(estimator="song")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="before any update"):
        MinibatchCKA().compute()


def test_zero_variance_layer_gives_nan_and_names_it() -> None:
    rng = np.random.default_rng(13)
    mb = MinibatchCKA()
    mb.update({"live": rng.standard_normal((10, 4)), "dead_relu": np.full((10, 4), 2.0)})
    with pytest.warns(RuntimeWarning, match="dead_relu"):
        da = mb.compute()
    assert np.isnan(da.sel(layer_a="dead_relu")).all() and np.isnan(da.sel(layer_b="dead_relu")).all()
    assert float(da.sel(layer_a="live", layer_b="live")) == pytest.approx(1.0)


def test_state_dict_round_trip(tmp_path) -> None:
    batches = _batches(14, [12] * 6, {"p": 5, "q": 7})
    full, first = MinibatchCKA(keep_batches=True), MinibatchCKA(keep_batches=True)
    for bt in batches:
        full.update(bt)
    for bt in batches[:3]:
        first.update(bt)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = MinibatchCKA(keep_batches=True)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for bt in batches[3:]:
        resumed.update(bt)
    np.testing.assert_array_equal(resumed.compute().values, full.compute().values)
    assert resumed.n_batches == 6
    with pytest.raises(ValueError, match="estimator"):
        MinibatchCKA(estimator="biased").load_state_dict(first.state_dict())


def test_bootstrap_interval() -> None:
    batches = _batches(15, [16] * 10, {"p": 5, "q": 7, "r": 3})
    mb = MinibatchCKA(keep_batches=True)
    for bt in batches:
        mb.update(bt)
    ds = mb.bootstrap(n_boot=300, ci=0.9, seed=1)
    assert set(ds.data_vars) == {"cka", "lower", "upper"}
    assert (ds.lower <= ds.cka + 1e-12).all() and (ds.cka <= ds.upper + 1e-12).all()
    off = ds.upper.values - ds.lower.values
    assert off[0, 1] > 0 and off[0, 0] == pytest.approx(0, abs=1e-12)
    same = MinibatchCKA(keep_batches=True)
    for _ in range(10):
        same.update(batches[0])
    s = same.bootstrap(n_boot=50)
    np.testing.assert_allclose(s.upper.values, s.lower.values, atol=1e-12)
    few = MinibatchCKA(keep_batches=True)
    for bt in batches[:4]:
        few.update(bt)
    with pytest.warns(UserWarning, match="only 4 batches"):
        few.bootstrap(n_boot=20)
    with pytest.raises(ValueError, match="n_boot must be a positive"):
        mb.bootstrap(n_boot=0)
    with pytest.raises(RuntimeError, match="keep_batches"):
        no = MinibatchCKA()
        no.update(batches[0])
        no.update(batches[1])
        no.bootstrap()


def test_gram_vector_inner_product() -> None:
    rng = np.random.default_rng(16)
    x, y = rng.standard_normal((9, 4)), rng.standard_normal((9, 6))
    for estimator, hsic, norm in (("unbiased", ref_hsic1, 9 * 6), ("biased", ref_hsic0, 8**2)):
        vx, vy = gram_vector(x, estimator=estimator), gram_vector(y, estimator=estimator)
        assert float(vx @ vy) / norm == pytest.approx(hsic(ref_linear_gram(x), ref_linear_gram(y)), abs=1e-12)


def ref_u_centre(k: np.ndarray) -> np.ndarray:
    """Szekely & Rizzo's U-centring, entry by entry from its definition (zero diagonal)."""
    n = len(k)
    kt = k - np.diag(np.diag(k))
    r, t = kt.sum(1), kt.sum()
    out = kt - r[:, None] / (n - 2) - r[None, :] / (n - 2) + t / ((n - 1) * (n - 2))
    np.fill_diagonal(out, 0)
    return out


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_closed_form_centring_matches_centred_grams(offset: float) -> None:
    """``hsic_from_grams`` on stacked feature Grams (all pairs and row by row) equals explicitly U-centred /
    double-centred Grams' inner products and Song's / tr(KHLH) references, in float64 and from float32 activations
    with a large mean."""
    from repsim.gram import feature_gram, hsic_from_grams, stack_grams

    rng = np.random.default_rng(5)
    n = 11
    acts = {f"l{i}": rng.standard_normal((n, 3 + 4 * i)) * (1 + i) + offset * rng.random(3 + 4 * i) for i in range(3)}
    for (estimator, norm), dtype in itertools.product((("unbiased", n * (n - 3)), ("biased", (n - 1) ** 2)),
                                                      (np.float64, np.float32)):
        cast = {k: x.astype(dtype) for k, x in acts.items()}  # the reference sees the same (rounded) inputs
        grams = [ref_linear_gram(x.astype(np.longdouble) - x.astype(np.longdouble).mean(0)) for x in cast.values()]
        if estimator == "unbiased":
            centred = [ref_u_centre(k) for k in grams]
        else:
            h = np.eye(n, dtype=np.longdouble) - 1 / n
            centred = [h @ k @ h for k in grams]
        want = np.array([[float((a * b).sum()) / norm for b in centred] for a in centred])
        ref = ref_hsic1 if estimator == "unbiased" else ref_hsic0
        np.testing.assert_allclose(want, [[ref(a, b) for b in grams] for a in grams], rtol=1e-10)
        vecs = {k: feature_gram(x, estimator=estimator) for k, x in cast.items()}
        st = stack_grams(vecs, list(vecs), n, torch.empty(3, n * n, dtype=torch.float64), estimator)
        atol = (1e-12 if dtype == np.float64 else 1e-6) * float(np.abs(np.diag(want)).max())
        np.testing.assert_allclose(hsic_from_grams(st, st, n, estimator).numpy(), want, rtol=0, atol=atol)
        np.testing.assert_allclose(hsic_from_grams(st, st, n, estimator, pairs=False).numpy(), np.diag(want),
                                   rtol=0, atol=atol)


def test_update_grams_takes_feature_or_centred_grams() -> None:
    """The engine's closed-form centring is idempotent: centred Grams (``gram_vector``) give what feature Grams do."""
    from repsim.gram import feature_gram

    rng = np.random.default_rng(8)
    batches = [{"p": rng.standard_normal((12, 5)) + 3, "q": rng.standard_normal((12, 9))} for _ in range(3)]
    for estimator in ("unbiased", "biased"):
        got = {}
        for make in (feature_gram, gram_vector):
            mb = MinibatchCKA(estimator=estimator)
            for bt in batches:
                mb.update_grams({k: make(v, estimator=estimator) for k, v in bt.items()}, n=12)
            got[make.__name__] = mb.compute().values
        np.testing.assert_allclose(got["gram_vector"], got["feature_gram"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ DDP all-reduce
def _ddp_worker(rank: int, out: str) -> None:
    batches = _batches(17, [6] * 10, {"p": 5, "q": 7})
    mb = MinibatchCKA(keep_batches=True)
    for i in range(rank, len(batches), 2):  # whole batches per rank (2 ranks), as repsim.shard gives them
        mb.update(batches[i], {"r": batches[i]["p"] ** 2}, index=i)
    mb.all_reduce()
    if rank == 0:
        da = mb.compute()
        boot = mb.bootstrap(n_boot=200, seed=3)
        np.save(out, np.concatenate([da.values.ravel(), boot["lower"].values.ravel(), boot["upper"].values.ravel(),
                                     [mb.n_samples, mb.n_batches, len(mb.batches)]]))


def test_all_reduce_two_gloo_processes(tmp_path, run_gloo) -> None:
    out = str(tmp_path / "ddp.npy")
    run_gloo(_ddp_worker, out)
    got = np.load(out)
    single = MinibatchCKA(keep_batches=True)
    for bt in _batches(17, [6] * 10, {"p": 5, "q": 7}):
        single.update(bt, {"r": bt["p"] ** 2})
    boot = single.bootstrap(n_boot=200, seed=3)
    want = np.concatenate([single.compute().values.ravel(), boot["lower"].values.ravel(), boot["upper"].values.ravel()])
    np.testing.assert_allclose(got[:-3], want, rtol=0, atol=1e-13)  # batches gathered in single-process order
    assert list(got[-3:]) == [60, 10, 10]


def test_package_functions_survive_submodule_imports() -> None:
    """``repsim.cka``/``capture``/``compare`` are functions even after their same-named modules are imported."""
    import importlib

    for name in ("cka", "capture", "compare"):
        importlib.import_module(f"repsim.{name}")
        assert callable(getattr(repsim, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 3), (127, 9), (128, 3100), (300, 600), (256, 768), (257, 1), (1100, 50)])
def test_symmetric_product_is_the_gram(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The block upper-triangle product (several block sizes, a ragged last block, one matmul for small products) is
    x x^T to rounding against a float64 reference, its lower blocks mirrored, also for a non-contiguous x."""
    from repsim import gram

    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = x.double() @ x.double().T
    scale = (1e-12 if dtype == torch.float64 else 1e-5) * float(ref.abs().max())
    for xin in (x, x.T.contiguous().T):
        k = gram.symmetric_product(xin)
        assert k.dtype == dtype and k.shape == (shape[0], shape[0])
        assert float((k.double() - ref).abs().max()) <= scale
        b = gram.gram_block_rows(*shape)
        assert torch.equal(k[b:, :b], k[:b, b:].T)  # lower blocks are copies of the upper ones
        for rows in (1, 7, shape[0]):  # any explicit block size, a single row included
            assert float((gram.symmetric_product(xin, rows).double() - ref).abs().max()) <= scale
    with pytest.raises(ValueError, match="block_rows must be a positive number of rows, got 0"):
        gram.symmetric_product(x, 0)
