"""Module groups of a model: the units a training stage freezes, trains, and gives a learning rate.

Groups of a :class:`~vlmzoo.VLMForConditionalGeneration`: ``vision_tower``, ``text_encoder`` (if
the model has one), ``llm``, each name of the strategy's ``module_groups()`` (e.g. ``connector``),
and ``strategy``, which stands for all of the strategy's groups together (plus any strategy
parameter no named group holds); on a model with a LoRA adapter (:mod:`vlmzoo.lora`), ``lora``
holds the adapter's parameters (whichever group's modules they adapt). Every parameter of the
model belongs to exactly one group.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from .utils import unknown_key_error

logger = logging.getLogger(__name__)

CORE_GROUPS = ("vision_tower", "text_encoder", "llm", "lora")
STRATEGY_ALIAS = "strategy"
LORA_GROUP = "lora"
# State-dict keys that belong to a peft adapter (LoRA matrices, modules_to_save copies).
ADAPTER_KEY = re.compile(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save)\.")


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


def has_adapter(model: nn.Module) -> bool:
    """Whether a peft adapter is injected in ``model`` (no peft import)."""
    return bool(getattr(model, "peft_config", None)) and not getattr(model, "_hf_peft_config_loaded", False)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter's parameters (LoRA matrices, ``modules_to_save`` copies)."""
    if not has_adapter(model):
        return []
    return [n for n, _ in model.named_parameters() if ADAPTER_KEY.search(n)]
