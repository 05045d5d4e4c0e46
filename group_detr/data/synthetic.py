"""A COCO-format synthetic detection dataset: coloured shapes on textured backgrounds.

`write_synthetic_dataset(out_dir)` writes

    out_dir/train/000000.jpg ...           images
    out_dir/val/000000.jpg ...
    out_dir/annotations/instances_train.json
    out_dir/annotations/instances_val.json

in the layout `group_detr.data.coco` reads (the same as COCO's `train2017/` + `annotations/`).
The settings come from a named preset (`group_detr.config.SYNTHETIC_PRESETS`, e.g. "hard":
classes, sizes from small to large, overlaps and occlusion on textured backgrounds), so the demo,
the CLI, the tests and the benchmarks generate their data from one definition.

Shapes are drawn one after another, so later shapes occlude earlier ones. Each annotation is the
box of the *visible* pixels (what COCO annotates); a shape hidden by more than
`1 - MIN_VISIBLE_FRACTION` of its area is not annotated. A few images have no objects at all.
Everything comes from one seeded numpy generator per split, so a given seed always gives the
same files.
"""
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from group_detr.config import DEMO_SYNTHETIC_PRESET, SyntheticPreset, synthetic_preset

CLASS_NAMES = ("circle", "square", "triangle", "cross", "star")
MIN_VISIBLE_FRACTION = 0.35
EMPTY_IMAGE_PROBABILITY = 0.03
SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003}
GENERATOR_SETTINGS_KEY = "group_detr_synthetic"  # in the annotation files' "info": the settings used


def _polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a shape of diameter `size` centred at (cx, cy), rotated by `angle` radians."""
    r = size / 2
    pts: List[Tuple[float, float]]
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r / math.sqrt(2) * 1.3
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        scale = r
    elif kind == "cross":
        t = 0.33  # half thickness of the bars, relative to r
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t),
               (-1, t), (-1, -t), (-t, -t)]
        scale = r
    elif kind == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = 1.0 if i % 2 == 0 else 0.45
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        scale = r
    else:
        raise ValueError(f"unknown polygon kind {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts]


def _shape_mask(kind: str, width: int, height: int, cx: float, cy: float, size: float,
                angle: float) -> np.ndarray:
    """Boolean `(height, width)` mask of one shape."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        r = size / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(kind, cx, cy, size, angle), fill=255)
    return np.asarray(canvas) > 127


def _background(rng: np.random.Generator, width: int, height: int, clutter: float) -> np.ndarray:
    """A float `(height, width, 3)` textured background in [0, 255]: gradient + stripes + noise.

    `clutter` scales the gradient, texture and noise amplitudes (1 = the original mix, 0 = flat);
    the random draws are the same for every value, so only the pixels change."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, size=3)
    direction = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(direction) * xx + np.sin(direction) * yy) / max(width, height)
    image = base + clutter * rng.uniform(-50, 50, size=3) * gradient[..., None]
    # Stripes or a checkerboard at low contrast, so that edges alone do not give objects away.
    period = rng.uniform(6, 30)
    theta = rng.uniform(0, math.pi)
    phase = (np.cos(theta) * xx + np.sin(theta) * yy) * 2 * math.pi / period
    if rng.random() < 0.5:
        texture = np.sin(phase)
    else:
        texture = np.sign(np.sin(xx * 2 * math.pi / period)) * np.sign(np.sin(yy * 2 * math.pi / period))
    image += clutter * rng.uniform(5, 25) * texture[..., None] * rng.uniform(0.5, 1.0, size=3)
    image += clutter * rng.normal(0, rng.uniform(2, 10), size=image.shape)
    return image


def _object_count(rng: np.random.Generator, preset: SyntheticPreset) -> int:
    """How many shapes one image gets (before occlusion hides some): see SyntheticPreset.mean_objects."""
    if preset.mean_objects > 0:
        return min(preset.max_objects, int(rng.geometric(1.0 / preset.mean_objects)))
    return int(rng.integers(1, preset.max_objects + 1))


def _render_image(rng: np.random.Generator, width: int, height: int, preset: SyntheticPreset
                  ) -> Tuple[np.ndarray, List[Dict]]:
    """One image `(height, width, 3)` uint8 and its annotations (label, xywh box, visible area).

    preset.min_contrast: an object's colour differs from the background's mean colour by at least
    this much (max over channels, 0-255); 0 draws colours freely (some shapes are then nearly
    invisible).
    """
    min_object_size, min_contrast = preset.min_object_size, preset.min_contrast
    image = _background(rng, width, height, preset.clutter)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROBABILITY else _object_count(rng, preset)
    owner = np.full((height, width), -1, dtype=np.int64)  # index of the shape visible at a pixel
    full_area = []
    labels = []
    short_side = min(width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(num_objects):
        label = int(rng.integers(len(CLASS_NAMES)))
        # Log-uniform sizes: as many small objects as large ones.
        size = float(np.exp(rng.uniform(math.log(min_object_size),
                                        math.log(preset.max_object_fraction * short_side))))
        cx = float(rng.uniform(0.1 * width, 0.9 * width))
        cy = float(rng.uniform(0.1 * height, 0.9 * height))
        mask = _shape_mask(CLASS_NAMES[label], width, height, cx, cy, size, float(rng.uniform(0, 2 * math.pi)))
        if not mask.any():
            continue
        colour = rng.uniform(0, 255, size=3)
        for _ in range(20):
            if min_contrast <= 0 or np.abs(colour - background_mean).max() >= min_contrast:
                break
            colour = rng.uniform(0, 255, size=3)
        # Shapes are shaded rather than flat so the class has to come from the outline.
        shade = 1.0 + 0.25 * np.sin((xx + yy) * 2 * math.pi / rng.uniform(8, 40))
        image[mask] = np.clip(colour[None, :] * shade[mask][:, None], 0, 255)
        owner[mask] = index
        full_area.append(int(mask.sum()))
        labels.append(label)
    annotations = []
    for index, label in enumerate(labels):
        visible = owner == index
        area = int(visible.sum())
        if area < MIN_VISIBLE_FRACTION * full_area[index] or area < 4:
            continue  # mostly hidden: a human annotator would not label it either
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append({"label": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area})
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def _atomic_write_json(data: Dict, path: str) -> None:
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(data, f)
    os.replace(tmp_path, path)


def write_split(out_dir: str, split: str, num_images: int, preset: SyntheticPreset) -> str:
    """Write `out_dir/{split}/*.jpg` and `out_dir/annotations/instances_{split}.json` with the
    generator settings of `preset` (its num_train / num_val are ignored: `num_images` counts).

    Returns the annotation file path. The json is written last and atomically, so its presence
    means the split is complete; its "info" records the generator settings.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if preset.image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {preset.image_size}")
    if preset.max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {preset.max_objects}")
    if not 0 < preset.max_object_fraction <= 1:
        raise ValueError(f"max_object_fraction must be in (0, 1], got {preset.max_object_fraction}")
    if not 4 <= preset.min_object_size <= preset.max_object_fraction * preset.image_size:
        raise ValueError(f"min_object_size must be in [4, max_object_fraction * image_size = "
                         f"{preset.max_object_fraction * preset.image_size:g}], got {preset.min_object_size}")
    if preset.mean_objects != 0 and not 1 <= preset.mean_objects <= preset.max_objects:
        raise ValueError(f"mean_objects must be 0 (uniform counts) or in [1, max_objects = "
                         f"{preset.max_objects}], got {preset.mean_objects}")
    image_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    rng = np.random.default_rng(preset.seed + SPLIT_SEED_OFFSET.get(split, 0))
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for image_id in range(1, num_images + 1):
        # Mild aspect-ratio variation exercises padding masks in the collate.
        height = preset.image_size
        width = int(round(preset.image_size * float(rng.choice([1.0, 1.0, 0.75, 1.25]))))
        pixels, objects = _render_image(rng, width, height, preset)
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": obj["label"] + 1,  # COCO category ids start at 1
                "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
    ann_path = os.path.join(ann_dir, f"instances_{split}.json")
    _atomic_write_json({
        "info": {"description": f"group-detr synthetic shapes, seed {preset.seed}",
                 GENERATOR_SETTINGS_KEY: preset.generator_settings()},
        "images": images, "annotations": annotations, "categories": categories,
    }, ann_path)
    return ann_path


def write_synthetic_dataset(out_dir: str, preset: Union[str, SyntheticPreset] = DEMO_SYNTHETIC_PRESET,
                            **overrides) -> Dict[str, str]:
    """Write the train and val splits of a synthetic preset; returns {split: annotation file path}.

    preset: a name in `group_detr.config.SYNTHETIC_PRESETS` or a `SyntheticPreset` (default: the
    demo's); overrides replace some of its fields (e.g. `num_train=8, image_size=64` for a test).
    """
    preset = resolve_preset(preset, **overrides)
    return {"train": write_split(out_dir, "train", preset.num_train, preset),
            "val": write_split(out_dir, "val", preset.num_val, preset)}


def resolve_preset(preset: Union[str, SyntheticPreset], **overrides) -> SyntheticPreset:
    """A preset name or object, with `overrides` applied."""
    if isinstance(preset, str):
        return synthetic_preset(preset, **overrides)
    return dataclasses.replace(preset, **overrides)


def synthetic_dataset_exists(out_dir: str) -> bool:
    """True when both annotation files exist (they are written last, so the splits are complete)."""
    return all(os.path.isfile(_annotation_path(out_dir, s)) for s in ("train", "val"))


def _annotation_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, "annotations", f"instances_{split}.json")


def ensure_synthetic_dataset(out_dir: str, preset: Union[str, SyntheticPreset], log: Callable[[str], None] = print,
                             **overrides) -> None:
    """Write the preset's dataset to `out_dir` unless it is already there.

    Raises ValueError when `out_dir` holds a synthetic dataset written with other settings
    (a changed preset must not silently train on the old data).
    """
    preset = resolve_preset(preset, **overrides)
    if synthetic_dataset_exists(out_dir):
        with open(_annotation_path(out_dir, "train")) as f:
            found = json.load(f).get("info", {}).get(GENERATOR_SETTINGS_KEY)
        if found is not None and SyntheticPreset.complete_settings(found) != preset.generator_settings():
            raise ValueError(f"{out_dir} holds a synthetic dataset with other settings ({found}) than the "
                             f"requested ones ({preset.generator_settings()}): delete it or choose another "
                             "data_dir")
        return
    log(f"writing the synthetic dataset to {out_dir} ...")
    start = time.time()
    write_synthetic_dataset(out_dir, preset)
    log(f"done in {time.time() - start:.1f} s")
