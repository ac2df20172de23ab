"""Algorithm 2: Z-filling equals a per-patch forward, and leaves the encoder's state alone."""

from __future__ import annotations

import pytest
import torch

from patchgd import ConfigError, PatchEncoder, PatchGrid, fill_mode, fill_z
from reference import TinyEncoder, reference_z

GRIDS = [  # (H, W, patch, stride): exact, overlap, padding, overlap + padding, non-square
    (64, 64, 32, 32),
    (64, 64, 32, 16),
    (70, 45, 32, 32),
    (75, 61, 32, 20),
    (40, 96, 16, 16),
]


@pytest.mark.parametrize(("h", "w", "p", "s"), GRIDS)
@pytest.mark.parametrize("backbone", ["test_efficientnet_gn", "test_vit"])
def test_fill_equals_per_patch_forward_at_every_position(h, w, p, s, backbone):
    encoder = PatchEncoder(backbone, p, latent_dim=16).double().eval()
    grid = PatchGrid((h, w), p, s, pad_value=0.5)
    images = torch.randn(2, 3, h, w, dtype=torch.float64)
    z = fill_z(encoder, images, grid, chunk=5)
    with torch.no_grad():
        expected = reference_z(encoder, images, grid)
    assert z.shape == (2, 16, grid.rows, grid.cols)
    torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_fill_does_not_depend_on_the_chunk_size(chunk):
    encoder = TinyEncoder().double()
    grid = PatchGrid((50, 50), 16, 12)
    images = torch.randn(3, 3, 50, 50, dtype=torch.float64)
    torch.testing.assert_close(
        fill_z(encoder, images, grid, chunk=chunk), fill_z(encoder, images, grid, chunk=10**6)
    )


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_a_skipped_patch_is_never_encoded_and_the_rest_fill_as_without_skip(chunk):
    encoder = TinyEncoder().double()
    seen: list[int] = []
    encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    grid = PatchGrid((50, 50), 16, 12)  # 4 × 4, overlapping and padded
    images = torch.randn(3, 3, 50, 50, dtype=torch.float64)
    skip = torch.rand(3, grid.num_patches, generator=torch.Generator().manual_seed(0)) < 0.4
    z = fill_z(encoder, images, grid, chunk=chunk, skip=skip)
    assert sum(seen) == int((~skip).sum()) and max(seen) <= chunk
    expected = reference_z(encoder, images, grid)
    kept = (~skip).view(3, 1, grid.rows, grid.cols).expand_as(z)
    torch.testing.assert_close(z[kept], expected[kept], rtol=1e-10, atol=1e-12)
    assert (z[~kept] == 0).all()
    with pytest.raises(ConfigError, match="no patch to encode"):
        fill_z(encoder, images, grid, skip=torch.ones_like(skip))


def test_batchnorm_encoder_in_eval_mode_fills_like_a_per_patch_eval_forward():
    encoder = PatchEncoder("test_resnet", 32, latent_dim=8).double()
    # Make the running statistics non-trivial so that eval and train normalisation differ.
    encoder.train()
    with torch.no_grad():
        encoder(torch.randn(16, 3, 32, 32, dtype=torch.float64) * 3 + 1)
    encoder.eval()
    grid = PatchGrid(64, 32)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_z(encoder, images, grid)
    torch.testing.assert_close(fill_z(encoder, images, grid, chunk=3), expected)


def _bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in module.state_dict().items() if "running" in k or "batches" in k
    }


@pytest.mark.parametrize("norm", ["batch", "running"])
def test_fill_in_training_never_changes_running_statistics_and_restores_modes(norm):
    encoder = PatchEncoder("test_resnet", 32, latent_dim=8)
    encoder.train()
    encoder.proj.eval()  # an odd mix of modes must come back unchanged too
    modes = {name: m.training for name, m in encoder.named_modules()}
    before = _bn_state(encoder)
    grid = PatchGrid(96, 32)
    z1 = fill_z(encoder, torch.randn(2, 3, 96, 96), grid, chunk=4, norm=norm)
    after = _bn_state(encoder)
    assert before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {name: m.training for name, m in encoder.named_modules()} == modes
    assert all(bn.track_running_stats for bn in encoder.modules() if hasattr(bn, "running_mean"))
    assert torch.isfinite(z1).all()


def test_batch_fill_normalises_with_chunk_statistics_and_running_fill_with_running_ones():
    encoder = PatchEncoder("test_resnet", 32, latent_dim=8).double().train()
    grid = PatchGrid(64, 32)
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64) * 5 + 2
    # "batch": one chunk of all 4 patches == a train-mode forward of those 4 (without updates).
    z_batch = fill_z(encoder, images, grid, chunk=4, norm="batch")
    with torch.no_grad(), fill_mode(encoder, "batch"):
        expected = encoder(grid.extract(images)[0].reshape(4, 3, 32, 32))
    torch.testing.assert_close(z_batch[0].permute(1, 2, 0).reshape(4, -1), expected)
    # "running": equals the eval-mode forward.
    z_running = fill_z(encoder, images, grid, chunk=1, norm="running")
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(z_running, reference_z(encoder, images, grid))
    assert not torch.allclose(z_batch, z_running)


def test_fill_is_deterministic_with_dropout_in_the_encoder():
    encoder = PatchEncoder("test_vit", 32, latent_dim=8, drop_rate=0.5).train()
    grid = PatchGrid(64, 32)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(fill_z(encoder, images, grid), fill_z(encoder, images, grid))


def test_fill_rejects_bad_settings():
    grid = PatchGrid(64, 32)
    with pytest.raises(ConfigError, match="fill_chunk must be at least 1, got 0"):
        fill_z(TinyEncoder(), torch.zeros(1, 3, 64, 64), grid, chunk=0)
    with pytest.raises(ConfigError, match="fill_norm must be 'batch' or 'running', got 'train'"):
        fill_z(TinyEncoder(), torch.zeros(1, 3, 64, 64), grid, norm="train")  # type: ignore[arg-type]


def test_frozen_batchnorm_keeps_running_statistics_in_a_batch_fill():
    encoder = PatchEncoder("test_resnet", 32, latent_dim=8).double().train()
    with torch.no_grad():  # calibrate running statistics away from their initial values
        encoder(torch.randn(16, 3, 32, 32, dtype=torch.float64) * 3 + 1)
    frozen = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in frozen:
        bn.eval()  # the usual "freeze pretrained BatchNorm" pattern
    grid = PatchGrid(64, 32)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    z = fill_z(encoder, images, grid, chunk=8, norm="batch")
    with torch.no_grad():
        expected = reference_z(encoder, images, grid)  # train mode, BatchNorm frozen
    torch.testing.assert_close(z, expected)
    assert all(not bn.training for bn in frozen)


@pytest.mark.parametrize(
    "backbone", ["mobilenetv3_small_050", "ghostnet_100", "convnext_atto", "regnetx_002"]
)
def test_encoder_projects_any_backbone_family_to_latent_dim(backbone):
    encoder = PatchEncoder(backbone, 32, latent_dim=12).eval()
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 12)


def _counting(encoder):
    seen: list[int] = []
    encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_a_candidate_fill_encodes_only_candidates_and_gives_the_rest_the_blank_patchs_embedding(
    chunk,
):
    encoder = TinyEncoder().double()
    seen = _counting(encoder)
    grid = PatchGrid((50, 50), 16, 12, pad_value=0.25)  # 4 × 4, overlapping and padded
    images = torch.randn(3, 3, 50, 50, dtype=torch.float64)
    candidates = torch.rand(3, grid.num_patches, generator=torch.Generator().manual_seed(1)) < 0.3
    candidates[2] = False  # an image without tissue: all of its Z is background
    z = fill_z(encoder, images, grid, chunk=chunk, candidates=candidates)
    # Candidates plus one blank patch per image, the blanks in the first call only.
    assert sum(seen) == int(candidates.sum()) + 3 and max(seen) <= chunk + 3
    expected = reference_z(encoder, images, grid)
    with torch.no_grad():
        blank = encoder(torch.full((1, 3, 16, 16), 0.25, dtype=torch.float64))[0]
    kept = candidates.view(3, 1, grid.rows, grid.cols).expand_as(z)
    torch.testing.assert_close(z[kept], expected[kept], rtol=1e-10, atol=1e-12)
    background = z.permute(0, 2, 3, 1)[~candidates.view(3, grid.rows, grid.cols)]
    torch.testing.assert_close(background, blank.expand_as(background), rtol=1e-10, atol=1e-12)


def test_a_candidate_fill_with_every_patch_a_candidate_equals_the_full_fill():
    encoder = TinyEncoder().double()
    grid = PatchGrid((50, 50), 16, 12)
    images = torch.randn(2, 3, 50, 50, dtype=torch.float64)
    every = torch.ones(2, grid.num_patches, dtype=torch.bool)
    torch.testing.assert_close(
        fill_z(encoder, images, grid, chunk=5, candidates=every), fill_z(encoder, images, grid)
    )


def test_candidates_and_skip_together_encode_only_unskipped_candidates():
    encoder = TinyEncoder().double()
    seen = _counting(encoder)
    grid = PatchGrid(64, 16)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    candidates = torch.zeros(2, 16, dtype=torch.bool)
    candidates[:, :6] = True
    skip = torch.zeros(2, 16, dtype=torch.bool)
    skip[:, :2] = True  # the first inner iteration's patches: candidates the step re-encodes
    z = fill_z(encoder, images, grid, chunk=100, skip=skip, candidates=candidates)
    assert seen == [2 + 2 * 4]
    expected = reference_z(encoder, images, grid)
    torch.testing.assert_close(z[:, :, 0, 2:6], expected[:, :, 0, 2:6], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        blank = encoder(torch.zeros(1, 3, 16, 16, dtype=torch.float64))[0]
    rest = z.flatten(2)[:, :, 6:].permute(0, 2, 1)  # positions 6..15: background
    torch.testing.assert_close(rest, blank.expand_as(rest), rtol=1e-10, atol=1e-12)


def test_candidates_must_match_the_batch_and_grid():
    grid = PatchGrid(64, 16)
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ConfigError, match=r"candidates must have shape \(2, 16\)"):
        fill_z(TinyEncoder(), images, grid, candidates=torch.ones(4, 8, dtype=torch.bool))


def test_a_recalibration_with_candidates_sees_what_inference_encodes():
    from patchgd import PatchGDClassifier
    from patchgd.batchnorm import recalibrating

    torch.manual_seed(0)
    model = PatchGDClassifier("test_resnet", 3, 64, 16, latent_dim=8, fill_chunk=100).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64) * 3 + 1
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(4)) < 0.5
    reference = PatchGDClassifier("test_resnet", 3, 64, 16, latent_dim=8).double()
    reference.load_state_dict(model.state_dict())
    model.recalibrate_batchnorm([images], candidates=[mask])
    # The slow way: one call on the two blank patches and the candidates, in fill order.
    patches = model.grid.extract(images).reshape(32, 3, 16, 16)
    blanks = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    reference.train()
    with recalibrating(reference.encoder):
        reference.encoder(torch.cat([blanks, patches[mask.flatten()]]))
    got, want = model.encoder.state_dict(), reference.encoder.state_dict()
    stats = [k for k in want if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)
    unmasked = PatchGDClassifier("test_resnet", 3, 64, 16, latent_dim=8, fill_chunk=100).double()
    unmasked.load_state_dict(reference.state_dict())
    unmasked.recalibrate_batchnorm([images])
    assert not torch.allclose(unmasked.encoder.state_dict()[stats[0]], got[stats[0]])


def test_a_batch_fill_normalises_the_blank_patch_with_the_first_chunk():
    """Under "batch" norm a blank patch is normalised with the statistics of the chunk it is
    encoded with, as a background patch of a full fill would be: here, the first chunk."""
    encoder = PatchEncoder("test_resnet", 32, latent_dim=8).double().train()
    grid = PatchGrid(64, 32)
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64) * 5 + 2
    candidates = torch.tensor([[True, True, False, True]])
    z = fill_z(encoder, images, grid, chunk=4, norm="batch", candidates=candidates)
    patches = grid.extract(images)[0].reshape(4, 3, 32, 32)
    with torch.no_grad(), fill_mode(encoder, "batch"):
        expected = encoder(torch.cat([torch.zeros(1, 3, 32, 32).double(), patches[[0, 1, 3]]]))
    flat = z[0].permute(1, 2, 0).reshape(4, -1)
    torch.testing.assert_close(flat[[0, 1, 3]], expected[1:])
    torch.testing.assert_close(flat[2], expected[0])


def test_a_model_infers_with_the_candidates_it_trained_with():
    from patchgd import PatchGDClassifier

    torch.manual_seed(0)
    model = PatchGDClassifier("test_resnet", 3, 64, 16, latent_dim=8).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    candidates = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.4
    model.eval()
    with torch.no_grad():
        z = fill_z(model.encoder, images, model.grid, chunk=3, candidates=candidates)
        expected = model.head(z)
    model.train()  # inference switches to eval mode by itself and restores the mode
    torch.testing.assert_close(model(images, candidates=candidates), expected)
    assert model.training
    assert not torch.allclose(model(images), expected)  # the mask changes Z, hence the logits
