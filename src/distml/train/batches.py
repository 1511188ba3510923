"""Batches as tensor ops over a split held in memory (on the GPU when there is one) as ``uint8``.

The order of an epoch is a seeded permutation of the whole split, a pure function of (seed, epoch): every rank
computes the same one, and global step ``s`` covers ``perm[s*B:(s+1)*B]``, of which rank ``r`` takes the ``r``-th
contiguous slice of ``B/W``. So each sample is seen once per epoch across the ranks, the global batch is the same
for any W (the DDP contract test relies on it), and resuming at any step needs no sampler state beyond
(epoch, step). The last incomplete global batch is dropped so every rank runs the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812


def step_generator(seed: int, *parts: int, device: torch.device | None = None) -> torch.Generator:
    """A generator seeded from (seed, *parts): randomness that is a pure function of where we are in training."""
    gen = torch.Generator(device=device or "cpu")
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + part + 0x9E3779B9) & 0xFFFFFFFFFFFF
    gen.manual_seed(value)
    return gen


@dataclass
class EpochOrder:
    """Which samples rank ``rank`` of ``world_size`` uses at each step of an epoch."""

    num_samples: int
    global_batch: int
    rank: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch % self.world_size:
            raise ValueError(f"batch {self.global_batch} does not divide by {self.world_size} replicas")
        self.local_batch = self.global_batch // self.world_size
        self.steps_per_epoch = self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=step_generator(self.seed, 1, epoch))

    def indices(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        start = step * self.global_batch + self.rank * self.local_batch
        return perm[start : start + self.local_batch]


class Batcher:
    """Turns ``uint8`` N x H x W x C images into normalised float N x C x H x W batches, augmented on request."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: list[float],
        std: list[float],
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        self.images = images.to(device)  # stays uint8: 4x less memory than float, sliced per batch
        self.labels = labels.to(device)
        self.device = device
        c = images.shape[-1]
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, c, 1, 1) * 255.0)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.labels)

    def batch(
        self, idx: torch.Tensor, *, augment: str = "none", gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.device)
        x = self.images[idx].permute(0, 3, 1, 2).float()
        x = (x - self.mean) * self.inv_std
        if augment != "none":
            assert gen is not None, "augmentation needs a generator"
            x = random_crop(x, pad=2, gen=gen)
            if augment == "crop+flip":
                flip = torch.rand(len(x), generator=gen, device=gen.device) < 0.5
                x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
        return x.contiguous(memory_format=self.memory_format), self.labels[idx]


def random_crop(x: torch.Tensor, *, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of ``x`` zero-padded by ``pad`` (zero = the mean after normalisation): one gather."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # N,1,H,1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # N,1,1,W
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]
