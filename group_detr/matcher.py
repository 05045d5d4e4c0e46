"""GroupMatcher: DETR's HungarianMatcher for K groups of queries, all problems in one solver call.

Group DETR (Chen et al., ICCV 2023) matches every group of N queries one-to-one to the ground
truth, so each target gets K positives. Public implementations build DETR's batch-wide
`(B*K*N, sum M)` cost, copy it to the host and call scipy B*K times. Here the cost is built per
image and group as one padded `(B*K, N, M_max)` tensor (B times fewer entries) and solved by one
call of the batched solver; on the CPU both run as one op, each problem's cost solved while it is
still in the cache.

Switching from a public matcher: the criterion's call stays as it is (DETR's
`matcher(outputs, targets)`, Conditional DETR's and LW-DETR's `group_detr=K` keyword, the same
returned list of `(query_idx, target_idx)` int64 CPU tensors); only the matcher is built anew.
  * DETR (models/matcher.py, build_matcher):
        GroupMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                     cost_giou=args.set_cost_giou, class_cost="softmax")
  * Conditional DETR (GroupDETR branch), LW-DETR (models/matcher.py, build_matcher):
        GroupMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                     cost_giou=args.set_cost_giou, focal_alpha=args.focal_alpha)
  * RF-DETR (rfdetr/models/matcher.py): as LW-DETR with `class_cost="focal_logsigmoid",
    focal_alpha=0.25` (its matcher fixes alpha at 0.25), plus for segmentation its
    `cost_mask_ce=`, `cost_mask_dice=`, `mask_point_sample_ratio=`, and `validate=False` for
    RF-DETR's "replace non-finite costs and match on".
  * Hugging Face transformers (DETR, Conditional/Deformable DETR, DAB-DETR, LW-DETR, RF-DETR):
        from group_detr.integrations.transformers import use_group_matcher; use_group_matcher()
Errors differ on purpose: a bad input raises ValueError or TypeError naming the target, image or
problem (KeyError for a missing dict key), where those matchers raise AssertionError (DETR's box
checks), IndexError (a class id past the logits) or scipy's ValueError without the problem.
"""
import warnings
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from group_detr import _ext
from group_detr.assignment import _host_to_device, linear_sum_assignment, raise_for_status
from group_detr.box_ops import check_boxes
from group_detr.mask_cost import check_masks, mask_cost_matrix, num_points_for
from group_detr.match_cost import CLASS_COSTS, COST_BACKENDS, match_cost, resolve_cost_backend


def _get(mapping, *keys, what):
    for key in keys:
        if key in mapping:
            return mapping[key]
    raise KeyError(f"{what} not found: expected one of the keys {keys}, got {sorted(mapping)}")


def target_fields(targets):
    """Per-image labels `(M_i,)` and boxes `(M_i, 4)` of DETR's target dicts, and the M_i.

    Checks what reads no tensor values: the keys, the shapes and that labels are integers.
    """
    labels = [_get(t, "labels", "class_labels", what="target labels") for t in targets]
    boxes = [_get(t, "boxes", what="target boxes") for t in targets]
    for i, (l, b) in enumerate(zip(labels, boxes)):
        if l.dim() != 1 or b.shape != (l.shape[0], 4):
            raise ValueError(
                f"target {i}: labels must be (M,) and boxes (M, 4), got {tuple(l.shape)} "
                f"and {tuple(b.shape)}"
            )
        if l.is_floating_point():
            raise TypeError(f"target {i}: labels must be integer class ids, got {l.dtype}")
    return labels, boxes, [int(l.shape[0]) for l in labels]


def pad_targets(targets, num_classes: int, device, validate: bool = True):
    """Stack per-image targets into padded tensors.

    Returns labels `(B, M_max)` int64, boxes `(B, M_max, 4)` float32 cxcywh and the list of
    M_i. Padding rows hold label 0 and the valid box (0.5, 0.5, 0.5, 0.5) so that the costs
    stay finite; the solver never looks at them (`num_targets`).

    This is where targets are validated, once, before matching (SetCriterion does not check them
    again). The shape and dtype checks read no tensor values and always run
    (`target_fields`). The value checks (`check_targets`) read the tensors on the host, so with
    validate=False they are skipped on every device (nothing synchronises on CUDA); labels are
    then clamped into range so that a bad one cannot fault the gather, and a bad box gives
    non-finite costs, which the solver's validate=False rule handles
    (`group_detr.assignment.sanitize_cost`). The one-pass CPU op applies the same checks and
    the same clamp itself (csrc/cost/group_match_cpu.cpp), with the same messages.
    """
    labels, boxes, sizes = target_fields(targets)
    labels_padded, boxes_padded = _stack_padded(labels, boxes, device)
    if not validate:
        return labels_padded.clamp_(0, max(num_classes - 1, 0)), boxes_padded, sizes
    check_targets(labels_padded, boxes_padded, num_classes)
    return labels_padded, boxes_padded, sizes


def _stack_padded(labels, boxes, device):
    """Per-image labels `(M_i,)` and boxes `(M_i, 4)` -> `(B, M_max)` int64, `(B, M_max, 4)`
    float32 on `device`, padded with 0 and 0.5: one pad_sequence per field (per-image slice
    copies cost a few microseconds each, most of a small batch's assignment time; `.to` is free
    for a tensor already of that dtype and device). No blocking host copy on CUDA."""
    if not labels:
        return (torch.zeros((0, 0), dtype=torch.int64, device=device),
                torch.zeros((0, 0, 4), device=device))
    pad = torch.nn.utils.rnn.pad_sequence
    return (pad([l.to(device, torch.int64) for l in labels], batch_first=True, padding_value=0),
            pad([b.to(device, torch.float32) for b in boxes], batch_first=True, padding_value=0.5))


def check_targets(labels: Tensor, boxes: Tensor, num_classes: int) -> None:
    """Raise ValueError, naming the image, for padded labels `(B, M)` outside [0, num_classes)
    or boxes `(B, M, 4)` that are not finite with non-negative size (`check_boxes`).

    Reads the tensors on the host (a synchronisation on CUDA). DETR-family matchers raise
    AssertionError (DETR's box checks) or IndexError (a class id past the logits) for these;
    ValueError here.
    """
    if labels.numel():
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            image, column = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"target {image} has class id {int(labels[image, column])} outside "
                f"[0, {num_classes}): the data has more classes than the model was built for "
                f"(num_classes={num_classes})"
            )
    check_boxes(boxes, "target boxes")


class GroupMatcher(nn.Module):
    """One-to-one Hungarian matching per group of queries (Group DETR), as DETR's HungarianMatcher.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the class, L1 box and GIoU costs
            (Group DETR's defaults 2 / 5 / 2).
        num_groups: default number of query groups K (1 = plain DETR matching).
        class_cost: "focal" (Deformable/Conditional DETR, DINO, LW-DETR: log(p + 1e-8)),
            "focal_logsigmoid" (RF-DETR: logsigmoid) or "softmax" (DETR: -prob);
            `group_detr.match_cost.class_cost_torch`.
        focal_alpha, focal_gamma: focal cost parameters.
        backend: solver backend, see `group_detr.linear_sum_assignment`.
        cost_backend: how the cost is computed, see `group_detr.match_cost`: "auto" (the
            fused C++ op on the CPU, torch elsewhere), "torch" (the reference) or "fused". With
            the fused cost and the compiled CPU solver (backend "auto" or "cpu"), forward runs
            cost and assignment as one op per call (`group_detr::group_match`, the same pairs
            as `assign(cost_matrix(...))`, without the padded cost tensor).
        return_device: keep the indices on the outputs' device instead of DETR's CPU tensors.
        cost_mask, cost_dice: weights of Mask2Former's point-sampled sigmoid cross-entropy and
            dice costs (`group_detr.mask_cost`), used when the outputs hold "pred_masks"
            `(B, K*N, H, W)` and the targets "masks" `(M_i, H', W')`; 0 = masks ignored (with a
            one-time warning if masks are given).
        cost_mask_ce, cost_mask_dice: RF-DETR's names for cost_mask and cost_dice (give one
            name of each pair, not both).
        use_pos_only, use_position_modulated_cost: LW-DETR's and RF-DETR's keywords, which their
            matchers accept and ignore; only False is accepted (True raises ValueError).
        num_points: P, the points sampled per image (Mask2Former's 112 * 112).
        mask_point_sample_ratio: RF-DETR's option: P = H*W // ratio of the predicted masks
            (overrides num_points). Targets are sampled bilinearly, as Mask2Former does
            (RF-DETR samples them at the nearest pixel).
        validate: True: check the targets' values (`check_targets`) and raise ValueError for
            NaN/-inf costs (naming the image and group's problem); a host synchronisation on
            CUDA. False: no value checks and, on CUDA, no host synchronisation; non-finite
            costs (e.g. NaN predictions) are replaced by the solver's rule
            (`group_detr.assignment.sanitize_cost`), so every group is still matched one-to-one
            with every index in range. The one knob: SetCriterion checks nothing itself.

    Bad inputs raise ValueError/TypeError (KeyError for a missing dict key): see the module
    docstring for how that differs from the public matchers, and how to switch from them.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        num_groups: int = 1,
        class_cost: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        backend: str = "auto",
        cost_backend: str = "auto",
        return_device: bool = False,
        validate: bool = True,
        cost_mask: float = 0.0,
        cost_dice: float = 0.0,
        num_points: int = 112 * 112,
        mask_point_sample_ratio: Optional[int] = None,
        *,
        cost_mask_ce: Optional[float] = None,
        cost_mask_dice: Optional[float] = None,
        use_pos_only: bool = False,
        use_position_modulated_cost: bool = False,
    ):
        super().__init__()
        cost_mask = _alias("cost_mask", cost_mask, 0.0, "cost_mask_ce", cost_mask_ce)
        cost_dice = _alias("cost_dice", cost_dice, 0.0, "cost_mask_dice", cost_mask_dice)
        for name, value in (("use_pos_only", use_pos_only),
                            ("use_position_modulated_cost", use_position_modulated_cost)):
            if value is not False:
                raise ValueError(
                    f"{name}={value!r}: LW-DETR's and RF-DETR's matchers take this keyword but never "
                    "read it (reserved there, not implemented), so they match with class + L1 + GIoU "
                    f"as GroupMatcher does; drop the keyword or pass {name}=False")
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching cost weights are 0")
        for name, count in (("num_points", num_points), ("mask_point_sample_ratio", mask_point_sample_ratio)):
            if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
                raise ValueError(f"{name} must be a positive int, got {count!r}")
        _check_num_groups(num_groups)
        if cost_backend not in COST_BACKENDS:
            raise ValueError(f"cost_backend must be one of {COST_BACKENDS}, got {cost_backend!r}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.num_groups = num_groups
        self.class_cost = class_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.backend = backend
        self.cost_backend = cost_backend
        self.return_device = return_device
        self.validate = validate
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.mask_point_sample_ratio = mask_point_sample_ratio
        self._warned_unused_masks = False

    @torch.no_grad()
    def cost_matrix(self, outputs: Mapping[str, Any],
                    targets: Sequence[Mapping[str, Tensor]]) -> Tuple[Tensor, List[int]]:
        """Padded matching cost `(B, Q, M_max)` for Q = K*N queries, and the target counts M_i.

        Class + L1 + GIoU (`group_detr.match_cost`), plus the mask costs when the outputs hold
        "pred_masks" and a mask weight is set (`group_detr.mask_cost`).
        """
        logits, pred_boxes = _predictions(outputs, targets)
        labels, tgt_boxes, sizes = pad_targets(
            targets, logits.shape[-1], logits.device, validate=self.validate
        )
        cost = match_cost(logits, pred_boxes, labels, tgt_boxes, self.cost_class, self.cost_bbox,
                          self.cost_giou, self.class_cost, self.focal_alpha, self.focal_gamma,
                          num_targets=sizes, backend=self.cost_backend)
        pred_masks = outputs.get("pred_masks")
        if pred_masks is not None:
            cost = self._add_mask_cost(cost, pred_masks, targets, sizes)
        return cost, sizes

    def _add_mask_cost(self, cost: Tensor, pred_masks: Tensor, targets, sizes) -> Tensor:
        if not (self.cost_mask or self.cost_dice):
            if not self._warned_unused_masks:
                self._warned_unused_masks = True
                warnings.warn("GroupMatcher: the outputs hold pred_masks but cost_mask and cost_dice "
                              "are 0, so the matching ignores the masks (set them, e.g. Mask2Former's "
                              "cost_mask=5, cost_dice=5)", UserWarning, stacklevel=2)
            return cost
        if not isinstance(pred_masks, Tensor):
            raise ValueError(
                f"pred_masks must be a dense tensor (B, K*N, H, W) of mask logits, got "
                f"{type(pred_masks).__name__}"
                + (" (RF-DETR's sparse form: GroupMatcher does not "
                   "match it; pass the dense masks, or set cost_mask and cost_dice to 0 to match boxes only)"
                   if isinstance(pred_masks, dict) else ""))
        target_masks = [_get(t, "masks", what="target masks") for t in targets]
        check_masks(pred_masks, target_masks, cost.shape[0], cost.shape[1], sizes)
        num_points = num_points_for(pred_masks, self.num_points, self.mask_point_sample_ratio)
        return cost + mask_cost_matrix(pred_masks, target_masks, cost.shape[2], self.cost_mask,
                                       self.cost_dice, num_points)

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]],
                num_groups: Optional[int] = None,
                group_detr: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
        """Match K groups of queries to the targets.

        Args:
            outputs: dict with "pred_logits" (or "logits") `(B, K*N, num_classes)` and
                "pred_boxes" `(B, K*N, 4)` normalised cxcywh.
            targets: list of B dicts with "labels" (or "class_labels") `(M_i,)` int64 and
                "boxes" `(M_i, 4)` normalised cxcywh.
            num_groups: K for this call (`group_detr=` is accepted as an alias, as in
                Conditional DETR's and LW-DETR's matchers); default `self.num_groups`.

        Returns:
            list of B tuples `(query_idx, target_idx)`, int64, query_idx ascending, the queries
            of group g offset by g*N; each of the K groups matches min(N, M_i) pairs.
        """
        num_groups = num_groups if num_groups is not None else group_detr
        logits, pred_boxes = _predictions(outputs, targets)
        if self._matches_in_one_pass(outputs, logits, pred_boxes):
            return self._match_in_one_pass(logits, pred_boxes, targets, num_groups)
        cost, sizes = self.cost_matrix(outputs, targets)
        return self.assign(cost, sizes, num_groups)

    def _matches_in_one_pass(self, outputs, logits: Tensor, pred_boxes: Tensor) -> bool:
        """CPU inputs, the fused cost and the compiled CPU solver, no mask costs: then cost and
        assignment run as one op (`group_detr::group_match`), whose pairs are those of
        `assign(cost_matrix(...))` with cost_backend="fused", bit for bit; it never builds the
        padded `(B, K*N, M_max)` cost (mostly zero padding when M_i vary) and wakes the
        intra-op threads once. Measured on the 2-core CPU: benchmarks/bench_matcher.py."""
        return ("pred_masks" not in outputs and self.backend in ("auto", "cpu")
                and _ext.has_group_match_cpu()
                and resolve_cost_backend(self.cost_backend, logits, pred_boxes) == "fused")

    def _match_in_one_pass(self, logits: Tensor, pred_boxes: Tensor, targets, num_groups):
        num_groups = self.num_groups if num_groups is None else num_groups
        _queries_per_group(logits.shape[1], num_groups)  # ValueError for a K that does not divide Q
        labels, boxes, sizes = target_fields(targets)
        if not sizes:
            return []
        # The op takes each image's targets as they are (it converts float boxes to float32 as
        # it packs them); only labels of another integer type, integer boxes or targets off the
        # CPU are copied first, as the two-step path (pad_targets) converts them.
        device = logits.device
        if any(l.dtype != torch.int64 or l.device != device for l in labels):
            labels = [l.to(device, torch.int64) for l in labels]
        if any(b.device != device or not b.is_floating_point() for b in boxes):
            boxes = [b.to(device, torch.float32) for b in boxes]
        query, target, status = torch.ops.group_detr.group_match(
            logits, pred_boxes, labels, boxes, num_groups, float(self.cost_class),
            float(self.cost_bbox), float(self.cost_giou), self.class_cost, float(self.focal_alpha),
            float(self.focal_gamma), self.validate)
        raise_for_status(status)
        return list(zip(query, target))

    @torch.no_grad()
    def assign(self, cost: Tensor, num_targets: Union[Tensor, Sequence[int]],
               num_groups: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
        """Match from a precomputed cost (masks, keypoints, other tasks).

        Args:
            cost: `(B, K*N, M_max)` cost of every query against every (padded) target.
            num_targets: `(B,)` number of valid targets per image (list of int or tensor).
            num_groups: K (default `self.num_groups`).

        Returns: as `forward`.
        """
        num_groups = self.num_groups if num_groups is None else num_groups
        _check_num_groups(num_groups)
        if not isinstance(cost, Tensor) or cost.dim() != 3:
            raise ValueError("cost must be a tensor of shape (B, K*N, M_max)")
        num_images, total_queries, max_targets = cost.shape
        queries_per_group = _queries_per_group(total_queries, num_groups)
        sizes = [int(m) for m in (num_targets.tolist() if isinstance(num_targets, Tensor) else num_targets)]
        if len(sizes) != num_images:
            raise ValueError(f"num_targets has {len(sizes)} entries for {num_images} images")
        if any(not 0 <= m <= max_targets for m in sizes):  # host ints: free, on every device
            raise ValueError(f"num_targets {sizes} must lie in [0, M_max = {max_targets}]")
        counts = torch.tensor(sizes, dtype=torch.int64).repeat_interleave(num_groups)
        # On CUDA: no synchronisation in the solve; the status (validate=True) travels to the
        # host with the indices in one copy, or alone with return_device. validate=False
        # replaces non-finite costs so that every group is completely matched (the solver's
        # rule): no failed problem, so no query index past the end. On the CPU the status is
        # free to read and is always checked.
        matched, status = linear_sum_assignment(
            cost.reshape(num_images * num_groups, queries_per_group, max_targets),
            _host_to_device(counts, cost.device),
            backend=self.backend,
            validate=self.validate,
            return_status=True,
        )
        check = status is not None and (self.validate or status.device.type == "cpu")
        return _to_detr_indices(matched, num_images, num_groups, queries_per_group, sizes,
                                to_cpu=not self.return_device, status=status if check else None)


def _alias(name: str, value, default, alias: str, alias_value):
    """`value`, or the client's keyword `alias` for it (RF-DETR's names); both given: ValueError."""
    if alias_value is None:
        return value
    if value != default:
        raise ValueError(f"give {name} or its alias {alias}, not both (got {value!r} and {alias_value!r})")
    return alias_value


def _check_num_groups(num_groups):
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")


def _queries_per_group(total_queries: int, num_groups) -> int:
    """N for K*N queries; ValueError for a bad K or a K that does not divide them."""
    _check_num_groups(num_groups)
    if total_queries % num_groups:
        raise ValueError(
            f"the number of queries K*N = {total_queries} is not divisible by num_groups "
            f"{num_groups}: Group DETR needs K groups of equal size N"
        )
    return total_queries // num_groups


def _predictions(outputs, targets):
    """The logits `(B, Q, C)` and boxes `(B, Q, 4)` of DETR's outputs dict, shapes checked."""
    logits = _get(outputs, "pred_logits", "logits", what="class logits")
    pred_boxes = _get(outputs, "pred_boxes", what="predicted boxes")
    if logits.dim() != 3 or pred_boxes.dim() != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            "expected pred_logits (B, Q, num_classes) and pred_boxes (B, Q, 4), got "
            f"{tuple(logits.shape)} and {tuple(pred_boxes.shape)}"
        )
    if logits.shape[:2] != pred_boxes.shape[:2]:
        raise ValueError(
            f"pred_logits {tuple(logits.shape)} and pred_boxes {tuple(pred_boxes.shape)} "
            "disagree on batch size or number of queries"
        )
    if len(targets) != logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} images")
    return logits, pred_boxes


def _to_detr_indices(matched, num_images, num_groups, queries_per_group, sizes, to_cpu,
                     status=None):
    """Solver output `(B*K, M_max)` -> DETR's per-image `(query_idx, target_idx)`, query-sorted.

    One sort for the whole batch: unmatched/padding entries get a key past every query, so
    after sorting each image's valid pairs come first; their number, K * min(N, M_i), is known
    on the host without looking at the result (no synchronisation needed for it).
    """
    max_targets = matched.shape[-1]
    matched = matched.view(num_images, num_groups, max_targets)
    offsets = torch.arange(num_groups, device=matched.device).view(1, -1, 1) * queries_per_group
    sentinel = num_groups * queries_per_group
    query = torch.where(matched >= 0, matched + offsets, sentinel).flatten(1)
    target = torch.arange(max_targets, device=matched.device).expand(num_images, num_groups, -1)
    query, order = torch.sort(query, dim=1)
    target = torch.gather(target.flatten(1), 1, order)
    if to_cpu and matched.device.type != "cpu":  # one copy: the call's one synchronisation
        parts = [query.flatten(), target.flatten()]
        if status is not None:
            parts.append(status.to(torch.int64))
        host = torch.cat(parts).cpu()
        query = host[: query.numel()].view(query.shape)
        target = host[query.numel(): 2 * query.numel()].view(target.shape)
        if status is not None:
            status = host[2 * query.numel():]
    if status is not None:
        raise_for_status(status)
    return [
        (query[b, : num_groups * min(queries_per_group, m)],
         target[b, : num_groups * min(queries_per_group, m)])
        for b, m in enumerate(sizes)
    ]
