"""Module groups: the units a training stage freezes, trains, and gives a learning rate.

Groups of a :class:`~vlmzoo.VLMForConditionalGeneration`: ``vision_tower``, ``text_encoder`` (if
the model has one), ``llm``, each name of the strategy's ``module_groups()`` (e.g. ``connector``),
and ``strategy``, which stands for all of the strategy's groups together (plus any strategy
parameter no named group holds); on a model with a LoRA adapter (:mod:`vlmzoo.lora`), ``lora``
holds the adapter's parameters (whichever group's modules they adapt). Every parameter of the
model belongs to exactly one group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from ..config import StageConfig
from ..utils import unknown_key_error

logger = logging.getLogger(__name__)

CORE_GROUPS = ("vision_tower", "text_encoder", "llm", "lora")
STRATEGY_ALIAS = "strategy"
LORA_GROUP = "lora"


@dataclass
class GroupLayout:
    """Which parameter (by full name) belongs to which atomic group.

    Attributes:
        groups: atomic group -> parameter names, in model order. ``strategy`` here holds only the
            strategy's parameters outside its named groups (often none).
        strategy_groups: the atomic groups the ``strategy`` alias expands to.
    """

    groups: dict[str, list[str]]
    strategy_groups: list[str] = field(default_factory=list)

    @property
    def valid_names(self) -> list[str]:
        return sorted({*self.groups, STRATEGY_ALIAS})

    def expand(self, names: list[str], where: str) -> list[str]:
        """Atomic groups meant by ``names`` (``strategy`` expanded); unknown names are errors."""
        out: list[str] = []
        for name in names:
            if name == STRATEGY_ALIAS:
                members = self.strategy_groups
            elif name in self.groups:
                members = [name]
            else:
                raise unknown_key_error(name, self.valid_names, f"{where} (module groups of this model)")
            out += [m for m in members if m not in out]
        return out


def group_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Each module group that is one module: the core ones the model has, then the strategy's."""
    core = {"vision_tower": model.vision_tower, "text_encoder": getattr(model, "text_encoder", None),
            "llm": model.language_model}
    return {**{k: v for k, v in core.items() if v is not None}, **dict(model.strategy.module_groups())}


def group_layout(model: nn.Module) -> GroupLayout:
    """Assign every parameter of ``model`` to one atomic group; overlaps and orphans are errors."""
    from ..lora import adapter_parameter_names

    core: dict[str, nn.Module | None] = {
        "vision_tower": model.vision_tower,
        "text_encoder": getattr(model, "text_encoder", None),
        "llm": model.language_model,
    }
    strategy_modules = dict(model.strategy.module_groups())
    for name in strategy_modules:
        if name in CORE_GROUPS or name == STRATEGY_ALIAS:
            raise ValueError(
                f"Strategy {type(model.strategy).__name__} names a module group {name!r}, which clashes with a "
                f"core group; rename it in module_groups(). Core groups: {', '.join(CORE_GROUPS)}, {STRATEGY_ALIAS}."
            )
    named = dict(model.named_parameters())
    owner: dict[int, str] = {id(named[n]): LORA_GROUP for n in adapter_parameter_names(model)}

    def claim(group: str, module: nn.Module) -> None:
        for p in module.parameters():
            if owner.get(id(p)) == LORA_GROUP:
                continue
            if id(p) in owner and owner[id(p)] != group:
                raise ValueError(f"A parameter is in two module groups, {owner[id(p)]!r} and {group!r}.")
            owner[id(p)] = group

    for name, module in core.items():
        if module is not None:
            claim(name, module)
    for name, module in strategy_modules.items():
        claim(name, module)
    for p in model.strategy.parameters():
        owner.setdefault(id(p), STRATEGY_ALIAS)

    groups: dict[str, list[str]] = {name: [] for name, m in core.items() if m is not None}
    groups.update({name: [] for name in strategy_modules})
    if LORA_GROUP in owner.values():
        groups[LORA_GROUP] = []
    groups[STRATEGY_ALIAS] = []
    orphans = []
    for pname, p in model.named_parameters():
        group = owner.get(id(p))
        if group is None:
            orphans.append(pname)
        else:
            groups[group].append(pname)
    if orphans:
        raise ValueError(f"Parameters outside every module group: {', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}.")
    strategy_groups = list(strategy_modules)
    if groups[STRATEGY_ALIAS]:
        strategy_groups.append(STRATEGY_ALIAS)
    else:
        del groups[STRATEGY_ALIAS]
    return GroupLayout(groups=groups, strategy_groups=strategy_groups)


@dataclass
class StagePlan:
    """A stage resolved against a model: trained groups and the learning rate of each.

    Attributes:
        layout: the model's group layout.
        trained: atomic groups that train in this stage (``lora`` when the model carries an adapter).
        lrs: atomic group -> learning rate (trained groups only).
        adapted: atomic groups the stage's LoRA adapter goes into (their own weights stay frozen).
    """

    layout: GroupLayout
    trained: list[str]
    lrs: dict[str, float]
    adapted: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, model: nn.Module, stage: StageConfig, where: str = "stage") -> StagePlan:
        layout = group_layout(model)
        trained = layout.expand(list(stage.train), f"{where}.train")
        if "text_encoder" in trained:
            raise ValueError(
                f"{where}.train lists 'text_encoder', but the core runs the instruction text encoder under "
                "torch.no_grad (vlmzoo/modeling.py), so it cannot train. Remove it from the stage."
            )
        adapted = layout.expand(list(stage.lora.groups), f"{where}.lora.groups") if stage.lora is not None else []
        both = [g for g in adapted if g in trained]
        if both:
            raise ValueError(f"{where}: {', '.join(both)} is both in train (trained fully) and in lora.groups (adapted); "
                             "a stage does one or the other to a group.")
        if LORA_GROUP in layout.groups and LORA_GROUP not in trained:
            trained.append(LORA_GROUP)  # an adapter the stage carries trains in it
        lrs = {g: stage.lr for g in trained}
        # Alias entries first, so an atomic group's own entry wins.
        for name in sorted(stage.group_lr, key=lambda n: n != STRATEGY_ALIAS):
            for g in layout.expand([name], f"{where}.group_lr"):
                if g in lrs:
                    lrs[g] = float(stage.group_lr[name])
        return cls(layout=layout, trained=trained, lrs=lrs, adapted=adapted)

    @property
    def tower_changes(self) -> bool:
        """Whether the vision tower's output changes during the stage (trained or adapted)."""
        return "vision_tower" in self.trained or "vision_tower" in self.adapted

    def apply(self, model: nn.Module) -> None:
        """Set ``requires_grad``: exactly the trained groups' parameters train."""
        trained = set(self.trained)
        params = dict(model.named_parameters())
        for group, names in self.layout.groups.items():
            for name in names:
                params[name].requires_grad_(group in trained)
        # The core runs the tower under no_grad when its config says frozen; follow the stage.
        model.config.freeze_vision_tower = not self.tower_changes

    def param_groups(self, model: nn.Module, decay_names: set[str], weight_decay: float) -> list[dict]:
        """Optimizer parameter groups: one per (trained group, decay or not), each with its lr."""
        params = dict(model.named_parameters())
        out = []
        for group in self.trained:
            names = [n for n in self.layout.groups[group] if params[n].requires_grad]
            for decays in (True, False):
                chosen = [params[n] for n in names if (n in decay_names) == decays]
                if chosen:
                    out.append({
                        "params": chosen,
                        "lr": self.lrs[group],
                        "weight_decay": weight_decay if decays else 0.0,
                        "group_name": group,
                    })
        if not out:
            raise ValueError(f"Stage trains groups {self.trained} but they hold no parameters.")
        return out

    def count_lines(self, model: nn.Module) -> list[str]:
        """One line per group: trainable / total parameters (after :meth:`apply`)."""
        params = dict(model.named_parameters())
        lines = []
        for group, names in self.layout.groups.items():
            total = sum(params[n].numel() for n in names)
            trainable = sum(params[n].numel() for n in names if params[n].requires_grad)
            state = "TRAINABLE" if trainable else "frozen   "
            lr = f"  lr={self.lrs[group]:g}" if group in self.lrs else ""
            lines.append(f"{group:<16} {state} {trainable:>14,} / {total:>14,} params{lr}")
        return lines

    def counts(self, model: nn.Module) -> dict[str, dict[str, int]]:
        params = dict(model.named_parameters())
        return {
            group: {
                "trainable": sum(params[n].numel() for n in names if params[n].requires_grad),
                "total": sum(params[n].numel() for n in names),
            }
            for group, names in self.layout.groups.items()
        }
