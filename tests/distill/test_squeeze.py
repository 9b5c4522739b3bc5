"""The teacher a distillation uses: a checkpoint of another class count is refused, and the
class-order guard trips on a teacher whose head is permuted."""
from __future__ import annotations

import pytest
import torch

from cdabench.distill.squeeze import load_teacher
from cdabench.engine.models import create_model
from tests.fixtures import run_cli


def test_teacher_with_wrong_class_count(capsys, cli_common, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "five.pt"
    torch.save(create_model("resnet18", 5, 1, 8).state_dict(), path)
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(path),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and "has 5 classes but dataset digits has 10" in text


@pytest.mark.slow
def test_teacher_with_permuted_head_trips_class_order_guard(capsys, cli_common, tiny_ctx, tiny_teacher, tmp_path):
    state = {k: v.detach().clone() for k, v in tiny_teacher.model.state_dict().items()}
    good = tmp_path / "good.pt"
    torch.save(state, good)
    assert load_teacher(tiny_ctx, good).info["probe_top1"] >= 50.0   # the unpermuted head passes the guard
    state["fc.weight"] = torch.roll(state["fc.weight"], 1, dims=0)   # class c now answers as c+1
    state["fc.bias"] = torch.roll(state["fc.bias"], 1, dims=0)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, text = run_cli(capsys, ["distill", *cli_common, "--method", "herding", "--ipc", "1", "--teacher", str(bad),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and "class-order guard" in text and "do not match the dataset's class order" in text
    assert not (tmp_path / "out" / "manifest.json").exists()
