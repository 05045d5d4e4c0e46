"""QueryLayout: segments, visibility rules, dense masks, block lists and validation.

The masks are checked against constructions written independently of layout.py: a per-position
rule, and the attention mask DINO's `prepare_for_cdn` builds.
"""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from group_detr.layout import DENOISING_SEES, QueryLayout, resolve_layout


def rule_mask(layout: QueryLayout) -> torch.Tensor:
    """(L, L) bool from the DN-DETR / DINO / Group DETR rules, position by position."""
    size_dn, n = layout.denoising_group_size, layout.queries_per_group

    def kind(i):  # ("dn", denoising group) or ("match", matching group)
        if i < layout.num_denoising:
            return "dn", i // size_dn
        return "match", (i - layout.num_denoising) // n

    length = layout.total_queries
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        qk, qg = kind(i)
        for j in range(length):
            kk, kg = kind(j)
            if qk == kk:
                mask[i, j] = qg == kg
            elif qk == "dn":  # a denoising query looking at a matching key
                mask[i, j] = layout.denoising_sees == "all" or (
                    layout.denoising_sees == "first" and kg == 0)
            # a matching query never sees a denoising key: stays False
    return mask


layouts = st.builds(
    lambda k, n, d, size, sees: QueryLayout(k, n, d * size, d, sees),
    st.integers(1, 4), st.integers(1, 7), st.integers(0, 3), st.integers(1, 4),
    st.sampled_from(DENOISING_SEES))


@settings(max_examples=60, deadline=None)
@given(layouts)
def test_dense_mask_follows_the_rules(layout):
    mask = layout.dense_mask()
    assert mask.dtype == torch.bool and mask.shape == (layout.total_queries,) * 2
    assert torch.equal(mask, rule_mask(layout))
    assert torch.equal(layout.mha_attn_mask(), ~mask)
    assert layout.visible_fraction() == pytest.approx(mask.float().mean().item())


@settings(max_examples=60, deadline=None)
@given(layouts)
def test_segments_tile_the_sequence_and_ranges_match_the_mask(layout):
    segments = layout.segments
    assert len(segments) == layout.num_segments
    assert segments[0][0] == 0 and segments[-1][1] == layout.total_queries
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:]))
    mask = layout.dense_mask()
    for seg, ((start, end), ranges) in enumerate(zip(segments, layout.visible_key_ranges())):
        from_ranges = torch.zeros(layout.total_queries, dtype=torch.bool)
        for k_start, k_end in ranges:
            from_ranges[k_start:k_end] = True
        assert torch.equal(mask[start:end], from_ranges.expand(end - start, -1)), seg
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), "ranges must be merged"
    for seg, ((start, end), ranges) in enumerate(zip(segments, layout.visible_query_ranges())):
        from_ranges = torch.zeros(layout.total_queries, dtype=torch.bool)
        for q_start, q_end in ranges:
            from_ranges[q_start:q_end] = True
        assert torch.equal(mask[:, start:end], from_ranges[:, None].expand(-1, end - start)), seg


def test_dino_mask_for_one_matching_group():
    # DINO's prepare_for_cdn (dn_components.py), True = masked out, dn groups of 2*max_targets
    num_queries, single_pad, scalar = 9, 4, 3
    pad_size = single_pad * scalar
    tgt_size = pad_size + num_queries
    attn_mask = torch.ones(tgt_size, tgt_size) < 0
    attn_mask[pad_size:, :pad_size] = True
    for i in range(scalar):
        if i == 0:
            attn_mask[single_pad * i:single_pad * (i + 1), single_pad * (i + 1):pad_size] = True
        if i == scalar - 1:
            attn_mask[single_pad * i:single_pad * (i + 1), :single_pad * i] = True
        else:
            attn_mask[single_pad * i:single_pad * (i + 1), single_pad * (i + 1):pad_size] = True
            attn_mask[single_pad * i:single_pad * (i + 1), :single_pad * i] = True
    layout = QueryLayout(1, num_queries, num_denoising=pad_size, denoising_groups=scalar)
    assert layout.denoising_sees == "all"  # the default follows DINO
    assert torch.equal(layout.mha_attn_mask(), attn_mask)


def test_equal_groups_are_block_diagonal():
    layout = QueryLayout(num_groups=3, queries_per_group=4)
    assert layout.total_queries == 12 and layout.is_equal_groups
    assert torch.equal(layout.dense_mask(), torch.block_diag(*[torch.ones(4, 4)] * 3).bool())
    assert layout.visible_fraction() == pytest.approx(1 / 3)
    assert layout.visible_key_ranges() == (((0, 4),), ((4, 8),), ((8, 12),))


def test_denoising_sees_options():
    base = dict(num_groups=2, queries_per_group=3, num_denoising=4, denoising_groups=2)
    ranges = {s: QueryLayout(**base, denoising_sees=s).visible_key_ranges()[0]
              for s in DENOISING_SEES}
    assert ranges == {"all": ((0, 2), (4, 10)), "first": ((0, 2), (4, 7)), "none": ((0, 2),)}
    assert not QueryLayout(**base).is_equal_groups


def test_single_group_and_resolve_layout():
    assert resolve_layout(None, 7) == QueryLayout(1, 7)
    assert QueryLayout.single_group(7).dense_mask().all()
    with pytest.raises(ValueError, match="sequence length is 8 but the layout has 7 queries"):
        resolve_layout(QueryLayout(1, 7), 8)
    with pytest.raises(TypeError, match="layout must be a QueryLayout"):
        resolve_layout({"num_groups": 1}, 7)


def test_frozen_and_hashable():
    a, b = QueryLayout(11, 300), QueryLayout(num_groups=11, queries_per_group=300)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != QueryLayout(11, 300, 200, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_groups = 2


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_groups=0, queries_per_group=3), ValueError, "num_groups must be >= 1"),
    (dict(num_groups=2, queries_per_group=0), ValueError, "queries_per_group must be >= 1"),
    (dict(num_groups=2, queries_per_group=3, num_denoising=-2, denoising_groups=1), ValueError,
     "must be >= 0"),
    (dict(num_groups=2, queries_per_group=3, num_denoising=10, denoising_groups=3), ValueError,
     "not divisible by denoising_groups=3"),
    (dict(num_groups=2, queries_per_group=3, num_denoising=10), ValueError,
     "needs denoising_groups >= 1"),
    (dict(num_groups=2, queries_per_group=3, denoising_groups=2), ValueError,
     "needs num_denoising > 0"),
    (dict(num_groups=2, queries_per_group=3, num_denoising=4, denoising_groups=2,
          denoising_sees="some"), ValueError, "denoising_sees must be one of"),
    (dict(num_groups=2.0, queries_per_group=3), TypeError, "num_groups must be an int"),
    (dict(num_groups=True, queries_per_group=3), TypeError, "num_groups must be an int"),
])
def test_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        QueryLayout(**kwargs)

