"""How often the fused CPU cost's bits, and the pairs solved from them, differ from the torch cost's.

The fused op (csrc/cost) runs torch's own algorithms for the sigmoid, exp and log1p (Sleef's),
so its "focal_logsigmoid" cost is the torch cost bit for bit; its "focal" cost takes the log by
Sleef's algorithm where torch's Tensor.log is MKL's (x86-64 wheels), and its softmax sums in
another order, so those two differ in the last bits of some entries. Pairs can then differ only
where two assignments of a problem cost the same up to those bits: exact ties, such as
identical query rows. Per class cost this reports

    entries     the fraction of (query, target) cost entries whose bits differ, and the largest
                difference, on the matcher workloads (workloads.json, --seeds inputs each)
    problems    the (image, group) problems whose pairs differ between
                GroupMatcher(cost_backend="auto") (the one-pass fused op) and cost_backend="torch"
    tied        on --tied-cases problems whose query rows are all identical (every assignment
                costs the same: the cost's last bits alone decide), the problems whose pairs
                differ from the client's own matcher (DETR's, LW-DETR's, RF-DETR's cost
                computed as they compute it, scipy), for the fused and for the torch cost

    python benchmarks/bench_cost_bits.py [--seeds 3] [--tied-cases 600]

Writes benchmarks/results/cost_bits-<machine>.json. It measures agreement, not speed.
"""
import argparse

import torch

import common
from group_detr import GroupMatcher
from workloads import matcher_inputs, select_workloads

CLASS_COSTS = ("focal", "focal_logsigmoid", "softmax")


def differing_problems(ours, reference, num_groups, per_group):
    """(image, group) problems whose pairs differ between two matcher results."""
    count = 0
    for (q, t), (rq, rt) in zip(ours, reference):
        for g in range(num_groups):
            sel, rsel = (q // per_group) == g, (rq // per_group) == g
            count += not (torch.equal(q[sel], rq[rsel]) and torch.equal(t[sel], rt[rsel]))
    return count


def workload_agreement(spec, class_cost, seeds):
    """Entry and problem agreement of the fused and torch costs on one workload."""
    num_groups, per_group = spec["groups"], spec["queries_per_group"]
    entries = differing = problems = differing_problems_total = 0
    max_diff = 0.0
    for seed in range(seeds):
        outputs, targets = matcher_inputs(dict(spec, seed=spec["seed"] + 1000 * seed))
        fused = GroupMatcher(num_groups=num_groups, class_cost=class_cost, cost_backend="fused")
        torch_cost = GroupMatcher(num_groups=num_groups, class_cost=class_cost,
                                  cost_backend="torch")
        cost_f, sizes = fused.cost_matrix(outputs, targets)
        cost_t, _ = torch_cost.cost_matrix(outputs, targets)
        for b, m in enumerate(sizes):
            a, r = cost_f[b, :, :m], cost_t[b, :, :m]
            entries += a.numel()
            differing += int((a != r).sum())
            if a.numel():
                max_diff = max(max_diff, float((a - r).abs().max()))
        auto = GroupMatcher(num_groups=num_groups, class_cost=class_cost)(outputs, targets)
        differing_problems_total += differing_problems(auto, torch_cost(outputs, targets),
                                                       num_groups, per_group)
        problems += len(targets) * num_groups
    return {"entries": entries, "entries_differing": differing,
            "entries_differing_fraction": differing / max(entries, 1), "max_abs_diff": max_diff,
            "problems": problems, "problems_differing": differing_problems_total}


def client_indices(logits, boxes, targets, class_cost, weights=(2.0, 5.0, 2.0), alpha=0.25):
    """The clients' own matcher for one group (DETR: softmax; LW-DETR and transformers: the
    classic focal cost; RF-DETR: logsigmoid): the class cost on the whole `(B*Q, C)` logits,
    its target columns picked, scipy on each image."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    from group_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

    flat_logits, flat_boxes = logits.flatten(0, 1), boxes.flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    if class_cost == "softmax":
        cost_class = -flat_logits.softmax(-1)[:, tgt_ids]
    else:
        prob = flat_logits.sigmoid()
        if class_cost == "focal_logsigmoid":
            log_prob = torch.nn.functional.logsigmoid(flat_logits)
            log_not_prob = torch.nn.functional.logsigmoid(-flat_logits)
        else:
            log_prob, log_not_prob = (prob + 1e-8).log(), (1 - prob + 1e-8).log()
        neg = (1 - alpha) * (prob ** 2) * (-log_not_prob)
        pos = alpha * ((1 - prob) ** 2) * (-log_prob)
        cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    cost = (weights[1] * torch.cdist(flat_boxes, tgt_boxes, p=1) + weights[0] * cost_class
            - weights[2] * generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes),
                                               box_cxcywh_to_xyxy(tgt_boxes)))
    cost = cost.view(logits.shape[0], logits.shape[1], -1)
    out = []
    for b, c in enumerate(cost.split([len(t["labels"]) for t in targets], -1)):
        rows, cols = scipy_lsa(c[b].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def tied_agreement(class_cost, cases):
    """Problems with identical query rows (N in [2, 40], 91 classes): the pairs of
    GroupMatcher's fused ("auto") and torch costs, each against the client's own matcher."""
    gen = torch.Generator().manual_seed(0)
    differing = {"auto": 0, "torch": 0}
    for _ in range(cases):
        queries, classes = int(torch.randint(2, 41, (1,), generator=gen)), 91
        m = int(torch.randint(1, queries + 1, (1,), generator=gen))
        logits = (torch.randn(1, 1, classes, generator=gen) * 4).expand(1, queries, -1).contiguous()
        boxes = (torch.rand(1, 1, 4, generator=gen) * 0.3 + 0.2).expand(1, queries, -1).contiguous()
        targets = [{"labels": torch.randint(classes, (m,), generator=gen),
                    "boxes": torch.rand(m, 4, generator=gen) * 0.3 + 0.2}]
        outputs = {"pred_logits": logits, "pred_boxes": boxes}
        client = client_indices(logits, boxes, targets, class_cost)
        for backend in differing:
            ours = GroupMatcher(class_cost=class_cost, cost_backend=backend)(outputs, targets)
            differing[backend] += differing_problems(ours, client, 1, queries)
    return {"problems": cases, "problems_differing_from_client_fused": differing["auto"],
            "problems_differing_from_client_torch_cost": differing["torch"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, default=3, help="inputs per workload")
    parser.add_argument("--tied-cases", type=int, default=600)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = dict(benchmark="cost_bits", **common.environment(torch.device("cpu")),
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), class_costs={})
    print(f"{'class cost':18s} {'workload':12s} {'entries differing':>18s} {'max diff':>9s} "
          f"{'problems differing':>19s}")
    for class_cost in CLASS_COSTS:
        rows = {}
        for name, spec in select_workloads("matcher", args.workloads).items():
            rows[name] = row = workload_agreement(spec, class_cost, args.seeds)
            print(f"{class_cost:18s} {name:12s} {row['entries_differing_fraction']:17.4%} "
                  f"{row['max_abs_diff']:9.1e} {row['problems_differing']:>8d} of {row['problems']}")
        tied = tied_agreement(class_cost, args.tied_cases)
        print(f"{class_cost:18s} {'all tied':12s} differing from the client's pairs: fused "
              f"{tied['problems_differing_from_client_fused']} of {tied['problems']}, torch cost "
              f"{tied['problems_differing_from_client_torch_cost']}")
        report["class_costs"][class_cost] = {"workloads": rows, "tied": tied}
    common.write_results(report, args.out or common.results_path("cost_bits", report["machine"]))


if __name__ == "__main__":
    main()
