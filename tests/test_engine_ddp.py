"""Two CPU processes under torchrun (gloo): DistributedDataParallel training over an uneven dataset (5
images, 2 ranks: the epoch boundary falls mid-batch) runs the same number of steps on both ranks without a
hang, ends with identical weights, and the sharded evaluation gathers every validation image. In the same
launch, a SIGTERM that reaches one rank during an evaluation stops both ranks together, after it, with one
checkpoint (no rank left waiting in a collective)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from resdet.config import load_config
    from resdet.engine import distributed as dist
    from resdet.engine.trainer import Trainer
    root, out = sys.argv[1], sys.argv[2]
    cfg = load_config(os.path.join({repo!r}, "configs/shapes/mask_rcnn_r34_fpn.yaml"), [
        f"data.root={{root}}", "data.shapes.num_train=5", "data.shapes.num_val=3", "data.shapes.image_size=64",
        "data.batch_size=1", "data.test_batch_size=1", "data.num_workers=0", "model.backbone=resnet18",
        "model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_train=100",
        "model.rpn_post_nms_top_n_train=50", "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=20",
        "model.box_batch_size_per_image=16",
        "model.options={{fpn_out_channels: 32, box_representation_size: 64, mask_layers: [32], "
        "mask_predictor_channels: 32}}",
        "solver.max_iter=4", "solver.steps=[]", "solver.warmup_iters=0", "solver.lr=0.01", "train.device=cpu",
        f"train.output_dir={{out}}", "train.checkpoint_period=0", "train.num_vis_images=0", "train.progress_bar=false",
        "train.sync_bn=true", "eval.iou_types=[bbox]"])  # sync_bn: ignored with a warning on CPU
    trainer = Trainer(cfg)
    assert dist.get_world_size() == 2 and isinstance(trainer.ddp_model, torch.nn.parallel.DistributedDataParallel)
    metrics = trainer.train()
    torch.save({{"model": trainer.model.state_dict(), "metrics": metrics, "steps": trainer.batches_done}},
               os.path.join(out, f"rank{{dist.get_rank()}}.pt"))

    # a signal that reaches rank 1 only, during the evaluation at iteration 1
    import signal
    from resdet.config import apply_overrides
    from resdet.engine import trainer as trainer_mod
    from resdet.engine.trainer import TrainingInterrupted
    evaluate = trainer_mod.evaluate_model

    def signalled_evaluate(*args, **kwargs):
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    trainer_mod.evaluate_model = signalled_evaluate
    trainer = Trainer(apply_overrides(cfg, [f"train.output_dir={{out}}/signal", "solver.max_iter=2",
                                            "train.eval_period=1"]))
    try:
        trainer.train()
        outcome = "finished"
    except TrainingInterrupted as err:
        outcome = str(err)
    with open(os.path.join(out, f"signal_rank{{dist.get_rank()}}.txt"), "w") as f:
        f.write(outcome)
    dist.destroy_distributed()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(repo=REPO))
    from resdet.data import shapes

    shapes.generate(str(tmp_path / "shapes"), num_train=5, num_val=3, image_size=64, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script),
           str(tmp_path / "shapes"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "out" / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "out" / "rank1.pt", weights_only=False)
    assert r0["steps"] == r1["steps"] == 4  # two epochs' boundary crossed on both ranks
    assert r0["model"].keys() == r1["model"].keys()
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert r0["metrics"]["bbox/AP"] == r1["metrics"]["bbox/AP"]  # gathered on rank 0, broadcast to all
    resumable = torch.load(tmp_path / "out" / "model_0000004.pth", weights_only=True)  # end of training
    assert resumable["iteration"] == 4 and len(resumable["rng"]) == 2
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert final["iteration"] == 4 and "optimizer" not in final
    for rank in (0, 1):  # both ranks stopped after the evaluation, on the same checkpoint
        outcome = (tmp_path / "out" / f"signal_rank{rank}.txt").read_text()
        assert "SIGTERM during the evaluation at iteration 1" in outcome and "model_0000001.pth" in outcome, outcome
    assert torch.load(tmp_path / "out" / "signal" / "model_0000001.pth", weights_only=True)["iteration"] == 1
