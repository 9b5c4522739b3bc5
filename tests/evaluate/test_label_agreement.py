"""The label-agreement guard (distill/squeeze.py): a foreign folder whose labels the task's teacher
agrees with at most 2 x chance is refused as a probably permuted class map; strictly above that it
is evaluated; our own sets (with our manifest, whose class map is recorded and checked) are never
refused, however little the teacher agrees with them: the agreement is recorded."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cdabench.cli import main
from cdabench.data import DataError
from cdabench.distill.squeeze import label_agreement_guard
from cdabench.engine.train import ImageBank, to_unit


def _bank_agreeing_on(tiny_ctx, tiny_teacher, n: int, agreeing: int) -> ImageBank:
    """`n` held-out images labelled with the teacher's own prediction for the first `agreeing` of
    them and another class for the rest: the teacher agrees with exactly agreeing / n of the labels."""
    heldout = tiny_ctx.source("heldout")
    images = heldout.images[:n]
    with torch.no_grad():   # one batch of n, as the guard's own evaluation runs it: the same predictions
        predicted = tiny_teacher.model(tiny_ctx.normalizer()(to_unit(images, tiny_ctx.device))).argmax(1)
    labels = torch.where(torch.arange(n) < agreeing, predicted, (predicted + 1) % tiny_ctx.num_classes)
    return ImageBank(images, labels)


@pytest.mark.parametrize("agreeing, refused", [(10, True), (11, False), (0, True)])
def test_the_guard_refuses_at_most_twice_chance(tiny_ctx, tiny_teacher, agreeing, refused):
    """10 classes, 50 images: 10 agreeing = 20.0 % = 2 x chance exactly, refused; 11 = 22 %, evaluated."""
    bank = _bank_agreeing_on(tiny_ctx, tiny_teacher, 50, agreeing)
    if refused:
        with pytest.raises(DataError, match=rf"agrees with the folder labels of x on only {2 * agreeing:.1f}% "
                                             r"of its 50 images \(chance 10.0%\)"):
            label_agreement_guard(tiny_ctx, tiny_teacher, bank, "x")
    else:
        assert label_agreement_guard(tiny_ctx, tiny_teacher, bank, "x") == pytest.approx(2.0 * agreeing)
    # Not enforced (our own sets): the same agreement, measured and returned, never refused.
    assert label_agreement_guard(tiny_ctx, tiny_teacher, bank, "x", enforce=False) == pytest.approx(2.0 * agreeing)


@pytest.mark.slow
def test_our_own_set_is_exempt_however_little_the_teacher_agrees(capsys, cli_common, distilled, tmp_path):
    """Our noise baseline (our manifest; images the teacher cannot read) is evaluated and its low
    agreement recorded; the very same images as a foreign folder (no manifest) are refused."""
    noise = distilled("noise")
    argv = ["evaluate", *cli_common, "--labels", "soft", "--epochs", "1", "--out", str(tmp_path / "runs")]
    assert main([*argv, "--data", str(noise)]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "runs" / "records.jsonl").read_text().splitlines()]
    assert record["method"] == "noise" and record["label_agreement"] <= 20.0, record["label_agreement"]
    foreign = tmp_path / "foreign"
    shutil.copytree(noise / "images", foreign)
    capsys.readouterr()
    assert main([*argv, "--data", str(foreign)]) == 2
    assert "label-agreement guard" in capsys.readouterr().err
    assert len((tmp_path / "runs" / "records.jsonl").read_text().splitlines()) == 1
