"""The conformance suite: every registered strategy (vlmzoo.available_strategies(), entry points
included) passes the checks of tests/conformance.py, with no test file of its own:

* save_pretrained / from_pretrained round trip, bit for bit;
* greedy generation with and without the KV cache equal on a left-padded batch with image and
  text-only rows;
* gradients reach exactly the module groups a stage trains (training's StagePlan);
* every strategy parameter is initialised by a ``reset_parameters()``;
* each ``zero_init_equivalences`` declaration holds;
* each ``configs/<strategy>/reference*.yaml`` builds on the meta device and its prefill is FLOP-counted.

The strategies are those registered when this module is collected; a strategy registered later (as
in the toy tests below) is checked by calling the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from conformance import (
    check_fresh_init,
    check_gradients,
    check_generation,
    check_reference_config,
    check_save_load,
    check_zero_init_equivalence,
    reference_configs,
    zero_init_declarations,
)
from vlmzoo import (
    GuidanceInputs,
    GuidanceStrategy,
    StrategyConfig,
    StrategyNeeds,
    StrategyOutput,
    available_strategies,
    register_strategy,
)
from vlmzoo.layers import MLPConnector, ZeroLinear
from vlmzoo.registry import STRATEGIES
from vlmzoo.strategy import ZeroInitEquivalence

NAMES = available_strategies()


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_is_exact(name, tmp_path):
    check_save_load(name, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_cached_generation_equals_cacheless_on_a_padded_mixed_batch(name):
    check_generation(name)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_exactly_the_trained_groups(name):
    check_gradients(name)


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_parameter_is_set_by_reset_parameters(name):
    check_fresh_init(name)


def _declaration_id(value: str | ZeroInitEquivalence) -> str:
    if isinstance(value, str):
        return value
    fields = ",".join(f"{k}={v}" for k, v in value.overrides.items())
    return f"{fields}~{value.reference or 'itself'}"


@pytest.mark.parametrize(("name", "declared"), zero_init_declarations(NAMES), ids=_declaration_id)
def test_declared_zero_init_equivalence_holds(name, declared):
    check_zero_init_equivalence(name, declared)


@pytest.mark.parametrize(("name", "path"), reference_configs(NAMES),
                         ids=lambda v: v.stem if isinstance(v, Path) else v)
def test_reference_config_builds_on_meta_and_counts_a_prefill(name, path):
    check_reference_config(name, path)


def test_every_builtin_strategy_is_covered():
    builtin = {"llava", "tg_llava", "ta_llava", "igva", "dense_connector", "resampler"}
    assert builtin <= set(NAMES)
    assert {n for n, _ in reference_configs(NAMES)} >= builtin
    assert {n for n, _ in zero_init_declarations(NAMES)} >= {"tg_llava", "igva"}


# ---- a strategy registered at run time, and broken ones ------------------------------------------------
@dataclass
class ToyConfig(StrategyConfig):
    vision_layer: int = -2
    use_branch: bool = False


class Toy(GuidanceStrategy):
    """`llava`'s connector on layer -2 patches, plus (``use_branch``) a zero-initialised linear branch:
    ``(N, P, D_v)`` -> ``(N, P, d_llm)``. Fresh with the branch on, it is `llava`."""

    config_class = ToyConfig
    zero_init_equivalences = (ZeroInitEquivalence(overrides={"use_branch": True}, reference="llava"),)
    branch_class: type[nn.Module] = ZeroLinear

    def __init__(self, config: ToyConfig, dims) -> None:
        super().__init__(config, dims)
        self.connector = MLPConnector(dims.vision_hidden_size, dims.llm_hidden_size, depth=2, act="gelu")
        self.branch = self.branch_class(dims.vision_hidden_size, dims.llm_hidden_size) if config.use_branch else None

    @property
    def needs(self) -> StrategyNeeds:
        return StrategyNeeds(vision_layers=(self.config.vision_layer,))

    @property
    def num_visual_tokens(self) -> int:
        return self.dims.vision_num_patches

    def features(self, inputs: GuidanceInputs) -> torch.Tensor:
        return inputs.vision.layers[self.config.vision_layer]  # (N, P, D_v)

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        x = self.features(inputs)
        tokens = self.connector(x)
        if self.branch is not None:
            tokens = tokens + self.branch(x)
        return StrategyOutput(visual_embeds=tokens)


class ReadsTheWholeSequence(Toy):
    """Adds the mean embedding of every token of its row: generated tokens too, without a cache."""

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        out = super().forward(inputs)
        mask = inputs.attention_mask.unsqueeze(-1).to(out.visual_embeds.dtype)  # (B, T, 1)
        mean = (inputs.llm_embed_tokens(inputs.input_ids) * mask).sum(1) / mask.sum(1)  # (B, d)
        return StrategyOutput(visual_embeds=out.visual_embeds + 10 * mean[inputs.image_batch_index, None])


class UnsavedNoise(Toy):
    """Adds a random non-persistent buffer, which save_pretrained does not keep."""

    def __init__(self, config: ToyConfig, dims) -> None:
        super().__init__(config, dims)
        self.register_buffer("noise", torch.randn(dims.vision_hidden_size), persistent=False)

    def features(self, inputs: GuidanceInputs) -> torch.Tensor:
        return super().features(inputs) + self.noise


@dataclass
class BranchOnConfig(ToyConfig):
    use_branch: bool = True


class DetachedBranch(Toy):
    """Its branch is on and detached: the group ``branch`` never gets a gradient."""

    config_class = BranchOnConfig
    branch_class = nn.Linear

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        x = self.features(inputs)
        return StrategyOutput(visual_embeds=self.connector(x) + self.branch(x).detach())


class FalseEquivalence(Toy):
    """Declares `llava`'s output with the branch on, but the branch starts at PyTorch's random init."""

    branch_class = nn.Linear


class BareParameter(Toy):
    """A scale held directly by the strategy, which no ``reset_parameters()`` initialises."""

    def __init__(self, config: ToyConfig, dims) -> None:
        super().__init__(config, dims)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        out = super().forward(inputs)
        return StrategyOutput(visual_embeds=out.visual_embeds * self.scale)


@pytest.fixture
def register():
    """Register strategy classes for one test (unregistered after it): ``register(name, cls) -> name``."""
    names: list[str] = []

    def _register(name: str, cls: type[GuidanceStrategy]) -> str:
        register_strategy(name)(cls)
        names.append(name)
        return name

    yield _register
    for name in names:
        STRATEGIES.unregister(name)


def test_a_strategy_registered_at_run_time_passes_every_check(register, tmp_path):
    name = register("conformance_toy", Toy)
    assert name in available_strategies() and name not in NAMES
    check_save_load(name, tmp_path)
    check_generation(name)
    check_gradients(name)
    check_fresh_init(name)
    for declared in Toy.zero_init_equivalences:
        check_zero_init_equivalence(name, declared)


BROKEN = {
    "cache": (ReadsTheWholeSequence, lambda name, folder: check_generation(name), r"step 1"),
    "save_load": (UnsavedNoise, check_save_load, r"after save_pretrained/from_pretrained, logits"),
    "gradients": (DetachedBranch, lambda name, folder: check_gradients(name), r"training 'branch': no gradient reaches"),
    "zero_init": (FalseEquivalence, lambda name, folder: check_zero_init_equivalence(name, FalseEquivalence.zero_init_equivalences[0]),
                  r"\{'use_branch': True\} vs llava \{\}, visual tokens"),
    "fresh_init": (BareParameter, lambda name, folder: check_fresh_init(name), r"initialises strategy\.\['scale'\]"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_each_check_fails_on_a_strategy_that_breaks_it(register, tmp_path, broken):
    cls, check, message = BROKEN[broken]
    name = register(f"conformance_broken_{broken}", cls)
    with pytest.raises(AssertionError, match=message):
        check(name, tmp_path)
