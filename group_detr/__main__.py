"""Command line: `python -m group_detr {demo,train,eval,synth}`.

    python -m group_detr demo                      # synthetic data + K=11 training + AP + PNG
    python -m group_detr synth --out data/synthetic-hard --preset hard
    python -m group_detr train --data-dir data/coco --output-dir runs/r50 --backbone-weights r50.pth
    torchrun --nproc_per_node 8 -m group_detr train --data-dir data/coco ...
    python -m group_detr eval --checkpoint runs/demo/checkpoint.pth

`train` and `demo` take every `TrainConfig` field as `--field-name` (see `--help`); `train`
starts from the paper's defaults, `demo` from `demo_config()` (group_detr/config.py, which also
holds the synthetic-data presets that `synth --preset` and the demo's `--synthetic` name).
"""
import argparse
import dataclasses
import sys
import time
import typing
from typing import List, Optional

from group_detr.config import SYNTHETIC_PRESETS, TrainConfig, config_from_dict, demo_config, synthetic_preset
from group_detr.data.synthetic import ensure_synthetic_dataset, write_synthetic_dataset
from group_detr.engine import evaluate_checkpoint, train

HELP = {
    "data_dir": "dataset root: {split}/ images and annotations/instances_{split}.json",
    "backbone": "'resnet50' (the paper's) or 'small' (a from-scratch CNN for synthetic data)",
    "backbone_weights": "local torchvision-format ResNet-50 checkpoint (never downloaded)",
    "num_groups": "K, the number of query groups in training (1 = plain Conditional DETR)",
    "num_queries": "N, queries per group; inference uses N queries",
    "resume": "continue from output_dir/checkpoint.pth when it exists",
    "max_train_images": "train on the first n images only",
    "synthetic": f"synthetic-data preset ({', '.join(sorted(SYNTHETIC_PRESETS))}) the demo writes to "
                 "data_dir when it has no dataset",
}


def _add_config_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """One `--field-name` option per TrainConfig field, typed from the dataclass annotations."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint, default = hints[f.name], getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = HELP.get(f.name, "") + f" (default: {default})"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=args[0], nargs="+", default=default, help=help_text)
        elif typing.get_origin(hint) is typing.Union:  # Optional[X]
            parser.add_argument(flag, type=args[0], default=default, help=help_text)
        else:
            parser.add_argument(flag, type=hint, default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m group_detr", description="Group DETR training and evaluation")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="synthetic data, a short K=11 training, AP table and a PNG")
    demo.add_argument("--num-train-images", type=int, default=None,
                      help="synthetic training images written when data_dir has no dataset yet "
                           "(default: the preset's)")
    demo.add_argument("--num-val-images", type=int, default=None,
                      help="synthetic validation images written when data_dir has no dataset yet "
                           "(default: the preset's)")
    _add_config_arguments(demo, demo_config(resume=True))

    train_cmd = commands.add_parser("train", help="train on a COCO-format dataset (torchrun for several processes)")
    _add_config_arguments(train_cmd, TrainConfig())

    evaluate = commands.add_parser("eval", help="COCO AP of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data-dir", default=None, help="default: the one the checkpoint was trained on")
    evaluate.add_argument("--split", default=None, help="default: the checkpoint's val split")
    evaluate.add_argument("--batch-size", type=int, default=None)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--png", default=None, help="also draw predictions on a few images into this PNG")

    synth = commands.add_parser("synth", help="write a synthetic COCO-format shapes dataset (a preset)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--preset", default=demo_config().synthetic, choices=sorted(SYNTHETIC_PRESETS),
                       help="generator settings (default: the demo's, %(default)s)")
    # Each flag replaces one field of the preset (default: keep the preset's value).
    synth.add_argument("--num-train", type=int)
    synth.add_argument("--num-val", type=int)
    synth.add_argument("--image-size", type=int)
    synth.add_argument("--max-objects", type=int)
    synth.add_argument("--min-object-size", type=int, help="smallest shape diameter in pixels")
    synth.add_argument("--seed", type=int)
    return parser


SYNTH_OVERRIDES = ("num_train", "num_val", "image_size", "max_objects", "min_object_size", "seed")


def _given(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _follow_the_preset(config: TrainConfig) -> TrainConfig:
    """The demo's settings that depend on its synthetic preset (data_dir, image sizes) follow
    `--synthetic`: every field still at demo_config()'s default takes the preset's demo value."""
    default, for_preset = demo_config(resume=True), demo_config(synthetic=config.synthetic, resume=True)
    left_alone = [f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) == getattr(default, f.name)]
    return dataclasses.replace(config, **{name: getattr(for_preset, name) for name in left_alone})


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        paths = write_synthetic_dataset(args.out, synthetic_preset(args.preset, **_given(args, SYNTH_OVERRIDES)))
        print("\n".join(f"{split}: {path}" for split, path in paths.items()))
        return 0
    if args.command == "eval":
        evaluate_checkpoint(args.checkpoint, args.data_dir, args.split, args.device, args.batch_size, args.png)
        return 0
    config = config_from_dict(vars(args))  # the parser has one flag per TrainConfig field
    if args.command == "demo":
        start = time.time()
        config = _follow_the_preset(config)
        sizes = {"num_train": args.num_train_images, "num_val": args.num_val_images}
        if config.synthetic is None:  # the demo's parser always sets a preset
            raise ValueError("the demo trains on a synthetic preset, but config.synthetic is None")
        ensure_synthetic_dataset(config.data_dir, config.synthetic,
                                 **{k: v for k, v in sizes.items() if v is not None})
        if config.output_dir == demo_config().output_dir:
            # One directory per K, so that runs with different K never meet one checkpoint.
            config = dataclasses.replace(config, output_dir=f"{config.output_dir}-k{config.num_groups}")
        result = train(config)
        if result["png"]:
            print(f"demo finished in {time.time() - start:.0f} s: AP {result['stats']['AP']:.3f}, "
                  f"predictions drawn in {result['png']}")
        return 0
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
