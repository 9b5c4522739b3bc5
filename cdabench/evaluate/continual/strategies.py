"""Sequential strategies: one registry entry per strategy (its memory kind and its Avalanche
builder), one `create_strategy` factory. Add a strategy by registering one more builder.

Strategies (avalanche-lib 0.6.0, its current benchmark API):
- `naive`: fine-tuning, the lower bound;
- `replay`: Naive + our memory plugin: after experience i the `ipc` memory images of each of its
  classes (random or herding exemplars, or a method's distilled images) join the memory, and every
  later mini-batch is a stream batch plus a memory batch (`ReplayDataLoader` with
  `oversample_small_tasks=True`, so a small memory is cycled, not exhausted after a few batches);
- `gdumb`, `der`, `er_ace`: Avalanche's own buffers, filled from the stream, `mem_size = ipc x classes`;
- `lwf`, `ewc`: regularisation, no memory.
iCaRL and the strategies broken with torch 2.14 are excluded (EXCLUDED gives the reasons).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cdabench.config import ConfigError
from cdabench.engine.train import ImageBank
from cdabench.evaluate.continual.scenario import avalanche_dataset, subset_by_classes
from cdabench.schema import SequentialSettings

MEMORY_KINDS = ("source", "own-buffer", "none")
EXCLUDED = {
    "icarl": "avalanche-lib 0.6.0's ICaRL reads experience.benchmark.n_classes_per_exp and .classes_order, "
             "which exist only on the legacy nc_benchmark scenarios; on the current class_incremental_benchmark "
             "it fails with AttributeError: 'DatasetExperience' object has no attribute 'benchmark'",
    "bic": "passes verbose= to torch's MultiStepLR, which torch 2.14 no longer accepts",
    "gem": "needs the quadprog QP solver (qpsolvers finds none installed)",
    "er_aml": "hangs in avalanche-lib 0.6.0",
}


@dataclass(frozen=True)
class StrategyMemory:
    """What a strategy's memory is made of: a memory source's images (`source`), or the size of
    the strategy's own buffer (`own-buffer`)."""

    bank: ImageBank | None = None
    size: int = 0
    mean: tuple | None = None      # the normalisation our replay buffer applies to the source's images
    std: tuple | None = None


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    memory: str          # "source" (a memory source fills it), "own-buffer" (its own buffer) or "none"
    build: Callable      # build(av, common keyword arguments, settings, StrategyMemory) -> Avalanche strategy
    description: str
    buffer_only: bool = False     # trains on its buffer alone, not on the stream (GDumb)
    stores_logits: bool = False   # its buffer also holds every buffered image's logits (DER)


_STRATEGIES: dict[str, StrategyEntry] = {}


def register_strategy(name: str, memory: str, description: str, buffer_only: bool = False,
                      stores_logits: bool = False):
    """Decorator registering `build` under `name`; a name already registered is refused."""
    if memory not in MEMORY_KINDS:
        raise ValueError(f"strategy {name!r}: memory must be one of {', '.join(MEMORY_KINDS)}, got {memory!r}")

    def wrap(build):
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered ({_STRATEGIES[name].description}): "
                             "pick another name")
        _STRATEGIES[name] = StrategyEntry(name, memory, build, description, buffer_only, stores_logits)
        return build
    return wrap


def list_strategies() -> list[str]:
    """The registered strategies, in registration order (the order of a suite's grid)."""
    return list(_STRATEGIES)


def strategy_entry(name: str) -> StrategyEntry:
    if name in _STRATEGIES:
        return _STRATEGIES[name]
    known = ", ".join(_STRATEGIES)
    if name in EXCLUDED:
        raise ConfigError(f"strategy {name!r} is excluded: {EXCLUDED[name]}. Use one of {known}")
    raise ConfigError(f"unknown strategy {name!r}: use one of {known} "
                      f"(excluded, see docs/continual.md: {', '.join(sorted(EXCLUDED))})")


def check_strategy(name: str) -> None:
    strategy_entry(name)


def memory_kind(strategy: str) -> str:
    """'source' (a memory source fills it), 'own-buffer' (the strategy's buffer) or 'none'."""
    return strategy_entry(strategy).memory


def make_optimizer(model: nn.Module, settings: SequentialSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def create_strategy(av, name: str, model: nn.Module, settings: SequentialSettings, device: torch.device,
                    mem_size: int = 0, memory: ImageBank | None = None, mean=None, std=None, loggers=None):
    """Avalanche strategy `name` training `model`, evaluated by us only (no periodic evaluation).
    `memory`: a memory source's images (replay); `mem_size`: an own buffer's size. `loggers`:
    Avalanche loggers, fed its epoch loss and accuracy metrics; none: no metric is computed."""
    entry = strategy_entry(name)
    if entry.memory == "source" and memory is None:
        raise ConfigError(f"strategy {name} needs a memory source (random, herding, cda, sre2l)")
    if entry.memory == "own-buffer" and mem_size < 1:
        raise ConfigError(f"strategy {name} needs mem_size >= 1")
    common = dict(model=model, optimizer=make_optimizer(model, settings), criterion=nn.CrossEntropyLoss(),
                  train_mb_size=settings.batch_size, train_epochs=settings.epochs, eval_mb_size=256,
                  device=device, evaluator=_evaluator(av, loggers), eval_every=-1)
    return entry.build(av, common, settings, StrategyMemory(memory, mem_size, mean, std))


def _evaluator(av, loggers):
    if not loggers:
        return av.EvaluationPlugin(loggers=[])
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    return av.EvaluationPlugin(loss_metrics(epoch=True), accuracy_metrics(epoch=True), loggers=list(loggers))


def _batch_size_mem(settings: SequentialSettings, memory: StrategyMemory) -> int:
    return min(settings.batch_size, memory.size)   # their buffer loaders drop the last partial batch


@register_strategy("naive", "none", "fine-tuning, the lower bound")
def _naive(av, common: dict, settings: SequentialSettings, memory: StrategyMemory):
    return av.Naive(**common)


@register_strategy("replay", "source", "Naive + a memory source's images, a memory batch with every stream batch")
def _replay(av, common: dict, settings: SequentialSettings, memory: StrategyMemory):
    buffer_cls, plugin_cls = _memory_classes(av)
    plugin = plugin_cls(buffer_cls(memory.bank, memory.mean, memory.std), settings.batch_size)
    return av.Naive(plugins=[plugin], **common)


@register_strategy("gdumb", "own-buffer", "GDumb: retrains on its class-balanced buffer only", buffer_only=True)
def _gdumb(av, common: dict, settings: SequentialSettings, memory: StrategyMemory):
    return av.GDumb(mem_size=memory.size, **common)


@register_strategy("lwf", "none", "Learning without Forgetting: distillation from the previous model")
def _lwf(av, common: dict, settings: SequentialSettings, memory: StrategyMemory):
    return av.LwF(alpha=settings.lwf_alpha, temperature=settings.lwf_temperature, **common)


@register_strategy("ewc", "none", "Elastic Weight Consolidation: a Fisher-weighted penalty")
def _ewc(av, common: dict, settings: SequentialSettings, memory: StrategyMemory):
    return av.EWC(ewc_lambda=settings.ewc_lambda, **common)


@register_strategy("der", "own-buffer", "Dark Experience Replay: a buffer of images and their logits",
                   stores_logits=True)
def _der(av, common: dict, settings: SequentialSettings, memory: StrategyMemory):
    return av.DER(mem_size=memory.size, batch_size_mem=_batch_size_mem(settings, memory), alpha=settings.der_alpha,
                  beta=settings.der_beta, **common)


@register_strategy("er_ace", "own-buffer", "ER-ACE: experience replay with asymmetric cross-entropy")
def _er_ace(av, common: dict, settings: SequentialSettings, memory: StrategyMemory):
    return av.ER_ACE(mem_size=memory.size, batch_size_mem=_batch_size_mem(settings, memory), **common)


_CLASSES: dict = {}


def _memory_classes(av):
    """Our buffer and plugin, subclassing Avalanche's (defined once Avalanche is imported)."""
    if _CLASSES:
        return _CLASSES["buffer"], _CLASSES["plugin"]

    class SourceMemoryBuffer(av.ExemplarsBuffer):
        """A fixed per-class memory: after each experience, the memory images of its classes are
        added (the buffer holds `ipc` images of every class seen so far)."""

        def __init__(self, memory: ImageBank, mean, std):
            super().__init__(max_size=len(memory))
            self.memory, self.mean, self.std = memory, mean, std
            self.classes: list[int] = []

        def post_adapt(self, agent_state, exp):
            self.classes += [int(c) for c in sorted(exp.classes_in_this_experience) if int(c) not in self.classes]
            self.buffer = avalanche_dataset(av, subset_by_classes(self.memory, self.classes), self.mean, self.std)

        def resize(self, strategy, new_size):
            raise ValueError("this memory holds a fixed number of images per class; it cannot be resized")

    class SourceReplayPlugin(av.SupervisedPlugin):
        def __init__(self, buffer: SourceMemoryBuffer, batch_size_mem: int):
            super().__init__()
            self.storage_policy, self.batch_size_mem = buffer, batch_size_mem

        def before_training_exp(self, strategy, num_workers: int = 0, shuffle: bool = True,
                                drop_last: bool = False, **kwargs):
            memory = self.storage_policy.buffer
            if len(memory) == 0:
                return
            # A memory batch never larger than the memory: with drop_last a larger one yields no batch at all.
            strategy.dataloader = av.ReplayDataLoader(
                strategy.adapted_dataset, memory, oversample_small_tasks=True,
                batch_size=strategy.train_mb_size, batch_size_mem=min(self.batch_size_mem, len(memory)),
                num_workers=num_workers, shuffle=shuffle, drop_last=drop_last)

        def after_training_exp(self, strategy, **kwargs):
            self.storage_policy.post_adapt(strategy, strategy.experience)

    _CLASSES.update(buffer=SourceMemoryBuffer, plugin=SourceReplayPlugin)
    return SourceMemoryBuffer, SourceReplayPlugin
