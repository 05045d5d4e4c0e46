"""Backbones and the sine position encoding.

* `SmallConvBackbone`: a small CNN trained from scratch (BatchNorm or GroupNorm, stride 2 per
  stage); the backbone of the synthetic-data demo, benchmarks and tests (fast on a CPU).
* `ResNet50`: the paper's backbone (C5, stride 32, frozen batch norm), written in plain torch
  with torchvision's parameter names so that a torchvision ResNet-50 checkpoint file loads as it
  is through `load_backbone_weights` (weights come only from local files, never a download).

`Joiner` runs a backbone and returns the feature map, the padding mask resized to it and the
position encoding, which is what the transformer consumes.
"""
import math
import typing
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters).

    Detection batches are too small for batch statistics; like DETR and the paper we keep the
    ImageNet ones. The buffer names match nn.BatchNorm2d so torchvision checkpoints load.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # nn.BatchNorm2d checkpoints carry a counter that frozen statistics do not need.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv); same parameter names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 up to C5: `(B, 3, H, W)` -> `(B, 2048, H/32, W/32)`.

    The stem and layer1 are frozen (DETR trains layer2-4 with the backbone learning rate).
    There is no `fc`; `load_backbone_weights` drops the classifier from ImageNet checkpoints.
    """

    num_channels = 2048
    stride = 32
    # built in a loop by setattr; declared so that their type is known
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, train_layers: Tuple[str, ...] = ("layer2", "layer3", "layer4")):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                FrozenBatchNorm2d(planes * 4),
            )
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(any(name.startswith(layer + ".") for layer in train_layers))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _conv_norm_relu(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    layer_norm = nn.BatchNorm2d(out_channels) if norm == "batch" else nn.GroupNorm(8, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        layer_norm,
        nn.ReLU(inplace=True),
    )


SMALL_NORMS = ("batch", "group")


class SmallConvBackbone(nn.Module):
    """A small CNN trained from scratch: `(B, 3, H, W)` -> `(B, widths[-1], H/s, W/s)`, s = 2**len(widths).

    Each stage is a stride-2 conv and a stride-1 conv, each followed by the normalisation and a
    ReLU. norm="batch" (BatchNorm, the default) learns much faster from scratch than
    norm="group" (GroupNorm with 8 groups, batch-size independent and identical in train and
    eval); see the demo's docstring for the measurements.
    """

    def __init__(self, widths: Tuple[int, ...] = (32, 64, 128, 256), norm: str = "batch"):
        super().__init__()
        widths = tuple(widths)
        if not 1 <= len(widths) <= 5 or any(not isinstance(w, int) or w < 8 or w % 8 for w in widths):
            raise ValueError(f"SmallConvBackbone needs 1 to 5 widths, each a multiple of 8, got {widths}")
        if norm not in SMALL_NORMS:
            raise ValueError(f"SmallConvBackbone norm must be one of {SMALL_NORMS}, got {norm!r}")
        stages, in_channels = [], 3
        for width in widths:
            stages.append(nn.Sequential(_conv_norm_relu(in_channels, width, 2, norm),
                                        _conv_norm_relu(width, width, 1, norm)))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.num_channels = widths[-1]
        self.stride = 2 ** len(widths)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine encoding of feature-map positions, aware of padding.

    mask `(B, h, w)` bool (True = padding) -> `(B, 2 * num_pos_feats, h, w)`; coordinates are
    normalised by the unpadded extent of each image, so padding does not shift positions.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        eps = 1e-6
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Joiner(nn.Module):
    """Backbone + position encoding.

    forward(images `(B, 3, H, W)`, mask `(B, H, W)` bool) -> features `(B, C, h, w)`,
    mask `(B, h, w)` and pos `(B, hidden_dim, h, w)`.
    """

    def __init__(self, body: nn.Module, hidden_dim: int):
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even for the sine position encoding, got {hidden_dim}")
        self.body = body
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2)
        # any body that declares its output width (SmallConvBackbone, ResNet50, a user's module)
        self.num_channels = typing.cast(int, body.num_channels)

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        features = self.body(images)
        mask = F.interpolate(mask[:, None].float(), size=features.shape[-2:]).to(torch.bool)[:, 0]
        return features, mask, self.position_embedding(mask).to(features.dtype)


def _extract_state_dict(checkpoint) -> Dict[str, Tensor]:
    """Accept a bare state dict or the usual {"state_dict": ...} / {"model": ...} wrappers."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError("backbone weights must be a state dict of tensors (e.g. torchvision's resnet50 .pth)")
    # Checkpoints saved from a wrapper (DDP, a detector) prefix the names; strip common prefixes.
    for prefix in ("module.", "backbone.body.", "backbone.0.body.", "body."):
        if checkpoint and all(k.startswith(prefix) for k in checkpoint):
            checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items()}
    # A whole detector (one of our checkpoints, or DETR's): keep its backbone's tensors, so that
    # a new detector can start from the backbone another one has trained.
    for prefix in ("backbone.body.", "backbone.0.body."):
        if any(k.startswith(prefix) for k in checkpoint) and any(k.startswith("transformer.") for k in checkpoint):
            checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    return checkpoint


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local checkpoint (e.g. torchvision's resnet50-0676ba61.pth) into `backbone`.

    A detector checkpoint (ours from `train`, or DETR's) works too: its backbone is taken.

    The ImageNet classifier (`fc.*`) is dropped; every other tensor must match by name and shape,
    otherwise a ValueError lists what is missing or unexpected.
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; report them uniformly
        raise ValueError(f"cannot load backbone weights from {path}: {exc}") from exc
    state_dict = {k: v for k, v in _extract_state_dict(checkpoint).items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(k for k in set(state_dict) - set(own) if not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise ValueError(f"backbone weights in {path} do not fit {type(backbone).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong_shape = [k for k in own if own[k].shape != state_dict[k].shape]
    if wrong_shape:
        raise ValueError(f"backbone weights in {path} have the wrong shape for {wrong_shape[:5]}")
    backbone.load_state_dict(state_dict, strict=False)


def build_backbone(name: str, hidden_dim: int, weights: Optional[str] = None,
                   small_widths: Tuple[int, ...] = (32, 64, 128, 256), small_norm: str = "batch") -> Joiner:
    """name: "small" (SmallConvBackbone) or "resnet50"; weights: optional local checkpoint path."""
    body: nn.Module
    if name == "small":
        body = SmallConvBackbone(tuple(small_widths), small_norm)
    elif name == "resnet50":
        body = ResNet50()
    else:
        raise ValueError(f"unknown backbone {name!r}; choose 'small' or 'resnet50'")
    if weights:
        load_backbone_weights(body, weights)
    return Joiner(body, hidden_dim)
