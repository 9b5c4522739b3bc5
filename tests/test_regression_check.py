"""The smoke regression check catches real breakages, and only them.

Each breakage is injected the way a bug would arrive: the packaged smoke task with one setting
changed. The smoke cells it touches run on the smoke suite's first four seeds (one, where the
breakage moves every seed the same way by construction) and are compared with the committed
targets (cdabench/builtin/leaderboards/targets.csv, calibrated over ten seeds on five float
paths): the check must turn red on the target that names the breakage, and stay green on the
cells the breakage cannot touch. What each one moves (seeds 0-3, the packaged teacher, one
thread per process, on AVX-512 and on oneDNN's AVX2 path; docs/suites.md has the numbers):

- CDA's crop curriculum replaced by no crop: the CDA images are optimised on the whole image,
  the very view label agreement is measured on, so the teacher agrees with all of their labels:
  100 % in every seed on both paths, against the two-sided band 94.84 +- 3.08 (healthy sets:
  88-100 %, ten-seed means 94.2-95.3 per path). One seed decides it as well as four;
- the BN loss weight set to 0: the CDA images lose the BN statistics; CDA top-1 drops 10.9-11.7
  points (to 60.8 and 61.6, 6.5-7.3 below the band's floor 68.10; four seeds);
- the KD temperature 4 -> 1: every soft-label student moves: random real images drop 1.9-2.5
  points, outside that very stable cell's 1.16-point band, and CDA 6.2-8.8 points, below its band
  (four seeds); either failure turns the check red, and the label agreements (properties of the
  sets, which a student's temperature cannot touch: the very sets of a healthy run) stay green.

The teacher is the task's packaged checkpoint (`teacher_checkpoint`): no test depends on a cache
the host left, and every machine starts from the same teacher."""
from __future__ import annotations

from pathlib import Path

import pytest

from cdabench import packaged
from cdabench.harness.run import run_suite
from cdabench.harness.suites import load_suite
from cdabench.results.check import compare, read_targets
from tests.fixtures import suite_file

SMOKE_TASK = packaged.builtin("tasks", "digits-smoke.toml").read_text()
SEEDS = [0, 1, 2, 3]

# name: (edits of the task text, methods to run, the (method, metric, status) failures of which the
#        check must report at least one, seeds, the (method, metric) targets the breakage cannot
#        touch, which must stay ok)
BREAKAGES = {
    "cda-curriculum-replaced-by-no-crop": ([("[recover.cda]\n", '[recover.cda]\ncrop = { kind = "none" }\n')],
                                           ["cda"], [("cda", "label_agreement", "changed")], SEEDS[:1], []),
    "bn-loss-weight-zero": ([("r_bn = 0.01", "r_bn = 0.0")], ["cda"], [("cda", "top1", "regressed")], SEEDS, []),
    "kd-temperature-changed": ([("temperature = 4.0", "temperature = 1.0")], ["cda", "random"],
                               [("random", "top1", "regressed"), ("cda", "top1", "regressed")], SEEDS,
                               [("cda", "label_agreement"), ("random", "label_agreement")]),
}


def broken_task(folder: Path, edits: list[tuple[str, str]]) -> Path:
    """The smoke task with each `old` text replaced by `new` (each must occur: a renamed setting
    must fail this test loudly, not inject nothing), saved as digits-smoke.toml (the same task name)."""
    text = SMOKE_TASK
    for old, new in edits:
        assert old in text, f"the smoke task has no {old!r} any more: update this breakage"
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "digits-smoke.toml"
    path.write_text(text)
    return path


def narrowed_smoke(task: Path, methods: list[str], seeds: list[int], folder: Path) -> Path:
    """The smoke suite on `task`, narrowed to `methods` and `seeds`."""
    smoke = load_suite("smoke")
    return suite_file(folder / "suite.toml", task, base={}, methods=methods, students=list(smoke.students),
                      labels=list(smoke.labels), seeds=seeds)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_the_smoke_check_turns_red_on_a_real_breakage(name, tmp_path):
    edits, methods, expected, seeds, untouched = BREAKAGES[name]
    assert set(seeds) <= set(load_suite("smoke").seeds)
    task = broken_task(tmp_path / "task", edits)
    suite = load_suite(str(narrowed_smoke(task, methods, seeds, tmp_path)))
    results = run_suite(suite, tmp_path / "run", cache=str(tmp_path / "cache"), workers=1)
    assert not (tmp_path / "cache" / "teachers").exists()          # the packaged teacher, never a trained one
    targets = [t for t in read_targets() if t.task == "digits-smoke" and t.method in methods]
    status = {(s.target.method, s.target.metric): s for s in compare(results, targets)}
    assert all((method, metric) in status for method, metric, _ in expected), \
        f"the committed targets lack a target this test checks: {expected}"
    seen = [f"{m} {metric}: {status[(m, metric)].measured:.2f} against {status[(m, metric)].target.target_top1} "
            f"± {status[(m, metric)].target.tolerance} ({status[(m, metric)].status})" for m, metric, _ in expected]
    assert any(status[(m, metric)].status == want for m, metric, want in expected), \
        f"{name}: the check did not catch it: " + "; ".join(seen)
    assert all(status[(m, metric)].seeds == len(seeds) for m, metric, _ in expected)
    for cell in untouched:                                          # what the breakage cannot move stays green
        assert status[cell].status == "ok", (f"{name} cannot touch {cell}, yet the check says {status[cell].status} "
                                             f"({status[cell].measured} against {status[cell].target.target_top1} "
                                             f"± {status[cell].target.tolerance})")
