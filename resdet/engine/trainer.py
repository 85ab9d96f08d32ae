"""The training loop: a config in, a trained checkpoint, metrics and drawn predictions out.

One *iteration* is one optimizer step over ``solver.accumulate`` micro-batches of ``data.batch_size``
images per process. Under ``torchrun`` the model is wrapped in DistributedDataParallel; the total batch
per step is ``batch_size * world_size * accumulate``. With ``solver.scale_lr=true`` the learning rate is
``solver.lr * total_batch / solver.base_batch_size`` (linear scaling rule); otherwise ``solver.lr`` is
used as given, so scale it yourself when changing the number of GPUs.

Per micro-batch the ranks all-reduce one small vector (each loss, a non-finite flag and a stop flag), so
every rank agrees on logging values, on stopping at a non-finite loss (before the backward pass, so the
last good checkpoint stays the newest) and on stopping after SIGINT/SIGTERM (a checkpoint is saved first).
A signal during an evaluation stops it at once in a single process; under DDP the evaluation runs to its
end on every rank and the ranks then agree (one all-reduce) to stop together, so a signal that reached one
rank never leaves the others waiting in a collective. Either way the checkpoint of that iteration is saved
(it already is at the end of training) and ``--resume`` re-runs that evaluation. Signals arriving while a
checkpoint is written wait until it is complete (``checkpoint.signals_deferred``). A second signal stops the
process at once, without saving.

What stays on disk: resumable ``model_NNNNNNN.pth`` (with optimizer state; one is written at the end of
training too), ``model_final.pth`` and ``model_best.pth`` with the weights only (``model_best.pth`` is a
link to ``model_final.pth`` when the final model is the best), ``metrics.jsonl`` without the rows of redone
iterations after a resume.
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
from resdet.data.label_space import LabelSpace
from resdet.models import arch_task, build_model
from resdet.models.registry import check_typed_keys
from resdet.models.validation import InvalidInput

from . import distributed as dist
from .builders import build_dataset, build_train_loader, dataset_metadata
from .checkpoint import CheckpointError, CheckpointManager, capture_rng_state, load_model_state, restore_rng_state
from .inference import amp_dtype, evaluate_model
from .logger import MetricsWriter, ProgressBar, format_progress, setup_logger
from .lr_schedule import LRFactor, build_lr_scheduler, resolve_schedule
from .optim import build_optimizer, clip_grad_norm, scaled_lr
from .pretrained import load_pretrained

__all__ = ["Trainer", "TrainingInterrupted", "seed_everything"]

class TrainingInterrupted(RuntimeError):
    """Raised after SIGINT/SIGTERM once the checkpoint is saved; ``signum`` tells which signal."""

    def __init__(self, signum: int, checkpoint: Path | None, during: str = "training", *,
                 at_once: bool = False) -> None:
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        if at_once:  # a second signal: nothing more was saved
            where = f"newest checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
            super().__init__(f"stopped at once by a second {name} during {during}; {where}; continue with --resume")
        else:
            where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint saved"
            super().__init__(f"stopped by {name} during {during}; {where}; continue with --resume")
        self.signum, self.checkpoint = signum, checkpoint


class _StopNow(BaseException):
    """Raised by the signal handler inside an evaluation (BaseException: no ``except Exception`` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"train.output_dir={str(self.output_dir)!r} is an existing file, expected a "
                                     f"folder (or a path that does not exist yet)")
        check_typed_keys(cfg.model)  # before any data is read or generated
        self.logger = setup_logger(self.output_dir, rank=self.rank)
        if isinstance(resume, (str, Path)) and not Path(resume).is_file():
            raise CheckpointError(f"--resume-from: checkpoint {str(resume)!r} does not exist")
        s = cfg.solver
        if s.max_iter < 1:
            raise ValueError(f"solver.max_iter must be >= 1, got {s.max_iter}")
        steps, warmup = resolve_schedule(max_iter=s.max_iter, steps=s.steps, warmup_iters=s.warmup_iters,
                                         schedule=s.schedule)
        seed_everything(cfg.train.seed + self.rank, deterministic=cfg.train.deterministic)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")

        self.train_set = build_dataset(cfg, train=True)
        self.val_set = build_dataset(cfg, train=False) if cfg.eval.evaluator != "none" else None
        self.metadata = dataset_metadata(self.train_set)
        self.model = self._build_model().to(self.device)
        total_batch = cfg.data.batch_size * self.world_size * s.accumulate
        lr = scaled_lr(s.lr, total_batch_size=total_batch, base_batch_size=s.base_batch_size) if s.scale_lr else s.lr
        self.logger.info("total batch %d (%d/process x %d processes x %d accumulation), lr %.4g",
                         total_batch, cfg.data.batch_size, self.world_size, s.accumulate, lr)
        self.optimizer = build_optimizer(self.model, name=s.optimizer, lr=lr, weight_decay=s.weight_decay,
                                         no_decay_norm_bias=s.no_decay_norm_bias, momentum=s.momentum,
                                         nesterov=s.nesterov, betas=tuple(s.betas))
        self.base_lr = lr
        self.lr_factor = LRFactor(schedule=s.schedule, max_iter=s.max_iter, steps=steps, gamma=s.gamma,
                                  warmup_iters=warmup, warmup_factor=s.warmup_factor, min_factor=s.min_lr_factor,
                                  warmup_method=s.warmup_method, power=s.poly_power)
        self.scheduler = build_lr_scheduler(self.optimizer, self.lr_factor)
        self.amp_dtype = amp_dtype(cfg.train.amp, self.device)
        if cfg.train.amp == "auto":
            self.logger.info("train.amp=auto: %s on %s", self.amp_dtype or "float32", self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.ddp_model: nn.Module = self.model
        if dist.is_distributed():
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train.find_unused_parameters)
        self.loader, self.batch_sampler, self.seeded_set = build_train_loader(
            cfg, self.train_set, rank=self.rank, world_size=self.world_size)
        self.checkpoints = CheckpointManager(self.output_dir, keep_last=cfg.train.keep_last, clean=self.rank == 0)
        if self.checkpoints.removed_tmp:
            self.logger.info("removed partial files of an interrupted run: %s", ", ".join(self.checkpoints.removed_tmp))
        self.writer = MetricsWriter(self.output_dir, enabled=self.rank == 0)
        self.iteration, self.batches_done = 0, 0
        self.best: dict[str, Any] = {"metric": cfg.train.best_metric, "value": None, "iteration": None}
        self._signal: int | None = None
        self._stop_now = False  # inside an evaluation: a signal stops at once
        self._during = "training"  # what a signal interrupts, for its message
        self._saved_at: int | None = None  # iteration of the newest resumable checkpoint
        self.summary = ""
        if resume:
            self._resume(resume)
        if self.iteration == 0:  # a fresh start redoes every iteration: rows of an earlier attempt go
            dropped = self.writer.truncate(0)
            if dropped:
                self.logger.info("%s: dropped %d rows of an earlier run that stopped before its first checkpoint",
                                 self.writer.path, dropped)

    # ---------------------------------------------------------------------------------------- setup
    def _build_model(self) -> nn.Module:
        model = build_model(self.cfg)
        model.label_space = LabelSpace.from_dataset(self.train_set)  # labels -> the data's category ids
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
        if resume is True:
            found = self.checkpoints.load_newest(log=self.logger.warning)
            if found is None:
                self.logger.info("--resume: no checkpoint in %s, starting from scratch", self.output_dir)
                return
            path, state = found
        else:
            path = Path(resume)
            state = CheckpointManager.load(path, map_location="cpu", resumable=True)  # RNG states stay on the CPU
        load_model_state(self.model, state["model"], path, stored_config=state.get("config"),
                         config=config_to_dict(self.cfg))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r}: optimizer state does not fit solver.optimizer="
                                  f"{self.cfg.solver.optimizer!r}: {err}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_schedule(path)
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.batches_done = state["iteration"], state["batches_done"]
        self._saved_at = self.iteration
        self.best = state.get("best", self.best)
        rng = state["rng"]
        restore_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        dropped = self.writer.truncate(self.iteration)
        self.logger.info("resumed from %s at iteration %d%s", path, self.iteration,
                         f" ({dropped} metrics rows of redone iterations dropped)" if dropped else "")

    def _apply_schedule(self, path: Path) -> None:
        """After loading a scheduler state: keep this config's schedule and learning rate (said when they
        differ from the checkpoint's) and set every group's current lr from them."""
        sched = self.scheduler
        old_base = list(sched.base_lrs)
        if any(abs(b - self.base_lr) > 1e-12 * max(1.0, abs(b)) for b in old_base):
            self.logger.warning("solver.lr changed on resume: %s trained with lr %.4g, applying %.4g from "
                                "iteration %d", path.name, old_base[0], self.base_lr, sched.last_epoch)
        old_factor = dict(sched.lr_lambdas[0].__dict__) if hasattr(sched.lr_lambdas[0], "__dict__") else {}
        if old_factor and old_factor != self.lr_factor.__dict__:
            changed = {k: v for k, v in self.lr_factor.__dict__.items() if old_factor.get(k) != v}
            self.logger.info("LR schedule differs from %s's; applying %s", path.name, changed)
        sched.lr_lambdas = [self.lr_factor] * len(self.optimizer.param_groups)
        sched.base_lrs = [self.base_lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.base_lr
            group["lr"] = self.base_lr * self.lr_factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------------------------ checkpoints
    def _weights_state(self) -> dict[str, Any]:
        """What inference and fine-tuning need: weights, config and label metadata."""
        return {
            "resdet": resdet.__version__,
            "model": self.model.state_dict(),
            "iteration": self.iteration,
            "best": dict(self.best),
            "config": config_to_dict(self.cfg),
            **self.metadata,
        }

    def _state(self) -> dict[str, Any]:
        rng = dist.all_gather_object(capture_rng_state())  # every rank's generators
        return {
            **self._weights_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "batches_done": self.batches_done,
            "rng": rng,
        }

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Save the full (resumable) training state (all ranks must call; rank 0 writes)."""
        state = self._state()
        name = name or self.checkpoints.periodic_name(self.iteration)
        path = self.output_dir / f"{name}.pth"
        if self.rank == 0:
            path = self.checkpoints.save(state, name)
        dist.barrier()
        self._saved_at = self.iteration
        return path

    def _save_weights(self, name: str) -> Path:
        """Save the weights-only checkpoint ``<name>.pth`` (rank 0; no collective)."""
        path = self.output_dir / f"{name}.pth"
        if self.rank == 0:
            self.checkpoints.save(self._weights_state(), name, update_latest=False)
        return path

    # ----------------------------------------------------------------------------------------- loop
    def _batches(self) -> Iterator[tuple[list, list]]:
        self.batch_sampler.set_start(self.batches_done)  # infinite stream; a resume skips what was done
        yield from self.loader

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_now:  # inside an evaluation (single process): stop it now
            self._stop_now = False
            raise _StopNow(signum)
        if self._signal is not None:  # second signal: give up at once
            raise TrainingInterrupted(signum, self.checkpoints.latest(), self._during, at_once=True)
        self._signal = signum

    def _stoppable_evaluation(self) -> tuple[dict[str, float], str]:
        """``_evaluate`` that a signal stops (``_StopNow``): at once in a single process; under DDP once every
        rank has finished it, when any rank was signalled (one all-reduce, so the ranks stay in step)."""
        distributed = dist.is_distributed()
        if self._signal is not None and not distributed:
            raise _StopNow(self._signal)
        try:
            self._stop_now = not distributed
            metrics, summary = self._evaluate()
        finally:
            self._stop_now = False
        if distributed:
            flag = torch.tensor([0.0 if self._signal is None else 1.0], device=self.device)
            if float(dist.all_reduce_sum(flag)) > 0:
                raise _StopNow(self._signal or signal.SIGTERM)
        return metrics, summary

    def _forward(self, images: list, targets: list, last_micro: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = [img.to(self.device, non_blocking=True) for img in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        sync = contextlib.nullcontext() if last_micro or not dist.is_distributed() else self.ddp_model.no_sync()
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with sync, autocast:
            try:
                losses = self.ddp_model(images, targets)
            except InvalidInput as err:  # the model's input check: name the dataset's image, not the batch slot
                if err.index is None:
                    raise
                image_id = targets[err.index].get("image_id", "?") if isinstance(targets[err.index], dict) else "?"
                image_id = int(image_id) if torch.is_tensor(image_id) else image_id
                raise ValueError(f"training image_id {image_id} (batch item {err.index}): {err.what}; "
                                 f"check the dataset and its transforms") from None
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
            norm = clip_grad_norm(list(self.model.parameters()), self.cfg.solver.clip_grad_norm)
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
        cfg = self.cfg
        max_iter = cfg.solver.max_iter
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            start = time.perf_counter()
            if self._eval_due_on_resume():
                self._periodic_eval()
            self._loop(max_iter)
            train_time = time.perf_counter() - start
            self._sync_buffers()
            if self._saved_at != self.iteration:  # the resumable end-of-training state, before evaluating
                self.save_checkpoint()
            checkpoint = self.output_dir / f"{self.checkpoints.periodic_name(self.iteration)}.pth"
            try:
                self._during = "the final evaluation"
                metrics, summary = self._stoppable_evaluation()
                is_best = self._record_best(metrics)
                # past the last collective: from here a signal stops this process at once (after any write)
                self._stop_now = True
                self._during = "the writing of model_final.pth"
                self._save_weights("model_final")
                if is_best and self.rank == 0:  # the same weights: a link, not a second copy
                    self.checkpoints.link("model_final", "model_best")
                self._during = "the drawing of predictions"
                self._draw()
            except _StopNow as stop:
                raise TrainingInterrupted(stop.signum, checkpoint, during=self._during) from None
            finally:
                self._stop_now = False
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        self.writer.write(self.iteration, {"time/train_s": train_time}, kind="train_end")
        self.writer.close()
        self.summary = summary
        return metrics

    def _loop(self, max_iter: int) -> None:
        t = self.cfg.train
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
                    self.logger.info(format_progress(it, max_iter, logged, lr=lr, per_iter=per_iter))
                if stop:
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(self._signal or signal.SIGTERM, path)
                if t.checkpoint_period and it % t.checkpoint_period == 0 and it < max_iter:
                    self.save_checkpoint()
                if t.eval_period and it % t.eval_period == 0 and it < max_iter:
                    self._periodic_eval()
        finally:
            bar.close()

    def _eval_due_on_resume(self) -> bool:
        """A resumed run at a periodic-evaluation iteration re-runs that evaluation (it may have been killed)."""
        it, period = self.iteration, self.cfg.train.eval_period
        return bool(self._saved_at == it and period and 0 < it < self.cfg.solver.max_iter and it % period == 0)

    def _draw(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.rank == 0 and self.val_set is not None and t.num_vis_images:
            from .visualize import save_dataset_visualizations, semantic_class_names

            names = self.metadata["class_names"]
            if arch_task(cfg.model.arch) == "semantic":
                names = semantic_class_names(names, cfg.model.num_classes)
            paths, drawn = save_dataset_visualizations(
                self.model, self.val_set, self.output_dir / "vis", device=self.device, num_images=t.num_vis_images,
                class_names=names, score_thresh=cfg.eval.vis_score_thresh)
            if paths and not drawn:
                self.logger.warning("drew %d validation images into %s: no prediction reached eval.vis_score_thresh"
                                    "=%.2f, the images show none (train longer or lower the threshold)",
                                    len(paths), self.output_dir / "vis", cfg.eval.vis_score_thresh)
            elif paths:
                self.logger.info("drew %d validation images into %s (%d predictions at score >= %.2f)",
                                 len(paths), self.output_dir / "vis", drawn, cfg.eval.vis_score_thresh)

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
            try:
                metrics, summary = evaluate_model(self.cfg, self.model, self.val_set, device=self.device,
                                                  output_dir=str(self.output_dir))
            finally:
                random.setstate(py)
                np.random.set_state(npst)
        self.writer.write(self.iteration, metrics, kind="eval")
        return metrics, summary

    def _periodic_eval(self) -> None:
        self._sync_buffers()
        self._during = f"the evaluation at iteration {self.iteration}"
        try:
            metrics, summary = self._stoppable_evaluation()
        except _StopNow as stop:
            path = self.save_checkpoint() if self._saved_at != self.iteration else \
                self.output_dir / f"{self.checkpoints.periodic_name(self.iteration)}.pth"
            raise TrainingInterrupted(stop.signum, path, during=self._during) from None
        finally:
            self._during = "training"
        self.logger.info("evaluation at iteration %d:\n%s", self.iteration, summary)
        if self._record_best(metrics):
            self._save_weights("model_best")
        self.ddp_model.train()

    def _record_best(self, metrics: dict[str, float]) -> bool:
        """Update ``self.best`` from ``metrics``; True when this is a new best."""
        value = metrics.get(self.best["metric"])
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best["value"] is None or value > self.best["value"]:
            self.best.update(value=value, iteration=self.iteration)
            return True
        return False
