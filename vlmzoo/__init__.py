"""vlmzoo: interchangeable vision-guidance strategies for LLaVA-style VLMs, head to head.

Public API: the strategy interface and registry, the Hugging Face-native config/model, and the
processor. Strategies live outside this package (``architectures/`` for the built-ins) and are
found through the ``vlmzoo.strategies`` entry-point group. The lab around it (tiny world,
comparison study, benchmark, visualisations, demo) is the package ``vlmzoo_lab``, which this one
never imports.
"""

from .registry import (
    DuplicateStrategyError,
    UnknownStrategyError,
    available_strategies,
    get_strategy_class,
    register_strategy,
)
from .strategy import (
    CoreDims,
    ExtraOutput,
    GuidanceInputs,
    GuidanceStrategy,
    InputSpec,
    InstructionFeatures,
    StrategyConfig,
    StrategyNeeds,
    StrategyOutput,
    TokenGrid,
    VisionFeatures,
    patch_grid,
)
from .configuration import VLMConfig  # noqa: E402  (after the registry: it validates strategy names)
from .modeling import VLMCausalLMOutputWithPast, VLMForConditionalGeneration
from .processing import VLMProcessor

__all__ = [
    "CoreDims",
    "DuplicateStrategyError",
    "ExtraOutput",
    "GuidanceInputs",
    "GuidanceStrategy",
    "InputSpec",
    "InstructionFeatures",
    "StrategyConfig",
    "StrategyNeeds",
    "StrategyOutput",
    "TokenGrid",
    "UnknownStrategyError",
    "VLMCausalLMOutputWithPast",
    "VLMConfig",
    "VLMForConditionalGeneration",
    "VLMProcessor",
    "VisionFeatures",
    "available_strategies",
    "get_strategy_class",
    "patch_grid",
    "register_strategy",
]

