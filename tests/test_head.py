"""The head on Z: gated attention-MIL pooling against a per-position reference."""

import pytest
import torch

from patchgd import ConfigError
from patchgd.head import GatedAttentionPool, LatentHead, MaskedAveragePool, evidence


def _reference_pool(pool: GatedAttentionPool, h: torch.Tensor) -> torch.Tensor:
    """Ilse et al.'s formula written out one image and one position at a time."""
    V, bV = pool.tanh_branch.weight[:, :, 0, 0], pool.tanh_branch.bias
    U, bU = pool.gate_branch.weight[:, :, 0, 0], pool.gate_branch.bias
    w, bw = pool.score.weight[0, :, 0, 0], pool.score.bias[0]
    out = []
    for image in h:
        features = [image[:, r, c] for r in range(h.shape[2]) for c in range(h.shape[3])]
        scores = torch.stack(
            [w @ (torch.tanh(V @ f + bV) * torch.sigmoid(U @ f + bU)) + bw for f in features]
        )
        weights = torch.exp(scores - scores.max())
        weights = weights / weights.sum()
        out.append(sum(a * f for a, f in zip(weights, features, strict=True)))
    return torch.stack(out)


def test_gated_attention_pool_equals_the_per_position_formula():
    torch.manual_seed(0)
    pool = GatedAttentionPool(6).double()
    h = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(pool(h), _reference_pool(pool, h))
    weights = pool.weights(h)
    assert weights.shape == (3, 4, 5)
    torch.testing.assert_close(weights.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))


def test_attention_pooling_ignores_the_order_of_positions():
    torch.manual_seed(1)
    pool = GatedAttentionPool(4).double()
    h = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    perm = torch.randperm(9)
    shuffled = h.flatten(2)[:, :, perm].view_as(h)
    torch.testing.assert_close(pool(shuffled), pool(h))
    torch.testing.assert_close(
        pool.weights(shuffled).flatten(1), pool.weights(h).flatten(1)[:, perm]
    )


def test_an_attention_head_serves_any_grid_and_gives_its_weights():
    head = LatentHead(8, 3, (4, 4), width=8, stride1_layers=0, stride2_layers=0, pool="attention")
    for shape in [(4, 4), (3, 7), (1, 1)]:
        z = torch.randn(2, 8, *shape)
        assert head(z).shape == (2, 3)
        assert head.attention(z).shape == (2, *shape)


def test_attention_weights_need_an_attention_head():
    head = LatentHead(8, 3, (4, 4), width=8, pool="avg")
    with pytest.raises(ConfigError, match="pool='attention'"):
        head.attention(torch.zeros(1, 8, 4, 4))


def test_evidence_of_an_average_pooled_linear_head_is_each_positions_share_of_the_logit():
    torch.manual_seed(2)
    head = LatentHead(5, 3, (3, 4), stride1_layers=0, stride2_layers=0, pool="avg").double()
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    probs, heat = evidence(head, z)
    logits = head(z)
    torch.testing.assert_close(probs, logits.float().softmax(dim=1))
    for b in range(2):
        c = int(logits[b].argmax())
        for r in range(3):
            for col in range(4):
                share = head.fc.weight[c].double() @ z[b, :, r, col] / 12
                torch.testing.assert_close(heat[b, r, col].double(), share, atol=1e-6, rtol=1e-5)
        # Exact decomposition: the positions' shares add up to the logit less its bias.
        torch.testing.assert_close(
            heat[b].sum().double(), logits[b, c] - head.fc.bias[c], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("stride2_layers", [0, 1])
def test_evidence_of_an_attention_head_is_its_attention_on_zs_grid(stride2_layers):
    torch.manual_seed(3)
    head = LatentHead(
        6, 4, (5, 5), width=6, stride1_layers=1, stride2_layers=stride2_layers, pool="attention"
    ).eval()
    z = torch.randn(3, 6, 5, 5)
    valid = _valid_mask(3, 5, 5, seed=4)
    probs, heat = evidence(head, z, valid)
    torch.testing.assert_close(probs, head(z, valid).softmax(dim=1))
    weights = head.attention(z, valid)  # on the head's grid: 5×5, or 3×3 after one stride 2
    assert heat.shape == (3, 5, 5)
    cell = 2**stride2_layers
    for r in range(5):
        for c in range(5):
            torch.testing.assert_close(heat[:, r, c], weights[:, r // cell, c // cell])
    if stride2_layers == 0:
        assert (heat[~valid] == 0).all()
        torch.testing.assert_close(heat.sum(dim=(1, 2)), torch.ones(3))


def _valid_mask(batch: int, rows: int, cols: int, seed: int) -> torch.Tensor:
    valid = torch.rand(batch, rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.4
    valid[:, 0, 0] = True  # at least one per image
    return valid


def test_pooling_heads_read_only_the_valid_positions():
    """Masked average and attention equal the same pooling over the valid positions alone."""
    torch.manual_seed(4)
    h = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    valid = _valid_mask(3, 4, 5, seed=0)
    attention = GatedAttentionPool(6).double()
    weights = attention.weights(h, valid)
    assert (weights[~valid] == 0).all()
    torch.testing.assert_close(weights.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    pooled, averaged = attention(h, valid), MaskedAveragePool()(h, valid)
    for b in range(3):
        kept = h[b][:, valid[b]][:, :, None]  # (C, n, 1): the valid positions as a grid
        torch.testing.assert_close(pooled[b], _reference_pool(attention, kept[None])[0])
        torch.testing.assert_close(averaged[b], kept.mean(dim=(1, 2)))


def test_after_stride2_layers_a_position_is_valid_if_its_footprint_holds_a_valid_one():
    head = LatentHead(4, 3, (7, 6), width=4, stride1_layers=0, stride2_layers=2, pool="avg")
    valid = _valid_mask(2, 7, 6, seed=1)
    mask = head._reduce_mask(valid, torch.zeros(2, 4, 2, 2))
    reference = valid.clone()
    for _ in range(2):  # a 3×3, stride-2, padding-1 window: rows 2i-1..2i+1, same for columns
        rows, cols = (reference.shape[1] + 1) // 2, (reference.shape[2] + 1) // 2
        reduced = torch.zeros(2, rows, cols, dtype=torch.bool)
        for i in range(rows):
            for j in range(cols):
                window = reference[:, max(2 * i - 1, 0) : 2 * i + 2, max(2 * j - 1, 0) : 2 * j + 2]
                reduced[:, i, j] = window.flatten(1).any(dim=1)
        reference = reduced
    assert torch.equal(mask, reference)


def test_an_image_without_valid_positions_is_read_whole():
    head = LatentHead(4, 3, (3, 3), width=4, stride1_layers=0, stride2_layers=0, pool="attention")
    z = torch.randn(2, 4, 3, 3)
    valid = torch.zeros(2, 3, 3, dtype=torch.bool)
    valid[0, 1, 1] = True
    out = head(z, valid)
    torch.testing.assert_close(out[1], head(z[1:])[0])
    torch.testing.assert_close(head.attention(z, valid)[0].sum(), head.attention(z, valid)[0, 1, 1])


def test_the_flatten_head_reads_every_position_whatever_the_mask():
    head = LatentHead(4, 3, (4, 4), width=8, dropout=0.0, norm="none").eval()
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(head(z, _valid_mask(2, 4, 4, seed=2)), head(z))


@pytest.mark.parametrize("pool", ["avg", "attention"])
def test_outside_an_images_extent_z_is_never_read_so_it_scores_as_alone(pool):
    """With ``extent``, each image of a padded Z gets the logits of its own grid alone: Z
    outside it acts as the convolutions' zero padding and is never pooled."""
    torch.manual_seed(0)
    head = LatentHead(8, 3, (7, 6), width=8, stride1_layers=1, stride2_layers=2, pool=pool)
    for module in head.modules():  # running statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
    head.eval()
    z = torch.randn(3, 8, 7, 6)
    extent = torch.tensor([[3, 5], [7, 6], [2, 1]])
    logits = head(z, extent=extent)
    for b, (rows, cols) in enumerate(extent.tolist()):
        alone = head(z[b : b + 1, :, :rows, :cols])
        torch.testing.assert_close(logits[b : b + 1], alone, atol=1e-6, rtol=0)
    noisy = z.clone()
    noisy[0, :, 3:] = 1e3  # outside image 0's 3 × 5
    noisy[0, :, :, 5:] = -1e3
    torch.testing.assert_close(head(noisy, extent=extent), logits, atol=0, rtol=0)
    valid = torch.zeros(3, 7, 6, dtype=torch.bool)
    valid[:, :2, :2] = True  # with a mask too: both apply
    masked = head(z, valid, extent)
    for b, (rows, cols) in enumerate(extent.tolist()):
        alone = head(z[b : b + 1, :, :rows, :cols], valid[b : b + 1, :rows, :cols])
        torch.testing.assert_close(masked[b : b + 1], alone, atol=1e-6, rtol=0)
