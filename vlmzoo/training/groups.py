"""A training stage resolved against a model's module groups (:mod:`vlmzoo.module_groups`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from ..config import StageConfig
from ..module_groups import CORE_GROUPS, LORA_GROUP, STRATEGY_ALIAS, GroupLayout, group_layout, group_modules

__all__ = ["CORE_GROUPS", "LORA_GROUP", "STRATEGY_ALIAS", "GroupLayout", "StagePlan", "group_layout", "group_modules"]

logger = logging.getLogger(__name__)


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
