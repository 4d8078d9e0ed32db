"""DP-SGD's noise and Poisson sampling draw from generators whose whole state
is OS entropy (privimage_core/dp_sgd/entropy.py), not a 32-bit seed."""
from __future__ import annotations

import pytest
import torch

from privimage_core.dp_sgd.entropy import entropy_generator, seeded_from_32_bits
from privimage_core.dp_sgd.finetune import make_private
from privimage_core.privacy.ledger import PrivacyLedger


def test_torch_cpu_seeds_keep_32_bits_and_the_check_sees_it():
    """The weakness, and the control: manual_seed(s) and manual_seed(s mod
    2^32) give the same noise, and the check flags any manual_seed state."""
    s = (1 << 62) + 12345
    a = torch.normal(0, 1, (8,), generator=torch.Generator().manual_seed(s))
    b = torch.normal(0, 1, (8,), generator=torch.Generator().manual_seed(s % 2 ** 32))
    assert torch.equal(a, b)
    for seed in (0, 1, 2 ** 31 + 7, s):
        assert seeded_from_32_bits(torch.Generator().manual_seed(seed))


def test_entropy_generator_has_a_full_random_state():
    g1, g2 = entropy_generator("cpu"), entropy_generator("cpu")
    assert not seeded_from_32_bits(g1) and not seeded_from_32_bits(g2)
    x1 = torch.normal(0, 1, (1000,), generator=g1)
    x2 = torch.normal(0, 1, (1000,), generator=g2)
    assert not torch.equal(x1, x2)
    assert abs(x1.mean().item()) < 0.2 and 0.8 < x1.std().item() < 1.2
    # the state survives a round trip (checkpointing a generator keeps it)
    g3 = torch.Generator()
    g3.set_state(g2.get_state())
    assert torch.equal(torch.rand(5, generator=g2), torch.rand(5, generator=g3))


def test_make_private_noise_and_sampling_use_entropy_generators():
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(64, 4), torch.zeros(64, dtype=torch.long)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=8,
                      noise_multiplier=1.0, max_grad_norm=1.0,
                      ledger=PrivacyLedger(10.0, 1e-5), grad_sample_mode="hooks")
    noise, sampling = dp.optimizer.generator, dp.loader.batch_sampler.generator
    assert noise is not None and sampling is not None and noise is not sampling
    assert not seeded_from_32_bits(noise) and not seeded_from_32_bits(sampling)
    # control: the construction used before (a 63-bit seed) is caught
    old = torch.Generator().manual_seed(0x5DEECE66D12345)
    assert seeded_from_32_bits(old)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_has_a_random_seed_and_offset():
    g1, g2 = entropy_generator("cuda"), entropy_generator("cuda")
    assert g1.initial_seed() != g2.initial_seed() or g1.get_offset() != g2.get_offset()
    assert g1.get_offset() % 4 == 0 and g1.get_offset() > 0
    x1 = torch.normal(0, 1, (1000,), device="cuda", generator=g1)
    x2 = torch.normal(0, 1, (1000,), device="cuda", generator=g2)
    assert not torch.equal(x1, x2)
