"""The configuration schema: the frozen dataclasses a task, a method, a suite and their parts
are made of. A leaf module: it imports nothing else of cdabench, so every layer can name these
types; loading from TOML and cross-checks happen at the edge (config.py). Each class validates
its own fields in __post_init__ (a ValueError that names the field and its allowed values).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field


# ---------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentSpec:
    """What a training batch goes through: crop, flip, then optional batch mixing.

    crop: "rrc" (RandomResizedCrop with scale (min_scale, 1)), "pad" (RandomCrop with zero
    padding `pad`, the CIFAR recipe) or "none". mix: "none", "cutmix" (Beta(alpha, alpha), p=1)
    or "mixup"."""

    crop: str = "rrc"
    min_scale: float = 0.08
    pad: int = 4
    flip: bool = True
    mix: str = "none"
    mix_alpha: float = 1.0

    def __post_init__(self):
        if self.crop not in ("rrc", "pad", "none"):
            raise ValueError(f"unknown crop {self.crop!r}: use rrc, pad or none")
        if self.mix not in ("none", "cutmix", "mixup"):
            raise ValueError(f"unknown mix {self.mix!r}: use none, cutmix or mixup")


# ---------------------------------------------------------------- crop-scale curriculum
CROP_KINDS = ("none", "fixed", "step", "linear", "cosine")


@dataclass(frozen=True)
class CropSchedule:
    """The crop-scale curriculum: SRe2L's fixed bound and CDA's easy-to-hard schedules (methods.md sections 2-3).

    Only the lower bound of RandomResizedCrop's scale moves; the upper bound stays at `max_scale`.
    With milestone m (the fraction of the T iterations the curriculum spans), for t < m*T:
        step:    lower = max_scale
        linear:  lower = min + (max - min) * (1 - t / (m*T))
        cosine:  lower = min + (max - min) * (1 + cos(pi * t / (m*T))) / 2
    and lower = min for t >= m*T. `fixed` is SRe2L (m irrelevant); `none` means no crop at all
    (SRe2L's CIFAR-100 recipe, roll jitter only). `reverse=True` runs hard-to-easy, the variant the
    CDA ablation found worse; it is here for ablations only."""

    kind: str = "fixed"
    milestone: float = 1.0
    min_scale: float = 0.08
    max_scale: float = 1.0
    reverse: bool = False

    def __post_init__(self):
        if self.kind not in CROP_KINDS:
            raise ValueError(f"unknown crop schedule {self.kind!r}: use one of {', '.join(CROP_KINDS)}")
        if not 0.0 <= self.milestone <= 1.0:
            raise ValueError(f"crop milestone must lie in [0, 1], got {self.milestone}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")

    @property
    def crops(self) -> bool:
        return self.kind != "none"

    def lower(self, t: int, total: int) -> float:
        """The scale lower bound at iteration t (0-based) of `total`."""
        if self.kind == "none":
            return self.max_scale
        if self.reverse:
            t = total - 1 - t
        span = self.milestone * total
        if self.kind == "fixed" or t >= span:
            return self.min_scale
        progress = t / span
        width = self.max_scale - self.min_scale
        if self.kind == "step":
            return self.max_scale
        if self.kind == "linear":
            return self.min_scale + width * (1.0 - progress)
        return self.min_scale + width * (1.0 + math.cos(math.pi * progress)) / 2.0

    def scale(self, t: int, total: int) -> tuple[float, float]:
        return (self.lower(t, total), self.max_scale)


# ---------------------------------------------------------------- recover (SRe2L / CDA)
@dataclass(frozen=True)
class RecoverConfig:
    iterations: int = 1000
    lr: float = 0.25
    r_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    batch_size: int = 100
    jitter: int = 4
    jitter_symmetric: bool = False   # offsets in [-J, J] (SRe2L's Tiny script) instead of [0, J]
    flip: bool = True
    crop: CropSchedule | None = None   # None: the method's own schedule (config.recover_config)
    image_format: str = "png"        # "jpeg75" reproduces the official output
    precision: str | None = None     # "fp32" | "bf16" (teacher forward under bf16 autocast); None: the task's
    clamp_to: str = "normalised"     # "normalised": per-channel image of [0,1]; "unit": [0,1] (ImageNet-21K-P)
    # Shards optimised together in one teacher forward (K x batch_size images). 0: automatic, 1 on
    # a CPU (no reliable gain measured there; bitwise resume) and what free memory holds on a GPU
    # (docs/recover.md).
    shards_per_forward: int = 0
    # torch.compile of the teacher's hooked forward, compiled once per recover run (eager when
    # compilation fails here). A step equals eager's to float rounding; at the Tiny-ImageNet shape on
    # a CPU core 1.8x the official loop in fp32 and 7x with bf16, after about a minute of compiling;
    # compiled bf16 kept the accuracy on the embedded default (docs/recover.md).
    compile: bool = False

    def __post_init__(self):
        if self.shards_per_forward < 0:
            raise ValueError(f"shards_per_forward must be >= 0 (0: automatic), got {self.shards_per_forward}")

    def to_dict(self) -> dict:
        """What the images depend on. `shards_per_forward` and `compile` say only how the work runs
        (each shard's images are the same up to float rounding; its marker records both), so they
        are left out: distill keys and distill.json stay those of earlier versions, and a run
        resumes with another K or with compilation switched."""
        settings = asdict(self)
        del settings["shards_per_forward"], settings["compile"]
        return settings


# ---------------------------------------------------------------- training recipes, tasks, methods
@dataclass(frozen=True)
class TrainRecipe:
    """How a model is trained: the teacher on real data, or a student on a distilled set."""

    model: str = "resnet18"
    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"              # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_matrices_only: bool = False   # weight decay only on parameters with ndim > 1 (the ImageNet recipe)
    warmup_epochs: int = 0              # linear warm-up from warmup_start x lr
    warmup_start: float = 0.01
    schedule: str = "cosine"            # cosine (per step, to 0) | constant
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    patch_size: int | None = None       # ViTs only: the patch size (None: the registry's choice for the size)
    # ResNets only: zero-initialise the last BN gamma of every block (torchvision's option of this
    # name). Off = torchvision's default init, the official models'; the digits tasks turn it on.
    zero_init_residual: bool = False

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")


@dataclass(frozen=True)
class StudentOverride:
    """Per-student settings of the post-train protocol (tuned on the held-out split, never on test)."""

    epochs: int | None = None
    full_epochs: int | None = None      # this student's epochs on the `full` baseline (over the task's)
    full_batch_size: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    full_lr: float | None = None        # on the `full` baseline: 13x the images a step sees in an epoch
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    full_warmup_epochs: int | None = None   # on the `full` baseline (a warm-up sized for a set's epochs can outlast it)
    augment: AugmentSpec | None = None
    patch_size: int | None = None


@dataclass(frozen=True)
class KDConfig:
    """Soft labels: `online` (the teacher labels every augmented batch) or `stored` (FKD-style
    label store, generated once and replayed); loss KL(student/T || teacher/T), x T^2 if asked."""

    mode: str = "online"
    temperature: float = 4.0
    t_squared: bool = True
    topk: int = 0                       # stored mode: keep only the top-k logits (0 = all)

    def __post_init__(self):
        if self.mode not in ("online", "stored"):
            raise ValueError(f"kd mode must be online or stored, got {self.mode!r}")


@dataclass(frozen=True)
class PostTrain:
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    kd: KDConfig = field(default_factory=KDConfig)
    students: dict[str, StudentOverride] = field(default_factory=dict)
    # The `full` baseline's epochs; None = the same epochs as every other method. A task may set the
    # same number of optimiser steps instead (equal compute), when equal epochs over the whole real
    # set would dominate its budget; the record says which (docs/digits.md).
    full_epochs: int | None = None
    full_batch_size: int | None = None  # the `full` baseline's batch (None: the recipe's)
    # Cells at any IPC train for the optimiser steps of a cell at this IPC (epochs scaled by the
    # ratio of steps per epoch, rounded up); None: the same epochs at every IPC, the papers' rule.
    # A budget choice for tasks whose small-IPC cells would otherwise get a handful of steps
    # (digits IPC 1: one step per epoch); recorded in every record's recipe (docs/digits.md).
    equal_steps_ipc: int | None = None

    def __post_init__(self):
        if self.equal_steps_ipc is not None and self.equal_steps_ipc < 1:
            raise ValueError(f"equal_steps_ipc must be a positive IPC, got {self.equal_steps_ipc}")

    def recipe_for(self, student: str, full: bool = False, images: int | None = None,
                   classes: int | None = None) -> TrainRecipe:
        """The protocol for one student: the shared recipe with that student's overrides. `images`
        and `classes`: the size of the set it trains on, which sets its epochs under equal_steps_ipc."""
        changes = {"model": student}
        override = self.students.get(student)
        full_changes = {"epochs": self.full_epochs, "batch_size": self.full_batch_size}
        if override is not None:
            for f in dataclasses.fields(override):
                value = getattr(override, f.name)
                if value is None:
                    continue
                if f.name.startswith("full_"):
                    full_changes[f.name.removeprefix("full_")] = value
                else:
                    changes[f.name] = value
        if full:
            changes.update({k: v for k, v in full_changes.items() if v is not None})
        recipe = dataclasses.replace(self.recipe, **changes)
        if full or self.equal_steps_ipc is None or images is None:
            return recipe
        if classes is None:
            raise ValueError("equal_steps_ipc needs the number of classes to size the reference set")
        reference_steps = math.ceil(self.equal_steps_ipc * classes / recipe.batch_size)
        steps_per_epoch = math.ceil(images / recipe.batch_size)
        # The warm-up scales with the epochs, so the whole schedule is the reference cell's in steps.
        return dataclasses.replace(
            recipe, epochs=math.ceil(recipe.epochs * reference_steps / steps_per_epoch),
            warmup_epochs=math.ceil(recipe.warmup_epochs * reference_steps / steps_per_epoch))


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    description: str = ""
    image_size: int | None = None       # None: the dataset's default working size
    ipcs: tuple[int, ...] = (10,)
    holdout_fraction: float | None = None
    holdout_per_class: int | None = None
    split_seed: int = 0
    probe_per_class: int = 10           # held-out images per class for the class-order guard
    # The cross-architecture panel: the students a cross-arch suite post-trains when it names none.
    # The papers' tasks keep the standard models; a task of far smaller images may size them for its
    # data (digits: engine/models.py's small-data panel, a named deviation in docs/digits-narrow-panel.md).
    panel: tuple[str, ...] = ("resnet18", "resnet50", "mobilenetv2", "deit_tiny")
    # fp32 | bf16: autocast of every forward pass (teacher training, recover, relabel, post-train,
    # evaluation). fp32 is what the papers' numbers came from; `--precision` overrides it.
    precision: str = "fp32"
    teacher: TrainRecipe = field(default_factory=TrainRecipe)
    # The seed the teacher is trained with (a trained teacher only; 0 keeps every key of a task
    # that predates it). Another seed is another draw of the teacher, and so of every set and
    # label it makes: the way to measure how much a run's results owe to its one teacher.
    teacher_seed: int = 0
    # A checkpoint the teacher is loaded from instead of trained (its recipe then only names the
    # architecture): a file shipped in cdabench/builtin/teachers/ by name, or a path. The smoke task
    # ships one so that every machine's regression check starts from the same teacher: a teacher
    # trained on another CPU's float path moves the ten-seed mean of its CDA cell by up to 6 points
    # (docs/suites.md). `--teacher` overrides it.
    teacher_checkpoint: str | None = None
    recover: dict[str, RecoverConfig] = field(default_factory=dict)
    posttrain: PostTrain = field(default_factory=PostTrain)
    path: str = ""

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if (self.holdout_fraction is None) == (self.holdout_per_class is None):
            raise ValueError("set exactly one of holdout_fraction / holdout_per_class")
        if self.teacher_checkpoint and self.teacher_seed != 0:
            raise ValueError(f"teacher_seed = {self.teacher_seed} seeds a trained teacher, but this task loads its "
                             f"teacher from teacher_checkpoint {self.teacher_checkpoint!r}: remove one of the two")


VALUE_SPACES = ("pixel", "normalized", "zca")
LABEL_SOURCES = ("auto", "hard", "logits", "fkd")


@dataclass(frozen=True)
class ExternalSource:
    """A distilled set another method made, as that method ships it (docs/bring-your-own.md).

    path: its file or folder (relative paths: to the method entry's folder). format: a reader of
    cdabench/distill/formats.py, or "auto" (detected from the path). space: what the image values
    are: "pixel" ([0, 1] units, or uint8 files), "normalized" ((pixel - mean) / std with the
    method's `mean`/`std`; empty: the task's) or "zca" (kornia's ZCAWhitening(eps=zca_eps) fitted
    on the task's [0, 1] training images, as MTT/DATM run with --zca). labels: the method's own
    labels, used by `method`-label cells: "hard" (the class indices), "logits" (per-image logits
    shipped with the set), "fkd" (an FKD soft-label directory, `fkd_path`), or "auto" (logits when
    the set has them, fkd when fkd_path is set, else hard); logits and FKD labels are used through
    softmax at `temperature` (x T^2 if `t_squared`), the method's protocol. class_order: the task
    class of each of the set's label indices, for sets labelled by index (tensor files, folders named
    by integer); empty: index k is the task's class k."""

    path: str
    format: str = "auto"
    space: str = "pixel"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    zca_eps: float = 0.1
    labels: str = "auto"
    temperature: float = 1.0
    t_squared: bool = False
    fkd_path: str = ""
    fkd_seed: int = 42                   # the relabel script's RandomSampler seed (SRe2L/CDA/D4M: 42)
    fkd_input_size: int | None = None    # the relabel crop size in pixels (None: the stored images' size)
    learned_lr: bool = True              # method-label cells train at the set's learned lr, when it has one
    experiment: int = 0                  # DC/DSA/DM res_*.pt files: which experiment's set
    class_order: tuple[str, ...] = ()
    ipc: int | None = None               # images per class, checked on reading (a suite needs it to place the set)

    def __post_init__(self):
        if self.space not in VALUE_SPACES:
            raise ValueError(f"space must be one of {', '.join(VALUE_SPACES)}, got {self.space!r}")
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"labels must be one of {', '.join(LABEL_SOURCES)}, got {self.labels!r}")
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have one value per channel each (or both be empty)")
        if self.space != "normalized" and (self.mean or self.std):
            raise ValueError(f"mean/std describe a normalized set, but space is {self.space!r}")
        if self.labels == "fkd" and not self.fkd_path:
            raise ValueError("labels = 'fkd' needs fkd_path, the FKD soft-label directory (epoch_<e>/batch_<b>.tar)")
        if self.temperature <= 0 or self.zca_eps <= 0:
            raise ValueError("temperature and zca_eps must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Method:
    """A way to produce a distilled set: `recover` (SRe2L/CDA: the task's [recover.<name>]
    settings with this crop schedule), `select` (real images: random, herding, full), `noise`
    (the recover start point, N(0, 1) in the normalised space, never optimised: the floor every
    distilled set must clear by a wide margin) or `external` (a set another method made, read as
    that method ships it: the [source] table)."""

    name: str
    kind: str                          # recover | select | noise | external
    description: str = ""
    strategy: str = ""                 # select: random | herding | full
    crop: CropSchedule | None = None   # recover: the default crop schedule (a task may override)
    source: ExternalSource | None = None   # external: where the set is and how to read it
    citation: str = ""                 # the paper (and code) the method comes from
    path: str = ""

    def __post_init__(self):
        if self.kind not in ("recover", "select", "noise", "external"):
            raise ValueError(f"method kind must be recover, select, noise or external, got {self.kind!r}")
        if self.kind == "select" and self.strategy not in ("random", "herding", "full"):
            raise ValueError(f"select strategy must be random, herding or full, got {self.strategy!r}")
        if self.kind == "recover" and self.crop is None:
            raise ValueError("a recover method needs a [crop] table")
        if (self.kind == "external") != (self.source is not None):
            raise ValueError("an external method needs a [source] table (path, format, space, labels, ...), "
                             "and only an external method has one")


# ---------------------------------------------------------------- suites
@dataclass(frozen=True)
class Suite:
    name: str
    kind: str = "cross-arch"
    description: str = ""
    task: str = "digits"
    methods: tuple[str, ...] = ("cda", "sre2l", "random", "herding", "full")
    ipcs: tuple[int, ...] = ()               # empty: the task's IPCs
    students: tuple[str, ...] = ()           # empty: the task's panel
    labels: tuple[str, ...] = ("soft",)
    hard_label_methods: tuple[str, ...] = ()  # these methods also run with hard labels (fairness pair; with
                                              # `full`: the hard-label recovery, docs/suites.md)
    no_augment_methods: tuple[str, ...] = ()  # these methods also run with the student's augmentation off
                                              # (the augmentation share; needs `random`, docs/suites.md)
    seeds: tuple[int, ...] = (0, 1)
    path: str = ""


# ---------------------------------------------------------------- continual suites (docs/continual.md)
CONTINUAL_PROTOCOLS = ("retrain", "sequential")


@dataclass(frozen=True)
class SequentialSettings:
    """Training of the sequential protocol (not tuned: Avalanche's example values where it has them)."""

    epochs: int = 2                 # per experience
    batch_size: int = 32            # stream mini-batch; replay/DER/ER-ACE add a memory batch of the same size
    optimizer: str = "adam"         # adam | sgd; constant learning rate (Avalanche's default loop)
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 10.0
    der_alpha: float = 0.1
    der_beta: float = 0.5

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"sequential optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("sequential epochs and batch_size must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ContinualSuite:
    name: str
    kind: str = "continual"
    description: str = ""
    task: str = "digits"
    steps: tuple[int, ...] = (5,)
    protocols: tuple[str, ...] = CONTINUAL_PROTOCOLS
    strategies: tuple[str, ...] | None = None   # None: every registered strategy (evaluate/continual/strategies.py)
    memories: tuple[str, ...] = ("random", "herding", "cda", "sre2l")   # replay memories (and retrain's by default)
    retrain_memories: tuple[str, ...] | None = None   # None: the same as memories
    unmasked: tuple[str, ...] = ()        # retrain also runs the papers' unmasked variant for these memories
    ipc: int | None = None                # images per class of every memory; None: the task's first IPC
    seeds: tuple[int, ...] = (0,)         # seeds the class order, the memory selection and the training
    class_order: str = "cdabench"         # or "sre2l-cl": the official SRe2L continual script's permutation
    student: str = "resnet18"
    retrain_epochs: int | None = None     # None: the task's post-train epochs
    sequential: SequentialSettings = field(default_factory=SequentialSettings)
    path: str = ""
