"""Distributed Poisson sampling keeps empty draws: each rank
yields one draw per round, empty or not, so every rank takes the same logical
steps and no batch is conditioned on being non-empty. Opacus's own sampler is
the failing control."""
from __future__ import annotations

import pytest
import torch
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler

from privimage_core.dp_sgd.poisson_sampler import DistributedPoissonSampler


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)


def _draws(cls, seed=0):
    s = cls(total_size=200, sample_rate=0.005, steps=400,
            generator=torch.Generator().manual_seed(seed))
    return list(s)


def test_every_round_is_yielded_and_empty_draws_included(two_ranks):
    ours = _draws(DistributedPoissonSampler)
    assert len(ours) == 400
    empty = sum(len(d) == 0 for d in ours)
    # 100 examples on this rank at q=0.005: P(empty) = 0.995^100 ~ 0.61
    assert 0.5 * 400 < empty < 0.72 * 400
    # the same draws as Opacus's where Opacus yields one (same generator stream)
    theirs = _draws(DistributedUniformWithReplacementSampler)
    assert [d.tolist() for d in ours if len(d)] == [d.tolist() for d in theirs]


def test_control_opacus_sampler_skips_empty_draws(two_ranks):
    assert len(_draws(DistributedUniformWithReplacementSampler)) < 400 * 0.5


def test_make_private_distributed_uses_it_and_an_empty_draw_still_steps(tmp_path):
    import torch.distributed as dist
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    from privimage_core.dp_sgd.finetune import make_private
    from privimage_core.privacy.ledger import PrivacyLedger

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        net = DPDDP(torch.nn.Linear(4, 2))
        x, y = torch.randn(50, 4), torch.zeros(50, dtype=torch.long)
        led = PrivacyLedger(1e6, 1e-5)
        dp = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y, batch_size=1,
                          noise_multiplier=1.0, max_grad_norm=1.0, ledger=led, distributed=True)
        assert isinstance(dp.loader.batch_sampler, DistributedPoissonSampler)
        batches = list(dp.loader)
        assert len(batches) == len(dp.loader.batch_sampler)  # one per round
        xb = next(b[0] for b in batches if len(b[0]) == 0)  # q = 1/50: some rounds are empty
        assert xb.shape == (0, 4)
        dp.model(xb).sum().backward()
        dp.optimizer.step()
        assert dp.record.steps == 1  # the empty draw was a noised, recorded step
    finally:
        dist.destroy_process_group()
