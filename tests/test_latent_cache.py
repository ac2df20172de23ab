"""Z reuse: a step started from a kept Z, and the cache that decides when to refill."""

from __future__ import annotations

import copy

import pytest
import torch

from patchgd import (
    ConfigError,
    HeadConfig,
    InnerLoopConfig,
    LatentCache,
    PatchGDClassifier,
    PatchGrid,
    RandomPatchSampler,
    fill_z,
    train_step,
)
from patchgd.head import LatentHead
from reference import TinyEncoder

GRID = PatchGrid(48, 16)  # 3 × 3


def _step(encoder, head, images, z=None, seed=1):
    return train_step(
        encoder,
        head,
        GRID,
        images,
        torch.tensor([0, 2]),
        torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.5),
        InnerLoopConfig(patches_per_iteration=2, max_visit_fraction=0.5),
        RandomPatchSampler(seed),
        z=z,
    )


def _modules():
    torch.manual_seed(0)
    encoder = TinyEncoder(latent_dim=4).double()
    head = LatentHead(4, 3, GRID.shape, width=16, norm="none", dropout=0.0).double()
    return encoder, head


def test_a_step_given_its_own_fill_equals_the_step_that_fills():
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    filling = _modules()
    given = copy.deepcopy(filling)
    z = fill_z(given[0], images, GRID)
    a, b = _step(*filling, images), _step(*given, images, z=z.clone())
    assert a.losses == b.losses
    torch.testing.assert_close(a.z, b.z, rtol=0, atol=0)
    for p, q in zip(filling[0].parameters(), given[0].parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_step_returns_z_with_the_newest_embedding_of_every_patch_it_re_encoded():
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    encoder, head = _modules()
    # A kept Z is older than the encoder: offset it, so that every re-encoded position must
    # change (the fill's own values could equal a re-encode bit for bit).
    start = fill_z(encoder, images, GRID) + 1.0
    given = start.clone()
    calls: list[torch.Tensor] = []
    encoder.register_forward_hook(lambda m, args, out: calls.append(out.detach().clone()))
    result = _step(encoder, head, images, z=given)
    assert torch.equal(given, start)  # the caller's Z is never written
    expected = start.clone()
    for positions, emb in zip(result.plan, calls, strict=True):  # no fill: one call per iteration
        image_idx, slot = (positions >= 0).nonzero(as_tuple=True)
        pos = positions[image_idx, slot]
        expected[image_idx, :, pos // 3, pos % 3] = emb
    torch.testing.assert_close(result.z, expected, rtol=0, atol=0)
    changed = (result.z != start).any(dim=1)  # (B, rows, cols): positions written
    visited = torch.zeros_like(changed)
    for positions in result.plan:
        image_idx, slot = (positions >= 0).nonzero(as_tuple=True)
        pos = positions[image_idx, slot]
        visited[image_idx, pos // 3, pos % 3] = True
    assert visited.any() and torch.equal(changed, visited)


def test_a_z_of_the_wrong_shape_is_refused():
    encoder, head = _modules()
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with pytest.raises(ConfigError, match="z has shape"):
        _step(encoder, head, images, z=torch.zeros(2, 4, 2, 3, dtype=torch.float64))


def _model(refresh: int) -> PatchGDClassifier:
    torch.manual_seed(0)
    return PatchGDClassifier(
        "test_efficientnet_gn",
        3,
        64,
        16,
        latent_dim=8,
        in_chans=1,
        head=HeadConfig(width=8, stride1_layers=0, stride2_layers=1, dropout=0.0, norm="none"),
        loop=InnerLoopConfig(patches_per_iteration=4, max_visit_fraction=0.5),
        z_refresh_every=refresh,
    )


def _fills(model: PatchGDClassifier) -> list[int]:
    """Counts the fill's encoder calls (those without autograd), one entry per step."""
    counts: list[int] = []
    model.encoder.register_forward_hook(
        lambda m, args, out: counts.append(int(not torch.is_grad_enabled()))
    )
    return counts


def test_the_cache_fills_an_image_once_every_r_visits_and_otherwise_starts_from_its_last_z():
    model = _model(refresh=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, targets = torch.randn(2, 1, 64, 64), torch.tensor([0, 1])
    calls = _fills(model)
    seen: list[torch.Tensor] = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    filled, previous = [], None
    for visit in range(7):
        calls.clear(), seen.clear()
        result = model.training_step(images, targets, optimizer, keys=["a", "b"])
        filled.append(sum(calls) > 0)
        if not filled[-1]:
            # The first inner iteration's Z: the previous step's Z, but for the patches it
            # re-encodes.
            first = result.plan[0]
            untouched = torch.ones(2, 16, dtype=torch.bool)
            image_idx, slot = (first >= 0).nonzero(as_tuple=True)
            untouched[image_idx, first[image_idx, slot]] = False
            keep = untouched.view(2, 1, 4, 4).expand_as(previous)
            assert torch.equal(seen[0][keep], previous[keep]), f"visit {visit}"
        previous = result.z
    assert filled == [True, False, False, True, False, False, True]
    assert len(model.latent_cache) == 2
    assert model.latent_cache.nbytes == 2 * 8 * 16 * 4


def test_a_batch_with_a_new_image_or_without_keys_is_filled_whole():
    model = _model(refresh=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, targets = torch.randn(2, 1, 64, 64), torch.tensor([0, 1])
    calls = _fills(model)
    steps = [["a", "b"], ["a", "b"], ["a", "c"], None, ["a", "c"]]
    filled = []
    for keys in steps:
        calls.clear()
        model.training_step(images, targets, optimizer, keys=keys)
        filled.append(sum(calls) > 0)
    assert filled == [True, False, True, True, False]


def test_refresh_every_one_keeps_nothing_and_bad_values_are_refused():
    model = _model(refresh=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.training_step(torch.randn(2, 1, 64, 64), torch.tensor([0, 1]), optimizer, keys=[1, 2])
    assert len(model.latent_cache) == 0
    for bad in (0, -1, True):
        with pytest.raises(ConfigError, match="z_refresh_every"):
            LatentCache(bad)


def test_training_batches_name_their_images_so_fit_reuses_z(tmp_path):
    """The training loader gives each batch its images' indices in the split (``KeyedBatch``);
    with ``z_refresh_every=2`` a two-epoch ``fit`` fills every image's Z in the first epoch
    and starts each step of the second from it (no fill: only the inner iterations encode)."""
    import lightning as L

    from patchgd.app.datamodules import KeyedBatch, UltraMNISTDataModule
    from patchgd.app.task import PatchGDTask

    data = UltraMNISTDataModule(
        canvas_size=64, per_class_train=2, per_class_val=1, per_class_test=1, batch_size=4
    )
    data.setup("fit")
    train = data.datasets["train"]
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, KeyedBatch)
    images, targets = batch.batch
    for image, target, key in zip(images, targets, batch.keys.tolist(), strict=True):
        expected_image, expected_target = train[key]
        assert torch.equal(image, expected_image) and int(target) == expected_target

    classifier = PatchGDClassifier(
        "test_resnet", 10, 64, 32, in_chans=1, latent_dim=8, head=HeadConfig(width=8),
        loop=InnerLoopConfig(patches_per_iteration=2), z_refresh_every=2,
    )  # fmt: skip
    encoded: list[int] = []
    step = classifier.training_step

    def counted(*args, **kwargs):
        result = step(*args, **kwargs)
        encoded.append(result.patches_encoded)
        return result

    classifier.training_step = counted  # type: ignore[method-assign]
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(PatchGDTask(classifier, warmup_epochs=0.0), datamodule=data)

    steps = len(train) // 4  # 20 images, batches of 4
    assert len(encoded) == 2 * steps and len(classifier.latent_cache) == len(train)
    first, second = encoded[:steps], encoded[steps:]
    fill = 4 * 4 - 2 * 4  # every patch of the 4 images but those the first iteration re-encodes
    assert [a - b for a, b in zip(first, second, strict=True)] == [fill] * steps
