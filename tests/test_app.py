"""The training application through its command line: fit, validate, test, resume, configs."""

from __future__ import annotations

import csv
import json
import logging
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from app_helpers import fit_in_subprocess as _fit
from app_helpers import predict_args as _predict_args
from app_helpers import run_dir as _run_dir
from app_helpers import trainer_config
from images import tiny_ultramnist_args
from patchgd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ultramnist" / "patchgd_tiny.yaml"
# One epoch of the tiny config: the warm-up must be shorter than the run.
ONE_EPOCH = [
    "fit",
    "--config",
    str(TINY),
    "--trainer.max_epochs",
    "1",
    "--model.warmup_epochs",
    "0.4",
]


def test_fit_then_validate_test_from_the_saved_config_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY)]) == 0
    run = _run_dir(tmp_path)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(c.startswith("best-epoch") for c in checkpoints)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert (run / "curves.png").stat().st_size > 0
    assert (run / "metrics.csv").exists() and (tmp_path / "runs" / "tensorboard").exists()
    fit = json.loads((run / "summary.json").read_text())["fit"]
    assert fit["epochs"] == 2 and len(fit["seconds_per_epoch"]) == 2
    assert fit["final_metrics"]["lr"] == pytest.approx(0.5e-3)  # decayed to half by the end
    assert 0.0 <= fit["best"]["score"] <= 1.0

    config, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", str(config), "--ckpt_path", str(last)]) == 0
    assert main(["test", "--config", str(config), "--ckpt_path", str(last)]) == 0
    assert "val/acc" in json.loads((_run_dir(tmp_path, 1) / "summary.json").read_text())["validate"]
    test = json.loads((_run_dir(tmp_path, 2) / "summary.json").read_text())["test"]
    assert set(test) == {"test/acc", "test/qwk", "test/loss"}


def _logged_losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [
            float(row["train/loss_step"]) for row in csv.DictReader(f) if row["train/loss_step"]
        ]


def test_bf16_mixed_precision_trains_bit_identically_on_the_cpu(tmp_path, monkeypatch):
    """Two bf16-mixed fits of the same config log the same losses, to the last bit, and no NaN."""
    losses = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert main([*ONE_EPOCH, "--trainer.precision", "bf16-mixed"]) == 0
        losses.append(_logged_losses(_run_dir(tmp_path / name)))
    assert len(losses[0]) == 5  # 20 training images, batches of 4
    assert all(math.isfinite(x) for x in losses[0])
    assert losses[0] == losses[1]


def test_batchnorm_recalibration_before_validation_leaves_training_unchanged(tmp_path, monkeypatch):
    """With and without recalibration: the same training losses and weights in the epoch
    before it, but the saved running statistics are recalibrated ones (those of the current
    weights). The next epoch's fills read them (``fill_norm="running"``)."""
    states, losses = {}, {}
    for batches in ("0", "2"):
        (tmp_path / batches).mkdir()
        monkeypatch.chdir(tmp_path / batches)
        assert main([*ONE_EPOCH, "--model.recalibrate_bn_batches", batches]) == 0
        run = _run_dir(tmp_path / batches)
        losses[batches] = _logged_losses(run)
        last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        states[batches] = last["state_dict"]
    assert losses["0"] == losses["2"]
    running = [k for k in states["0"] if k.endswith(("running_mean", "running_var"))]
    assert running
    for key, value in states["0"].items():
        if key not in running and isinstance(value, torch.Tensor):
            assert torch.equal(value, states["2"][key]), key
    assert any(not torch.equal(states["0"][k], states["2"][k]) for k in running)


def test_a_run_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert _fit(straight).returncode == 0

    kill = trainer_config(killed, "callbacks", "app_helpers.KillAt", epoch=1, batch=2)
    died = _fit(killed, "--config", str(kill))
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    last = _run_dir(killed) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # only epoch 0 was saved
    resumed = _fit(killed, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not _run_dir(killed, 1).exists()  # resumed in its own run folder

    a = torch.load(_run_dir(straight) / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(_run_dir(killed) / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["state_dict"][key]), key
    sampler = "classifier._extra_state"
    assert torch.equal(
        a["state_dict"][sampler]["sampler"]["generator"],
        b["state_dict"][sampler]["sampler"]["generator"],
    )
    for key, state in a["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer_states"][0]["state"][key][name]), name
    assert a["lr_schedulers"] == b["lr_schedulers"]
    summary_a = json.loads((_run_dir(straight) / "summary.json").read_text())["fit"]
    summary_b = json.loads((_run_dir(killed) / "summary.json").read_text())["fit"]
    for name in ("val/acc", "val/qwk", "val/loss", "train/loss"):
        assert summary_a["final_metrics"][name] == summary_b["final_metrics"][name], name
    # The same best checkpoint, and no other: the tracking carried over the kill.
    assert summary_a["best"]["score"] == summary_b["best"]["score"]
    best_a, best_b = Path(summary_a["best"]["checkpoint"]), Path(summary_b["best"]["checkpoint"])
    assert best_a.name == best_b.name and best_b.parent == _run_dir(killed) / "checkpoints"
    names = lambda run: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert names(_run_dir(straight)) == names(_run_dir(killed))
    # One metrics row per logged step, as if never killed (timings aside).
    assert _untimed_metrics(_run_dir(straight)) == _untimed_metrics(_run_dir(killed))


def _untimed_metrics(run: Path) -> list[dict[str, str]]:
    """The run's metrics.csv rows without the throughput columns, which vary run to run."""
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in r.items() if "per_s" not in k} for r in csv.DictReader(handle)]


def test_a_bad_inner_loop_fails_before_training_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "fit",
            "--config",
            str(TINY),
            "--model.classifier.init_args.loop",
            '{"inner_iterations": 2, "accumulation": 3}',
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "accumulation (ε=3) is larger than inner_iterations (ζ=2)" in err[0]
    assert not (tmp_path / "runs").exists()


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_every_config_parses_and_builds_its_model(config, tmp_path, monkeypatch):
    from patchgd.app.lightning_cli import PatchGDCLI, trainer_defaults
    from patchgd.app.task import PatchGDTask
    from patchgd.model import Classifier

    monkeypatch.chdir(tmp_path)
    header = config.read_text().splitlines()[:6]
    commands = [line[4:].split() for line in header if line.startswith("#   patchgd ")]
    assert commands, "no command in the header"
    # The configs the header's command names (a base and a method file, or this file alone).
    named = [
        w
        for c in commands
        if c[1] == "fit"
        for f, w in zip(c, c[1:], strict=False)
        if f == "--config"
    ]
    assert not named or str(config.relative_to(ROOT)) in named, "the header's command omits it"
    args = [a for f in named or [str(config.relative_to(ROOT))] for a in ("--config", ROOT / f)]
    args = [str(a) for a in args]
    if "num_classes: null" in config.read_text():  # from the data on fit, which is not here
        args += ["--model.classifier.init_args.num_classes", "4"]
        args += ["--model.classifier.init_args.image_size", "4096"]
    cli = PatchGDCLI(  # run=False: parses and builds; a memory budget would plan only on fit
        PatchGDTask,
        None,
        subclass_mode_data=True,
        run=False,
        trainer_defaults=trainer_defaults(),
        args=args,
        auto_configure_optimizers=False,
    )
    assert isinstance(cli.model.classifier, Classifier)
    assert cli.model.classifier.num_classes in (4, 6, 10)


PAPER = ROOT / "configs" / "paper"


@pytest.mark.parametrize("method", ["patchgd", "gd", "gd_extended", "gd_downscaled"])
def test_the_papers_cells_are_its_base_a_method_and_the_documented_overrides(method, tmp_path):
    """configs/paper: the base (ResNet50, 4 GB) with one method file; the header's overrides
    give the 16 GB budget and MobileNetV2 and change nothing else."""
    from patchgd.app.lightning_cli import PatchGDCLI, trainer_defaults
    from patchgd.app.task import PatchGDTask

    base = ["--config", str(PAPER / "ultramnist.yaml"), "--config", str(PAPER / f"{method}.yaml")]
    header = (PAPER / "ultramnist.yaml").read_text()
    overrides = ["--memory-budget", "16GB", "--model.classifier.init_args.backbone"]
    assert all(o in header for o in overrides) and "mobilenetv2_100" in header
    configs = {}
    for extra in ([], ["--memory-budget", "16GB"], overrides[2:] + ["mobilenetv2_100"]):
        cli = PatchGDCLI(
            PatchGDTask, None, subclass_mode_data=True, run=False,
            trainer_defaults=trainer_defaults(), args=base + extra, auto_configure_optimizers=False,
        )  # fmt: skip
        configs[len(configs)] = cli.config.as_dict()
    plain, big, mobile = configs.values()
    assert plain["memory_budget"] == "4GB" and plain["trainer"]["max_epochs"] == 100
    assert plain["model"]["classifier"]["init_args"]["backbone"] == "resnet50"
    assert plain["data"]["init_args"]["batch_size"] == 32
    assert big == {**plain, "memory_budget": "16GB"}
    mobile_args = mobile["model"]["classifier"].pop("init_args")
    plain_args = dict(plain["model"]["classifier"].pop("init_args"))
    assert mobile == plain and mobile_args == {**plain_args, "backbone": "mobilenetv2_100"}


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    from patchgd.app.datamodules import EpochShuffle

    a, b = EpochShuffle(50, seed=3), EpochShuffle(50, seed=3)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        orders.append(list(a))
    b.set_epoch(2)
    assert list(b) == orders[2]  # a fresh sampler at epoch 2 == the one that ran 0, 1, 2
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[0]) == list(range(50))


def test_schedule_warms_up_from_zero_then_decays_linearly_to_the_final_fraction():
    from patchgd.schedule import warmup_then_linear_decay as f

    assert [f(s, 4, 12, 0.5) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert f(8, 4, 12, 0.5) == pytest.approx(0.75) and f(12, 4, 12, 0.5) == 0.5
    assert f(20, 4, 12, 0.5) == 0.5 and f(0, 0, 10, 0.5) == 1.0


def test_predict_writes_probabilities_and_heatmaps_for_files_and_folders(tmp_path, monkeypatch):
    import csv

    monkeypatch.chdir(tmp_path)
    assert main(ONE_EPOCH) == 0
    assert main(tiny_ultramnist_args("imgs")) == 0
    (tmp_path / "broken.png").write_bytes(b"not an image")
    run = _run_dir(tmp_path)
    inputs = "[imgs/train/000003.png, imgs/val, broken.png]"
    options = ["--data.target_size", "64", "--data.keep_gray", "true"]
    assert main([*_predict_args(run, inputs), *options]) == 0
    out = _run_dir(tmp_path, 1)
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == ["imgs/train/000003.png"] + [
        f"imgs/val/{i:06d}.png" for i in range(10)
    ]  # the broken file is skipped
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in range(10)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert int(row["predicted"]) == max(range(10), key=probs.__getitem__)
    assert len(list((out / "heatmaps").glob("*.png"))) == 11
    arrays = sorted((out / "heatmaps").glob("*.npy"))
    assert len(arrays) == 11
    assert np.load(arrays[0]).shape == (2, 2)  # the evidence map on the model's 2×2 grid


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.lrr", "0.1"], "fit: unrecognized arguments: --model.lrr 0.1"),
        (
            ["--data.init_args.canvas_size", "96"],
            "the data gives 96×96 px images but model.classifier was built for image_size=64×64",
        ),
        (
            ["--model.classifier.init_args.num_classes", "6"],
            "the data has 10 classes but model.classifier num_classes=6",
        ),
        (
            ["--model.classifier.init_args.patch_size", "128"],
            "patch_size=128 is larger than the image (64×64 px)",
        ),
        (["--model.warmup_epochs", "2"], "warmup_epochs=2.0 (10 optimizer steps) is not shorter"),
        (["--trainer.gradient_clip_val", "1.0"], "gradient_clip_val"),
    ],
)
def test_wrong_configs_fail_before_training_in_one_line(
    args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("patchgd")]
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_checkpoint_from_a_different_model_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(ONE_EPOCH) == 0
    last = _run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert (
        main(
            [
                "fit",
                "--config",
                str(TINY),
                "--model.classifier.init_args.latent_dim",
                "32",
                "--ckpt_path",
                str(last),
            ]
        )
        == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("patchgd")]
    assert len(err) == 1
    assert "the checkpoint was saved from a different model" in err[0]
    assert "classifier.encoder.proj.bias is (16,) there, (32,) here" in err[0]


def _logged_lr(run: Path) -> list[float]:
    import csv

    with open(run / "metrics.csv", newline="") as handle:
        return [float(r["lr"]) for r in csv.DictReader(handle) if r.get("lr")]


def test_the_schedule_counts_optimizer_steps_not_batches(tmp_path, monkeypatch):
    """ζ = 2, ε = 1: two optimizer steps per batch, 5 batches per epoch, 2 epochs = 20 steps,
    warm-up of 1 epoch = 10 steps. The logged rate is the one the batch's last step used."""
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "fit",
                "--config",
                str(TINY),
                "--model.classifier.init_args.loop",
                '{"patches_per_iteration": 2, "accumulation": 1}',
            ]
        )
        == 0
    )
    expected = [1e-3 * f(2 * b + 2) for b in range(10)]  # factor of step 2b + 2 (1-based)
    assert _logged_lr(_run_dir(tmp_path)) == pytest.approx(expected, rel=1e-6)


def f(step: int, warmup: int = 10, total: int = 20) -> float:
    from patchgd.schedule import warmup_then_linear_decay

    return warmup_then_linear_decay(step, warmup, total, 0.5)


def test_max_steps_counts_optimizer_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "fit",
                "--config",
                str(TINY),
                "--trainer.max_steps",
                "6",
                "--model.warmup_epochs",
                "0.2",
                "--model.classifier.init_args.loop",
                '{"patches_per_iteration": 2, "accumulation": 1}',
            ]
        )
        == 0
    )
    # 6 optimizer steps = 3 batches; warm-up 0.2 epoch = 2 steps; decay to 0.5 at step 6
    assert _logged_lr(_run_dir(tmp_path)) == pytest.approx([1e-3, 0.75e-3, 0.5e-3], rel=1e-6)


@pytest.mark.parametrize(
    "head", ["{width: 8}", "{width: 8, stride1_layers: 0, stride2_layers: 1, pool: attention}"]
)
def test_lazy_slides_train_through_the_command_line(tmp_path, monkeypatch, head):
    """CSV + pyramidal TIFFs, read patch by patch (mode: lazy) with tissue masks; the paper's
    head, and an attention head that pools the tissue positions only."""
    import numpy as np

    from images import smooth_rgb, write_pyramid

    monkeypatch.chdir(tmp_path)
    rows = ["image_id,label,split"]
    for i, split in enumerate(["train"] * 4 + ["val", "test"]):
        h, w = 120 + 10 * i, 150 - 8 * i
        slide = np.full((h, w, 3), 235, np.uint8)
        slide[20:90, 30:100] = smooth_rgb(70, 70, seed=i)
        write_pyramid(tmp_path / f"s{i}.tif", slide, n_levels=2, tile=32, photometric="rgb")
        rows.append(f"s{i},{i % 2},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "lazy.yaml"
    config.write_text(f"""
trainer: {{max_epochs: 2, accelerator: cpu, deterministic: true}}
model:
  classifier:
    class_path: patchgd.PatchGDClassifier
    init_args:
      backbone: test_resnet
      num_classes: 2
      image_size: [192, 192]
      patch_size: 32
      latent_dim: 8
      head: {head}
      loop: {{patches_per_iteration: 4}}
  warmup_epochs: 0.5
data:
  class_path: patchgd.app.datamodules.ImageFolderDataModule
  init_args:
    csv: {tmp_path / "labels.csv"}
    mode: lazy
    level: 0
    canvas: [192, 192]
    tissue_masks: true
    tissue_cache: {tmp_path / "masks"}
    reader_workers: 1
    batch_size: 2
""")
    assert main(["fit", "--config", str(config)]) == 0
    run = _run_dir(tmp_path)
    fit = json.loads((run / "summary.json").read_text())["fit"]
    assert fit["epochs"] == 2 and 0.0 <= fit["final_metrics"]["val/acc"] <= 1.0
    # one cached mask per slide trained or validated on: the fill of both encodes tissue only
    assert len(list((tmp_path / "masks").glob("*.npz"))) == 5
    assert (
        main(
            [
                "test",
                "--config",
                str(run / "config.yaml"),
                "--ckpt_path",
                str(run / "checkpoints" / "last.ckpt"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "masks").glob("*.npz"))) == 6  # the test slide's too


def test_without_tissue_masks_lazy_candidates_leave_out_the_canvas_padding(tmp_path):
    from patchgd import PatchGrid
    from patchgd.app.datamodules import ImageFolderDataModule
    from patchgd.data.lazy import LazyImage

    data = ImageFolderDataModule(str(tmp_path / "labels.csv"), mode="lazy", level=0)
    grid = PatchGrid((128, 128), 32)
    whole = [LazyImage("a", 0, (128, 128), (128, 128))] * 2
    assert data.candidates(whole, grid) is None  # nothing to leave out: the plain fill
    small = [LazyImage("a", 0, (128, 128), (128, 128)), LazyImage("b", 0, (64, 40), (128, 128))]
    candidates = data.candidates(small, grid)
    assert candidates[0].all()
    assert candidates[1].view(4, 4).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_a_lazy_canvas_that_differs_from_the_model_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from images import smooth_rgb, write_pyramid

    monkeypatch.chdir(tmp_path)
    write_pyramid(tmp_path / "a.tif", smooth_rgb(100, 130), n_levels=1, tile=32, photometric="rgb")
    (tmp_path / "labels.csv").write_text("image_id,label\na,0\na2,1\n")
    (tmp_path / "a2.tif").write_bytes((tmp_path / "a.tif").read_bytes())
    rc = main(
        [
            "fit",
            "--config",
            str(TINY),
            "--data",
            "patchgd.app.datamodules.ImageFolderDataModule",
            "--data.csv",
            str(tmp_path / "labels.csv"),
            "--data.mode",
            "lazy",
            "--data.num_folds",
            "2",
            "--model.classifier.init_args.num_classes",
            "2",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("patchgd")]
    assert rc == 2 and len(err) == 1
    assert "the data gives 100×130 px images but model.classifier was built for" in err[0]


def test_the_shipped_slides_config_trains_on_a_csv_alone_and_predicts_on_slides(
    tmp_path, monkeypatch, caplog
):
    """configs/folder/patchgd_slides.yaml: slides of different sizes, classes and canvas from
    the data, tissue masks, the attention head, a slide with a corrupt tile skipped in
    training; then lazy predict with heatmaps, where a
    slide larger than the model's canvas, an unreadable file and a corrupt tile are skipped,
    the rest predicted."""
    from images import damage_first_tile, smooth_rgb, write_pyramid

    monkeypatch.chdir(tmp_path)
    rows = ["image_id,label,split"]
    sizes = [(1600, 1800), (1700, 1100), (1200, 1500), (1400, 1600), (1300, 1300)]
    for i, ((h, w), split) in enumerate(zip(sizes, ["train"] * 3 + ["val", "test"], strict=True)):
        slide = np.full((h, w, 3), 235, np.uint8)
        slide[40 : h // 2 + 40, 60 : w // 2 + 60] = smooth_rgb(h // 2, w // 2, seed=i)
        write_pyramid(tmp_path / f"s{i}.tif", slide, n_levels=2, tile=64, photometric="rgb")
        rows.append(f"s{i},{i % 3},{split}")
    damage_first_tile(tmp_path / "s2.tif", tmp_path / "corrupt.tif")  # that tile holds tissue
    rows.append("corrupt,2,train")  # its batch is skipped, named in a warning; the run goes on
    (tmp_path / "slides.csv").write_text("\n".join(rows) + "\n")
    config = ROOT / "configs" / "folder" / "patchgd_slides.yaml"
    backbone = ["--model.classifier.init_args.backbone", "test_resnet"]
    fit = ["fit", "--config", str(config), "--data.init_args.csv", "slides.csv", *backbone]
    with caplog.at_level(logging.WARNING, logger="patchgd.data"):
        assert main([*fit, "--trainer.max_epochs", "2"]) == 0
    skips = [r.getMessage() for r in caplog.records if "skipped a training batch" in r.message]
    assert len(skips) == 2 and all("corrupt.tif" in m for m in skips)  # once per epoch
    recalibrations = [r.getMessage() for r in caplog.records if "recalibration" in r.message]
    assert recalibrations and all("corrupt.tif" in m for m in recalibrations)
    run = _run_dir(tmp_path)
    saved = (run / "config.yaml").read_text()
    assert "num_classes: 3" in saved  # from the labels
    assert "image_size:\n      - 1700\n      - 1800\n" in saved  # the canvas: the largest slide

    big = np.full((1800, 500, 3), 235, np.uint8)  # taller than the 1700 × 1800 px canvas
    write_pyramid(tmp_path / "big.tif", big, n_levels=1, tile=64, photometric="rgb")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    inputs = "[s2.tif, big.tif, s1.tif, broken.tif, corrupt.tif]"
    assert main(_predict_args(run, inputs)) == 0
    out = _run_dir(tmp_path, 1)
    with open(out / "predictions.csv", newline="") as handle:
        predicted = [row["image"] for row in csv.DictReader(handle)]
    assert predicted == ["s2.tif", "s1.tif"]
    with open(out / "skipped.csv", newline="") as handle:
        skipped = {row["image"]: row["reason"] for row in csv.DictReader(handle)}
    assert skipped.keys() == {"big.tif", "broken.tif", "corrupt.tif"}
    assert "larger than the model's image_size 1700×1800" in skipped["big.tif"]
    assert "cannot decode" in skipped["corrupt.tif"]
    maps = {p.stem.split("_", 1)[1]: np.load(p) for p in (out / "heatmaps").glob("*.npy")}
    assert sorted(maps) == ["s1", "s2"] and len(list((out / "heatmaps").glob("*.png"))) == 2
    for name, (h, w) in (("s2", sizes[2]), ("s1", sizes[1])):
        weights = maps[name]  # attention on the model's 7 × 8 grid, summing to 1 per slide
        assert weights.shape == (7, 8) and weights.sum() == pytest.approx(1.0, abs=1e-5)
        rows_in, cols_in = -(-h // 256), -(-w // 256)  # the slide's own grid
        assert (weights[rows_in:] == 0).all() and (weights[:, cols_in:] == 0).all()
