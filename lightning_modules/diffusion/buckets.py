"""Timestep buckets: the K equal slices of [0, T) that losses and accuracies are reported per.

Bucket k holds the integer timesteps t with floor(t K / T) = k, i.e. ceil(k T / K) <= t < ceil((k + 1) T / K);
with K <= T no bucket is empty.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["bucket_centres", "timestep_buckets"]


def timestep_buckets(t: Tensor, num_timesteps: int, num_buckets: int) -> Tensor:
    """Bucket index floor(t K / T) in [0, K) of each timestep: long (B,) -> long (B,)."""
    return t * num_buckets // num_timesteps


def bucket_centres(num_timesteps: int, num_buckets: int) -> list[int]:
    """The middle timestep of each bucket: (first + last + 1) // 2, the mean of its timesteps rounded up.

    An integer timestep inside its own bucket (so it can be a validation timestep and a plot coordinate at
    once), within 1/2 of the bucket's mean; floor((2k + 1) T / 2K) when K divides T (T = 1000, K = 10:
    50, 150, ..., 950).
    """
    if not 1 <= num_buckets <= num_timesteps:
        raise ValueError(f"num_buckets must be in [1, {num_timesteps}], got {num_buckets}")
    # first timestep of bucket i: ceil(i T / K), in integer arithmetic
    edges = [-(-i * num_timesteps // num_buckets) for i in range(num_buckets + 1)]
    return [(edges[k] + edges[k + 1]) // 2 for k in range(num_buckets)]
