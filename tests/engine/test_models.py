"""The model registry and the adaptations it names: the small-image strides and patches give the
feature maps the docs promise; a name is registered once."""
from __future__ import annotations

import pytest
import torch

from cdabench.engine.models import MODELS, create_model, describe_adaptation, mobilenetv2_stride1_stages, register_model


@pytest.mark.parametrize("size, stages, side", [(8, [1, 2], 2), (16, [1], 2), (32, [], 2), (64, [], 4)])
def test_mobilenetv2_keeps_a_2x2_last_map(size, stages, side):
    assert mobilenetv2_stride1_stages(size) == stages
    model = create_model("mobilenetv2", 10, 1, size).eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 1, size, size)).shape[-2:] == (side, side)
    assert describe_adaptation("mobilenetv2", size).endswith(f"stride-1 stages {stages}" if stages else "stride-1 stem")


def test_deit_patch_size():
    assert create_model("deit_tiny", 10, 1, 8).patch_embed.grid_size == (8, 8)           # the registry's default
    assert create_model("deit_tiny", 10, 1, 8, patch_size=4).patch_embed.grid_size == (2, 2)
    assert describe_adaptation("deit_tiny", 8, 4) == "deit_tiny_patch16_224, img_size 8, patch 4"
    with pytest.raises(ValueError, match="does not divide the image size 8"):
        create_model("deit_tiny", 10, 1, 8, patch_size=3)
    with pytest.raises(ValueError, match="no patches; only deit_tiny"):
        create_model("resnet18", 10, 1, 8, patch_size=4)


def test_the_model_registry_refuses_a_second_entry_of_a_name():
    entry = MODELS["resnet18"]
    with pytest.raises(ValueError, match=r"model 'resnet18' is already registered \(timm ResNet.*pick another name"):
        register_model("resnet18", "resnet34", "another resnet18", lambda timm_name, size: timm_name)(lambda *args: None)
    assert MODELS["resnet18"] is entry
