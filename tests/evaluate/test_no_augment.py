"""A cell with the student's augmentation off trains on the images as stored, says so in its
record, and hashes another evaluation config than the same cell with it on."""
from __future__ import annotations

import pytest

from cdabench import records
from cdabench.cli import main
from cdabench.evaluate.posttrain import NO_AUGMENT


@pytest.mark.slow
def test_augmentation_off_is_recorded_and_keyed(cli_common, distilled, tmp_path):
    common = ["evaluate", *cli_common, "--data", str(distilled("random")), "--labels", "hard", "--epochs", "2",
              "--curve-points", "0", "--out", str(tmp_path)]
    assert main(common) == 0 and main([*common, "--no-augment"]) == 0
    on, off = records.read_records(tmp_path / "records.jsonl")
    assert (on["augmentation"], off["augmentation"]) == ("on", "off")
    assert on["recipe"]["augment"]["crop"] == "rrc" and off["recipe"]["augment"] == {
        "crop": NO_AUGMENT.crop, "min_scale": NO_AUGMENT.min_scale, "pad": NO_AUGMENT.pad, "flip": False,
        "mix": "none", "mix_alpha": NO_AUGMENT.mix_alpha}
    assert on["hashes"]["eval_config"] != off["hashes"]["eval_config"]
    assert {k: v for k, v in on["recipe"].items() if k != "augment"} == \
        {k: v for k, v in off["recipe"].items() if k != "augment"}
