"""ottimo.registry.tracking's metric records."""

from __future__ import annotations

import time

from ottimo.registry.tracking import stamped


def test_stamped_metrics_share_one_wall_clock_reading_at_their_step():
    before = int(time.time() * 1000)
    metrics = stamped({"val_accuracy": 1, "val_loss": 0.25}, step=3)
    after = int(time.time() * 1000)
    assert [(m.key, m.value, m.step) for m in metrics] == [("val_accuracy", 1.0, 3), ("val_loss", 0.25, 3)]
    assert all(isinstance(m.value, float) for m in metrics)
    assert len({m.timestamp for m in metrics}) == 1 and before <= metrics[0].timestamp <= after  # not 1970
    assert [(m.step, m.timestamp) for m in stamped({"rows": 5}, now=1234)] == [(0, 1234)]
    assert stamped({}) == []
