"""The `cnn` family: convolution blocks (conv, ReLU, 2x2 max-pool while the map is at least 2x2) and a small head,
for image rows [channels, height, width] (data.input.kind: image)."""

from __future__ import annotations

from torch import nn

from ottimo.spec import InputSpec


def build(spec: InputSpec, n_classes: int, channels: list[int] = (16, 32), kernel: int = 3, hidden: int = 64,
          dropout: float = 0.1) -> nn.Module:
    if spec.kind != "image":
        raise ValueError(f"the cnn takes images; these rows are {spec.kind} {list(spec.shape)}: set data.input to "
                         "{kind: image, shape: [channels, height, width]}, or leave cnn out of train.candidates")
    c, h, w = spec.shape
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, int(out), kernel, padding=kernel // 2), nn.ReLU()]
        c = int(out)
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, int(hidden)), nn.ReLU(), nn.Dropout(dropout),
               nn.Linear(int(hidden), n_classes)]
    return nn.Sequential(*layers)
