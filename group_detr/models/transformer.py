"""Conditional DETR transformer (Meng et al., ICCV 2021), with grouped decoder self-attention.

Sequences are sequence-first as in DETR: memory `(HW, B, d)`, queries `(Q, B, d)`.

Conditional DETR's change to DETR is in the decoder cross-attention: each query predicts a 2-D
reference point from its learned embedding; the sine encoding of that point, scaled by a
transformation of the decoder embedding, becomes a *conditional spatial query* that is
concatenated (per head) with the content query, while keys concatenate the content key with
the key's position encoding. Content and spatial parts therefore match separately, which makes
each query attend to one region early in training and speeds convergence.

Group DETR's change is in the decoder self-attention only: with K groups of N queries,
`GroupedSelfAttention` with a `QueryLayout` keeps groups from seeing each other, so each group
is an independent set of queries trained with its own one-to-one assignment. With
`layout=None` it is ordinary self-attention; the detector passes None in eval.

Simplification against the reference code: the decoder self-attention projects `tgt + query_pos`
with the attention's own in-projection (DETR's form) instead of separate content and position
projections; the conditional cross-attention is as in the paper.
"""
import copy
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from group_detr.attention import GroupedSelfAttention
from group_detr.layout import QueryLayout


class MLP(nn.Module):
    """A few Linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def sine_embed_of_points(points: Tensor, d_model: int, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of normalised 2-D points `(..., 2)` (x, y) -> `(..., d_model)` (y then x).

    The same frequencies as the feature-map encoding (`PositionEmbeddingSine`), so a query's
    spatial part and the keys' position encodings live in one space.
    """
    half = d_model // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=points.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    scaled = points * (2 * math.pi)
    pos_x = scaled[..., 0, None] / dim_t
    pos_y = scaled[..., 1, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x), dim=-1)


class TransformerEncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention with positions added to q and k, then FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Optional[Tensor], pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=key_padding_mask,
                                                            need_weights=False)[0]))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class ConditionalCrossAttention(nn.Module):
    """Multi-head attention over the memory with separately matched content and spatial parts.

    q `(Q, B, 2d)` and k `(HW, B, 2d)` are per-head concatenations [content_h, spatial_h] (built by
    the decoder layer, so no input projection here); v `(HW, B, d)`. Each head's logits are
    content_q . content_k + spatial_q . spatial_k, scaled by 1/sqrt(2d/H) as in the reference.
    Returns `(Q, B, d)`.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        num_queries, batch, _ = q.shape
        d_model = v.shape[-1]
        # (L, B, H*D) -> (B, H, L, D)
        q = q.reshape(num_queries, batch, self.nhead, -1).permute(1, 2, 0, 3)
        k = k.reshape(k.shape[0], batch, self.nhead, -1).permute(1, 2, 0, 3)
        v = v.reshape(v.shape[0], batch, self.nhead, -1).permute(1, 2, 0, 3)
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]  # True = may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(num_queries, batch, d_model))


class ConditionalDecoderLayer(nn.Module):
    """Grouped self-attention, conditional cross-attention, FFN; post-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, is_first: bool,
                 attention_backend: str = "auto"):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.nhead = nhead
        self.is_first = is_first
        self.self_attn = GroupedSelfAttention(d_model, nhead, dropout=dropout, backend=attention_backend)
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        # Only the first layer adds the learned query embedding to the content query; later
        # layers get their position only through the conditional spatial query.
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ConditionalCrossAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def _heads_concat(self, content: Tensor, spatial: Tensor) -> Tensor:
        """(L, B, d) and (L, B, d) -> (L, B, 2d) concatenated per head."""
        length, batch, d_model = content.shape
        content = content.view(length, batch, self.nhead, d_model // self.nhead)
        spatial = spatial.view(length, batch, self.nhead, d_model // self.nhead)
        return torch.cat((content, spatial), dim=3).view(length, batch, 2 * d_model)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor], pos: Tensor,
                query_pos: Tensor, query_sine_embed: Tensor, layout: Optional[QueryLayout]) -> Tensor:
        """tgt, query_pos, query_sine_embed `(Q, B, d)`; memory, pos `(HW, B, d)` -> `(Q, B, d)`."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, layout=layout)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:  # the first layer only (Conditional DETR)
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q = self._heads_concat(q_content, self.ca_qpos_sine_proj(query_sine_embed))
        k = self._heads_concat(k_content, k_pos)
        tgt2 = self.cross_attn(q, k, self.ca_v_proj(memory), memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class ConditionalDecoder(nn.Module):
    """Predicts reference points from the query embeddings and runs the layers.

    Returns the normed output of every layer `(num_layers, Q, B, d)`; the reference points
    before the sigmoid `(Q, B, 2)` (the box head adds its centre offsets to them) are the
    caller's: `reference_logits(query_pos)` for learned queries, a noised box's centre for a
    denoising query.
    """

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float,
                 attention_backend: str = "auto"):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=(i == 0),
                                    attention_backend=attention_backend)
            for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def reference_logits(self, query_pos: Tensor) -> Tensor:
        """The queries' reference points before the sigmoid `(..., 2)` from their embeddings `(..., d)`."""
        return self.ref_point_head(query_pos)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor], pos: Tensor,
                query_pos: Tensor, reference_unsigmoid: Tensor, layout: Optional[QueryLayout]) -> Tensor:
        point_embed = sine_embed_of_points(reference_unsigmoid.sigmoid(), self.d_model)
        output = tgt
        intermediate = []
        for layer_id, layer in enumerate(self.layers):
            # The first layer's decoder embedding is all zeros, so it cannot scale the point.
            scale = 1.0 if layer_id == 0 else self.query_scale(output)
            output = layer(output, memory, memory_key_padding_mask, pos, query_pos, point_embed * scale, layout)
            intermediate.append(self.norm(output))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """Encoder over the flattened feature map + conditional decoder.

    forward(src `(B, d, h, w)`, mask `(B, h, w)` bool, query_embed `(Q, d)`, pos `(B, d, h, w)`,
    layout, prefix) -> hs `(num_decoder_layers, B, P + Q, d)`, reference_unsigmoid `(B, P + Q, 2)`.

    `prefix` (content, query_pos, reference_unsigmoid), batch-first `(B, P, d)`, `(B, P, d)`,
    `(B, P, 2)`, puts P per-image queries in front of the learned ones (denoising queries:
    `group_detr.models.denoising`); `layout` then covers all P + Q.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 attention_backend: str = "auto"):
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be >= 1, got {num_decoder_layers}")
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_encoder_layers))
        self.decoder = ConditionalDecoder(d_model, nhead, num_decoder_layers, dim_feedforward, dropout,
                                          attention_backend)
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor,
                layout: Optional[QueryLayout] = None,
                prefix: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        batch = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(1).expand(-1, batch, -1)
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, mask, pos)
        # Conditional DETR starts the decoder from zeros; the queries' identity is query_pos.
        tgt = torch.zeros_like(query_pos)
        reference_unsigmoid = self.decoder.reference_logits(query_pos)
        if prefix is not None:
            content, prefix_pos, prefix_reference = (t.transpose(0, 1) for t in prefix)
            tgt = torch.cat((content, tgt))
            query_pos = torch.cat((prefix_pos, query_pos))
            reference_unsigmoid = torch.cat((prefix_reference, reference_unsigmoid))
        hs = self.decoder(tgt, memory, mask, pos, query_pos, reference_unsigmoid, layout)
        return hs.transpose(1, 2), reference_unsigmoid.transpose(0, 1)
