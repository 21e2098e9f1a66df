"""Small labelled image sets whose classes a random network already separates."""

from __future__ import annotations

import numpy as np
import torch


def quadrant_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 [n, 1, 28, 28] and labels [n]: class c (of 4) is a bright 10×10 square in quadrant c over noise."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randint(0, 60, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 2 + 14 * r:12 + 14 * r, 2 + 14 * q:12 + 14 * q] = 230
    return x, y.numpy()
