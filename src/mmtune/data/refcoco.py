"""RefCOCO, RefCOCO+ and RefCOCOg (G-Ref) in the REFER format.

Files (as distributed by the REFER toolkit):

- ``refs(unc).p`` (RefCOCO, RefCOCO+), ``refs(umd).p`` or ``refs(google).p`` (RefCOCOg): a
  pickled list of refs ``{ref_id, ann_id, image_id, split, sentences: [{sent_id, sent, raw}]}``;
- ``instances.json``: COCO annotations (``images``, ``annotations`` with polygon or RLE
  ``segmentation``);
- an image folder holding the COCO ``train2014`` files named in ``images[].file_name``.

Every sentence of a ref is one sample (``one_sentence_per_ref=True`` draws one per ref with a
seed instead). Masks come from pycocotools at the original image size; an annotation made of
several polygons is their union (``pycocotools.mask.merge``), never their sum.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from mmtune.data.base import DataSplits, TaskDataset, load_pickle, require_fields, require_file
from mmtune.encoders.images import to_rgb_array

__all__ = ["RefCOCODataset", "annotation_mask", "load_refcoco"]

SPLITS = ("train", "val", "testA", "testB", "test")


def annotation_mask(segmentation: Any, height: int, width: int, where: str = "annotation"):
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> bool (H, W)."""
    if isinstance(segmentation, list):
        if not segmentation or any(
            not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segmentation
        ):
            raise ValueError(f"{where}: polygons need an even number >= 6 of coordinates")
        try:
            coords = np.asarray([c for p in segmentation for c in p], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: polygon coordinates must be numbers ({e})") from None
        if not np.isfinite(coords).all():
            raise ValueError(f"{where}: polygon coordinates hold NaN or infinite values")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))  # union
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
    else:
        raise ValueError(f"{where}: 'segmentation' is neither polygons nor RLE")
    mask = mask_utils.decode(rle).astype(bool)
    if not mask.any():
        raise ValueError(
            f"{where}: the segmentation covers no pixel of the {width}x{height} image "
            "(a degenerate polygon or an empty RLE); nothing to segment"
        )
    return mask


class RefCOCODataset(TaskDataset):
    """Samples of one split. Items: image (H, W, 3 uint8), mask (H, W bool), expression, ids."""

    def __init__(
        self,
        samples: list[dict[str, Any]],
        images: dict[int, dict],
        anns: dict[int, dict],
        image_dir: Path,
    ):
        self.samples, self.images, self.anns, self.image_dir = samples, images, anns, image_dir

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.images[self.samples[i]["image_id"]]["file_name"]

    def check_image_sizes(self) -> None:
        """Every image file's size equals its ``instances.json`` entry (headers only)."""
        from PIL import Image, UnidentifiedImageError

        checked: set[int] = set()
        for i, s in enumerate(self.samples):
            if s["image_id"] in checked:
                continue
            path, info = self.image_path(i), self.images[s["image_id"]]
            try:
                with Image.open(path) as im:
                    width, height = im.size
            except FileNotFoundError:
                raise FileNotFoundError(2, "no such image file", str(path)) from None
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{path}: cannot decode as an image ({e})") from e
            if (width, height) != (info["width"], info["height"]):
                raise ValueError(
                    f"{path}: image is {width}x{height} but instances.json says "
                    f"{info['width']}x{info['height']}; masks would not line up"
                )
            checked.add(s["image_id"])

    def mask(self, i: int) -> np.ndarray:
        s = self.samples[i]
        info, ann = self.images[s["image_id"]], self.anns[s["ann_id"]]
        return annotation_mask(
            ann["segmentation"], info["height"], info["width"], where=f"annotation {s['ann_id']}"
        )

    def image_source(self, i: int) -> Path:
        return self.image_path(i)

    def scoring_item(self, i: int) -> dict[str, Any]:
        return {**self.samples[i], "mask": self.mask(i)}  # the mask needs only the annotation

    def metadata(self, i: int) -> dict[str, Any]:
        """The sample without decoding its image (the mask needs only the annotation)."""
        return {
            **self.samples[i],
            "image_path": self.image_path(i),
            "mask_pixels": int(self.mask(i).sum()),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        image = to_rgb_array(self.image_path(i))
        info = self.images[s["image_id"]]
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{self.image_path(i)}: image is {image.shape[1]}x{image.shape[0]} but "
                f"instances.json says {info['width']}x{info['height']}"
            )
        return {**s, "image": image, "mask": self.mask(i)}


def load_refcoco(
    refs: str | Path,
    instances: str | Path | None = None,
    image_dir: str | Path | None = None,
    *,
    one_sentence_per_ref: bool = False,
    seed: int = 0,
) -> DataSplits:
    """Load every split present in a REFER ``refs(*).p``; ``instances.json`` defaults to its
    folder, the image folder to ``<its folder>/../images/train2014``."""
    refs_path = require_file(refs, "REFER refs pickle")
    inst_path = require_file(instances or refs_path.parent / "instances.json", "COCO instances")
    image_dir = Path(image_dir) if image_dir else refs_path.parent.parent / "images" / "train2014"
    ref_list = load_pickle(refs_path, "REFER refs")
    if not isinstance(ref_list, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(ref_list).__name__}")
    try:
        coco = json.loads(inst_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{inst_path}: not valid JSON ({e})") from e
    require_fields(coco, ("images", "annotations"), str(inst_path))
    images = {}
    for i, im in enumerate(coco["images"]):
        require_fields(im, ("id", "file_name", "height", "width"), f"{inst_path}, images[{i}]")
        images[im["id"]] = im
    anns = {}
    for i, ann in enumerate(coco["annotations"]):
        require_fields(ann, ("id", "image_id", "segmentation"), f"{inst_path}, annotations[{i}]")
        anns[ann["id"]] = ann

    rng = random.Random(seed)
    by_split: dict[str, list[dict[str, Any]]] = {}
    for i, ref in enumerate(ref_list):
        where = f"{refs_path}, ref #{i}"
        require_fields(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"), where)
        if ref["split"] not in SPLITS:
            raise ValueError(f"{where}: field 'split' is {ref['split']!r}, not one of {SPLITS}")
        if ref["ann_id"] not in anns:
            raise ValueError(f"{where}: ann_id {ref['ann_id']} is not in {inst_path}")
        if ref["image_id"] not in images:
            raise ValueError(f"{where}: image_id {ref['image_id']} is not in {inst_path}")
        if anns[ref["ann_id"]]["image_id"] != ref["image_id"]:
            raise ValueError(f"{where}: ann_id {ref['ann_id']} belongs to another image")
        sentences = ref["sentences"]
        if not sentences:
            raise ValueError(f"{where}: no sentences")
        for j, sent in enumerate(sentences):
            require_fields(sent, ("sent",), f"{where}, sentences[{j}]")
            if not isinstance(sent["sent"], str) or not sent["sent"].strip():
                raise ValueError(
                    f"{where}, sentences[{j}]: field 'sent' must be a non-empty string, "
                    f"got {sent['sent']!r}"
                )
        chosen = [rng.choice(sentences)] if one_sentence_per_ref else sentences
        for j, sent in enumerate(chosen):
            by_split.setdefault(ref["split"], []).append(
                {
                    "id": f"{ref['ref_id']}:{sent.get('sent_id', j)}",
                    "expression": sent["sent"],
                    "sent_id": sent.get("sent_id"),
                    "ref_id": ref["ref_id"],
                    "ann_id": ref["ann_id"],
                    "image_id": ref["image_id"],
                }
            )
    if not by_split:
        raise ValueError(f"{refs_path}: no refs")
    splits = {
        name: RefCOCODataset(by_split[name], images, anns, image_dir)
        for name in SPLITS
        if name in by_split
    }
    flavour = refs_path.name.removeprefix("refs(").removesuffix(").p")

    def describe(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "expression": item["expression"],
            "image": f"{item['image'].shape}",
            "mask_pixels": int(item["mask"].sum()),
            "ref_id": item["ref_id"],
            "ann_id": item["ann_id"],
        }

    return DataSplits(f"refcoco-format ({flavour})", "segmentation", splits, describe=describe)
