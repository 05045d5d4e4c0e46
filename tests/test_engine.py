"""Training, evaluation, checkpoints, presets and the command line (group_detr.engine, .checkpoint,
.evaluation, .config, group_detr.__main__)."""
import dataclasses
import json
import os

import pytest
import torch

import group_detr.checkpoint as checkpoint_module
import group_detr.engine as engine
from conftest import requires_pycocotools
from group_detr.__main__ import build_parser, main
from group_detr.data import write_synthetic_dataset
from group_detr.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from group_detr.config import TrainConfig, config_to_dict, demo_config
from group_detr.engine import build_model, build_optimizer, evaluate_checkpoint, train
from group_detr.evaluation import COCO_STAT_NAMES


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(data_dir, output_dir, **overrides):
    """A model and data small enough that two epochs take a second or two."""
    config = TrainConfig(
        data_dir=data_dir, train_split="train", val_split="val", train_scales=(48, 64), max_size=96,
        crop_resize=(48, 56), crop_size=(32, 48), eval_size=64, backbone="small", small_widths=(8, 16, 16, 32),
        hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=5,
        num_groups=3, lr=1e-3, lr_backbone=1e-3, epochs=2, batch_size=4, output_dir=output_dir, num_workers=0,
        print_freq=1, num_vis_images=2)
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(out, num_train=8, num_val=4, image_size=64, seed=1)
    return out


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    """One finished tiny run, shared by the tests that only read its outputs."""
    config = tiny_config(synth_dir, str(tmp_path_factory.mktemp("run")))
    lines = []
    result = train(config, log=lines.append)
    return config, result, lines


@requires_pycocotools
def test_train_then_evaluate_end_to_end(trained, capsys):
    config, result, lines = trained
    assert set(result["stats"]) == set(COCO_STAT_NAMES)
    assert 0.0 <= result["stats"]["AP"] <= 1.0
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result["table"]
    assert any("predictions on 2 validation images" in line for line in lines)
    assert os.path.getsize(result["png"]) > 0
    with open(result["log"]) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["train_loss"] > 0 for r in records) and "val_AP" in records[-1]
    # evaluating the saved checkpoint reproduces the final numbers
    evaluated = evaluate_checkpoint(result["checkpoint"], num_workers=0, log=lambda _: None)
    assert evaluated["stats"]["AP"] == pytest.approx(result["stats"]["AP"], abs=1e-6)


@requires_pycocotools
def test_progress_lines_show_a_bar(trained, synth_dir, tmp_path, capsys):
    train(tiny_config(synth_dir, str(tmp_path), epochs=1), log=lambda _: None)
    out = capsys.readouterr().out
    assert "epoch 1/1 |##########..........| 1/2  loss" in out and "it/s" in out


@requires_pycocotools
def test_checkpoint_loads_with_weights_only(trained):
    _, result, _ = trained
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["epoch"] == 2
    assert checkpoint["num_classes"] == 5 and checkpoint["config"]["num_groups"] == 3


def _copy_of_run(result, run_dir):
    """A fresh output directory holding the finished tiny run's checkpoint, to resume from."""
    run_dir.mkdir()
    save_checkpoint(load_checkpoint(result["checkpoint"]), str(run_dir / "checkpoint.pth"))
    return run_dir


@requires_pycocotools
def test_resume_continues_after_the_saved_epoch(trained, tmp_path):
    config, result, _ = trained
    run_dir = _copy_of_run(result, tmp_path / "resumed")
    lines = []
    train(dataclasses.replace(config, output_dir=str(run_dir), epochs=3, resume=True), log=lines.append)
    assert "resumed from" in lines[0] and "after epoch 2" in lines[0]
    assert load_checkpoint(str(run_dir / "checkpoint.pth"))["epoch"] == 3
    with open(run_dir / "log.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [3]


@requires_pycocotools
def test_checkpoint_from_another_configuration(trained, tmp_path):
    config, result, _ = trained
    run_dir = _copy_of_run(result, tmp_path / "other")
    other = dataclasses.replace(config, output_dir=str(run_dir), num_groups=5, hidden_dim=64, resume=True)
    with pytest.raises(ValueError, match=r"another model configuration: hidden_dim: checkpoint 32, this run 64; "
                                         r"num_groups: checkpoint 3, this run 5"):
        train(other, log=lambda _: None)


def test_checkpoint_from_an_older_version_compares_missing_fields_as_defaults():
    """A checkpoint saved before `denoising_queries` existed matches a default run (no false
    mismatch 'None != 0') and still fails against a run that turns denoising on."""
    config = TrainConfig()
    saved = config_to_dict(config)
    del saved["denoising_queries"]
    older = {"config": saved, "num_classes": 5}
    checkpoint_module.check_checkpoint_matches(older, config, 5)
    with pytest.raises(ValueError, match=r"another model configuration: denoising_queries: checkpoint 0, this run 12"):
        checkpoint_module.check_checkpoint_matches(older, dataclasses.replace(config, denoising_queries=12), 5)


@requires_pycocotools
def test_resume_refuses_other_training_settings(trained, tmp_path):
    """A demo re-run after its defaults changed (loss, lr, ...) must not continue the old run."""
    config, result, _ = trained
    run_dir = _copy_of_run(result, tmp_path / "settings")
    other = dataclasses.replace(config, output_dir=str(run_dir), focal_alpha=0.5, lr=3e-4, resume=True)
    with pytest.raises(ValueError, match=r"other training settings: focal_alpha: checkpoint 0.25, this run 0.5; "
                                         r"lr: checkpoint 0.001, this run 0.0003\. Resuming continues the same "
                                         r"run only: start afresh with --no-resume"):
        train(other, log=lambda _: None)


@requires_pycocotools
def test_resume_with_more_epochs_says_where_the_lr_drop_moves(trained, tmp_path):
    config, result, _ = trained
    run_dir = _copy_of_run(result, tmp_path / "longer")
    lines = []
    train(dataclasses.replace(config, output_dir=str(run_dir), epochs=4, resume=True, eval_every=4), log=lines.append)
    assert any(line.startswith("note: that run was set for 2 epochs, this one for 4: the lr drop is now at step")
               for line in lines), lines


@requires_pycocotools
def test_checkpoint_for_another_number_of_classes(trained, tmp_path):
    _, result, _ = trained
    write_synthetic_dataset(str(tmp_path), num_train=1, num_val=1, image_size=48)
    annotation = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(annotation.read_text())
    data["categories"] = data["categories"][:3]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= 3]
    annotation.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_classes: checkpoint 5, this run 3"):
        evaluate_checkpoint(result["checkpoint"], data_dir=str(tmp_path), log=lambda _: None)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "none.pth"))
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*truncated.pth \(corrupt"):
        load_checkpoint(str(tmp_path / "truncated.pth"))
    torch.save({"model": {}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="is not a group-detr checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pth"))


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"format": CHECKPOINT_FORMAT, "epoch": 1}, path)

    def crashing_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill in the middle of the write

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format": CHECKPOINT_FORMAT, "epoch": 2}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind
    assert load_checkpoint(path)["epoch"] == 1


@requires_pycocotools
def test_a_crash_mid_training_leaves_the_last_good_checkpoint(synth_dir, tmp_path, monkeypatch):
    config = tiny_config(synth_dir, str(tmp_path), epochs=3)
    original = engine.train_one_epoch

    def crash_in_second_epoch(*args, **kwargs):
        if args[6] == 1:  # epoch index
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, log=lambda _: None)
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "log.jsonl"]


def test_optimizer_and_schedule_follow_the_paper():
    config = TrainConfig(backbone="small", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                         dim_feedforward=32, num_queries=2, num_groups=2)
    model = build_model(config, 3)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    rest, backbone = optimizer.param_groups
    assert (rest["lr"], backbone["lr"]) == (1e-4, 1e-5)
    assert rest["weight_decay"] == backbone["weight_decay"] == 1e-4
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in backbone_ids for p in backbone["params"])
    assert not any(id(p) in backbone_ids for p in rest["params"])
    assert config.lr_drop_fraction == 11 / 12 and config.clip_max_norm == 0.1
    assert config.warmup_steps == 0
    # The fused update (one kernel) on the CPU; the same numbers as the for-loop one.
    assert rest["fused"] and backbone["fused"]
    reference = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in model.parameters()],
                                  lr=1e-3, weight_decay=1e-4)
    fused = torch.optim.AdamW(list(model.parameters()), lr=1e-3, weight_decay=1e-4, fused=True)
    for _ in range(3):
        for opt in (reference, fused):
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p) * 0.1
            opt.step()
    for p, q in zip(reference.param_groups[0]["params"], fused.param_groups[0]["params"]):
        torch.testing.assert_close(p, q)


def test_schedule_warms_up_then_drops():
    config = TrainConfig(backbone="small", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                         dim_feedforward=32, num_queries=2, num_groups=2, lr=1e-3, epochs=2,
                         lr_drop_fraction=0.75, warmup_steps=4)
    optimizer = build_optimizer(build_model(config, 3), config)
    scheduler = engine.build_lr_scheduler(optimizer, config, steps_per_epoch=8)  # drop after step 12
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert lrs[11] == pytest.approx(1e-3) and lrs[12:] == pytest.approx([1e-4] * 4)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1).validate()


@requires_pycocotools
def test_lr_drops_at_eleven_twelfths(synth_dir, tmp_path, monkeypatch):
    # 8 images / batch 4 = 2 steps per epoch, 12 epochs: the drop comes after step 22
    config = tiny_config(synth_dir, str(tmp_path), epochs=12, eval_every=100, max_val_images=1)
    lrs = []
    original = engine.train_one_epoch

    def record(model, criterion, loader, optimizer, *args):
        result = original(model, criterion, loader, optimizer, *args)
        lrs.append(optimizer.param_groups[0]["lr"])
        return result

    monkeypatch.setattr(engine, "train_one_epoch", record)
    train(config, log=lambda _: None)
    assert lrs[:10] == [1e-3] * 10 and lrs[10] == pytest.approx(1e-4) and lrs[11] == pytest.approx(1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="config.num_groups must be a positive int, got 0"):
        TrainConfig(num_groups=0).validate()
    with pytest.raises(ValueError, match="config.backbone must be 'small' or 'resnet50'"):
        TrainConfig(backbone="vgg").validate()
    demo_config().validate()


def test_missing_dataset_gives_a_clear_error(tmp_path):
    config = tiny_config(str(tmp_path / "nowhere"), str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*instances_train.json"):
        train(config, log=lambda _: None)


@requires_pycocotools
def test_cli_demo_trains_and_prints_the_ap_table(tmp_path, capsys):
    data_dir, out_dir = tmp_path / "data", tmp_path / "demo"
    argv = ["demo", "--data-dir", str(data_dir), "--output-dir", str(out_dir), "--num-train-images", "4",
            "--num-val-images", "2", "--epochs", "1", "--batch-size", "2", "--num-workers", "0",
            "--small-widths", "8", "16", "16", "32", "--hidden-dim", "32", "--nheads", "4", "--enc-layers", "1",
            "--dec-layers", "1", "--dim-feedforward", "32", "--num-queries", "4", "--num-groups", "2",
            "--train-scales", "48", "--max-size", "64", "--crop-resize", "48", "--crop-size", "32", "48",
            "--eval-size", "48"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "writing the synthetic dataset" in out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    assert f"predictions drawn in {out_dir}/predictions.png" in out
    # a second run finds the data and the finished checkpoint: it only evaluates again
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "writing the synthetic dataset" not in out and "resumed from" in out


def test_cli_parses_every_config_field():
    args = build_parser().parse_args(["train", "--num-groups", "5", "--train-scales", "100", "200",
                                      "--max-train-images", "7", "--no-resume"])
    assert args.num_groups == 5 and args.train_scales == [100, 200] and args.max_train_images == 7
    assert args.resume is False and args.backbone == "resnet50"
    demo = build_parser().parse_args(["demo"])
    assert demo.backbone == "small" and demo.resume is True


# ----------------------------------------------------------------------------------------------
# presets and callbacks


def test_synthetic_presets_are_one_registry():
    from group_detr.config import DEMO_SYNTHETIC_PRESET, SYNTHETIC_PRESETS, synthetic_preset

    assert demo_config().synthetic == DEMO_SYNTHETIC_PRESET in SYNTHETIC_PRESETS
    assert demo_config().data_dir == f"data/synthetic-{DEMO_SYNTHETIC_PRESET}"
    hard = synthetic_preset("hard", num_train=3)
    assert (hard.num_train, hard.image_size) == (3, SYNTHETIC_PRESETS["hard"].image_size)
    with pytest.raises(ValueError, match=r"unknown synthetic preset 'nope'; known: \[.*'hard'"):
        synthetic_preset("nope")
    with pytest.raises(ValueError, match="config.synthetic must be None or one of"):
        TrainConfig(synthetic="nope").validate()
    # the CLI's synth command defaults to the same preset
    args = build_parser().parse_args(["synth", "--out", "x"])
    assert args.preset == DEMO_SYNTHETIC_PRESET and args.image_size is None


def test_ensure_synthetic_dataset_refuses_other_settings(tmp_path, capsys):
    from group_detr.data import ensure_synthetic_dataset

    ensure_synthetic_dataset(str(tmp_path), "hard", num_train=2, num_val=1, image_size=48)
    assert "writing the synthetic dataset" in capsys.readouterr().out
    ensure_synthetic_dataset(str(tmp_path), "hard", num_train=2, num_val=1, image_size=48)  # found: no-op
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="holds a synthetic dataset with other settings"):
        ensure_synthetic_dataset(str(tmp_path), "hard", num_train=2, num_val=1, image_size=64)
    # a dataset written before a generator knob existed lacks its key: read as the knob's default
    path = tmp_path / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    for knob in ("mean_objects", "max_object_fraction"):
        del data["info"]["group_detr_synthetic"][knob]
    path.write_text(json.dumps(data))
    ensure_synthetic_dataset(str(tmp_path), "hard", num_train=2, num_val=1, image_size=48)
    assert capsys.readouterr().out == ""


@requires_pycocotools
def test_callbacks_see_the_run(synth_dir, tmp_path):
    events = []

    class Recorder(engine.Callback):
        def on_train_start(self, run):
            events.append(("start", run.start_epoch, run.steps_per_epoch, run.model.training))

        def on_epoch_end(self, run, record):
            events.append(("epoch", record["epoch"], "val_AP" in record, run.lr_scheduler.last_epoch))
            record["extra"] = record["epoch"] * 10  # reaches log.jsonl

        def on_train_end(self, run, result):
            events.append(("end", result["checkpoint"] == os.path.join(run.config.output_dir, "checkpoint.pth")))

    result = train(tiny_config(synth_dir, str(tmp_path), eval_every=2), log=lambda _: None, callbacks=[Recorder()])
    assert events == [("start", 0, 2, True), ("epoch", 1, False, 2), ("epoch", 2, True, 4), ("end", True)]
    with open(result["log"]) as f:
        assert [json.loads(line)["extra"] for line in f] == [10, 20]


def test_cli_demo_settings_follow_the_synthetic_preset():
    from group_detr.__main__ import _follow_the_preset
    from group_detr.config import config_from_dict
    from group_detr.config import SYNTHETIC_PRESETS

    for name in SYNTHETIC_PRESETS:
        args = build_parser().parse_args(["demo", "--synthetic", name, "--epochs", "3"])
        config = _follow_the_preset(config_from_dict(vars(args)))
        assert config == demo_config(synthetic=name, epochs=3, resume=True)
    given = _follow_the_preset(config_from_dict(vars(build_parser().parse_args(
        ["demo", "--synthetic", "hard", "--data-dir", "mine"]))))
    assert given.data_dir == "mine" and given.synthetic == "hard"


def test_cli_demo_without_a_synthetic_preset_is_a_clear_error(monkeypatch):
    """The demo's parser always sets a preset; the check behind it (which also narrows the type)
    still says what is wrong should a config arrive without one."""
    import group_detr.__main__ as cli

    monkeypatch.setattr(cli, "_follow_the_preset", lambda c: dataclasses.replace(c, synthetic=None))
    with pytest.raises(ValueError, match="the demo trains on a synthetic preset, but config.synthetic is None"):
        main(["demo", "--epochs", "1"])
