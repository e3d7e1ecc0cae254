"""mynet: a small residual conv net for image rows, built the way Ottimo builds every model family.

Ottimo calls `build(spec, n_classes, **hparams)` with the InputSpec of one row (here kind "image", shape
(channels, height, width), dtype float32), the number of classes, and families.mynet.hparams (with a tuning
trial's values laid over them). It puts its own input normalisation in front and trains, exports and compresses
whatever torch.nn.Module comes back.
"""

from __future__ import annotations

import torch
from torch import nn

from ottimo import InputSpec


class Residual(nn.Module):
    """relu(x + conv(relu(conv(x)))): two 3x3 convolutions that keep the channels and the map size."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def build(spec: InputSpec, n_classes: int, channels: int = 16, blocks: int = 1, hidden: int = 64,
          dropout: float = 0.1) -> nn.Module:
    """A 3x3 stem to `channels`, `blocks` residual blocks, average pooling to at most 4x4, a `hidden`-unit head."""
    if spec.kind != "image":  # a ValueError names the problem in the run's first task, before any training
        raise ValueError(f"mynet takes images, these rows are {spec.describe()}: set data.input to "
                         "{kind: image, shape: [channels, height, width]}")
    c, h, w = spec.shape
    ph, pw = min(h, 4), min(w, 4)
    return nn.Sequential(
        nn.Conv2d(c, int(channels), 3, padding=1), nn.ReLU(),
        *[Residual(int(channels)) for _ in range(int(blocks))],
        nn.AdaptiveAvgPool2d((ph, pw)), nn.Flatten(),
        nn.Linear(int(channels) * ph * pw, int(hidden)), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(int(hidden), n_classes),
    )
