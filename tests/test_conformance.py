"""Conformance: the behaviour the papers' recipes define (shared/spec/methods.md), pinned so that a
drift fails here. Independent references only: torchvision's samplers and transforms, formulas
written out in the test, the task-settings tables of docs/methods.md parsed from the Markdown.
The reference recover loop (methods.md sections 2-3, written plainly) is in test_reference_loop.py."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision
from scipy import stats
from torchvision.transforms import v2

from cdabench.config import load_method, load_task, recover_config
from cdabench.data.registry import get_spec
from cdabench.distill.recover import cosine_lr, to_uint8
from cdabench.engine.augment import AugmentSpec, sample_aug_params, sample_crop_box
from cdabench.engine.context import eval_transform
from cdabench.engine.labels import OnlineKD, kd_loss
from cdabench.engine.models import create_model
from cdabench.engine.train import ImageBank, Normalizer
from cdabench.evaluate.continual.retrain import run_retrain
from cdabench.evaluate.continual.scenario import build_scenario, class_order

from tests.fixtures import REPO, TinyBNNet, make_tiny_bn_net

DOCS = REPO / "docs" / "methods.md"
PAPERS_TASKS = ("imagenet-1k", "tiny-imagenet", "cifar100", "imagenet-21k")


def docs_table(heading: str) -> list[dict[str, str]]:
    """The first Markdown table after `### heading` in docs/methods.md, as dicts by column."""
    lines = DOCS.read_text().split(f"### {heading}\n", 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [dict(zip(block[0], row)) for row in block[2:]]


def augment_text(spec: AugmentSpec) -> str:
    parts = {"rrc": f"rrc {spec.min_scale:g}", "pad": f"pad {spec.pad}", "none": "none"}[spec.crop]
    parts += " + flip" if spec.flip else ""
    return parts + (f" + {spec.mix} {spec.mix_alpha:g}" if spec.mix != "none" else "")


def yes(value: bool) -> str:
    return "yes" if value else "no"


# ------------------------------------------------------------------ task settings = the docs' tables
def test_every_papers_task_recover_setting_equals_the_docs_table():
    table = docs_table("Recover")
    assert {(r["task"], r["method"]) for r in table} == {(t, m) for t in PAPERS_TASKS for m in ("sre2l", "cda")}
    for row in table:
        config = recover_config(load_task(row["task"]), load_method(row["method"]))
        low = -config.jitter if config.jitter_symmetric else 0
        crop = {"fixed": "fixed", "none": "none"}.get(config.crop.kind, f"{config.crop.kind} m={config.crop.milestone:g}")
        if config.crop.kind == "fixed":
            assert (config.crop.min_scale, config.crop.max_scale) == (0.08, 1.0)
        measured = {"iterations": str(config.iterations), "lr": f"{config.lr:g}", "r_bn": repr(config.r_bn),
                    "batch": str(config.batch_size), "jitter range": f"{low}..{config.jitter}", "crop": crop,
                    "flip": yes(config.flip), "format": config.image_format, "clamp": config.clamp_to}
        for column, value in measured.items():
            assert value == row[column], (row["task"], row["method"], column, value, row[column])
        assert config.first_bn_multiplier == 10.0 and config.precision == "fp32"


def test_every_papers_task_teacher_recipe_equals_the_docs_table():
    table = docs_table("Teacher (squeeze)")
    assert sorted(r["task"] for r in table) == sorted(PAPERS_TASKS)
    for row in table:
        recipe = load_task(row["task"]).teacher
        measured = {"model": recipe.model, "epochs": str(recipe.epochs), "batch": str(recipe.batch_size),
                    "optimizer": recipe.optimizer, "lr": f"{recipe.lr:g}", "momentum": f"{recipe.momentum:g}",
                    "weight decay": f"{recipe.weight_decay:.4f}".rstrip("0"),
                    "warm-up epochs": str(recipe.warmup_epochs), "schedule": recipe.schedule,
                    "augment": augment_text(recipe.augment)}
        for column, value in measured.items():
            assert value == row[column], (row["task"], column, value, row[column])


def test_every_papers_task_posttrain_protocol_equals_the_docs_table():
    table = docs_table("Post-train (student)")
    assert sorted(r["task"] for r in table) == sorted(PAPERS_TASKS)
    for row in table:
        task = load_task(row["task"])
        recipe, kd = task.posttrain.recipe, task.posttrain.kd
        measured = {"optimizer": recipe.optimizer, "lr": f"{recipe.lr:g}",
                    "weight decay": f"{recipe.weight_decay:.4f}".rstrip("0"),
                    "decay only ndim > 1": yes(recipe.decay_matrices_only), "epochs": str(recipe.epochs),
                    "batch": str(recipe.batch_size), "labels": kd.mode, "T": repr(kd.temperature),
                    "T²": yes(kd.t_squared), "augment": augment_text(recipe.augment)}
        for column, value in measured.items():
            assert value == row[column], (row["task"], column, value, row[column])


def test_the_spec_values_the_tables_must_hold():
    """A few spec values written out here as well, so that editing the table and the task together
    cannot silently move away from the papers (methods.md sections 1-5)."""
    tiny = load_task("tiny-imagenet")
    sre2l, cda = (recover_config(tiny, load_method(m)) for m in ("sre2l", "cda"))
    assert (sre2l.lr, sre2l.r_bn, sre2l.jitter_symmetric) == (0.1, 1.0, True)
    assert (cda.lr, cda.r_bn, cda.jitter, cda.crop.kind, cda.crop.milestone) == (0.4, 0.05, 4, "cosine", 1.0)
    cifar = recover_config(load_task("cifar100"), load_method("sre2l"))
    assert (cifar.crop.crops, cifar.flip) == (False, False)            # roll only
    assert (tiny.teacher.epochs, tiny.teacher.lr, tiny.teacher.warmup_epochs, tiny.teacher.warmup_start) == \
        (50, 0.2, 5, 0.01)
    assert (tiny.posttrain.kd.temperature, tiny.posttrain.kd.t_squared) == (20.0, True)
    imagenet = load_task("imagenet-1k")
    assert (imagenet.posttrain.kd.mode, imagenet.posttrain.kd.temperature, imagenet.posttrain.kd.t_squared) == \
        ("stored", 20.0, False)
    assert imagenet.posttrain.recipe.augment.mix == "cutmix" and imagenet.posttrain.recipe.augment.mix_alpha == 1.0


# ----------------------------------------------------------------------------------- recover pieces
def test_crop_sampler_matches_torchvision_in_distribution():
    """Area fraction and log aspect ratio of our RandomResizedCrop boxes against torchvision's
    own sampler (get_params), 4000 boxes each, at a 0.08-1 and a curriculum scale."""
    image = torch.zeros(3, 64, 64)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for scale in ((0.08, 1.0), (0.5, 1.0)):
        ours = np.array([sample_crop_box(rng, 64, 64, scale) for _ in range(4000)])
        theirs = np.array([v2.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
                           for _ in range(4000)])
        for column in (lambda b: b[:, 2] * b[:, 3] / 64 ** 2, lambda b: np.log(b[:, 3] / b[:, 2])):
            assert stats.ks_2samp(column(ours), column(theirs)).pvalue > 1e-3
        assert (ours[:, 2:] >= 1).all() and (ours[:, :2] + ours[:, 2:] <= 64).all()


@pytest.mark.parametrize("box", [(3, 8, 7, 6), (1, 4, 11, 12), (2, 3, 9, 13), (0, 0, 16, 15)])
def test_crop_gradient_is_zero_outside_the_box_and_equals_torchvisions(box):
    """The official loop crops with torchvision (a slice, then a resize): pixels outside the box get
    no gradient at all, so Adam leaves them alone. Ours must too (exactly), and match inside."""
    from cdabench.engine.augment import crop_resize
    import torchvision.transforms.functional as TF
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    weight = torch.randn(2, 3, 16, 16)
    (crop_resize(x, torch.tensor([box, box]), (16, 16)) * weight).sum().backward()
    ours, x.grad = x.grad.clone(), None
    (TF.resized_crop(x, *box, [16, 16], antialias=True) * weight).sum().backward()
    top, left, h, w = box
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[top:top + h, left:left + w] = False
    assert torch.equal(ours[..., outside], torch.zeros_like(ours[..., outside]))
    assert torch.allclose(ours, x.grad, atol=1e-5)


def test_cosine_lr_is_the_papers_formula():
    for t, total in ((0, 4000), (1000, 4000), (2000, 4000), (3999, 4000)):
        assert cosine_lr(0.25, t, total) == pytest.approx(0.25 * 0.5 * (1 + math.cos(math.pi * t / total)))
    assert cosine_lr(0.4, 0, 10) == 0.4 and cosine_lr(0.4, 5, 10) == pytest.approx(0.2)


def test_saved_images_are_truncated_not_rounded():
    """Denormalise, clamp to [0, 1], x255 and truncate, as PIL's conversion in the official code."""
    mean, std = (0.5,), (0.25,)
    pixels = torch.tensor([0.0, 0.999 / 255, 254.9 / 255, 1.2, -0.3]).view(1, 1, 1, 5)
    x = (pixels - 0.5) / 0.25
    assert to_uint8(x, mean, std).flatten().tolist() == [0, 0, 254, 255, 0]


# ------------------------------------------------------------------------------ models and data views
@pytest.mark.parametrize("size, small", [(32, True), (64, True), (224, False)])
def test_resnet_stem_for_small_images(size, small):
    model = create_model("resnet18", 10, 3, size)
    conv = model.conv1
    if small:   # the field's CIFAR/Tiny ResNet: 3x3 stride-1 conv1, no max-pool
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
        assert isinstance(model.maxpool, torch.nn.Identity)
    else:
        assert (conv.kernel_size, conv.stride) == ((7, 7), (2, 2)) and isinstance(model.maxpool, torch.nn.MaxPool2d)


def test_resnets_have_torchvisions_initialisation():
    """No zero-initialised last BN gamma (timm's default); convolutions Kaiming-normal (fan_out)."""
    torch.manual_seed(0)
    ours = create_model("resnet50", 10, 3, 224)
    reference = torchvision.models.resnet50(num_classes=10)
    for name, bn in ours.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight)), name
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias)), name
    ours_convs = {n: m.weight for n, m in ours.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            expected = math.sqrt(2.0 / fan_out)
            assert ours_convs[name].std().item() == pytest.approx(expected, rel=0.15), name
    for task in PAPERS_TASKS:   # the papers' recipes keep it; only our digits tasks opt out
        recipes = (load_task(task).teacher, load_task(task).posttrain.recipe)
        assert not any(r.zero_init_residual for r in recipes), task
    zero = create_model("resnet18", 10, 3, 32, zero_init_residual=True)
    assert all(float(block.bn2.weight.detach().abs().sum()) == 0 for layer in (zero.layer1, zero.layer4) for block in layer)


@pytest.mark.parametrize("size", [64, 224])
def test_a_torchvision_resnet18_checkpoint_loads_and_computes_the_same(size):
    """A user's torchvision.models.resnet18 teacher (the official code's, with the small-image stem
    below 64 px) loads into our resnet18 as it is and gives the same logits."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=200)
    if size <= 64:   # the official small-image variant: conv1 3x3 stride 1, no max-pool
        reference.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        reference.maxpool = torch.nn.Identity()
    ours = create_model("resnet18", 200, 3, size)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), reference.eval()(x), atol=1e-5)


def test_imagenet_eval_view_is_resize_256_centre_crop_224():
    """Photos: Resize(shorter side 256) then CenterCrop(224) at the 224 px working size, computed
    here with PIL independently of the transform under test."""
    from PIL import Image

    class Data:   # the two fields eval_transform reads
        spec = get_spec("imagenet-1k")
        image_size = 224

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    image = torch.from_numpy(array).permute(2, 0, 1)
    view = eval_transform(Data())(image)
    pil = Image.fromarray(array).resize((round(400 * 256 / 300), 256), Image.BILINEAR)
    left, top = (pil.width - 224) // 2, (pil.height - 224) // 2
    expected = torch.from_numpy(np.array(pil.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1)
    assert view.shape == (3, 224, 224)
    assert (view.int() - expected.int()).abs().float().mean() < 1.0    # antialiased resizes agree to rounding
    assert eval_transform(type("D", (), {"spec": get_spec("tiny-imagenet"), "image_size": 64})()) is None


# ------------------------------------------------------------------------------------------ relabel
def test_fkd_labels_one_box_and_flip_per_image_and_cutmix_always():
    """Stored labels (ImageNet protocol): every image its own RandomResizedCrop box and flip, CutMix
    with p = 1 (every image mixed), its weight Beta(1, 1) = uniform before the box is cut."""
    spec = load_task("imagenet-1k").posttrain.recipe.augment
    rng = np.random.default_rng(0)
    params = sample_aug_params(rng, 128, 224, 224, spec)
    assert len({tuple(b) for b in params.boxes.tolist()}) > 100          # per image, not per batch
    assert 0.3 < params.flips.float().mean().item() < 0.7
    assert (params.partner >= 0).all()                                     # p = 1
    # The standard CutMix box for a weight lam: side sqrt(1 - lam) of the image, centre uniform,
    # clipped; the recorded weight is the unpasted area. Simulated here with Beta(1, 1) weights.
    def cutmix_weight(r: np.random.Generator) -> float:
        lam = r.beta(1.0, 1.0)
        cut = math.sqrt(1 - lam)
        ch, cw = int(224 * cut), int(224 * cut)
        cy, cx = r.integers(0, 224), r.integers(0, 224)
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, 224)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, 224)
        return 1 - (y2 - y1) * (x2 - x1) / 224 ** 2
    ours = [sample_aug_params(rng, 2, 224, 224, spec).lam[0].item() for _ in range(3000)]
    reference_rng = np.random.default_rng(1)
    reference = [cutmix_weight(reference_rng) for _ in range(3000)]
    assert stats.ks_2samp(ours, reference).pvalue > 1e-3


@pytest.mark.parametrize("task_name", ["tiny-imagenet", "cifar100", "imagenet-1k"])
def test_online_kd_runs_the_teacher_in_eval_mode_with_the_tasks_temperature(task_name):
    kd = load_task(task_name).posttrain.kd
    teacher = make_tiny_bn_net(in_chans=3, num_classes=5).train()   # handed over in train mode
    before = [b.running_mean.clone() for b in teacher.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    normalizer = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    source = OnlineKD(AugmentSpec(crop="none", flip=False), 8, teacher, normalizer, kd.temperature, kd.t_squared)
    x = torch.rand(6, 3, 8, 8)
    _, probs = source.prepare(x, torch.zeros(6, dtype=torch.long), None, 0, np.random.default_rng(0), None)
    assert not teacher.training                                            # eval mode: running statistics used
    after = [b.running_mean for b in teacher.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))           # and never updated
    with torch.no_grad():
        expected_probs = torch.softmax(teacher(normalizer(x)) / kd.temperature, dim=1)
    assert torch.allclose(probs, expected_probs, atol=1e-6)
    student = torch.randn(6, 5)
    factor = kd.temperature ** 2 if task_name == "tiny-imagenet" else 1.0   # T^2 on Tiny only (methods.md 5)
    assert kd.t_squared == (task_name == "tiny-imagenet")
    # The hand KL(p || q), batch mean, in float64 from the same inputs. At T = 20-30 the two
    # distributions are near uniform and the KL (~1e-3) is a small difference of terms of size
    # p |log p| + p |log q| (~3): float32 rounds each term by ~eps32 times its size, so the float32
    # loss may be off by eps32 x that sum, relative 1e-5..1e-4 of the KL (3.6e-5 measured on one
    # CPU), whatever the ISA. Exact arithmetic is checked in float64; the float32 loss within 4x
    # that bound (measured: 0.05-0.07 of it on AVX-512, AVX2 and the default ATen kernels).
    p, log_q = probs.double(), torch.log_softmax(student.double() / kd.temperature, 1)
    kl = factor * (p * (p.log() - log_q)).sum(1).mean().item()
    conditioning = factor * (p * (p.log().abs() + log_q.abs())).sum(1).mean().item()
    assert kd_loss(student.double(), p, kd.temperature, kd.t_squared).item() == pytest.approx(kl, rel=1e-12)
    float32_error = 4 * torch.finfo(torch.float32).eps * conditioning
    assert source.loss(student, probs).item() == pytest.approx(kl, rel=0, abs=float32_error)
    assert kd_loss(student, probs, kd.temperature, kd.t_squared).item() == pytest.approx(kl, rel=0, abs=float32_error)


# ---------------------------------------------------------------------------------- continual retrain
class _Recorder(torch.nn.Module):
    """Wraps a tiny net; notes which classes' images reach each training forward. Class c's images
    are constant images of value 20c, which crops and flips keep constant."""

    def __init__(self, net, log):
        super().__init__()
        self.net, self.log = net, log

    def forward(self, x):
        if self.training:
            pixel = x[:, 0, 0, 0] * 0.25 + 0.5                                   # undo the normaliser
            self.log[-1].update(int(round(v)) for v in (pixel * 255 / 20).tolist())
        return self.net(x)


def test_retrain_trains_a_fresh_student_per_step_on_the_seen_classes_only():
    classes, per_class = 6, 4
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = (labels * 20).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    bank = ImageBank(images, labels)
    scenario = build_scenario(bank, bank, classes, 3, 0, (0.5,), (0.25,))
    log, initial = [], []

    def make_model():   # not seeded here: run_retrain must seed every step's fresh model itself
        log.append(set())
        model = _Recorder(TinyBNNet(in_chans=1, num_classes=classes), log)
        initial.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    teacher = make_tiny_bn_net(in_chans=1, num_classes=classes)
    recipe = dataclasses.replace(load_task("digits").posttrain.recipe, epochs=1, batch_size=4, augment=AugmentSpec(crop="rrc", min_scale=0.5, flip=True))
    outcome = run_retrain(scenario, bank, teacher, make_model, recipe, load_task("digits").posttrain.kd,
                          Normalizer((0.5,), (0.25,), torch.device("cpu")), torch.device("cpu"), 0, 8)
    assert len(log) == scenario.num_steps == 3                               # one fresh model per step
    for state in initial[1:]:                                                # ... each from the same init
        assert all(torch.equal(state[k], initial[0][k]) for k in state)
    for step, seen_in_training in enumerate(log):
        assert seen_in_training == set(scenario.seen_classes(step)), step   # only (and all) seen classes
    assert [s["classes"] for s in outcome.steps] == [2, 4, 6]


def test_the_official_continual_class_order_is_available_exactly():
    """SRe2L-CL: np.random.seed(0); np.random.permutation(200) over sorted-wnid class indices."""
    state = np.random.get_state()
    np.random.seed(0)
    official = np.random.permutation(200).tolist()
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    assert class_order(200, 0, "sre2l-cl") == official
    assert np.array_equal(np.random.get_state()[1], before)              # no global state touched
    assert class_order(200, 0) != official                               # ours is another (named) order
    with pytest.raises(Exception, match="sre2l-cl"):
        class_order(10, 0, "official")
