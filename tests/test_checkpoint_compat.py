"""Checkpoints written by an earlier version still load: names, shapes and saved arguments.

``tests/data/checkpoint_69565a8`` holds the run folder's ``config.yaml`` and a manifest of the
``last.ckpt`` that ``patchgd fit`` wrote at that commit (its tensors' names, shapes and dtypes,
its hyperparameters): a checkpoint is rebuilt from them, with random values, and the current
code must validate with it and load its state dict strictly.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from patchgd import HeadConfig, PatchGDClassifier
from patchgd.cli import main

OLD = Path(__file__).parent / "data" / "checkpoint_69565a8"


def _rebuild(path: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((OLD / "manifest.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state: dict = {}
    for name, (shape, dtype) in manifest["tensors"].items():
        if name.endswith("running_var"):
            state[name] = torch.ones(shape)  # a variance must be positive
        elif dtype == "int64":
            state[name] = torch.zeros(shape, dtype=torch.int64)
        else:
            state[name] = 0.1 * torch.randn(shape, generator=generator)
    state["classifier._extra_state"] = {"sampler": {"generator": generator.get_state()}}
    keys = ("epoch", "global_step", "pytorch-lightning_version", "hparams_name")
    checkpoint = {key: manifest[key] for key in keys}
    checkpoint.update(state_dict=state, hyper_parameters=manifest["hyper_parameters"])
    torch.save(checkpoint, path)
    return state


def test_a_checkpoint_from_before_the_classifier_interface_and_head_pools_still_loads(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    state = _rebuild(tmp_path / "old.ckpt")
    config = OLD / "config.yaml"
    assert main(["validate", "--config", str(config), "--ckpt_path", "old.ckpt"]) == 0
    # The same weights straight into the class, strictly: no key missing, none unexpected.
    model = PatchGDClassifier(
        "test_resnet", 10, 64, 32, in_chans=1, latent_dim=16, head=HeadConfig(width=16)
    )
    prefix = "classifier."
    model.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=True)
    torch.testing.assert_close(model.head.fc.weight, state["classifier.head.fc.weight"])


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("patchgd.app.data", "patchgd.app.datamodules", "UltraMNISTDataModule"),
        ("patchgd.app.cli", "patchgd.app.lightning_cli", "run_lightning"),
        ("patchgd.data.patches", "patchgd.data.source_patches", "SourcePatches"),
    ],
)
def test_renamed_modules_still_import_from_their_old_paths_with_a_warning(old, new, name):
    """Configs written before the renames name ``patchgd.app.data.…`` (as the checkpoint
    above does); code imports the old paths. Both keep working for one release."""
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=new):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
