"""Continual-learning metrics as pure functions of the accuracy matrix.

`A[i][j]` is the top-1 (%) on the test images of experience j after training experience i
(i, j = 0..T-1). Entries with j > i (classes not seen yet) are kept in the matrix but used only by
`unseen_accuracy`, a leak indicator; every other metric reads the lower triangle.

- seen accuracy after step i: the top-1 on the test images of all classes seen so far, i.e. the
  mean of A[i][0..i] weighted by each experience's test-image count (plain mean when unweighted);
- final accuracy: the seen accuracy after the last step (all classes);
- average incremental accuracy: the mean of the seen accuracies over the steps (iCaRL);
- forgetting (Chaudhry et al. 2018): for each old experience j < T-1, the drop from its best
  accuracy before the last step to its final accuracy, max_{l<T-1} A[l][j] - A[T-1][j], averaged;
- backward transfer (Lopez-Paz & Ranzato 2017): mean over j < T-1 of A[T-1][j] - A[j][j]
  (negative when old experiences lost accuracy). Avalanche's "forgetting" is -BWT.
With one step there is nothing old: forgetting and BWT are 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


def _check(matrix) -> list[list[float]]:
    rows = [[float(v) for v in row] for row in matrix]
    t = len(rows)
    if t == 0 or any(len(row) != t for row in rows):
        raise ValueError(f"the accuracy matrix must be square and non-empty, got {t} row(s) of lengths "
                         f"{[len(r) for r in rows]}")
    return rows


def seen_accuracy(matrix, weights=None) -> list[float]:
    rows = _check(matrix)
    w = [1.0] * len(rows) if weights is None else [float(x) for x in weights]
    out = []
    for i, row in enumerate(rows):
        total = sum(w[:i + 1])
        out.append(sum(a * b for a, b in zip(row[:i + 1], w[:i + 1])) / total if total else 0.0)
    return out


def final_accuracy(matrix, weights=None) -> float:
    return seen_accuracy(matrix, weights)[-1]


def average_incremental_accuracy(matrix, weights=None) -> float:
    seen = seen_accuracy(matrix, weights)
    return sum(seen) / len(seen)


def forgetting_per_experience(matrix) -> list[float]:
    """max_{l < T-1} A[l][j] - A[T-1][j] for every old experience j < T-1."""
    rows = _check(matrix)
    last = len(rows) - 1
    return [max(rows[l][j] for l in range(j, last)) - rows[last][j] for j in range(last)]


def average_forgetting(matrix) -> float:
    values = forgetting_per_experience(matrix)
    return sum(values) / len(values) if values else 0.0


def backward_transfer(matrix) -> float:
    rows = _check(matrix)
    last = len(rows) - 1
    values = [rows[last][j] - rows[j][j] for j in range(last)]
    return sum(values) / len(values) if values else 0.0


def unseen_accuracy(matrix) -> float:
    """Mean of A[i][j] over j > i: accuracy on classes whose images were never trained on. Above
    zero means knowledge of future classes reached the model (e.g. through an unmasked teacher)."""
    rows = _check(matrix)
    values = [rows[i][j] for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class ContinualMetrics:
    """Every number a continual record carries, computed from the accuracy matrices."""

    accuracy_matrix: list[list[float]]
    top5_matrix: list[list[float]]
    seen_accuracy: list[float]
    seen_top5: list[float]
    final_accuracy: float
    final_top5: float
    average_incremental_accuracy: float
    forgetting: float
    bwt: float
    unseen_accuracy: float

    def to_record(self) -> dict:
        return asdict(self)


def summarise(top1_matrix, top5_matrix=None, weights=None) -> ContinualMetrics:
    top1 = _check(top1_matrix)
    top5 = _check(top5_matrix) if top5_matrix is not None else top1
    seen1, seen5 = seen_accuracy(top1, weights), seen_accuracy(top5, weights)
    return ContinualMetrics(
        accuracy_matrix=top1, top5_matrix=top5, seen_accuracy=seen1, seen_top5=seen5,
        final_accuracy=seen1[-1], final_top5=seen5[-1],
        average_incremental_accuracy=sum(seen1) / len(seen1), forgetting=average_forgetting(top1),
        bwt=backward_transfer(top1), unseen_accuracy=unseen_accuracy(top1))
