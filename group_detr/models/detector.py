"""The Group DETR detector: backbone -> Conditional DETR transformer -> class and box heads.

Training runs K groups of N queries (K*N query embeddings, decoder self-attention restricted
to each group through a `QueryLayout`); `eval()` runs the first N queries with ordinary
self-attention, so the exported model is a plain Conditional DETR and no group code runs.
With a `ContrastiveDenoising` module, training also runs DINO's denoising queries in front of the
K groups (`group_detr.models.denoising`); eval runs none.
"""
import math
import typing
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from group_detr.layout import QueryLayout
from group_detr.models.backbone import Joiner, build_backbone
from group_detr.models.denoising import ContrastiveDenoising, DenoisingQueries
from group_detr.models.transformer import MLP, Transformer


class GroupDETR(nn.Module):
    """forward(images `(B, 3, H, W)`, mask `(B, H, W)` bool, True = padding) -> dict with

    * `pred_logits` `(B, Q, num_classes)`: class logits (sigmoid / focal, no "no object" class),
    * `pred_boxes` `(B, Q, 4)`: normalised cxcywh,
    * `aux_outputs`: the same two for every decoder layer but the last (when aux_loss),
    * with denoising, in training: `dn_outputs`, the same three for the D denoising queries
      (`pred_logits` `(B, D, num_classes)`, ...), and `dn_meta` (plain ints: num_groups,
      max_targets, group_size) for the criterion; absent when the batch has no target,

    where Q = num_groups * num_queries in training and num_queries in eval. Group g's queries are
    the slice [g*N, (g+1)*N), the format GroupMatcher expects. With denoising, training needs
    the targets: `forward(images, mask, targets)`.

    For analysis (paper Sec. 3.3): `reference_points()` gives every query's normalised position,
    `forward_all_groups()` runs all K groups whatever the mode, optionally with other query
    embeddings.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int,
                 num_queries: int = 300, num_groups: int = 11, aux_loss: bool = True,
                 denoising: Optional[ContrastiveDenoising] = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_queries < 1 or num_groups < 1:
            raise ValueError(f"num_queries and num_groups must be >= 1, got {num_queries} and {num_groups}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_groups = num_groups
        self.aux_loss = aux_loss
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_groups * num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # Focal-loss prior: start every class at probability 0.01 so the many negatives do not
        # swamp the first iterations (RetinaNet; Conditional DETR).
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        # Boxes start at the reference point with the size sigmoid(0) = 0.5.
        box_head = typing.cast(nn.Linear, self.bbox_embed.layers[-1])
        nn.init.zeros_(box_head.weight)
        nn.init.zeros_(box_head.bias)
        self.layout = QueryLayout(num_groups=num_groups, queries_per_group=num_queries)
        self.denoising = denoising

    def active_queries(self) -> int:
        """Queries this forward will run: K*N in training, N in eval."""
        return self.num_groups * self.num_queries if self.training else self.num_queries

    def reference_points(self, query_embed: Optional[Tensor] = None) -> Tensor:
        """Normalised (x, y) reference points `(Q, 2)` of query embeddings `(Q, d)` (default: all
        K*N learned ones). They depend on the embeddings only, not on the image: the queries'
        positions (paper Sec. 3.3.1)."""
        if query_embed is None:
            query_embed = self.query_embed.weight
        return self.transformer.decoder.reference_logits(query_embed).sigmoid()

    def forward(self, images: Tensor, mask: Optional[Tensor] = None,
                targets: Optional[Sequence[Dict]] = None) -> Dict:
        if self.training and self.denoising is not None:
            if targets is None:
                raise ValueError("a GroupDETR with denoising needs the targets in training: "
                                 "call model(images, mask, targets)")
            queries = self.denoising(targets, images.shape[0])
            if queries is not None:
                return self._forward(images, mask, self.query_embed.weight,
                                     queries.layout(self.num_groups, self.num_queries), queries)
        if self.training and self.num_groups > 1:
            return self._forward(images, mask, self.query_embed.weight, self.layout)
        # Inference keeps group 0 only; with layout=None no group code runs.
        return self._forward(images, mask, self.query_embed.weight[: self.num_queries], None)

    def forward_all_groups(self, images: Tensor, mask: Optional[Tensor] = None,
                           query_embed: Optional[Tensor] = None) -> Dict:
        """The training forward over all K groups (each group's self-attention its own) in either
        mode; `query_embed` `(K*N, d)` replaces the learned embeddings. Returns what `forward`
        does for Q = K*N queries (dropout as the mode says)."""
        if query_embed is None:
            query_embed = self.query_embed.weight
        if query_embed.shape != self.query_embed.weight.shape:
            raise ValueError(f"query_embed must be {tuple(self.query_embed.weight.shape)} (K*N, d), "
                             f"got {tuple(query_embed.shape)}")
        return self._forward(images, mask, query_embed, self.layout if self.num_groups > 1 else None)

    def _forward(self, images: Tensor, mask: Optional[Tensor], query_embed: Tensor,
                 layout: Optional[QueryLayout], denoising: Optional[DenoisingQueries] = None) -> Dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        features, mask, pos = self.backbone(images, mask)
        prefix = None
        if denoising is not None:
            prefix = (denoising.content, denoising.query_pos, denoising.reference_unsigmoid)
        hs, reference_unsigmoid = self.transformer(self.input_proj(features), mask, query_embed, pos, layout,
                                                   prefix)
        # hs (L, B, Q, d); box centres are offsets from the reference points, in logit space.
        box_offsets = self.bbox_embed(hs)
        centres = box_offsets[..., :2] + reference_unsigmoid
        boxes = torch.cat((centres, box_offsets[..., 2:]), dim=-1).sigmoid()
        logits = self.class_embed(hs)
        if denoising is None:
            return self._outputs(logits, boxes)
        # the denoising prefix comes first (QueryLayout's order)
        num_dn = denoising.num_queries
        out = self._outputs(logits[:, :, num_dn:], boxes[:, :, num_dn:])
        out["dn_outputs"] = self._outputs(logits[:, :, :num_dn], boxes[:, :, :num_dn])
        out["dn_meta"] = denoising.meta()
        return out

    def _outputs(self, logits: Tensor, boxes: Tensor) -> Dict:
        """The output dict of `(layers, B, Q, C)` logits and `(layers, B, Q, 4)` boxes."""
        out: Dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


def build_group_detr(num_classes: int, num_groups: int = 11, num_queries: int = 300, backbone: str = "resnet50",
                     backbone_weights: Optional[str] = None, hidden_dim: int = 256, nheads: int = 8,
                     enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048,
                     dropout: float = 0.1, aux_loss: bool = True,
                     small_widths: Sequence[int] = (32, 64, 128, 256), small_norm: str = "batch",
                     attention_backend: str = "auto", denoising_queries: int = 0,
                     denoising_label_noise: float = 0.5, denoising_box_noise: float = 1.0,
                     denoising_contrastive: bool = True) -> GroupDETR:
    """Build a Group DETR with Conditional DETR's defaults (d=256, 8 heads, 6+6 layers).

    backbone: "resnet50" (the paper's; load ImageNet weights with backbone_weights=PATH) or
    "small" (a from-scratch CNN of stride 2**len(small_widths), small_norm "batch" or "group",
    for the synthetic data and tests). attention_backend: the decoder self-attention's
    (`group_detr.attention.BACKENDS`). denoising_queries > 0 adds DINO's contrastive denoising
    with that budget and the three noise settings (`ContrastiveDenoising`).
    """
    joiner = build_backbone(backbone, hidden_dim, backbone_weights, tuple(small_widths), small_norm)
    transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout,
                              attention_backend)
    denoising = None
    if denoising_queries:
        denoising = ContrastiveDenoising(num_classes, hidden_dim, denoising_queries, denoising_label_noise,
                                         denoising_box_noise, denoising_contrastive)
    return GroupDETR(joiner, transformer, num_classes, num_queries, num_groups, aux_loss, denoising)
