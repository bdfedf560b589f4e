"""``VLMTrainer``: transformers' ``Trainer`` with one optimizer parameter group per module group,
a seeded length-grouped order, atomic checkpoints and a loss sum that survives resuming.

As LLaVA's ``llava_trainer`` gives the new projector its own learning rate, a stage here gives
every module group (``connector``, ``llm``, ...) the rate its config names; the scheduler scales
them all together. Checkpoints hold the stock ``Trainer``'s files (weights, optimizer, scheduler,
RNG states, trainer state), written under a temporary name and renamed when complete
(:mod:`vlmzoo.training.checkpoints`). Everything else (loop, DeepSpeed, DDP, resuming, logging
integrations) is the stock ``Trainer``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import rotate_checkpoints

from .. import lora
from ..feature_cache import FeatureCaches
from .checkpoints import CHECKPOINT_PREFIX, TMP_PREFIX, publish, write_manifest
from .groups import StagePlan


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' ``LengthGroupedSampler`` whose order comes from its own generator, seeded with
    ``seed + epoch`` (as accelerate's ``SeedableRandomSampler`` does for the default random order),
    never from the global RNG: a run resumed in epoch k replays epoch k's order exactly, whatever
    the global RNG holds. The ``Trainer`` calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class VLMTrainer(Trainer):
    """``Trainer`` whose optimizer follows a :class:`StagePlan` (per-group learning rates)."""
    def __init__(self, *args, stage_plan: StagePlan, checkpoint_info: dict[str, Any] | None = None,
                 loss_sum_start: float = 0.0, feature_caches: FeatureCaches | None = None, **kwargs) -> None:
        """``checkpoint_info``: entries every checkpoint manifest records (the stage's config hash);
        ``loss_sum_start``: the sum of the step losses before the step training starts at (a resume);
        ``feature_caches``: the run's memos of frozen encoder features, handed to the model with
        every batch (``forward(feature_caches=...)``); the caller owns them."""
        self.stage_plan = stage_plan
        self.feature_caches = feature_caches
        self.checkpoint_info = dict(checkpoint_info or {})
        self._loss_sum_start = float(loss_sum_start)
        self._loss_sum: torch.Tensor | None = None
        self._flop_params: int | None = None
        super().__init__(*args, **kwargs)

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self.feature_caches is not None:
            inputs = {**inputs, "feature_caches": self.feature_caches}
        return inputs

    # ---- the loss over every step, across resumes -------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._loss_sum is None:
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64
            self._loss_sum = torch.tensor(self._loss_sum_start, dtype=dtype, device=loss.device)
        self._loss_sum += loss.detach().to(self._loss_sum.dtype)  # stays on the device: no sync per step
        return loss

    def loss_sum(self) -> float:
        """Sum over every optimizer step so far (this run's and, after a resume, the earlier ones')
        of the step's training loss (the value the ``Trainer`` logs as ``loss``), averaged over processes."""
        if self._loss_sum is None:
            return self._loss_sum_start
        return float(self.accelerator.reduce(self._loss_sum.clone(), reduction="mean").item())

    # ---- atomic checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint's files, written into ``tmp-checkpoint-N``, listed in a manifest
        and renamed to ``checkpoint-N`` (then older ones rotated out as the stock ``Trainer`` does)."""
        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        tmp, final = run_dir / f"{TMP_PREFIX}-{step}", run_dir / f"{CHECKPOINT_PREFIX}-{step}"
        main = self.args.should_save
        if main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(str(tmp), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
        loss_sum = self.loss_sum()  # every process takes part in the reduction
        if main:
            for cb in self.callback_handler.callbacks + [self.control]:  # as the stock Trainer records them
                if isinstance(cb, ExportableState):
                    name, cb_state = cb.__class__.__name__, cb.state()
                    if isinstance(self.state.stateful_callbacks.get(name), list):
                        self.state.stateful_callbacks[name].append(cb_state)
                    else:
                        self.state.stateful_callbacks[name] = cb_state
            self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
        self.accelerator.wait_for_everyone()
        if main:
            write_manifest(tmp, step, {**self.checkpoint_info, "loss_sum": loss_sum})
            publish(tmp, final)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    # ---- LoRA: plain weights + lora/ (vlmzoo.lora) ------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A model with an adapter saves as a plain model's weights (base weights unmerged) plus
        ``lora/`` in peft's format; keys never carry peft's adapter name."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not lora.has_adapter(model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        full = model.state_dict() if state_dict is None else state_dict
        super()._save(output_dir, state_dict=lora.base_state_dict(full, model))
        if self.args.should_save:
            lora.save_adapter(model, output_dir, full)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.model if model is None else model
        if lora.has_adapter(target) and not self.is_deepspeed_enabled:
            lora.load_checkpoint(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def floating_point_ops(self, inputs) -> int:
        """Trainer's ``6 x tokens x parameters`` estimate (logged as ``total_flos``), with the
        parameter count taken once per stage instead of by a walk over every tensor each step
        (a measurable share of a tiny model's step)."""
        if self._flop_params is None:
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 0 if ids is None else 6 * ids.numel() * self._flop_params

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches from the dataset's stored token lengths (no pass over the images),
        in an order drawn from the run's seed and the epoch (:class:`SeededLengthGroupedSampler`)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=dataset.lengths, seed=seed
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
