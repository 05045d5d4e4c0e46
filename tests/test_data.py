"""Synthetic data, the pycocotools dataset, DETR's transforms and collate (group_detr.data)."""
import json
import os
import random

import pytest
import torch
from PIL import Image

from conftest import requires_pycocotools
from group_detr.__main__ import main
from group_detr.data import (CLASS_NAMES, CocoDetection, build_coco_dataset, collate_fn, load_coco_annotations,
                             make_detr_transforms, synthetic_dataset_exists, write_synthetic_dataset)
from group_detr.data.transforms import crop, hflip, resize

SMALL_TRANSFORMS = dict(scales=(48, 64), max_size=96, crop_resize=(48, 56), crop_size=(32, 48))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(out, num_train=12, num_val=4, image_size=64, seed=3)
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_coco(tmp_path, images=None, annotations=None, categories=None, image_size=(40, 30)):
    """A hand-written COCO file with one real image; returns (image_dir, annotation path)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    Image.new("RGB", image_size, (120, 30, 200)).save(image_dir / "a.jpg")
    data = {
        "images": images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 8], "area": 80, "iscrowd": 0}],
        "categories": categories if categories is not None else [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(image_dir), str(path)


# ----------------------------------------------------------------------------------------------
# synthetic data


def test_synthetic_dataset_is_coco_and_deterministic(synth_dir, tmp_path):
    assert synthetic_dataset_exists(synth_dir)
    train = read_json(os.path.join(synth_dir, "annotations", "instances_train.json"))
    assert [c["name"] for c in train["categories"]] == list(CLASS_NAMES)
    assert len(train["images"]) == 12 and len(train["annotations"]) > 12
    for ann in train["annotations"]:
        image = train["images"][ann["image_id"] - 1]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
    again = write_synthetic_dataset(str(tmp_path), num_train=12, num_val=4, image_size=64, seed=3)
    assert read_json(again["train"])["annotations"] == train["annotations"]
    other = write_split_annotations(tmp_path / "other", seed=4)
    assert other != train["annotations"]


def write_split_annotations(out, seed):
    return read_json(write_synthetic_dataset(str(out), num_train=12, num_val=1, image_size=64, seed=seed)["train"])[
        "annotations"]


def test_synthetic_sizes_span_small_to_large(tmp_path):
    paths = write_synthetic_dataset(str(tmp_path), num_train=60, num_val=1, image_size=128)
    areas = [a["area"] for a in read_json(paths["train"])["annotations"]]
    assert min(areas) < 32 ** 2 / 4 and max(areas) > 64 ** 2  # COCO small ... large (at this scale)
    assert {a["category_id"] for a in read_json(paths["train"])["annotations"]} == set(range(1, 6))


def test_crowded_preset_is_coco_like(tmp_path):
    """About 7 annotated objects per image, a long tail up to max_objects, small to mid sizes."""
    from group_detr.config import demo_config, synthetic_preset

    preset = synthetic_preset("crowded")
    data = read_json(write_synthetic_dataset(str(tmp_path), "crowded", num_train=150, num_val=1)["train"])
    per_image = [0] * (len(data["images"]) + 1)
    for a in data["annotations"]:
        per_image[a["image_id"]] += 1
    counts = per_image[1:]
    assert 6 <= sum(counts) / len(counts) <= 8.5 and max(counts) <= preset.max_objects
    assert sum(c >= 12 for c in counts) >= 5 and sum(c <= 3 for c in counts) >= 15  # long-tailed
    diameters = [max(a["bbox"][2:]) for a in data["annotations"]]
    assert min(diameters) <= 8 and max(diameters) <= preset.max_object_fraction * preset.image_size * 1.3 + 1  # a square's corners
    # the model's queries per group follow the most objects an image can hold
    assert demo_config(synthetic="crowded").num_queries == 30 and demo_config().num_queries == 10


@pytest.mark.parametrize("overrides, message", [
    ({"max_object_fraction": 0.0}, r"max_object_fraction must be in \(0, 1\], got 0.0"),
    ({"max_object_fraction": 1.5}, r"max_object_fraction must be in \(0, 1\], got 1.5"),
    ({"mean_objects": 0.5}, r"mean_objects must be 0 \(uniform counts\) or in \[1, max_objects = 3\], got 0.5"),
    ({"mean_objects": 4.0}, r"mean_objects must be 0 \(uniform counts\) or in \[1, max_objects = 3\], got 4.0"),
    ({"max_object_fraction": 0.25}, r"min_object_size must be in \[4, max_object_fraction \* image_size = 16\], got 24"),
])
def test_synthetic_generator_knobs_are_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):  # the easy preset: max_objects 3, 24-px objects, 64-px images
        write_synthetic_dataset(str(tmp_path), "easy", num_train=1, num_val=1, **overrides)


def test_synth_command_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--num-train", "3", "--num-val", "2", "--image-size", "48"]) == 0
    assert "instances_train.json" in capsys.readouterr().out
    assert len(os.listdir(out / "train")) == 3 and len(os.listdir(out / "val")) == 2
    assert synthetic_dataset_exists(str(out))
    # the flags replace fields of the preset; the rest is the preset's, recorded in the json
    from group_detr.config import demo_config, synthetic_preset

    settings = read_json(str(out / "annotations" / "instances_train.json"))["info"]["group_detr_synthetic"]
    assert settings == synthetic_preset(demo_config().synthetic, num_train=3, num_val=2,
                                        image_size=48).generator_settings()
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(out), "--preset", "no-such-preset"])


# ----------------------------------------------------------------------------------------------
# dataset


@requires_pycocotools
def test_dataset_items_and_collate(synth_dir):
    dataset = build_coco_dataset(synth_dir, "train", make_detr_transforms(False, eval_size=64, max_size=96))
    assert dataset.num_classes == 5 and len(dataset) == 12
    image, target = dataset[0]
    assert image.shape[0] == 3 and image.dtype == torch.float32
    assert target["boxes"].shape == (len(target["labels"]), 4)
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()  # normalised cxcywh
    assert target["labels"].dtype == torch.int64 and target["labels"].max() < 5
    assert target["orig_size"].tolist() == [64, dataset.coco.imgs[dataset.ids[0]]["width"]]
    items = [dataset[i] for i in range(4)]
    images, mask, targets = collate_fn(items)
    max_h, max_w = max(im.shape[1] for im, _ in items), max(im.shape[2] for im, _ in items)
    assert images.shape == (4, 3, max_h, max_w) and mask.shape == (4, max_h, max_w) and len(targets) == 4
    for i, (im, _) in enumerate(items):
        h, w = im.shape[1:]
        assert not mask[i, :h, :w].any() and mask[i, h:].all() and mask[i, :, w:].all()
        torch.testing.assert_close(images[i, :, :h, :w], im)
        assert (images[i, :, h:] == 0).all() and (images[i, :, :, w:] == 0).all()


@requires_pycocotools
def test_train_transforms_keep_boxes_consistent(synth_dir):
    random.seed(0)
    dataset = build_coco_dataset(synth_dir, "train", make_detr_transforms(True, **SMALL_TRANSFORMS))
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert max(image.shape[1:]) <= 96
        boxes = target["boxes"]
        assert boxes.shape == (len(target["labels"]), 4) and target["area"].shape == target["labels"].shape
        assert ((boxes[:, 2:] > 0) & (boxes[:, :2] >= 0) & (boxes[:, :2] <= 1)).all()


@requires_pycocotools
def test_sparse_category_ids_become_contiguous_labels(tmp_path):
    image_dir, path = write_coco(tmp_path)
    dataset = CocoDetection(image_dir, path)
    _, target = dataset[0]
    assert dataset.label_to_category_id == [3, 7] and dataset.class_names == ["a", "b"]
    assert target["labels"].tolist() == [1]
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 13.0]]  # xyxy pixels before transforms


def test_geometric_transforms():
    image = Image.new("RGB", (40, 20))
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 5.0, 40.0, 15.0]]),
              "labels": torch.tensor([0, 1]), "area": torch.tensor([100.0, 100.0]), "iscrowd": torch.zeros(2)}
    _, flipped = hflip(image, target)
    assert flipped["boxes"].tolist() == [[30.0, 0.0, 40.0, 10.0], [0.0, 5.0, 10.0, 15.0]]
    small, resized = resize(image, target, 10)
    assert small.size == (20, 10) and resized["boxes"][1].tolist() == [15.0, 2.5, 20.0, 7.5]
    assert resized["area"].tolist() == [25.0, 25.0]
    cropped_image, cropped = crop(image, target, (0, 0, 20, 20))  # keeps the first box only
    assert cropped_image.size == (20, 20) and cropped["labels"].tolist() == [0]
    assert cropped["size"].tolist() == [20, 20]


# ----------------------------------------------------------------------------------------------
# bad input


def test_missing_annotation_file():
    with pytest.raises(FileNotFoundError, match="annotation file not found: /no/such.json"):
        load_coco_annotations("/no/such.json")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"images": []}', r"is not COCO detection json: it needs the keys \('images', 'annotations', 'categories'\)"),
    ('{"images": [], "annotations": [], "categories": []}', "has no categories"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]}', "needs 'id' and 'file_name'"),
])
def test_malformed_annotation_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_coco_annotations(str(path))


def test_annotation_with_unknown_class_id(tmp_path):
    _, path = write_coco(tmp_path, annotations=[
        {"id": 5, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(ValueError, match="annotation 5 has category_id 99, which is not among the 2 categories"):
        load_coco_annotations(path)


@pytest.mark.parametrize("annotation, message", [
    ({"id": 5, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]}, "refers to unknown image_id 2"),
    ({"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2]}, "malformed bbox"),
    ({"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 1, float("nan"), 2]}, "malformed bbox"),
    ({"id": 5, "image_id": 1, "bbox": [1, 1, 2, 2]}, "needs 'image_id', 'category_id' and 'bbox'"),
])
def test_malformed_annotation(tmp_path, annotation, message):
    _, path = write_coco(tmp_path, annotations=[annotation])
    with pytest.raises(ValueError, match=message):
        load_coco_annotations(path)


@requires_pycocotools
def test_unreadable_and_missing_images(tmp_path):
    image_dir, path = write_coco(tmp_path, images=[
        {"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "broken.jpg"}, {"id": 3, "file_name": "gone.jpg"}],
        annotations=[])
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    dataset = CocoDetection(image_dir, path)
    dataset[0]
    with pytest.raises(ValueError, match=r"cannot read image .*broken.jpg \(image id 2\)"):
        dataset[1]
    with pytest.raises(FileNotFoundError, match=r"image 3 of .* not found: .*gone.jpg"):
        dataset[2]


@requires_pycocotools
def test_empty_image_passes_through_transforms_and_collate(tmp_path):
    image_dir, path = write_coco(tmp_path, annotations=[])
    random.seed(1)
    for train in (True, False):
        dataset = CocoDetection(image_dir, path, make_detr_transforms(train, **SMALL_TRANSFORMS))
        image, target = dataset[0]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        _, _, targets = collate_fn([(image, target)])
        assert targets[0]["boxes"].shape == (0, 4)


@requires_pycocotools
def test_crowd_and_degenerate_boxes_are_dropped(tmp_path):
    image_dir, path = write_coco(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5]},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [35, 1, 20, 5]},  # clipped to the image
    ])
    _, target = CocoDetection(image_dir, path)[0]
    assert target["boxes"].tolist() == [[35.0, 1.0, 40.0, 6.0]]
