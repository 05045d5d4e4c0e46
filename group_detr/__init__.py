"""group-detr: Group DETR training with a batched Hungarian solver and grouped attention kernels.

The public API, imported on first use (PEP 562 `__getattr__`), so that `from group_detr import
GroupMatcher` loads the matcher and the solver only, not the detector, the attention kernels or
the training engine:

* assignment: `linear_sum_assignment`, `scipy_compatible`, `backends` (which compiled paths exist)
* matching: `GroupMatcher`
* attention: `QueryLayout`, `grouped_attention`, `masked_attention`, `folded_attention`,
  `GroupedSelfAttention`
* model: `GroupDETR`, `build_group_detr`, `SetCriterion`, `PostProcess`
* training: `TrainConfig`, `demo_config`, `train`, `evaluate_checkpoint`
"""
import importlib

# public name -> the module that defines it
_EXPORTS = {
    "backends": "group_detr._ext",
    "linear_sum_assignment": "group_detr.assignment",
    "scipy_compatible": "group_detr.assignment",
    "GroupMatcher": "group_detr.matcher",
    "QueryLayout": "group_detr.layout",
    "grouped_attention": "group_detr.attention",
    "masked_attention": "group_detr.attention",
    "folded_attention": "group_detr.attention",
    "GroupedSelfAttention": "group_detr.attention",
    "GroupDETR": "group_detr.models.detector",
    "build_group_detr": "group_detr.models.detector",
    "SetCriterion": "group_detr.models.criterion",
    "PostProcess": "group_detr.models.postprocess",
    "TrainConfig": "group_detr.config",
    "demo_config": "group_detr.config",
    "train": "group_detr.engine",
    "evaluate_checkpoint": "group_detr.engine",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'group_detr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
