"""The logic of ``tools/semantic_peer.py``: resdet's semantic models against segmentation_models_pytorch's
same architecture on resdet's own timm encoder, trained by the same :class:`resdet.engine.trainer.Trainer`.

Both sides read one resdet config: same data, data order and augmentation (the seeded loader), same input
transform (normalization, padding; resdet's :class:`~resdet.models.semantic.SemSegTransform`), same
optimizer, schedule, loss (pixel cross-entropy, 255 ignored) and evaluator. Only the network differs: the
smp side is ``smp.<Arch>("tu-resdet_<backbone>", encoder_weights=None, classes=K)`` wrapped in resdet's
semantic model contract (:class:`SmpSegmentor`).

segmentation_models_pytorch is a benchmark-only dependency (``pip install -e .[peer]``); this module lives
outside resdet's import path so that resdet never imports it.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from torch import Tensor, nn

# resdet arch -> (shipped shapes config, smp class)
ARCHS = {
    "deeplabv3plus": ("configs/shapes/deeplabv3plus_r34.yaml", "DeepLabV3Plus"),
    "semantic_fpn": ("configs/shapes/semantic_fpn_r34.yaml", "FPN"),
}
SIDES = ("resdet", "smp")


def smp_network(arch: str, backbone: str, num_classes: int) -> nn.Module:
    """smp's network for a resdet arch name, on resdet's timm encoder, from scratch, smp's defaults."""
    import segmentation_models_pytorch as smp

    import resdet  # noqa: F401  (registers resdet_* with timm)

    return getattr(smp, ARCHS[arch][1])(f"tu-resdet_{backbone}", encoder_weights=None, classes=num_classes)


def smp_segmentor(cfg: Any) -> nn.Module:
    """An smp network behind resdet's semantic model contract, with the transform resdet's model would use."""
    from resdet.models import build_model
    from resdet.models.semantic import SemanticSegmentor, sem_seg_cross_entropy

    reference = build_model(cfg)  # for its input transform only

    class SmpSegmentor(SemanticSegmentor):
        def __init__(self, network: nn.Module, num_classes: int) -> None:
            super().__init__(reference.transform, ignore_index=reference.ignore_index)
            self.network = network
            self._num_classes = num_classes

        @property
        def num_classes(self) -> int:
            return self._num_classes

        def predict_logits(self, batch: Tensor) -> Tensor:
            return self.network(batch)  # [N, K, Hp, Wp]

        def compute_losses(self, batch: Tensor, targets: Tensor) -> dict[str, Tensor]:
            return {"loss_sem_seg": sem_seg_cross_entropy(self.network(batch), targets,
                                                          ignore_index=self.ignore_index)}

    return SmpSegmentor(smp_network(cfg.model.arch, cfg.model.backbone, cfg.model.num_classes),
                        cfg.model.num_classes)


def run_one(config: str, side: str, seed: int, output_dir: str, overrides: list[str]) -> dict[str, Any]:
    """Train and evaluate one side with one seed in this process; returns mIoU, times, parameter count."""
    import torch

    from resdet.config import load_config
    from resdet.engine.trainer import Trainer

    cfg = load_config(config, [f"train.seed={seed}", f"train.output_dir={output_dir}", "train.progress_bar=false",
                               "train.num_vis_images=0", "train.checkpoint_period=0", *overrides])

    class PeerTrainer(Trainer):
        def _build_model(self) -> nn.Module:
            return super()._build_model() if side == "resdet" else smp_segmentor(self.cfg)

    start = time.perf_counter()
    trainer = PeerTrainer(cfg)
    metrics = trainer.train()
    total = time.perf_counter() - start
    train_s = next((json.loads(line)["time/train_s"] for line in open(Path(output_dir) / "metrics.jsonl")
                    if "time/train_s" in line), float("nan"))
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"side": side, "seed": seed, "mIoU": metrics["mIoU"], "train_s": train_s, "total_s": total,
            "params": params, "threads": torch.get_num_threads()}


def plan(archs: list[str], seeds: list[int]) -> list[list[tuple[str, int, str]]]:
    """The runs as (arch, seed, side), grouped in pairs of one seed; the side that goes first alternates
    from seed to seed, so that load drifting over a sequential comparison falls on both sides alike."""
    return [[(arch, seed, side) for side in (SIDES if i % 2 == 0 else SIDES[::-1])]
            for arch in archs for i, seed in enumerate(seeds)]


def run_all(
    archs: list[str], seeds: list[int], out: Path, overrides: list[str], *, jobs: int = 1, log=print
) -> list[dict[str, Any]]:
    """Every (arch, seed) for both sides, each run in its own process (logs in its run folder).

    ``jobs=1`` runs them one after the other in :func:`plan`'s order. ``jobs >= 2`` runs up to ``jobs``
    at once and starts the two sides of a seed together, so that each resdet/smp pair (whose time ratio
    the table reports) shares the same machine load; a run that fails stops the comparison with its log's
    tail.
    """
    groups = plan(archs, seeds)
    if jobs < 2:
        groups = [[run] for group in groups for run in group]
    pending, running, rows = list(groups), {}, []
    while pending or running:
        while pending and len(running) + len(pending[0]) <= max(jobs, 1):
            for arch, seed, side in pending.pop(0):
                run_dir = out / f"{arch}_{side}_seed{seed}"
                run_dir.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(Path(__file__).with_name("semantic_peer.py")), "--one", side,
                       "--config", ARCHS[arch][0], "--seed", str(seed), "--output", str(run_dir), *overrides]
                with open(run_dir / "peer.log", "w") as f:  # the child keeps its own copy of the handle
                    running[subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)] = (arch, seed, side, run_dir)
        done = [proc for proc in running if proc.poll() is not None]
        if not done:
            time.sleep(1.0)
            continue
        for proc in done:
            arch, seed, side, run_dir = running.pop(proc)
            text = (run_dir / "peer.log").read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                for other in running:
                    other.terminate()
                last = next((line for line in reversed(text.splitlines()) if line.strip()), "no output")
                raise RuntimeError(f"{arch} {side} seed {seed} failed (exit {proc.returncode}): {last.strip()} "
                                   f"(log: {run_dir / 'peer.log'})")
            row = {"arch": arch, "jobs": jobs, **json.loads(lines[-1])}
            log(json.dumps(row))
            rows.append(row)
    return rows


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl``, the newest per (arch, side, seed)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for n, line in enumerate(open(path), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows[(row["arch"], row["side"], row["seed"])] = row
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}:{n}: not a result row ({e})") from None
    return list(rows.values())


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, spread = max - min)."""
    return statistics.fmean(values), max(values) - min(values)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: per arch and side, mIoU mean ± spread (max - min) over seeds, times, and the
    resdet/smp time ratio of each seed's interleaved pair."""
    out = ["| arch | side | seeds | mIoU mean | mIoU min..max | train s (mean) | total s (mean) | params (M) |",
           "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        by_side = {s: [r for r in rows if r["arch"] == arch and r["side"] == s] for s in SIDES}
        for side, runs in by_side.items():
            if not runs:
                continue
            miou = [r["mIoU"] for r in runs]
            mean, _ = _stats(miou)
            out.append(f"| {arch} | {side} | {len(runs)} | {mean:.3f} | {min(miou):.3f}..{max(miou):.3f} | "
                       f"{statistics.fmean(r['train_s'] for r in runs):.0f} | "
                       f"{statistics.fmean(r['total_s'] for r in runs):.0f} | {runs[0]['params'] / 1e6:.1f} |")
        ours, peer = by_side["resdet"], by_side["smp"]
        if ours and peer:
            pairs = [(a, b) for a in ours for b in peer if a["seed"] == b["seed"]]
            ratios = [a["train_s"] / b["train_s"] for a, b in pairs]
            margin = statistics.fmean(r["mIoU"] for r in ours) - statistics.fmean(r["mIoU"] for r in peer)
            spread = max(_stats([r["mIoU"] for r in ours])[1], _stats([r["mIoU"] for r in peer])[1])
            ahead = "more" if margin > spread else "not more"
            times = ", ".join(f"{x:.2f}" for x in ratios) or "no pairs"
            verdicts.append(f"{arch}: resdet - smp mIoU {margin:+.3f}, {ahead} than the largest seed spread "
                            f"({spread:.3f}); resdet/smp training time per seed: {times}")
    return "\n".join(out + [""] + verdicts)
