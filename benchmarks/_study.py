"""The reproduction study's protocol, shared by its runner (``reproduce.py``) and its report
(``reproduce_report.py``): the sizes of each run, the methods, and what the configs of
``configs/reproduction/`` set. The report reads PatchGD's loop and head from those configs."""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from _report import DOCS, ROOT

from patchgd import HeadConfig, InnerLoopConfig
from patchgd.grid import PatchGrid

PAGE = DOCS / "reproduction.md"
CONFIGS = ROOT / "configs" / "reproduction"
METHODS = ("gd", "gd_downscaled", "gd_extended", "patchgd")
LABELS = {
    "gd": "GD",
    "gd_downscaled": "GD, downscaled",
    "gd_extended": "GD-extended",
    "patchgd": "PatchGD",
}
ARGS = "model.classifier.init_args"
#: The encoder's learning rate in the frozen-BatchNorm runs that keep the encoder slow.
FROZEN_ENCODER_LR = 1e-4
#: Run groups that ``--investigate`` adds: what moves PatchGD's number, beyond the paper's tables.
INVESTIGATIONS = frozenset({"bn", "frozen", "frozen_lr", "schedule", "head", "scratch"})


@dataclass(frozen=True)
class Protocol:
    """The study's sizes. The full protocol's values are explained in docs/reproduction.md."""

    canvas: int = 512
    patch: int = 256  # main comparison: 4 patches, k = 1, zeta = 4 (the paper's Table 2)
    ablation_patch: int = 128  # Table 4: 16 patches, so 10 / 30 / 50 % are 2 / 5 / 8 patches
    per_class: tuple[int, int, int] = (120, 50, 100)  # train, val, test images per class
    epochs: int = 3
    max_batch: int = 16
    tight: str = "160MiB"
    loose: str = "640MiB"
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 1200
    pretrain_canvas: int = 128
    pretrain_batch: int = 32
    latency_batch: int = 16
    latency_repeats: int = 9


FULL = Protocol()
QUICK = Protocol(
    canvas=128,
    patch=64,
    ablation_patch=32,
    per_class=(2, 2, 2),
    epochs=1,
    max_batch=4,
    tight="64MiB",
    loose="128MiB",
    seeds=(0,),
    pretrain_steps=4,
    pretrain_canvas=64,
    pretrain_batch=8,
    latency_batch=2,
    latency_repeats=2,
)


def model_args(method: str = "patchgd") -> dict:
    """The classifier's ``init_args`` in the study's config for ``method``."""
    config = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())
    return config["model"]["classifier"]["init_args"]


def backbone_name(method: str = "patchgd") -> str:
    return model_args(method)["backbone"]


def patchgd_loop(p: Protocol, loop: dict | None = None):
    """k, ζ and ε of the study's PatchGD config (or of ``loop``) on the protocol's grid."""
    loop = loop or model_args("patchgd")["loop"]
    return InnerLoopConfig(**loop).resolve(PatchGrid(p.canvas, p.patch).num_patches)


def patchgd_setting(p: Protocol) -> str:
    """PatchGD's settings in the study's config, in words, for the report's protocol table."""
    args = model_args("patchgd")
    loop = patchgd_loop(p, args["loop"])
    head = HeadConfig(**args.get("head", {}))
    convolutions = head.stride1_layers + head.stride2_layers
    head_text = "linear head" if convolutions == 0 else f"head of {convolutions} convolutions"
    fill = args.get("fill_norm", "running")
    return (
        f"patch {p.patch}, k = {loop.patches_per_iteration}, ζ = {loop.inner_iterations}, "
        f"ε = {loop.accumulation}, {head_text}, fill with {fill} BatchNorm statistics"
    )
