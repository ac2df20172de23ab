"""``--memory-budget`` on the Lightning commands: the plan is applied, saved, measured, capped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from patchgd import DownscaledGDClassifier, GDClassifier, planner
from patchgd.app.callbacks import planned_config
from patchgd.cli import main
from patchgd.planner import cap_cuda_memory, plan_classifier

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ultramnist" / "patchgd_tiny.yaml"
ONE_EPOCH = ["--trainer.max_epochs", "1", "--model.warmup_epochs", "0.4"]


def test_fit_under_a_budget_saves_the_plan_and_measures_a_steady_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(TINY), *ONE_EPOCH, "--model.classifier.init_args.fill_chunk"]
    assert main([*args, "3", "--memory-budget", "30MiB"]) == 0
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    plan = json.loads((run / "summary.json").read_text())["fit"]["memory_plan"]
    assert plan["budget_bytes"] == 30 * 2**20
    assert 0 < plan["predicted_peak_bytes"] <= plan["budget_bytes"]
    assert 0 < plan["measured_peak_bytes"] <= plan["budget_bytes"]
    # The measured second step agrees with the trial step the plan was made from.
    assert plan["measured_peak_bytes"] == pytest.approx(plan["predicted_peak_bytes"], rel=0.1)
    # The planned values are in the saved config, which validate reads back (budget included).
    config = yaml.safe_load((run / "config.yaml").read_text())
    init = config["model"]["classifier"]["init_args"]
    assert config["memory_budget"] == "30MiB"
    assert init["fill_chunk"] == plan["planned_config"]["model.classifier.init_args.fill_chunk"]
    assert init["fill_chunk"] == 3  # kept as configured: it fits
    assert config["data"]["init_args"]["batch_size"] == 4  # the configured batch fits
    last = run / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)]) == 0


def test_fit_under_an_impossible_budget_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY), "--memory-budget", "1MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1.0 MiB is too small: the smallest configuration" in err[0]
    assert not (tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints").exists()


def test_gd_gets_the_largest_batch_up_to_the_configured_one():
    model = GDClassifier("test_resnet", 3, 128)
    same, plan = plan_classifier(model, "24MiB", 64)
    assert same is model and 1 <= plan.batch_size < 64
    assert plan.classifier_args == {} and plan.batch_planned
    assert planned_config(plan) == {"data.init_args.batch_size": plan.batch_size}
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    # A larger budget allows a larger batch, but never more than the config asked for.
    wanted = plan.batch_size + 1
    _, more = plan_classifier(GDClassifier("test_resnet", 3, 128), "1GiB", wanted)
    assert more.batch_size == wanted


def test_downscaled_gd_gets_a_smaller_input_and_keeps_its_weights():
    args = dict(backbone="test_resnet", num_classes=3, image_size=256, input_size=256)
    torch.manual_seed(0)
    model = DownscaledGDClassifier(**args)
    rebuild = lambda size: DownscaledGDClassifier(**{**args, "input_size": size})  # noqa: E731
    planned, plan = plan_classifier(model, "12MiB", 4, rebuild=rebuild)
    size = plan.classifier_args["input_size"]
    assert planned_config(plan) == {"model.classifier.init_args.input_size": size}
    assert size < 256 and size % 32 == 0 and planned.input_size == (size, size)
    assert plan.batch_size == 4 and plan.predicted_peak_bytes <= 12 * 2**20
    for (name, a), b in zip(model.state_dict().items(), planned.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same initial weights, only the input size moved


def test_cuda_cap_is_the_budget_over_the_card(monkeypatch):
    calls = []
    fake = SimpleNamespace(
        get_device_properties=lambda device: SimpleNamespace(total_memory=8 * 2**30),
        set_per_process_memory_fraction=lambda fraction, device: calls.append((fraction, device)),
    )
    monkeypatch.setattr(planner.torch, "cuda", fake)
    device = torch.device("cuda", 0)
    assert cap_cuda_memory(2 * 2**30, device) == 0.25 and calls == [(0.25, device)]
    assert cap_cuda_memory(2 * 2**30, torch.device("cpu")) is None and len(calls) == 1
    with pytest.raises(Exception, match="more than cuda:0's 8.00 GiB"):
        cap_cuda_memory(9 * 2**30, device)
