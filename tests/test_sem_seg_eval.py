"""SemSegEvaluator: exact mIoU / accuracies on hand-made cases, accumulation, errors, distributed sum."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resdet.evaluation.sem_seg import SemSegEvaluator, confusion_matrix


def _t(rows):
    return {"sem_seg": torch.tensor(rows, dtype=torch.int64)}


def test_perfect_prediction_is_one():
    gt = torch.randint(0, 5, (7, 9))
    ev = SemSegEvaluator(5)
    ev.process([{"sem_seg": gt}], [{"sem_seg": gt.clone()}])
    m = ev.evaluate()
    present = gt.unique().numel()
    assert m["mIoU"] == 1.0 and m["pAcc"] == 1.0 and m["mAcc"] == 1.0 and m["fwIoU"] == pytest.approx(1.0)
    assert sum(f"IoU/{k}" in m for k in range(5)) == present


def test_hand_made_case_exact():
    # Pairs (gt, pred) over the 7 non-ignored pixels: (0,0)x3, (0,1)x1, (1,1)x2, (1,0)x1.
    # Class 2 is predicted only on an ignored pixel, so it is neither present nor predicted: NaN.
    gt = _t([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = _t([[0, 1, 1, 1], [0, 0, 0, 2]])
    ev = SemSegEvaluator(3, class_names=["bg", "road", "car"])
    ev.process([gt], [pred])
    assert ev.conf.tolist() == [[3, 1, 0], [1, 2, 0], [0, 0, 0]]
    m = ev.evaluate()
    assert m["IoU/bg"] == pytest.approx(3 / 5)  # tp 3, gt 4, pred 4
    assert m["IoU/road"] == pytest.approx(2 / 4)  # tp 2, gt 3, pred 3
    assert "IoU/car" not in m  # undefined
    assert m["mIoU"] == pytest.approx(0.55)
    assert m["pAcc"] == pytest.approx(5 / 7)
    assert m["mAcc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m["fwIoU"] == pytest.approx(3 / 5 * 4 / 7 + 2 / 4 * 3 / 7)
    table = ev.summary()
    assert "road" in table and "50.00" in table and "mIoU 55.00" in table


def test_false_positive_class_counts_as_zero_iou():
    ev = SemSegEvaluator(2)
    ev.process([_t([[0, 0], [0, 0]])], [_t([[0, 0], [0, 1]])])
    m = ev.evaluate()
    assert m["IoU/0"] == pytest.approx(3 / 4) and m["IoU/1"] == 0.0
    assert m["mIoU"] == pytest.approx(3 / 8)
    assert m["mAcc"] == pytest.approx(3 / 4)  # class 1 has no ground truth: no accuracy


def test_accumulates_over_batches_and_accepts_logits():
    g = torch.Generator().manual_seed(1)
    gts = [torch.randint(0, 4, (5, 6), generator=g) for _ in range(3)]
    preds = [torch.randint(0, 4, (5, 6), generator=g) for _ in range(3)]
    gts[1][0] = 255
    once = SemSegEvaluator(4)
    once.process([{"sem_seg": torch.cat(gts)}], [{"sem_seg": torch.cat(preds)}])
    split = SemSegEvaluator(4)
    split.process([{"sem_seg": gts[0]}], [{"sem_seg": preds[0]}])
    # Logits whose argmax is the prediction.
    logits = [torch.nn.functional.one_hot(p, 4).permute(2, 0, 1).float() for p in preds[1:]]
    split.process([{"sem_seg": g_} for g_ in gts[1:]], [{"sem_seg_logits": x} for x in logits])
    assert torch.equal(once.conf, split.conf)
    assert once.evaluate() == pytest.approx(split.evaluate())
    split.reset()
    assert split.conf.sum() == 0


def test_bad_inputs_name_the_problem():
    ev = SemSegEvaluator(3)
    with pytest.raises(ValueError, match="original image size"):
        ev.process([_t([[0, 1]])], [_t([[0], [1]])])
    with pytest.raises(ValueError, match=r"ground truth has values \[7\]"):
        ev.process([_t([[0, 7]])], [_t([[0, 1]])])
    with pytest.raises(ValueError, match=r"prediction has values \[3\]"):
        ev.process([_t([[0, 1]])], [_t([[0, 3]])])
    with pytest.raises(KeyError, match="sem_seg"):
        ev.process([_t([[0, 1]])], [{"boxes": torch.zeros(0, 4)}])


def test_confusion_matrix_ignores_ignore_index():
    conf = confusion_matrix(torch.tensor([255, 255, 1]), torch.tensor([0, 2, 1]), 3)
    assert conf.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


def _worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ev = SemSegEvaluator(2)
        # Rank 0 sees a perfect pixel of class 0, rank 1 a class-1 pixel predicted as 0.
        gt, pred = ([[0]], [[0]]) if rank == 0 else ([[1]], [[0]])
        ev.process([_t(gt)], [_t(pred)])
        m = ev.evaluate()
        if rank == 0:
            torch.save({"conf": ev._total_confusion(), "metrics": m}, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_distributed_sums_confusion_across_ranks(tmp_path):
    result = tmp_path / "result.pt"
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True, start_method="fork"
    )
    out = torch.load(result)
    assert out["conf"].tolist() == [[1, 0], [1, 0]]
    assert out["metrics"]["mIoU"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["metrics"]["pAcc"] == pytest.approx(1 / 2)
