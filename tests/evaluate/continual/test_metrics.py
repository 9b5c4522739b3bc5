"""Continual metrics against a hand computation (and Avalanche's functional forgetting)."""
from __future__ import annotations

import numpy as np
import pytest

from cdabench.evaluate.continual import metrics


# ------------------------------------------------------------------- metrics
def test_forgetting_and_bwt_equal_a_hand_computation():
    a = [[90.0, 0.0, 0.0, 0.0],
         [70.0, 80.0, 5.0, 0.0],
         [75.0, 60.0, 85.0, 0.0],
         [50.0, 65.0, 40.0, 95.0]]
    # forgetting: best before the last step minus final, for experiences 0..2
    assert metrics.forgetting_per_experience(a) == [90 - 50, 80 - 65, 85 - 40]
    assert metrics.average_forgetting(a) == pytest.approx((40 + 15 + 45) / 3)
    # BWT: final minus just-learned
    assert metrics.backward_transfer(a) == pytest.approx(((50 - 90) + (65 - 80) + (40 - 85)) / 3)
    assert metrics.seen_accuracy(a) == pytest.approx([90, 75, 220 / 3, 62.5])
    assert metrics.seen_accuracy(a, weights=[1, 3, 1, 1])[1] == pytest.approx((70 + 240) / 4)
    assert metrics.final_accuracy(a) == pytest.approx(62.5)
    assert metrics.unseen_accuracy(a) == pytest.approx(5.0 / 6)
    summary = metrics.summarise(a)
    assert summary.final_accuracy == pytest.approx(62.5) and summary.bwt == metrics.backward_transfer(a)
    assert metrics.average_forgetting([[88.0]]) == 0.0 and metrics.backward_transfer([[88.0]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        metrics.seen_accuracy([[1.0, 2.0]])
    # Avalanche's functional forgetting is A[k][k] - A[t][k]: its last row averages to -BWT.
    from avalanche.evaluation.functional import forgetting
    assert float(np.mean(forgetting(np.array(a))[-1, :-1])) == pytest.approx(-metrics.backward_transfer(a))
