"""Random generators for DP-SGD's noise and Poisson sampling, with their
whole state drawn from OS entropy.

``torch.Generator().manual_seed(s)`` keeps only the low 32 bits of ``s`` on
the CPU (its Mersenne Twister is initialised from one 32-bit word), so a
generator seeded that way can be searched by anyone who holds the weights
before and after a step: 2^32 candidates. Here the CPU generator's 624-word
Mersenne Twister state (19,968 bits) is filled from ``secrets`` instead,
and CUDA's Philox generator gets a 64-bit seed and a 64-bit offset (128
bits). What this does NOT resist: floating-point attacks on the Gaussian
sampler itself (Mironov 2012; Opacus's ``secure_mode`` exists for those), and
the Mersenne Twister is not a cryptographic generator: its outputs are
never released, only their sums with clipped gradients.
"""
from __future__ import annotations

import secrets
import struct

import numpy as np
import torch

MT_WORDS = 624
# torch's CPU generator state (CPUGeneratorImplState, legacy THGeneratorState
# first): uint64 initial seed, int left, int seeded, uint64 next, then the
# 624 Mersenne Twister words as uint64, then the normal-sampling cache.
_HEADER = struct.Struct("<QiiQ")
_WORDS_AT = _HEADER.size
_STATE_BYTES = 5056


def _words(state: np.ndarray) -> np.ndarray:
    return np.frombuffer(state[_WORDS_AT:_WORDS_AT + 8 * MT_WORDS].tobytes(), dtype=np.uint64)


def _cpu_generator() -> torch.Generator:
    g = torch.Generator()
    state = g.get_state().numpy().copy()
    if state.size != _STATE_BYTES:
        raise RuntimeError(f"torch's CPU generator state has {state.size} bytes, not the "
                           f"{_STATE_BYTES} this code fills; update privimage_core/dp_sgd/"
                           "entropy.py for this torch version")
    words = np.frombuffer(secrets.token_bytes(4 * MT_WORDS), dtype=np.uint32).astype(np.uint64)
    state[_WORDS_AT:_WORDS_AT + 8 * MT_WORDS] = words.view(np.uint8)
    # left = 1, next = 0: the first draw regenerates from these words
    _HEADER.pack_into(state, 0, 0, 1, 1, 0)
    g.set_state(torch.from_numpy(state))
    if not np.array_equal(_words(g.get_state().numpy()), words):
        raise RuntimeError("torch did not keep the Mersenne Twister words it was given; update "
                           "privimage_core/dp_sgd/entropy.py for this torch version")
    return g


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose state is OS entropy: the CPU's whole
    Mersenne Twister state, or CUDA Philox's seed and offset (128 bits)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_generator()
    if device.type == "cuda":
        g = torch.Generator(device=device)
        g.manual_seed(secrets.randbits(64))
        g.set_offset(4 * secrets.randbits(62))  # Philox offsets advance in steps of 4
        return g
    raise ValueError(f"no entropy generator for device type '{device.type}'")


def seeded_from_32_bits(g: torch.Generator) -> bool:
    """True when a CPU generator's Mersenne Twister words are the expansion
    of their first word (what ``manual_seed`` produces, whatever seed it was
    given): such a state has 32 bits of entropy at most."""
    w = _words(g.get_state().numpy()).astype(np.uint64)
    expect = np.empty_like(w)
    expect[0] = w[0]
    for i in range(1, MT_WORDS):
        prev = int(expect[i - 1])
        expect[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
    return bool(np.array_equal(w, expect))
