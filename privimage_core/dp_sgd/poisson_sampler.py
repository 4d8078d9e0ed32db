"""Distributed Poisson sampling that keeps empty draws.

Opacus 1.6's ``DistributedUniformWithReplacementSampler`` draws each rank's
batch by including each of the rank's examples with probability q, but
``yield``s a draw only when it is non-empty. A rank whose draw is empty then
skips that round: the ranks' logical steps pair draws from different rounds,
and a rank's batch is conditioned on being non-empty. Neither is the Poisson
subsampling the accountant (and the add/remove-one analysis) assumes.

This sampler draws exactly as Opacus does (same shuffle, same partition, same
Bernoulli(q) inclusion from the same generator) and yields EVERY draw, empty
ones included; Opacus's DPDataLoader collate already turns an empty index
list into an empty batch of the right shape, and an empty batch still takes a
noised step (the single-process case behaves like that already). Every rank
therefore takes the same number of logical steps per pass.
"""
from __future__ import annotations

import torch
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch.utils.data import DataLoader


class DistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        indices = indices[self.rank: self.total_size: self.num_replicas]
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield indices[mask.nonzero(as_tuple=False).reshape(-1)]  # possibly empty


def keep_empty_draws(dp_loader: DataLoader) -> DataLoader:
    """The same DP data loader with its distributed sampler replaced by one
    that yields empty draws too (a DataLoader's sampler cannot be swapped in
    place). Single-process loaders are returned as they are: Opacus's
    ``UniformWithReplacementSampler`` already yields empty draws."""
    old = dp_loader.batch_sampler
    if not isinstance(old, DistributedUniformWithReplacementSampler) or \
            isinstance(old, DistributedPoissonSampler):
        return dp_loader
    new = DistributedPoissonSampler(total_size=old.total_size, sample_rate=old.sample_rate,
                                    shuffle=old.shuffle, shuffle_seed=old.shuffle_seed,
                                    steps=old.num_batches, generator=old.generator)
    return DataLoader(dp_loader.dataset, batch_sampler=new, collate_fn=dp_loader.collate_fn,
                      num_workers=dp_loader.num_workers, pin_memory=dp_loader.pin_memory,
                      generator=dp_loader.generator)
