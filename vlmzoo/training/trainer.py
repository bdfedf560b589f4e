"""``VLMTrainer``: transformers' ``Trainer`` with one optimizer parameter group per module group.

As LLaVA's ``llava_trainer`` gives the new projector its own learning rate, a stage here gives
every module group (``connector``, ``llm``, ...) the rate its config names; the scheduler scales
them all together. Everything else (loop, DeepSpeed, DDP, checkpoints with optimizer and
scheduler state, resuming, logging integrations) is the stock ``Trainer``.
"""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from .groups import StagePlan


class VLMTrainer(Trainer):
    """``Trainer`` whose optimizer follows a :class:`StagePlan` (per-group learning rates)."""

    def __init__(self, *args, stage_plan: StagePlan, **kwargs) -> None:
        self.stage_plan = stage_plan
        self._flop_params: int | None = None
        super().__init__(*args, **kwargs)

    def floating_point_ops(self, inputs) -> int:
        """Trainer's ``6 x tokens x parameters`` estimate (logged as ``total_flos``), with the
        parameter count taken once per stage instead of by a walk over every tensor each step
        (a measurable share of a tiny model's step)."""
        if self._flop_params is None:
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 0 if ids is None else 6 * ids.numel() * self._flop_params

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches from the dataset's stored token lengths (no pass over the images)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=dataset.lengths
            )
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.accelerator.unwrap_model(self.model if model is None else model)
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = self.stage_plan.param_groups(opt_model, decay, self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)  # every group carries its own
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
