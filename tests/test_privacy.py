"""Privacy invariants: the ledger equals an independent Opacus computation, the
query has the sensitivity and noise of Theorem 3.1, clipping is per sample,
and with 2 distributed workers the noise is added once per logical step at the
accountant's scale."""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from privimage_core.dp_sgd.finetune import accumulate_grad_samples, make_private
from privimage_core.privacy.plan import DP_SGD_MECHANISM, plan_noise
from privimage_core.errors import PrivacyBudgetError
from privimage_core.privacy.ledger import RDP_ALPHAS, PrivacyLedger, compose_ledgers
from privimage_core.selection.distribution import (QUERY_MECHANISM, class_histograms, noise_std,
                                                  query_semantic_distribution, relabel_selection,
                                                  select_top_k2)

torch.set_num_threads(1)


# ----------------------------------------------------------------- ledger
@pytest.mark.parametrize("acc", ["rdp", "prv"])
def test_ledger_matches_independent_opacus(acc):
    led = PrivacyLedger(10.0, 1e-5, acc)
    led.record_gaussian(QUERY_MECHANISM, 50.0)
    rec = led.begin_dp_sgd(DP_SGD_MECHANISM, 1.1, 0.004)
    rec.steps = 300
    ref = RDPAccountant() if acc == "rdp" else PRVAccountant()
    for _ in range(1):
        ref.step(noise_multiplier=50.0, sample_rate=1.0)
    for _ in range(300):
        ref.step(noise_multiplier=1.1, sample_rate=0.004)
    kw = {"alphas": RDP_ALPHAS} if acc == "rdp" else {}
    assert led.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-5, **kw), rel=1e-9)


def test_query_is_one_gaussian_step_at_rate_one():
    # sample rate 1, sigma_q: RDP of the Gaussian mechanism is alpha / (2 sigma^2)
    led = PrivacyLedger(10.0, 1e-5)
    led.record_gaussian(QUERY_MECHANISM, 3.0)
    from opacus.accountants.analysis.rdp import compute_rdp
    rdp = compute_rdp(q=1.0, noise_multiplier=3.0, steps=1, orders=[2.0, 8.0])
    assert rdp == pytest.approx([2.0 / 18.0, 8.0 / 18.0])
    assert led.records[0].sample_rate == 1.0 and led.records[0].steps == 1


def test_calibration_and_max_steps_never_exceed_target():
    led = PrivacyLedger(4.0, 1e-5)
    led.record_gaussian(QUERY_MECHANISM, 20.0)
    sigma = led.calibrate_noise(sample_rate=0.01, steps=500)
    assert led.epsilon_if([_rec(sigma, 0.01, 500)]) <= 4.0
    assert led.epsilon_if([_rec(sigma * 0.97, 0.01, 500)]) > 4.0 * 0.97  # not wildly loose
    t = led.max_steps(sigma, 0.01)
    assert t >= 500
    assert led.epsilon_if([_rec(sigma, 0.01, t)]) <= 4.0
    assert led.epsilon_if([_rec(sigma, 0.01, t + 1)]) > 4.0


def _rec(s, q, t):
    from privimage_core.privacy.ledger import MechanismRecord
    return MechanismRecord("x", s, q, t)


def test_charge_over_budget_is_refused():
    led = PrivacyLedger(1.0, 1e-5)
    with pytest.raises(PrivacyBudgetError, match="raise its noise"):
        led.record_gaussian(QUERY_MECHANISM, 0.5)
    assert led.records == []


def test_ledger_roundtrip_and_resume_continues():
    led = PrivacyLedger(8.0, 1e-5)
    led.record_gaussian(QUERY_MECHANISM, 30.0)
    r = led.begin_dp_sgd(DP_SGD_MECHANISM, 1.0, 0.01)
    r.steps = 40
    led2 = PrivacyLedger.from_state_dict(led.state_dict())
    assert led2.epsilon() == led.epsilon()
    r2 = led2.begin_dp_sgd(DP_SGD_MECHANISM, 1.0, 0.01)  # resume: same record, not a new one
    assert r2.steps == 40 and len(led2.records) == 2
    with pytest.raises(PrivacyBudgetError, match="same fine-tuning settings"):
        led2.begin_dp_sgd(DP_SGD_MECHANISM, 2.0, 0.01)
    # plan on resume keeps the recorded sigma; the 40 steps taken count toward
    # the 100 asked for, and the total still fits the target
    sigma, q, total = plan_noise(led2, n=1000, batch_size=10, steps=100)
    assert (sigma, q) == (1.0, 0.01) and 40 < total <= 100
    assert led2.epsilon_if([]) <= 8.0
    r2.steps = total
    assert led2.epsilon() <= 8.0
    r2.steps = total + 1
    assert total == 100 or led2.epsilon() > 8.0  # capped by the budget, not below it


def test_compose_ledgers_is_worse_than_each():
    a = PrivacyLedger(10, 1e-5)
    a.record_gaussian("q", 5.0)
    b = PrivacyLedger(10, 1e-5)
    b.record_gaussian("q", 5.0)
    both = compose_ledgers([a.state_dict(), b.state_dict()], 1e-5)
    assert both > a.epsilon()


# ----------------------------------------------------------------- query
def test_histogram_sensitivity_is_sqrt_k1():
    rng = np.random.default_rng(0)
    k1, P, C = 3, 12, 4
    topk = np.stack([rng.choice(P, k1, replace=False) for _ in range(50)])
    labels = rng.integers(0, C, 50)
    h = class_histograms(topk, labels, P, C)
    assert h.sum() == 50 * k1
    for i in range(50):  # remove any one image: L2 change is exactly sqrt(k1)
        keep = np.arange(50) != i
        h2 = class_histograms(topk[keep], labels[keep], P, C)
        assert np.linalg.norm(h - h2) == pytest.approx(math.sqrt(k1))
    assert noise_std(k1, 2.0) == pytest.approx(2.0 * math.sqrt(3))


def test_query_noise_scale_and_ledger_charge():
    P, C, k1 = 20, 2, 4
    topk = np.tile(np.arange(k1), (1000, 1))
    labels = np.zeros(1000, dtype=np.int64)
    labels[500:] = 1
    sig = 5.0
    samples = []
    for s in range(40):
        led = PrivacyLedger(10, 1e-5)
        d = query_semantic_distribution(topk, labels, P, C, k1, 1, sig, led,
                                        rng=np.random.default_rng(s))
        raw = class_histograms(topk, labels, P, C)
        samples.append((d.noisy_histograms - raw).ravel())
        assert [r.name for r in led.records] == [QUERY_MECHANISM]
        assert led.records[0].noise_multiplier == sig
    std = np.concatenate(samples).std()
    assert std == pytest.approx(sig * math.sqrt(k1), rel=0.08)


def test_selection_is_topk2_disjoint_and_relabels():
    noisy = np.array([[10, 9, 1, 0, 0], [11, 0, 8, 7, 0]], dtype=float)
    sel = select_top_k2(noisy, 2)
    assert sel == {1: [0, 2], 0: [1, 3]} or sel == {0: [1, 3], 1: [0, 2]}
    assert not set(sel[0]) & set(sel[1])
    pub = np.array([0, 1, 2, 3, 4, 0])
    idx, new = relabel_selection(pub, sel)
    assert idx.tolist() == [0, 1, 2, 3, 5]
    assert new.tolist() == [1, 0, 1, 0, 1]


# ----------------------------------------------------------------- DP-SGD
class _Lin(torch.nn.Module):
    def __init__(self, d_in=5, d_out=3):
        super().__init__()
        self.fc = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.fc(x)


def test_clipping_is_per_sample():
    torch.manual_seed(0)
    x = torch.randn(64, 5) * torch.linspace(0.1, 10, 64)[:, None]  # very different norms
    y = torch.zeros(64, dtype=torch.long)
    model = _Lin()
    w0 = model.fc.weight.detach().clone()
    led = PrivacyLedger(1e30, 1e-5)  # sigma ~ 0: a huge (but finite) epsilon per step
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = make_private(model, opt, x, y, batch_size=64, noise_multiplier=1e-9, max_grad_norm=0.5,
                      ledger=led)
    # one logical step on exactly the 64 rows (bypass Poisson for a known batch)
    out = dp.model(x)
    (out.sum(dim=1)).mean().backward()
    dp.optimizer.step()
    # expected: mean over samples of individually clipped grads (Algorithm 1)
    per = torch.stack([torch.ones(3, 1) * xi[None, :] for xi in x])  # d(sum out)/dW
    norms = per.flatten(1).norm(dim=1)
    clipped = per * (0.5 / norms).clamp(max=1.0)[:, None, None]
    expected = clipped.sum(0) / dp.optimizer.expected_batch_size
    got = w0 - model.fc.weight.detach()
    assert torch.allclose(got, expected, atol=1e-5)
    assert led.records[0].steps == 1  # the step hook recorded it


def test_step_hook_refuses_a_step_past_the_target():
    """Whatever the training loop does, the optimizer cannot apply a DP-SGD
    step that takes the ledger past its target: the hook raises before the
    update (Opacus calls it in pre_step), so the weights stay as they were."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.zeros(32, dtype=torch.long)
    model = _Lin()
    led = PrivacyLedger(3.0, 1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = make_private(model, opt, x, y, batch_size=32, noise_multiplier=1.5, max_grad_norm=1.0,
                      ledger=led)
    fits = led.max_steps(1.5, dp.sample_rate)  # q = 1 here: a handful of steps fit
    assert 1 <= fits < 50
    for _ in range(fits):
        dp.model(x).sum(dim=1).mean().backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad(set_to_none=True)
    assert led.records[0].steps == fits and led.epsilon() <= 3.0
    before = model.fc.weight.detach().clone()
    dp.model(x).sum(dim=1).mean().backward()
    with pytest.raises(PrivacyBudgetError, match="refused before the update"):
        dp.optimizer.step()
    assert torch.equal(model.fc.weight.detach(), before)
    assert led.records[0].steps == fits and led.epsilon() <= 3.0


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _SumObjective:
    uses_multiplicity = False

    def draw(self, x, k):
        return {}

    def loss(self, model, x, y, rnd):
        return model(x).sum(dim=1)


def _dist_worker(rank, world, port, out_dir, sigma, C, n, mode):
    import torch.distributed as dist
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DPDDP(_Lin(100, 400))
    led = PrivacyLedger(1e6, 1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    # zero inputs: every clipped per-sample gradient is 0, so the averaged
    # gradient after the step is exactly the added noise / expected batch.
    x = torch.zeros(n, 100)
    y = torch.zeros(n, dtype=torch.long)
    dp = make_private(model, opt, x, y, batch_size=n // 4, noise_multiplier=sigma,
                      max_grad_norm=C, ledger=led, distributed=True, grad_sample_mode=mode)
    xb = torch.zeros(8, 100)
    if mode == "ghost":  # the clipped sum in p.grad, Opacus's fast-clipping DDP optimizer
        accumulate_grad_samples(dp, _SumObjective(), xb, torch.zeros(8))
    else:
        dp.model(xb).sum().backward()
    dp.optimizer.step()
    g = model.module.fc.weight.grad.detach().clone()
    total_expected = dp.optimizer.expected_batch_size * world
    torch.save({"grad": g, "B": total_expected, "steps": led.records[0].steps,
                "q": led.records[0].sample_rate}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_distributed_noise_added_once_per_logical_step(tmp_path, mode):
    import torch.multiprocessing as mp
    sigma, C, n, world = 1.3, 2.0, 4000, 2
    mp.spawn(_dist_worker, args=(world, _free_port(), str(tmp_path), sigma, C, n, mode),
             nprocs=world, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # all-reduced: both ranks hold the same gradient
    assert torch.allclose(r0["grad"], r1["grad"])
    # noise std of the summed gradient is sigma*C (once), not sqrt(2)*sigma*C (per rank)
    est = (r0["grad"] * r0["B"]).std().item()
    assert est == pytest.approx(sigma * C, rel=0.03)
    assert r0["B"] == pytest.approx(n / 4)
    # each rank's ledger counted one logical step at the global sampling rate
    assert r0["steps"] == r1["steps"] == 1
    assert r0["q"] == pytest.approx(0.25)
