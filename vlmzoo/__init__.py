"""vlmzoo: interchangeable vision-guidance strategies for LLaVA-style VLMs, head to head.

Public API: the strategy interface and registry, the Hugging Face-native config/model, and the
processor. Strategies live outside this package (``architectures/`` for the built-ins) and are
found through the ``vlmzoo.strategies`` entry-point group.
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

__all__ = [
    "CoreDims",
    "DuplicateStrategyError",
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
    "VisionFeatures",
    "available_strategies",
    "get_strategy_class",
    "patch_grid",
    "register_strategy",
]


def __getattr__(name: str):
    # The processor pulls in image/tokenizer code; import it on first use.
    if name == "VLMProcessor":
        from .processing import VLMProcessor

        return VLMProcessor
    raise AttributeError(f"module 'vlmzoo' has no attribute {name!r}")
