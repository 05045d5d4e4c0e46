"""The shared benchmark workloads (workloads.json) turned into identical inputs for every run.

workloads.json here is a copy of the project's shared/workloads.json so that the repository
stands alone; `load_workloads` prefers the shared file when it exists and checks the two agree.
"""
import json
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL = os.path.join(HERE, "workloads.json")
SHARED = os.path.join(HERE, "..", "..", "shared", "workloads.json")


def load_workloads(section=None):
    with open(LOCAL) as f:
        workloads = json.load(f)
    if os.path.exists(SHARED):
        with open(SHARED) as f:
            shared = json.load(f)
        if shared != workloads:
            raise RuntimeError(f"{LOCAL} is out of sync with {SHARED}: copy the shared file over")
    return workloads[section] if section else workloads


def select_workloads(section, names=None):
    """The workloads of `section` named in `names` (all of them when empty), in that order;
    ValueError naming the unknown ones."""
    workloads = load_workloads(section)
    names = names or list(workloads)
    unknown = [n for n in names if n not in workloads]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; known: {sorted(workloads)}")
    return {n: workloads[n] for n in names}


def target_counts(spec):
    """Targets per image: COCO-like geometric counts (mean 7.3, clipped) or a fixed count."""
    if spec["targets"] == "fixed":
        return [spec["fixed_targets"]] * spec["batch"]
    rng = np.random.default_rng(spec["seed"])
    mean = 7.3
    counts = rng.geometric(1.0 / (mean + 1.0), size=spec["batch"]) - 1
    return np.minimum(counts, spec["max_targets"]).tolist()


def matcher_inputs(spec, device="cpu"):
    """(outputs, targets) of a matcher workload: random logits/boxes, COCO-like targets."""
    gen = torch.Generator().manual_seed(spec["seed"])
    batch, groups, per_group = spec["batch"], spec["groups"], spec["queries_per_group"]
    num_classes = spec["num_classes"]

    def random_boxes(*shape):
        centre = torch.rand(*shape, 2, generator=gen) * 0.8 + 0.1
        size = torch.rand(*shape, 2, generator=gen) * 0.4 + 0.02
        return torch.cat([centre, size], dim=-1)

    outputs = {
        "pred_logits": torch.randn(batch, groups * per_group, num_classes, generator=gen).to(device),
        "pred_boxes": random_boxes(batch, groups * per_group).to(device),
    }
    targets = [
        {
            "labels": torch.randint(num_classes, (m,), generator=gen).to(device),
            "boxes": random_boxes(m).to(device),
        }
        for m in target_counts(spec)
    ]
    return outputs, targets
