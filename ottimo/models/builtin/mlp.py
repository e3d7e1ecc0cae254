"""The `mlp` family: flattened rows through hidden ReLU layers (tabular data or small images)."""

from __future__ import annotations

from torch import nn

from ottimo.spec import InputSpec


def build(spec: InputSpec, n_classes: int, hidden: list[int] = (128, 64), dropout: float = 0.1,
          width: int | None = None, depth: int | None = None) -> nn.Module:
    """`hidden` layer widths (or `depth` layers of `width` units, as the tuning space has it)."""
    if spec.dtype != "float32":
        raise ValueError("the mlp takes numeric rows (tabular or image); for token sequences use the transformer")
    if width is not None or depth is not None:
        hidden = [int(width or 64)] * int(depth or 1)
    layers: list[nn.Module] = [nn.Flatten()]
    size = spec.size
    for h in hidden:
        layers += [nn.Linear(size, int(h)), nn.ReLU(), nn.Dropout(dropout)]
        size = int(h)
    layers.append(nn.Linear(size, n_classes))
    return nn.Sequential(*layers)
