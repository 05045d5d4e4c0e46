"""Distributed data parallel on the CPU: 2 gloo processes train a few steps and stay in sync."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import requires_pycocotools
from group_detr.data import write_synthetic_dataset
from group_detr.config import TrainConfig
from group_detr.engine import train
from group_detr.matcher import GroupMatcher
from group_detr.models import SetCriterion

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, data_dir, output_dir, result_dir):
    """One torchrun-like process: the environment torchrun would set, then the ordinary train()."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # The group is started here, not by train(), so that it outlives train() for the check below.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    # Different seeds per rank: DDP must still start every rank from rank 0's weights.
    config = TrainConfig(
        data_dir=data_dir, train_split="train", val_split="val", train_scales=(48, 64), max_size=96,
        crop_resize=(48,), crop_size=(32, 48), eval_size=64, backbone="small", small_widths=(8, 16, 16, 32),
        hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=4,
        num_groups=2, lr=1e-3, lr_backbone=1e-3, epochs=2, batch_size=2, output_dir=output_dir,
        num_workers=0, print_freq=100, num_vis_images=1, seed=rank)
    result = train(config, log=lambda _: None)
    params = {n: p.detach().clone() for n, p in result["model"].named_parameters()}

    # num_boxes is averaged over ranks, so both ranks normalise by the same number
    criterion = SetCriterion(3, GroupMatcher(), {}, queries_per_group=4)
    targets = [{"labels": torch.zeros(1 + 2 * rank, dtype=torch.int64)}]  # 1 box on rank 0, 3 on rank 1
    normaliser = criterion.normaliser(targets, num_groups=2, device=torch.device("cpu"))
    dist.destroy_process_group()
    torch.save({"params": params, "normaliser": normaliser, "stats": result["stats"]},
               os.path.join(result_dir, f"rank{rank}.pth"))


@pytest.mark.slow
@requires_pycocotools
def test_two_cpu_processes_stay_in_sync(tmp_path):
    data_dir = str(tmp_path / "data")
    write_synthetic_dataset(data_dir, num_train=8, num_val=3, image_size=64, seed=2)
    mp.spawn(worker, args=(free_port(), data_dir, str(tmp_path / "run"), str(tmp_path)), nprocs=WORLD_SIZE,
             join=True)
    results = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(WORLD_SIZE)]
    for name, value in results[0]["params"].items():
        torch.testing.assert_close(results[1]["params"][name], value, rtol=0, atol=0, msg=name)
    initial = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert initial["epoch"] == 2
    torch.testing.assert_close(initial["model"]["class_embed.weight"], results[0]["params"]["class_embed.weight"])
    assert results[0]["normaliser"] == results[1]["normaliser"] == (1 + 3) / 2 * 2
    assert set(results[0]["stats"]) >= {"AP", "AP50"} and results[1]["stats"] == {}  # rank 0 scores
