"""Label spaces: how a detector's class labels map to a dataset's category ids.

A detector predicts labels ``1..K`` (0 is background). A :class:`LabelSpace` says which dataset category
id each label stands for, and its name:

* resdet models trained on a COCO-format json predict *contiguous* labels: label ``i`` is the ``i``-th
  smallest category id of the training json (ids such as 5, 17, 88, 90 come back as 5, 17, 88, 90);
* torchvision's published COCO models predict in the 91-entry COCO space: label ``l`` *is* COCO category
  id ``l``, with the ten unused ids ("N/A") as labels that no ground truth carries.

The space travels with the model (``model.label_space``) and in resdet checkpoints as plain types
(``{"cat_ids": [...], "class_names": [...]}``, loadable with ``torch.load(weights_only=True)``). The
evaluator, ``tools/test.py`` (results JSON) and ``tools/infer.py`` translate labels through it, and
fine-tuning between two spaces keeps the class rows of the categories both share
(:func:`remap_class_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor

__all__ = ["LabelSpace", "TORCHVISION_COCO_NUM_CLASSES", "remap_class_rows", "CLASS_ROW_KEYS", "label_space_of",
           "check_label_space", "checkpoint_label_space"]

TORCHVISION_COCO_NUM_CLASSES = 91  # background + category ids 1..90 (80 used, 10 "N/A")

# Per-class rows of the detection heads: key suffix -> rows per class.
CLASS_ROW_KEYS = {
    "roi_heads.box_predictor.cls_score.weight": 1,
    "roi_heads.box_predictor.cls_score.bias": 1,
    "roi_heads.box_predictor.bbox_pred.weight": 4,
    "roi_heads.box_predictor.bbox_pred.bias": 4,
    "roi_heads.mask_predictor.mask_fcn_logits.weight": 1,
    "roi_heads.mask_predictor.mask_fcn_logits.bias": 1,
}


@dataclass(frozen=True)
class LabelSpace:
    """Label ``i`` (``1..K``) is dataset category ``cat_ids[i - 1]``, named ``class_names[i - 1]``.

    A panoptic model's space also holds its stuff categories: labels ``1..num_things`` are the detector's
    classes (things), the labels after them stuff (``num_things`` None: every label is a detector class).
    """

    cat_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    num_things: int | None = None

    def __post_init__(self) -> None:
        if len(self.cat_ids) != len(self.class_names):
            raise ValueError(f"label space: {len(self.cat_ids)} category ids but {len(self.class_names)} names")
        if len(set(self.cat_ids)) != len(self.cat_ids):
            raise ValueError(f"label space: repeated category ids in {list(self.cat_ids)}")
        if self.num_things is not None and not 0 <= self.num_things <= len(self.cat_ids):
            raise ValueError(f"label space: num_things={self.num_things} for {len(self.cat_ids)} categories")

    @property
    def num_classes(self) -> int:
        """Detector classes counting background (``K + 1``; things + 1 in a panoptic space)."""
        return (len(self.cat_ids) if self.num_things is None else self.num_things) + 1

    def label_to_cat_id(self) -> dict[int, int]:
        """``{label: category id}`` for labels ``1..K``."""
        return {i + 1: c for i, c in enumerate(self.cat_ids)}

    def name(self, label: int) -> str:
        """The class name of ``label`` (``str(label)`` outside the space)."""
        return self.class_names[label - 1] if 1 <= label <= len(self.class_names) else str(label)

    def to_dict(self) -> dict[str, Any]:
        """Plain types for checkpoints."""
        out: dict[str, Any] = {"cat_ids": [int(c) for c in self.cat_ids],
                               "class_names": [str(n) for n in self.class_names]}
        if self.num_things is not None:
            out["num_things"] = int(self.num_things)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LabelSpace":
        num_things = data.get("num_things")
        return cls(tuple(int(c) for c in data["cat_ids"]), tuple(str(n) for n in data["class_names"]),
                   None if num_things is None else int(num_things))

    @classmethod
    def contiguous(cls, cat_ids: list[int], class_names: list[str]) -> "LabelSpace":
        """Labels ``1..K`` over the sorted ``cat_ids`` (names in the same order as ``cat_ids``)."""
        pairs = sorted(zip(cat_ids, class_names))
        return cls(tuple(c for c, _ in pairs), tuple(n for _, n in pairs))

    @classmethod
    def from_dataset(cls, dataset: Any) -> "LabelSpace | None":
        """The space of a resdet detection dataset (``contiguous_to_cat_id`` + ``class_names``); None when
        the dataset has no class names (semantic-only data)."""
        names = list(getattr(dataset, "class_names", None) or [])
        if not names:
            return None
        mapping = dict(getattr(dataset, "contiguous_to_cat_id", None) or {})
        cat_ids = [int(mapping.get(i + 1, i + 1)) for i in range(len(names))]
        num_things = getattr(dataset, "num_things", None)
        return cls(tuple(cat_ids), tuple(names), None if num_things is None else int(num_things))

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> "LabelSpace | None":
        """The space stored in a resdet checkpoint (``label_space``, or the older ``class_names`` +
        ``contiguous_to_cat_id`` pair); None when it holds neither."""
        if isinstance(state.get("label_space"), Mapping):
            return cls.from_dict(state["label_space"])
        names = list(state.get("class_names") or [])
        if not names:
            return None
        mapping = dict(state.get("contiguous_to_cat_id") or {})
        return cls(tuple(int(mapping.get(i + 1, i + 1)) for i in range(len(names))), tuple(names))

    @classmethod
    def torchvision_coco(cls) -> "LabelSpace":
        """torchvision's COCO models: label ``l`` is COCO category id ``l`` (1..90, "N/A" in the gaps)."""
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

        names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # 91 names, [0] background
        return cls(tuple(range(1, TORCHVISION_COCO_NUM_CLASSES)), tuple(names[1:]))


def remap_class_rows(state_dict: Mapping[str, Tensor], model_state: Mapping[str, Tensor], source: LabelSpace,
                     target: LabelSpace) -> tuple[dict[str, Tensor], str]:
    """Re-order the per-class rows of a detector checkpoint from ``source`` labels to ``target`` labels.

    For each per-class head tensor (:data:`CLASS_ROW_KEYS`) the result starts from the model's own
    (freshly initialised) tensor; the background row and the rows of every category both spaces hold (same
    id and same name: ids alone collide across taxonomies) are copied from the checkpoint. Tensors whose row
    count does not fit ``source`` are left as they are (the shape check of the caller then reports them).

    Args:
        state_dict: checkpoint tensors under the model's key names.
        model_state: ``model.state_dict()`` of the target model.

    Returns:
        (a new state dict with remapped rows, a one-line report; "" when nothing was remapped).
    """
    out = dict(state_dict)
    # Same id and same name (case-insensitive): ids alone collide across taxonomies (Cityscapes' 2 is not COCO's 2).
    src_label = {(c, n.lower()): i + 1 for i, (c, n) in enumerate(zip(source.cat_ids, source.class_names))}
    pairs = [(j + 1, src_label[(c, n.lower())]) for j, (c, n) in enumerate(zip(target.cat_ids, target.class_names))
             if (c, n.lower()) in src_label]  # (target label, source label)
    # Only detector classes have rows (a panoptic space's stuff labels follow its things).
    pairs = [(t, s) for t, s in pairs if t < target.num_classes and s < source.num_classes]
    done = False
    for key, rows in CLASS_ROW_KEYS.items():
        if key not in state_dict or key not in model_state:
            continue
        value, fresh = state_dict[key], model_state[key]
        if value.shape[0] != source.num_classes * rows or fresh.shape[0] != target.num_classes * rows:
            continue
        new = fresh.detach().clone()
        for t, s in [(0, 0), *pairs]:
            new[t * rows:(t + 1) * rows] = value[s * rows:(s + 1) * rows].to(new.dtype)
        out[key] = new
        done = True
    if not done:
        return out, ""
    matched = {t for t, _ in pairs}
    unmatched = [target.name(j) for j in range(1, target.num_classes) if j not in matched]
    report = (f"class rows matched by category id and name: {len(pairs)} of {len(target.cat_ids)} classes loaded "
              f"from the checkpoint's {len(source.cat_ids)}-class space")
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        report += f"; {len(unmatched)} re-initialised (no such category in the checkpoint): {shown}"
    return out, report


def label_space_of(model: Any) -> "LabelSpace | None":
    """``model.label_space`` through DDP / ``module`` wrappers; None when the model has none."""
    model = getattr(model, "module", model)
    return getattr(model, "label_space", None)


def check_label_space(space: LabelSpace, dataset: Any) -> None:
    """Raise when none of the model's categories occurs in ``dataset`` (wrong checkpoint or data): the
    evaluation would silently score 0."""
    data = LabelSpace.from_dataset(dataset)
    if data is None or set(space.cat_ids) & set(data.cat_ids):
        return
    from resdet.config import ConfigError

    raise ConfigError(f"the model's {len(space.cat_ids)} categories (ids {list(space.cat_ids)[:8]}...) share no "
                      f"category id with the validation data's {list(data.cat_ids)[:8]}...: wrong checkpoint "
                      f"or data.root?")


def checkpoint_label_space(state_dict: Mapping[str, Tensor], extras: Mapping[str, Any]) -> LabelSpace | None:
    """The label space a checkpoint's class rows are in: the one a resdet checkpoint stores (``extras``:
    its entries besides the weights), torchvision's COCO space for a torchvision detection checkpoint with
    a 91-way predictor, else None."""
    if extras:
        return LabelSpace.from_checkpoint(extras)
    rows = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if rows is not None and rows.shape[0] == TORCHVISION_COCO_NUM_CLASSES:
        return LabelSpace.torchvision_coco()
    return None
