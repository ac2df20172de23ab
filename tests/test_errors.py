"""Bad configurations fail before any work, in one line that names the option and value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchgd import (
    ConfigError,
    GDExtendedClassifier,
    HeadConfig,
    InnerLoopConfig,
    LatentHead,
    PatchEncoder,
    PatchGDClassifier,
)
from patchgd.baselines import _feature_map
from patchgd.errors import require_count


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        (
            InnerLoopConfig(patches_per_iteration=17),
            r"patches_per_iteration \(k=17\) must be between 1 and "
            r"the grid's 16 patches",
        ),
        (InnerLoopConfig(patches_per_iteration=0), r"patches_per_iteration \(k=0\)"),
        (InnerLoopConfig(sampling_fraction=1.5), r"sampling_fraction must be in \(0, 1\], got 1.5"),
        (
            InnerLoopConfig(sampling_fraction=None),
            "give patches_per_iteration or sampling_fraction",
        ),
        (InnerLoopConfig(max_visit_fraction=0.0), r"max_visit_fraction must be in \(0, 1\], got 0"),
        (InnerLoopConfig(accumulation=0), r"accumulation \(ε=0\) must be at least 1"),
        (
            InnerLoopConfig(inner_iterations=2, accumulation=3),
            r"accumulation \(ε=3\) is larger than inner_iterations \(ζ=2\)",
        ),
        (InnerLoopConfig(inner_iterations=0), r"inner_iterations \(ζ=0\) must be at least 1"),
    ],
)
def test_inner_loop_errors_name_the_option(loop, message):
    with pytest.raises(ConfigError, match=message):
        PatchGDClassifier("test_resnet", 3, 64, 16, loop=loop)


def test_patch_larger_than_image():
    with pytest.raises(ConfigError, match=r"patch_size=128 is larger than the image \(64×64 px\)"):
        PatchGDClassifier("test_resnet", 3, 64, 128)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match=r"backbone='resnet5' is not a timm model; did you mean"):
        PatchEncoder("resnet5", 32)


def test_missing_pretrained_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=f"pretrained weights file not found: {missing}"):
        PatchEncoder("test_resnet", 32, pretrained=missing)


def test_corrupt_pretrained_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=f"cannot load pretrained weights from {bad}"):
        PatchEncoder("test_resnet", 32, pretrained=bad)


def test_head_refuses_a_grid_it_cannot_reduce():
    with pytest.raises(ConfigError, match=r"the head cannot reduce a 512×512 latent grid"):
        LatentHead(256, 10, (512, 512), stride2_layers=1)
    LatentHead(256, 10, (512, 512), pool="avg", stride2_layers=1)  # pooling reduces any grid


def test_head_built_for_one_grid_refuses_another():
    head = LatentHead(8, 3, (4, 4), width=8)
    with pytest.raises(ConfigError, match=r"built for a 4×4 latent grid but got 3×5"):
        head(torch.zeros(2, 8, 3, 5))
    assert LatentHead(8, 3, (4, 4), width=8, pool="avg")(torch.zeros(2, 8, 3, 5)).shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_classes=1), "num_classes must be at least 2, got 1"),
        (dict(norm="layer"), "head norm must be 'batch', 'group' or 'none', got 'layer'"),
        (dict(pool="max"), "head pool must be 'flatten', 'avg' or 'attention', got 'max'"),
        (dict(stride2_layers=-1), "stride2_layers=-1"),
    ],
)
def test_bad_head_options(kwargs, message):
    args = dict(latent_dim=8, num_classes=3, grid_shape=(4, 4)) | kwargs
    with pytest.raises(ConfigError, match=message):
        LatentHead(**args)


def test_batchnorm_head_with_one_image_says_what_to_change():
    model = PatchGDClassifier(
        "test_efficientnet_gn", 3, 64, 32, latent_dim=8, head=HeadConfig(width=8)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="head norm='batch' cannot train on a batch of 1 image"):
        model.training_step(torch.randn(1, 3, 64, 64), torch.tensor([0]), opt)
    group = PatchGDClassifier(
        "test_efficientnet_gn", 3, 64, 32, latent_dim=8, head=HeadConfig(width=8, norm="group")
    )
    group.training_step(
        torch.randn(1, 3, 64, 64), torch.tensor([0]), torch.optim.SGD(group.parameters(), lr=0.1)
    )


def test_batchnorm_encoder_with_one_patch_per_step_says_what_to_change():
    model = PatchGDClassifier(
        "test_resnet",
        3,
        64,
        32,
        latent_dim=8,
        head=HeadConfig(width=8, norm="group"),
        loop=InnerLoopConfig(patches_per_iteration=1),
    )
    with pytest.raises(ConfigError, match="cannot train on 1 patch"):
        model.training_step(
            torch.randn(1, 3, 64, 64),
            torch.tensor([0]),
            torch.optim.SGD(model.parameters(), lr=0.1),
        )


def test_mismatched_targets_and_bad_fill_norm():
    model = PatchGDClassifier("test_resnet", 3, 64, 32, latent_dim=8, head=HeadConfig(width=8))
    with pytest.raises(ConfigError, match="got 2 images but 3 targets"):
        model.training_step(
            torch.randn(2, 3, 64, 64),
            torch.tensor([0, 1, 2]),
            torch.optim.SGD(model.parameters(), lr=0.1),
        )
    with pytest.raises(ConfigError, match="fill_norm must be 'batch' or 'running', got 'eval'"):
        PatchGDClassifier("test_resnet", 3, 64, 32, fill_norm="eval")  # type: ignore[arg-type]


def test_gd_extended_rejects_backbones_without_a_spatial_map():
    class Pooled(torch.nn.Module):  # forward_features gives (B, C): no map to put a head on
        def forward_features(self, x):
            return x.mean(dim=(2, 3))

    with pytest.raises(ConfigError, match=r"cannot read a spatial feature map from Pooled"):
        _feature_map(Pooled(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="num_classes must be at least 2"):
        GDExtendedClassifier("test_resnet", 1, 64)


def test_require_count_takes_whole_numbers_only():
    """The one check behind every count option: NumPy integers count, bools and floats do not,
    and the message names the option, the minimum and the value."""
    assert require_count("n", 3) == 3
    assert require_count("n", np.int64(3)) == 3 and type(require_count("n", np.int64(3))) is int
    assert require_count("seed", 0, at_least=0) == 0
    with pytest.raises(ConfigError, match=r"^num_folds must be at least 2, got 1$"):
        require_count("num_folds", 1, at_least=2)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(ConfigError, match=rf"^n must be a whole number, got {bad!r}$"):
            require_count("n", bad)
