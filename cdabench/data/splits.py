"""Seeded, stratified splits of a labelled set (e.g. a held-out part of the train split)."""

from __future__ import annotations

import numpy as np

from .errors import DataError


def _heldout_count(n_class: int, per_class: int | None, fraction: float | None) -> int:
    if per_class is not None:
        return per_class
    # round() then clamp so every class keeps at least one image on each side.
    return min(max(round(fraction * n_class), 1), n_class - 1)


def stratified_holdout(
    targets: np.ndarray,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (fit_indices, heldout_indices), both sorted int64.

    Exactly one of `per_class` (held-out images per class) or `fraction`
    (round(fraction * n_c) per class, at least 1 and at most n_c - 1) must be
    given. Only numpy.random.default_rng(seed) is used, never a global RNG, so
    the split depends on `targets` and `seed` alone.
    """
    if (per_class is None) == (fraction is None):
        raise DataError("stratified_holdout needs exactly one of per_class= or fraction=")
    if per_class is not None and (int(per_class) != per_class or per_class < 1):
        raise DataError(f"per_class must be a positive integer, got {per_class!r}")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise DataError(f"fraction must be strictly between 0 and 1, got {fraction!r}")
    targets = np.asarray(targets)
    if targets.ndim != 1 or len(targets) == 0:
        raise DataError("stratified_holdout needs a non-empty 1-D array of class labels")

    rng = np.random.default_rng(seed)
    fit, heldout = [], []
    # Classes in sorted order so the RNG stream is consumed deterministically.
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        needed = per_class + 1 if per_class is not None else 2
        if len(members) < needed:
            raise DataError(
                f"class {label} has only {len(members)} images but the held-out split needs at least {needed} "
                "(one must stay in the fit part); set a smaller held-out split with --holdout-per-class N "
                "(N < the smallest class) or --holdout-fraction F (the task file's holdout_per_class / "
                "holdout_fraction), or use more data"
            )
        count = _heldout_count(len(members), per_class, fraction)
        shuffled = rng.permutation(members)
        heldout.append(shuffled[:count])
        fit.append(shuffled[count:])
    return (
        np.sort(np.concatenate(fit)).astype(np.int64),
        np.sort(np.concatenate(heldout)).astype(np.int64),
    )
