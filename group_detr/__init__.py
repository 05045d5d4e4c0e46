"""group-detr: Group DETR training with a batched Hungarian solver and grouped attention kernels."""
from group_detr._ext import backends
from group_detr.assignment import linear_sum_assignment, scipy_compatible
from group_detr.attention import GroupedSelfAttention, folded_attention, grouped_attention, masked_attention
from group_detr.layout import QueryLayout
from group_detr.matcher import GroupMatcher
from group_detr.models import GroupDETR, PostProcess, SetCriterion, build_group_detr

__all__ = [
    "backends",
    "linear_sum_assignment",
    "scipy_compatible",
    "GroupMatcher",
    "QueryLayout",
    "grouped_attention",
    "masked_attention",
    "folded_attention",
    "GroupedSelfAttention",
    "GroupDETR",
    "build_group_detr",
    "SetCriterion",
    "PostProcess",
]
__version__ = "0.1.0"
