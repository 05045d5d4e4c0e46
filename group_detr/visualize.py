"""A PNG of predictions drawn on validation images (PIL only, no plotting library needed).

Ground truth and predictions must be told apart at a glance: ground truth is a dashed white box
with a dark outline (visible on light and dark backgrounds) and no label; a prediction above the
score threshold is a solid box in its class's colour with a "name score" label on a filled tag.
The images are tiled side by side above a legend that says which is which.
"""
import os
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40)]
GROUND_TRUTH_COLOUR = (255, 255, 255)
OUTLINE_COLOUR = (0, 0, 0)
LEGEND_ROW_HEIGHT = 16


def class_colour(label: int) -> Tuple[int, int, int]:
    return PALETTE[label % len(PALETTE)]


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], colour, dash: int = 4) -> None:
    """A 1-px dashed rectangle over a 3-px dark one, so it shows on any background."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=OUTLINE_COLOUR, width=1)
    for start, end, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True),
                                          (y0, y1, x0, False), (y0, y1, x1, False)):
        position = start
        while position < end:
            stop = min(position + dash, end)
            line = [(position, fixed), (stop, fixed)] if horizontal else [(fixed, position), (fixed, stop)]
            draw.line(line, fill=colour, width=1)
            position += 2 * dash


def _label(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, colour, image_width: int) -> None:
    """Text on a tag filled with the class colour, kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text)
    width, height = right - left + 4, bottom - top + 4
    x = min(max(x, 0), max(image_width - width, 0))
    y = max(y - height, 0)
    draw.rectangle([x, y, x + width, y + height], fill=colour)
    dark_text = sum(colour) > 3 * 140
    draw.text((x + 2 - left, y + 2 - top), text, fill=OUTLINE_COLOUR if dark_text else (255, 255, 255))


def draw_detections(image: Image.Image, predictions: Dict, class_names: Sequence[str], gt_boxes=(),
                    score_threshold: float = 0.3, scale: int = 1) -> Image.Image:
    """Draw on a copy of `image`. predictions: scores `(k,)`, labels `(k,)`, boxes `(k, 4)` xyxy px;
    gt_boxes: xyxy px of the ground truth."""
    image = image.convert("RGB")
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for box in gt_boxes:
        _dashed_rectangle(draw, [float(v) * scale for v in box], GROUND_TRUTH_COLOUR)
    kept = [(score, label, box) for score, label, box in zip(predictions["scores"].tolist(),
                                                            predictions["labels"].tolist(),
                                                            predictions["boxes"].tolist())
            if score >= score_threshold]
    for score, label, box in sorted(kept):  # the best-scoring boxes are drawn last, on top
        colour = class_colour(label)
        x0, y0, x1, y1 = [v * scale for v in box]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        name = class_names[label] if label < len(class_names) else str(label)
        _label(draw, x0, y0, f"{name} {score:.2f}", colour, image.width)
    return image


def draw_legend(width: int, class_names: Sequence[str], score_threshold: float) -> Image.Image:
    """Two rows: what a ground-truth box looks like, then the class colours of the predictions."""
    legend = Image.new("RGB", (width, 2 * LEGEND_ROW_HEIGHT + 4), (40, 40, 40))
    draw = ImageDraw.Draw(legend)
    _dashed_rectangle(draw, [6, 4, 30, LEGEND_ROW_HEIGHT - 2], GROUND_TRUTH_COLOUR)
    draw.text((38, 3), "ground truth (dashed white)", fill=(255, 255, 255))
    y = LEGEND_ROW_HEIGHT + 2
    draw.text((6, y + 1), f"predictions, score >= {score_threshold:.2f}:", fill=(255, 255, 255))
    x = 6 + draw.textlength(f"predictions, score >= {score_threshold:.2f}:") + 8
    for label, name in enumerate(class_names):
        draw.rectangle([x, y + 1, x + 18, y + LEGEND_ROW_HEIGHT - 3], outline=class_colour(label), width=2)
        draw.text((x + 22, y + 1), name, fill=class_colour(label))
        x += 22 + draw.textlength(name) + 12
    return legend


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
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    legend = draw_legend(max(width, 480), dataset.class_names, score_threshold)
    grid = Image.new("RGB", (max(width, legend.width), max(t.height for t in tiles) + legend.height))
    x = 0
    for tile in tiles:
        grid.paste(tile, (x, 0))
        x += tile.width + 4
    grid.paste(legend, (0, grid.height - legend.height))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = path + ".tmp.png"
    grid.save(tmp_path)
    os.replace(tmp_path, path)
    return path
