"""A PNG of predictions drawn on validation images (PIL only, no plotting library needed).

Ground truth is drawn thin in white, predictions above a score threshold in a colour per class
with "name score". Images are tiled side by side in one file.
"""
import os
from typing import Dict, List, Sequence

from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40)]


def draw_detections(image: Image.Image, predictions: Dict, class_names: Sequence[str], gt_boxes=(),
                    score_threshold: float = 0.3, scale: int = 1) -> Image.Image:
    """Draw on a copy of `image`. predictions: scores `(k,)`, labels `(k,)`, boxes `(k, 4)` xyxy px."""
    image = image.convert("RGB")
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for box in gt_boxes:
        draw.rectangle([float(v) * scale for v in box], outline=(255, 255, 255), width=1)
    for score, label, box in zip(predictions["scores"].tolist(), predictions["labels"].tolist(),
                                 predictions["boxes"].tolist()):
        if score < score_threshold:
            continue
        colour = PALETTE[label % len(PALETTE)]
        x0, y0, x1, y1 = [v * scale for v in box]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        name = class_names[label] if label < len(class_names) else str(label)
        draw.text((x0 + 2, max(y0 - 11, 0)), f"{name} {score:.2f}", fill=colour)
    return image


def save_prediction_grid(dataset, predictions: Dict[int, Dict], path: str, num_images: int = 4,
                         score_threshold: float = 0.3) -> str:
    """Tile up to `num_images` validation images with their predictions into one PNG at `path`.

    dataset: a `CocoDetection` (for the original images, ground truth and class names);
    predictions: {image_id: postprocessed dict in original-image pixels}.
    """
    image_ids: List[int] = [i for i in dataset.ids if i in predictions][:num_images]
    if not image_ids:
        raise ValueError("no predictions to draw")
    tiles = []
    for image_id in image_ids:
        image = dataset.load_image(image_id)
        # Small images are upscaled so that labels stay readable.
        scale = max(1, 320 // max(image.width, image.height))
        gt = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
              for a in dataset.coco.imgToAnns.get(image_id, [])]
        tiles.append(draw_detections(image, predictions[image_id], dataset.class_names, gt, score_threshold, scale))
    grid = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        grid.paste(tile, (x, 0))
        x += tile.width + 4
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = path + ".tmp.png"
    grid.save(tmp_path)
    os.replace(tmp_path, path)
    return path
