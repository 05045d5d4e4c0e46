"""QueryLayout: which decoder query may attend to which in Group DETR self-attention.

The decoder's query sequence is laid out as

    [ denoising group 0 | ... | denoising group D-1 | matching group 0 | ... | matching group K-1 ]

with an optional denoising prefix (DN-DETR / DINO) of `num_denoising` queries split into
`denoising_groups` equal parts, followed by `num_groups` matching groups of `queries_per_group`
queries each. Matching group 0 is the group kept at inference.

Visibility rules (True = the query may attend to the key):
  * a matching group sees only itself (Group DETR: groups are independent at training time);
  * a matching query never sees a denoising query (the ground truth must not leak into the
    matching queries; DN-DETR / DINO);
  * a denoising group never sees another denoising group (DN-DETR / DINO);
  * a denoising group sees itself and, depending on `denoising_sees`, the matching queries:
    "all"   every matching group (DINO's mask, extended to K groups; the default),
    "first" only matching group 0, the group kept at inference,
    "none"  no matching query.

The layout is a list of contiguous segments (one per denoising group and one per matching group)
plus a small (S, S) segment-visibility matrix. Kernels iterate over visible segments and never
build an (L, L) mask; `dense_mask` builds one for the reference path and for users' own code,
`mask_mod` gives the same rule to torch's FlexAttention.
"""
from dataclasses import dataclass
from numbers import Integral
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

DENOISING_SEES = ("all", "first", "none")

Range = Tuple[int, int]  # half-open [start, end) over query / key positions


@dataclass(frozen=True)
class QueryLayout:
    """Groups, queries per group and an optional denoising prefix.

    Frozen and hashable, so a layout can key caches (dense masks, kernel schedules) and be a
    compile-time constant under `torch.compile`.

    Args:
        num_groups: K, number of matching groups (>= 1).
        queries_per_group: N, matching queries in each group (>= 1).
        num_denoising: length of the denoising prefix (0 = no denoising queries).
        denoising_groups: number of equal denoising groups the prefix is split into
            (0 when num_denoising is 0, otherwise >= 1 and dividing num_denoising).
        denoising_sees: which matching groups a denoising query sees: "all" (DINO, default),
            "first" (matching group 0 only) or "none".
    """

    num_groups: int
    queries_per_group: int
    num_denoising: int = 0
    denoising_groups: int = 0
    denoising_sees: str = "all"

    def __post_init__(self):
        for name in ("num_groups", "queries_per_group", "num_denoising", "denoising_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"QueryLayout.{name} must be an int, got {type(value).__name__}")
            object.__setattr__(self, name, int(value))  # numpy ints -> int, for hashing
        if self.num_groups < 1:
            raise ValueError(f"QueryLayout.num_groups must be >= 1, got {self.num_groups}")
        if self.queries_per_group < 1:
            raise ValueError(
                f"QueryLayout.queries_per_group must be >= 1, got {self.queries_per_group}")
        if self.num_denoising < 0 or self.denoising_groups < 0:
            raise ValueError(
                "QueryLayout.num_denoising and denoising_groups must be >= 0, got "
                f"{self.num_denoising} and {self.denoising_groups}")
        if self.num_denoising == 0 and self.denoising_groups != 0:
            raise ValueError(
                f"QueryLayout.denoising_groups={self.denoising_groups} needs num_denoising > 0")
        if self.num_denoising > 0 and self.denoising_groups == 0:
            raise ValueError(
                f"QueryLayout.num_denoising={self.num_denoising} needs denoising_groups >= 1")
        if self.num_denoising > 0 and self.num_denoising % self.denoising_groups != 0:
            raise ValueError(
                f"QueryLayout.num_denoising={self.num_denoising} is not divisible by "
                f"denoising_groups={self.denoising_groups}: denoising groups must be equal")
        if self.denoising_sees not in DENOISING_SEES:
            raise ValueError(
                f"QueryLayout.denoising_sees must be one of {DENOISING_SEES}, "
                f"got {self.denoising_sees!r}")

    @classmethod
    def single_group(cls, num_queries: int) -> "QueryLayout":
        """One group of all `num_queries` queries: ordinary (full) self-attention."""
        return cls(num_groups=1, queries_per_group=num_queries)

    # ----- sizes -------------------------------------------------------------------------------
    @property
    def num_matching(self) -> int:
        """K * N matching queries."""
        return self.num_groups * self.queries_per_group

    @property
    def total_queries(self) -> int:
        """L = num_denoising + K * N, the sequence length q, k and v must have."""
        return self.num_denoising + self.num_matching

    @property
    def denoising_group_size(self) -> int:
        return self.num_denoising // self.denoising_groups if self.denoising_groups else 0

    @property
    def num_segments(self) -> int:
        return self.denoising_groups + self.num_groups

    @property
    def is_equal_groups(self) -> bool:
        """True when the layout is K equal, independent groups (no denoising prefix), i.e. when
        groups can be folded into the batch dimension."""
        return self.num_denoising == 0

    # ----- segments ----------------------------------------------------------------------------
    @property
    def segments(self) -> Tuple[Range, ...]:
        """(start, end) of each segment: the denoising groups first, then the matching groups."""
        size_dn, size_m = self.denoising_group_size, self.queries_per_group
        dn = tuple((i * size_dn, (i + 1) * size_dn) for i in range(self.denoising_groups))
        base = self.num_denoising
        match = tuple((base + g * size_m, base + (g + 1) * size_m) for g in range(self.num_groups))
        return dn + match

    @property
    def segment_visibility(self) -> Tuple[Tuple[bool, ...], ...]:
        """(S, S) nested tuple: [query segment][key segment] is True when queries of the first
        may attend to keys of the second. Always True on the diagonal, so no row is empty."""
        num_dn, num_seg = self.denoising_groups, self.num_segments
        rows = []
        for i in range(num_seg):
            row = [i == j for j in range(num_seg)]
            if i < num_dn and self.denoising_sees == "all":
                row[num_dn:] = [True] * self.num_groups
            elif i < num_dn and self.denoising_sees == "first":
                row[num_dn] = True
            rows.append(tuple(row))
        return tuple(rows)

    def visible_key_ranges(self) -> Tuple[Tuple[Range, ...], ...]:
        """For each query segment, the keys it sees as merged (start, end) ranges.

        Adjacent visible segments are merged, so a DINO denoising group with
        denoising_sees="all" sees two ranges (itself and all matching queries).
        """
        return _merged_ranges(self.segments, self.segment_visibility)

    def visible_query_ranges(self) -> Tuple[Tuple[Range, ...], ...]:
        """For each key segment, the queries that see it as merged (start, end) ranges (the
        transpose of `visible_key_ranges`, what a backward pass over keys iterates over)."""
        transposed = tuple(zip(*self.segment_visibility))
        return _merged_ranges(self.segments, transposed)

    def segment_ids(self, device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """int64 `(L,)`: the segment index of every query position."""
        lengths = torch.tensor([end - start for start, end in self.segments], device=device)
        return torch.repeat_interleave(torch.arange(self.num_segments, device=device), lengths)

    # ----- dense masks -------------------------------------------------------------------------
    def dense_mask(self, device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """bool `(L, L)`, True where query i MAY attend to key j.

        This is the convention of `F.scaled_dot_product_attention`'s boolean `attn_mask`, and the
        opposite of `nn.MultiheadAttention`'s boolean `attn_mask` (True = masked out); use
        `mha_attn_mask` for the latter. Costs L*L bytes: only for reference paths.
        """
        visibility = torch.tensor(self.segment_visibility, dtype=torch.bool, device=device)
        ids = self.segment_ids(device)
        return visibility[ids[:, None], ids[None, :]]

    def mask_mod(self, device: Optional[Union[str, torch.device]] = None
                 ) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The layout as a FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool` (True = may
        attend, like `dense_mask`): a lookup of the (S, S) segment visibility by the segment ids
        of the two positions, so `create_block_mask` skips the blocks no query of a block sees."""
        visibility = torch.tensor(self.segment_visibility, dtype=torch.bool, device=device)
        ids = self.segment_ids(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return visibility[ids[q_idx], ids[kv_idx]]

        return mask_mod

    def mha_attn_mask(self, device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """bool `(L, L)` in `nn.MultiheadAttention`'s convention: True where attention is NOT
        allowed (the `attn_mask` DN-DETR / DINO code builds)."""
        return ~self.dense_mask(device)

    def visible_fraction(self) -> float:
        """Fraction of the L*L query-key pairs that are visible (1/K for K equal groups)."""
        lengths = [end - start for start, end in self.segments]
        visible = sum(
            lengths[i] * lengths[j]
            for i, row in enumerate(self.segment_visibility)
            for j, seen in enumerate(row) if seen)
        return visible / self.total_queries ** 2

    def check_length(self, length: int, what: str = "sequence length") -> None:
        """Raise ValueError unless `length` equals `total_queries`."""
        if length != self.total_queries:
            raise ValueError(
                f"{what} is {length} but the layout has {self.total_queries} queries "
                f"(num_denoising={self.num_denoising} + num_groups={self.num_groups} * "
                f"queries_per_group={self.queries_per_group})")


def _merged_ranges(segments, visibility) -> Tuple[Tuple[Range, ...], ...]:
    """Per row of `visibility`, the union of the visible segments as sorted, merged ranges."""
    result = []
    for row in visibility:
        ranges: List[Range] = []
        for (start, end), seen in zip(segments, row):
            if not seen:
                continue
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        result.append(tuple(ranges))
    return tuple(result)


def resolve_layout(layout: Optional[QueryLayout], length: int) -> QueryLayout:
    """`layout`, or one group of all `length` queries when it is None; checks the length."""
    if layout is None:
        return QueryLayout.single_group(length)
    if not isinstance(layout, QueryLayout):
        raise TypeError(f"layout must be a QueryLayout or None, got {type(layout).__name__}")
    layout.check_length(length)
    return layout
