"""The training loop: a config in, a trained checkpoint, metrics and drawn predictions out.

One *iteration* is one optimizer step over ``solver.accumulate`` micro-batches of ``data.batch_size``
images per process. Under ``torchrun`` the model is wrapped in DistributedDataParallel; the total batch
per step is ``batch_size * world_size * accumulate``. With ``solver.scale_lr=true`` the learning rate is
``solver.lr * total_batch / solver.base_batch_size`` (linear scaling rule); otherwise ``solver.lr`` is
used as given, so scale it yourself when changing the number of GPUs.

Per micro-batch the ranks all-reduce one small vector (each loss, a non-finite flag and a stop flag), so
every rank agrees on logging values, on stopping at a non-finite loss (before the backward pass, so the
last good checkpoint stays the newest) and on stopping after SIGINT/SIGTERM (a checkpoint is saved first).
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

import resdet
from resdet.config import Config, config_to_dict, save_config
from resdet.models import build_model

from . import distributed as dist
from .builders import build_dataset, build_train_loader, dataset_metadata
from .checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from .inference import amp_dtype, evaluate_model
from .logger import MetricsWriter, ProgressBar, setup_logger
from .lr_schedule import LRFactor, build_lr_scheduler
from .optim import build_optimizer, scaled_lr
from .pretrained import load_pretrained

__all__ = ["Trainer", "TrainingInterrupted", "seed_everything"]

class TrainingInterrupted(RuntimeError):
    """Raised after SIGINT/SIGTERM once the checkpoint is saved; ``signum`` tells which signal."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal {signum}; checkpoint saved to {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    """Builds everything from ``cfg`` and trains.

    Args:
        cfg: the experiment.
        resume: continue from the newest checkpoint in ``cfg.train.output_dir`` (True) or from a path.
    """

    def __init__(self, cfg: Config, *, resume: bool | str = False) -> None:
        self.cfg = cfg
        self.device = dist.init_distributed(cfg.train.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.output_dir = Path(cfg.train.output_dir)
        self.logger = setup_logger(self.output_dir, rank=self.rank)
        seed_everything(cfg.train.seed + self.rank, deterministic=cfg.train.deterministic)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")

        self.train_set = build_dataset(cfg, train=True)
        self.val_set = build_dataset(cfg, train=False) if cfg.eval.evaluator != "none" else None
        self.metadata = dataset_metadata(self.train_set)
        self.model = self._build_model().to(self.device)
        s = cfg.solver
        total_batch = cfg.data.batch_size * self.world_size * s.accumulate
        lr = scaled_lr(s.lr, total_batch_size=total_batch, base_batch_size=s.base_batch_size) if s.scale_lr else s.lr
        self.logger.info("total batch %d (%d/process x %d processes x %d accumulation), lr %.4g",
                         total_batch, cfg.data.batch_size, self.world_size, s.accumulate, lr)
        self.optimizer = build_optimizer(self.model, name=s.optimizer, lr=lr, weight_decay=s.weight_decay,
                                         no_decay_norm_bias=s.no_decay_norm_bias, momentum=s.momentum,
                                         nesterov=s.nesterov, betas=tuple(s.betas))
        self.scheduler = build_lr_scheduler(self.optimizer, LRFactor(
            schedule=s.schedule, max_iter=s.max_iter, steps=tuple(s.steps), gamma=s.gamma,
            warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor, min_factor=s.min_lr_factor))
        self.amp_dtype = amp_dtype(cfg.train.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.ddp_model: nn.Module = self.model
        if dist.is_distributed():
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train.find_unused_parameters)
        self.loader, self.batch_sampler, self.seeded_set = build_train_loader(
            cfg, self.train_set, rank=self.rank, world_size=self.world_size)
        self.checkpoints = CheckpointManager(self.output_dir, keep_last=cfg.train.keep_last)
        self.writer = MetricsWriter(self.output_dir, enabled=self.rank == 0)
        self.iteration, self.batches_done = 0, 0
        self.best: dict[str, Any] = {"metric": cfg.train.best_metric, "value": None, "iteration": None}
        self._signal: int | None = None
        self.summary = ""
        if resume:
            self._resume(resume)

    # ---------------------------------------------------------------------------------------- setup
    def _build_model(self) -> nn.Module:
        model = build_model(self.cfg)
        if self.cfg.model.weights:
            report = load_pretrained(model, self.cfg.model.weights)
            self.logger.info("fine-tuning weights:\n%s", report)
        if self.cfg.train.sync_bn and dist.is_distributed():
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self.logger.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA (device %s)", self.device)
        return model

    def _resume(self, resume: bool | str) -> None:
        path = self.checkpoints.latest() if resume is True else Path(resume)
        if path is None:
            self.logger.info("--resume: no checkpoint in %s, starting from scratch", self.output_dir)
            return
        state = CheckpointManager.load(path, map_location="cpu")  # RNG states must stay on the CPU
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.batches_done = state["iteration"], state["batches_done"]
        self.best = state.get("best", self.best)
        rng = state["rng"]
        restore_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        self.logger.info("resumed from %s at iteration %d", path, self.iteration)

    # ------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        rng = dist.all_gather_object(capture_rng_state())  # every rank's generators
        return {
            "resdet": resdet.__version__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "batches_done": self.batches_done,
            "rng": rng,
            "best": self.best,
            "config": config_to_dict(self.cfg),
            **self.metadata,
        }

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Save the full training state (all ranks must call; rank 0 writes)."""
        state = self._state()
        name = name or self.checkpoints.periodic_name(self.iteration)
        path = self.output_dir / f"{name}.pth"
        if self.rank == 0:
            path = self.checkpoints.save(state, name)
        dist.barrier()
        return path

    # ----------------------------------------------------------------------------------------- loop
    def _batches(self) -> Iterator[tuple[list, list]]:
        per_epoch = len(self.batch_sampler)
        epoch, offset = divmod(self.batches_done, per_epoch)
        while True:
            self.batch_sampler.set_epoch(epoch, start_batch=offset)
            self.seeded_set.epoch = epoch
            yield from self.loader
            epoch, offset = epoch + 1, 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self._signal = signum

    def _forward(self, images: list, targets: list, last_micro: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = [img.to(self.device, non_blocking=True) for img in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        sync = contextlib.nullcontext() if last_micro or not dist.is_distributed() else self.ddp_model.no_sync()
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with sync, autocast:
            losses = self.ddp_model(images, targets)
        return sum(losses.values()), losses

    def _reduced(self, losses: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool, bool]:
        """(losses averaged over ranks, any rank non-finite, any rank signalled)."""
        values = torch.stack([v.detach().float() for v in losses.values()]).cpu()
        finite = bool(torch.isfinite(values).all())
        flags = torch.tensor([0.0 if finite else 1.0, 0.0 if self._signal is None else 1.0])
        vec = torch.cat([torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), flags])
        if dist.is_distributed():
            vec = dist.all_reduce_sum(vec.to(self.device)).cpu()
        n = len(values)
        mean = {k: float(v) for k, v in zip(losses, vec[:n] / self.world_size)}
        if not finite:  # report this rank's raw values
            mean = {k: float(v) for k, v in zip(losses, values)}
        return mean, bool(vec[n] > 0), bool(vec[n + 1] > 0)

    def _step(self) -> tuple[dict[str, float], bool]:
        """One optimizer step; returns (logged losses, stop requested by a signal)."""
        accumulate = self.cfg.solver.accumulate
        logged: dict[str, float] = {}
        stop = False
        for micro in range(accumulate):
            images, targets = next(self._data)
            total, losses = self._forward(images, targets, last_micro=micro == accumulate - 1)
            mean, nonfinite, signalled = self._reduced(losses)
            if nonfinite:
                detail = ", ".join(f"{k}={v:.4g}" for k, v in mean.items())
                latest = self.checkpoints.latest()
                raise FloatingPointError(
                    f"non-finite loss at iteration {self.iteration + 1} (micro-batch {micro}): {detail}; "
                    f"stopped without updating the weights; last good checkpoint: {latest or 'none'}")
            stop = stop or signalled
            self.scaler.scale(total / accumulate).backward()
            self.batches_done += 1
            for k, v in mean.items():
                logged[k] = logged.get(k, 0.0) + v / accumulate
        if self.cfg.solver.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.solver.clip_grad_norm)
            logged["grad_norm"] = float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iteration += 1
        logged["loss"] = sum(v for k, v in logged.items() if k.startswith("loss"))
        return logged, stop

    def train(self) -> dict[str, float]:
        """Train to ``solver.max_iter``, evaluate, save ``model_final.pth`` and drawn predictions.

        Returns:
            The final evaluation metrics (the printed tables are in ``self.summary``).

        Raises:
            FloatingPointError: a loss became NaN/inf.
            TrainingInterrupted: SIGINT/SIGTERM arrived (a checkpoint was saved first).
        """
        cfg, t = self.cfg, self.cfg.train
        max_iter = cfg.solver.max_iter
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._data = self._batches()
        bar = ProgressBar(max_iter, initial=self.iteration, enabled=self.rank == 0 and t.progress_bar)
        self.ddp_model.train()
        start, start_iter = time.perf_counter(), self.iteration
        try:
            while self.iteration < max_iter:
                logged, stop = self._step()
                it = self.iteration
                lr = self.optimizer.param_groups[0]["lr"]
                bar.update(logged["loss"], lr)
                if it % t.log_period == 0 or it == max_iter or it == start_iter + 1:
                    per_iter = (time.perf_counter() - start) / (it - start_iter)
                    self.writer.write(it, {**logged, "lr": lr, "time/iter": per_iter,
                                           "eta_s": per_iter * (max_iter - it)})
                if stop:
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(self._signal or signal.SIGTERM, path)
                if t.checkpoint_period and it % t.checkpoint_period == 0 and it < max_iter:
                    self.save_checkpoint()
                if t.eval_period and it % t.eval_period == 0 and it < max_iter:
                    self._periodic_eval()
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        train_time = time.perf_counter() - start
        self._sync_buffers()
        metrics, summary = self._evaluate()
        self._update_best(metrics, final=True)
        self.save_checkpoint("model_final")
        if self.rank == 0 and self.val_set is not None and t.num_vis_images:
            from .visualize import save_dataset_visualizations

            save_dataset_visualizations(self.model, self.val_set, self.output_dir / "vis", device=self.device,
                                        num_images=t.num_vis_images, class_names=self.metadata["class_names"],
                                        score_thresh=cfg.eval.vis_score_thresh)
        self.writer.write(self.iteration, {"time/train_s": train_time}, kind="train_end")
        self.writer.close()
        self.summary = summary
        return metrics

    # ------------------------------------------------------------------------------------ evaluation
    def _sync_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank before evaluating."""
        if dist.is_distributed():
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf.data, src=0)

    def _evaluate(self) -> tuple[dict[str, float], str]:
        if self.val_set is None:
            return {}, ""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            py, npst = random.getstate(), np.random.get_state()
            metrics, summary = evaluate_model(self.cfg, self.model, self.val_set, device=self.device,
                                              output_dir=str(self.output_dir))
            random.setstate(py)
            np.random.set_state(npst)
        self.writer.write(self.iteration, metrics, kind="eval")
        return metrics, summary

    def _periodic_eval(self) -> None:
        self._sync_buffers()
        metrics, summary = self._evaluate()
        self.logger.info("evaluation at iteration %d:\n%s", self.iteration, summary)
        self._update_best(metrics)
        self.ddp_model.train()

    def _update_best(self, metrics: dict[str, float], final: bool = False) -> None:
        name = self.best["metric"]
        value = metrics.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        if self.best["value"] is None or value > self.best["value"]:
            self.best.update(value=value, iteration=self.iteration)
            state = self._state()
            if self.rank == 0:
                self.checkpoints.save(state, "model_best", update_latest=False)
            dist.barrier()
