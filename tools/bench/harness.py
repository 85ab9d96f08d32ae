"""Side-by-side benchmark of resdet detectors against torchvision's same architecture.

Both models are built in one process with the same depth, the same weights (torchvision's random
initialisation copied into resdet with :func:`resdet.models.from_torchvision`), the same settings and
the same images, so they do the same work; timings alternate between the two models so background
load hits both alike, and medians are reported.

torchvision's model is built with frozen BatchNorm, as its published COCO models are. Inference is
timed for resdet's model as built and after :meth:`GeneralizedRCNN.optimize_for_inference` (BatchNorm
folded into convs, channels-last), alternating with torchvision's model as is. Training steps (forward,
backward, SGD step with learning rate 0 so the work stays equal) use both models unmodified.
FLOPs (matmuls and convolutions, ``FlopCounterMode``) divided by the median time give achieved GFLOP/s,
to compare with a plain matrix product measured in the same run (:func:`gemm_gflops`).

CPU peak memory is the rise of the process's peak resident set (``VmHWM`` after resetting it via
``/proc/self/clear_refs``); run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``tools/benchmark.py`` sets it)
so large tensors are returned to the OS when freed and the figure tracks live memory. CUDA peak memory
is ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "Row", "bench_multiscale_roi_align", "benchmark_pair", "build_pair", "format_markdown", "format_rows",
    "gemm_gflops", "interleaved_times", "normalize_depth",
]


@dataclass
class Row:
    """One measured quantity for both models."""

    model: str
    metric: str
    resdet: float
    torchvision: float
    unit: str
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.resdet / self.torchvision if self.torchvision else float("nan")


def build_pair(
    arch: str, depth: str, *, num_classes: int = 91, box_score_thresh: float = 0.0, seed: int = 0, **settings
) -> tuple[nn.Module, nn.Module]:
    """Returns (resdet model, torchvision model) of ``arch`` ("faster"|"mask") on ``depth`` with equal weights.

    torchvision's model is built like ``fasterrcnn_resnet50_fpn`` with pretrained weights (frozen
    BatchNorm, conv1 and layer1 frozen) on ``resnet_fpn_backbone(backbone_name=depth)``.
    ``box_score_thresh`` defaults to 0 so random weights still give 100 detections per image and the
    mask branch and mask pasting run as they would on a trained model. ``settings`` are further
    keyword arguments of torchvision's ``FasterRCNN`` / ``MaskRCNN`` (e.g. ``rpn_post_nms_top_n_test``);
    resdet's model reads them from torchvision's.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    from resdet.models import from_torchvision

    if arch not in ("faster", "mask"):
        raise ValueError(f"arch must be 'faster' or 'mask', got {arch!r}")
    torch.manual_seed(seed)
    body = resnet_fpn_backbone(backbone_name=depth, weights=None, trainable_layers=3, norm_layer=FrozenBatchNorm2d)
    cls = FasterRCNN if arch == "faster" else MaskRCNN
    tv = cls(body, num_classes=num_classes, box_score_thresh=box_score_thresh, **settings)
    rd = from_torchvision(tv, box_score_thresh=box_score_thresh)
    return rd, tv


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: list[Callable[[], object]], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Median seconds per call of each fn, calls alternating between the fns (so background load hits all alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for k, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _read_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB) ``fn`` needs above what is live before it runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _read_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    fn()
    return (_read_status_kib("VmHWM") - base) / 1024


def count_flops(fn: Callable[[], object]) -> int:
    """Floating point operations of one call (matmuls and convolutions, via FlopCounterMode).

    Counted with resdet's Winograd convolutions off: every convolution at its direct-convolution count,
    the nominal work both models do. The Winograd path does fewer multiplications for the same result, so
    resdet's achieved GFLOP/s can exceed the GEMM reference.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from resdet.layers.policy import fast_paths

    with FlopCounterMode(display=False) as counter, fast_paths(False, "winograd"):
        fn()
    return counter.get_total_flops()


def _set_min_size(model: nn.Module, min_size: int, max_size: int) -> None:
    model.transform.min_size = (min_size,)
    model.transform.max_size = max_size


def _synthetic_image(h: int, w: int, device: torch.device, generator: torch.Generator) -> Tensor:
    # Smooth blobs plus noise: closer to a photo than pure noise, deterministic.
    low = torch.rand(3, max(h // 32, 1), max(w // 32, 1), generator=generator)
    img = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    img = (img + 0.1 * torch.rand(3, h, w, generator=generator)).clamp(0, 1)
    return img.to(device)


def _synthetic_targets(n: int, h: int, w: int, masks: bool, device: torch.device, g: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(n):
        k = 5
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 16 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        t = {"boxes": boxes.to(device), "labels": torch.randint(1, 91, (k,), generator=g).to(device)}
        if masks:
            m = torch.zeros(k, h, w, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                m[j, y1:y2, x1:x2] = 1
            t["masks"] = m.to(device)
        targets.append(t)
    return targets


def gemm_gflops(device: torch.device, n: int = 2048, iters: int = 5) -> float:
    """Achieved GFLOP/s of a plain float32 n×n matrix product: the machine's reference for the models."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    (t,) = interleaved_times([lambda: a @ b], iters, 1, device)
    return 2 * n**3 / t / 1e9


def normalize_depth(depth: str) -> str:
    """``"34"``, ``"r34"``, ``"resnet34"`` -> ``"resnet34"`` (other backbone names pass unchanged)."""
    text = str(depth).lower()
    digits = text[1:] if text.startswith("r") and text[1:].isdigit() else text
    return f"resnet{digits}" if digits.isdigit() else text


def benchmark_pair(
    arch: str,
    depth: str,
    *,
    sizes: tuple[tuple[int, int], ...] = ((800, 1066), (320, 427)),
    iters: int = 5,
    warmup: int = 1,
    train: tuple[tuple[int, int, int], ...] = ((2, 512, 683), (4, 320, 427)),
    train_iters: int = 3,
    device: str = "cpu",
    amp: bool = False,
    measure: tuple[str, ...] = ("infer", "train", "memory", "flops"),
    settings: dict | None = None,
) -> list[Row]:
    """Measures one architecture for resdet and torchvision; returns the rows (see the module docstring).

    Inference rows come in two kinds, timed alternately in one loop with torchvision's model: ``as built``
    (resdet's model exactly as constructed) and ``optimized`` (after ``optimize_for_inference()``).
    Time rows carry the FLOPs of one call (``extra["gflop"]``, resdet and torchvision) when "flops" is
    measured, from which :func:`format_markdown` derives achieved GFLOP/s.

    Args:
        train: training steps to time, each ``(batch, height, width)``.
        settings: torchvision detector keyword arguments applied to both models (see :func:`build_pair`).
    """
    import copy

    dev = torch.device(device)
    depth = normalize_depth(depth)
    name = f"{arch}_rcnn_{depth}_fpn"
    rd, tv = build_pair(arch, depth, **(settings or {}))
    rows = [
        Row(name, "params", sum(p.numel() for p in rd.parameters()) / 1e6,
            sum(p.numel() for p in tv.parameters()) / 1e6, "M"),
    ]
    rd_train = copy.deepcopy(rd).to(dev) if ("train" in measure or "memory" in measure) and train else None
    rd_built = rd.to(dev).eval()
    rd_opt = copy.deepcopy(rd_built).optimize_for_inference()
    tv = tv.to(dev).eval()
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device_type=dev.type) if amp else contextlib.nullcontext()

    def infer(model: nn.Module, image: Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(), autocast:
                return model([image])
        return run

    for h, w in sizes:
        image = _synthetic_image(h, w, dev, g)
        for model in (rd_built, rd_opt, tv):
            _set_min_size(model, min(h, w), max(1333, max(h, w)))
        fns = [infer(rd_built, image), infer(rd_opt, image), infer(tv, image)]
        ndet = len(fns[0]()[0]["boxes"])
        flops = [count_flops(fn) / 1e9 for fn in fns] if "flops" in measure else None
        if "infer" in measure:
            t = interleaved_times(fns, iters, warmup, dev)
            for k, kind in ((0, "as built"), (1, "optimized")):
                extra = {"detections": ndet, "gflop": (flops[k], flops[2])} if flops else {"detections": ndet}
                rows.append(Row(name, f"infer {h}x{w} {kind}", t[k] * 1e3, t[2] * 1e3, "ms", extra))
        if "memory" in measure:
            if "infer" not in measure:
                for fn in fns:  # warm: first calls allocate caches the peak should not count
                    fn()
            m = [peak_memory_mib(fn, dev) for fn in fns]
            rows.append(Row(name, f"infer peak mem {h}x{w} as built", m[0], m[2], "MiB"))
            rows.append(Row(name, f"infer peak mem {h}x{w} optimized", m[1], m[2], "MiB"))
        if flops:
            rows.append(Row(name, f"infer GFLOPs {h}x{w}", flops[0], flops[2], "GFLOP"))
    del rd_built, rd_opt
    if rd_train is not None:
        tv.train()
        rd_train.train()
        # lr 0: the step runs in full but both models keep equal weights, hence equal proposals and the
        # same number of positive RoIs (the mask branch's cost) in every step.
        opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0) for m in (rd_train, tv)]
        for batch, h, w in train:
            images = [_synthetic_image(h, w, dev, g) for _ in range(batch)]
            targets = _synthetic_targets(batch, h, w, arch == "mask", dev, g)
            for model in (rd_train, tv):
                _set_min_size(model, min(h, w), max(1333, max(h, w)))

            def step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], object]:
                def run() -> object:
                    with autocast:
                        loss = sum(model(images, targets).values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    return loss
                return run

            fns = [step(rd_train, opts[0]), step(tv, opts[1])]
            if "train" in measure:
                extra = {"gflop": tuple(count_flops(fn) / 1e9 for fn in fns)} if "flops" in measure else {}
                # The FLOP count ran each step once already: it stands for one warm-up step.
                t = interleaved_times(fns, train_iters, max(0, warmup - bool(extra)), dev)
                rows.append(Row(name, f"train step b{batch} {h}x{w}", t[0] * 1e3, t[1] * 1e3, "ms", extra))
            else:
                for fn in fns:  # warm: first calls allocate caches the peak should not count
                    fn()
            if "memory" in measure:
                m = [peak_memory_mib(fn, dev) for fn in fns]
                rows.append(Row(name, f"train peak mem b{batch} {h}x{w}", m[0], m[1], "MiB"))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A fixed-width table: model, metric, resdet, torchvision, ratio resdet/torchvision."""
    lines = [f"{'model':<24} {'metric':<30} {'resdet':>10} {'torchvision':>12} {'ratio':>7}  unit"]
    for r in rows:
        lines.append(
            f"{r.model:<24} {r.metric:<30} {r.resdet:>10.2f} {r.torchvision:>12.2f} {r.ratio:>7.3f}  {r.unit}"
        )
    return "\n".join(lines)


def bench_multiscale_roi_align(
    *,
    num_rois: int = 1024,
    output_size: int = 7,
    sampling_ratio: int = 2,
    batch: int = 2,
    image_size: tuple[int, int] = (800, 1088),
    channels: int = 256,
    iters: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Row:
    """``MultiScaleRoIAlign`` forward + backward: resdet's pooler (``impl="auto"``) vs torchvision's.

    Four FPN levels (strides 4..32) of ``batch`` images padded to ``image_size``, ``channels`` channels;
    ``num_rois`` boxes spread over the images, log-uniform sides from 16 px to the image's short side
    (so every level gets RoIs). Runs alternate between the two poolers; the Row holds median ms and, in
    ``extra``, the largest absolute differences of the outputs and of the feature gradients.
    """
    from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign

    from resdet.heads import MultiScaleRoIAlign

    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    feats = {
        f"p{k}": torch.randn(batch, channels, -(-h // 2**k), -(-w // 2**k), generator=g).to(dev).requires_grad_()
        for k in range(2, 6)
    }
    per_image = [num_rois // batch + (i < num_rois % batch) for i in range(batch)]
    boxes = []
    for n in per_image:
        side = torch.exp(torch.empty(n, 2).uniform_(float(torch.log(torch.tensor(16.0))),
                                                     float(torch.log(torch.tensor(float(min(h, w))))), generator=g))
        x1y1 = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - side).clamp(min=0)
        boxes.append(torch.cat([x1y1, x1y1 + side], dim=1).to(dev))
    sizes = [(h, w)] * batch
    ours = MultiScaleRoIAlign(tuple(feats), output_size, sampling_ratio)
    theirs = TVMultiScaleRoIAlign(list(feats), output_size, sampling_ratio)
    grad_out = torch.randn(num_rois, channels, output_size, output_size, generator=g).to(dev)

    def run(pool: nn.Module) -> Callable[[], tuple[Tensor, list[Tensor]]]:
        def fn() -> tuple[Tensor, list[Tensor]]:
            for x in feats.values():
                x.grad = None
            out = pool(feats, boxes, sizes)
            out.backward(grad_out)
            return out, [x.grad for x in feats.values()]
        return fn

    fns = [run(ours), run(theirs)]
    (a, ga), (b, gb) = fns[0](), fns[1]()
    extra = {
        "max_abs_out": float((a - b).detach().abs().max()) if a.numel() else 0.0,
        "max_abs_grad": max(float((x - y).abs().max()) for x, y in zip(ga, gb)),
        "num_rois": num_rois, "output_size": output_size, "batch": batch, "image_size": image_size,
    }
    del a, b, ga, gb
    t = interleaved_times(fns, iters, warmup, dev)
    metric = f"roi_align fwd+bwd {num_rois}x{output_size}^2 b{batch} {h}x{w}"
    return Row("MultiScaleRoIAlign", metric, t[0] * 1e3, t[1] * 1e3, "ms", extra)


def format_markdown(rows: list[Row], gemm: float | None = None) -> str:
    """A markdown table (what the README takes); time rows with FLOPs get achieved GFLOP/s and, given the
    GEMM reference ``gemm`` (GFLOP/s), its percentage."""
    head = "| model | metric | resdet | torchvision | ratio | unit | resdet GFLOP/s | torchvision GFLOP/s |"
    lines = [head, "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        rates = ["", ""]
        if r.unit == "ms" and "gflop" in r.extra:
            for k, (gflop, ms) in enumerate(zip(r.extra["gflop"], (r.resdet, r.torchvision))):
                rate = gflop / (ms / 1e3)
                rates[k] = f"{rate:.0f}" + (f" ({100 * rate / gemm:.0f} %)" if gemm else "")
        lines.append(
            f"| {r.model} | {r.metric} | {r.resdet:.2f} | {r.torchvision:.2f} | {r.ratio:.3f} | {r.unit} | "
            f"{rates[0]} | {rates[1]} |"
        )
    if gemm:
        lines.append(f"\nReference: a float32 2048×2048 matrix product ran at {gemm:.0f} GFLOP/s in this run.")
    return "\n".join(lines)
