"""The thin Conditional-DETR-style Group DETR detector, its losses and post-processing."""
from group_detr.models.backbone import ResNet50, SmallConvBackbone, build_backbone, load_backbone_weights
from group_detr.models.criterion import SetCriterion, default_weight_dict, sigmoid_focal_loss
from group_detr.models.detector import GroupDETR, build_group_detr
from group_detr.models.postprocess import PostProcess
from group_detr.models.transformer import Transformer

__all__ = [
    "ResNet50", "SmallConvBackbone", "build_backbone", "load_backbone_weights",
    "SetCriterion", "default_weight_dict", "sigmoid_focal_loss",
    "GroupDETR", "build_group_detr", "PostProcess", "Transformer",
]
