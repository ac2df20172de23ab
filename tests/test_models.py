"""PatchGD and the baselines as models: they learn, agree on shapes, save state, load weights."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from patchgd import (
    DownscaledGDClassifier,
    GDClassifier,
    GDExtendedClassifier,
    HeadConfig,
    InnerLoopConfig,
    PatchEncoder,
    PatchGDClassifier,
    StepHooks,
)
from patchgd.backbones import in_backbone_layout
from patchgd.errors import ConfigError
from patchgd.head import evidence
from patchgd.model import DEFAULT_FILL_ACTIVATION, default_fill_chunk


def _fixed_batch(size: int = 64, batch: int = 4, classes: int = 3):
    torch.manual_seed(0)
    return torch.randn(batch, 3, size, size), torch.arange(batch) % classes


@pytest.mark.parametrize("backbone", ["resnet18", "deit_tiny_patch16_224"])
def test_cnn_and_vit_backbones_lower_the_loss_on_a_tiny_fixed_batch(backbone):
    images, targets = _fixed_batch()
    model = PatchGDClassifier(
        backbone,
        3,
        64,
        32,
        latent_dim=32,
        head=HeadConfig(width=32, dropout=0.0),
        loop=InnerLoopConfig(patches_per_iteration=2),
    ).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # 16 steps: with the default fill chunk (all 16 patches in one call, so BatchNorm's batch
    # statistics mix the 4 images) resnet18 first halves its loss at step 10; with one image
    # per chunk it did so by step 5.
    losses = [model.training_step(images, targets, opt).loss for _ in range(16)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


# timm zero-initialises the last BatchNorm of each residual block, which starves the convs
# before it of gradient on the first step; turned off so every parameter must move.
RESNET = {"zero_init_last": False}
MODELS = {
    "patchgd": lambda **kw: PatchGDClassifier(
        "test_resnet", 5, 64, 32, latent_dim=16, head=HeadConfig(width=16), backbone_kwargs=RESNET,
        **kw,
    ),
    "gd": lambda **kw: GDClassifier("test_resnet", 5, 64, backbone_kwargs=RESNET, **kw),
    "gd_extended": lambda **kw: GDExtendedClassifier(
        "test_resnet", 5, 64, latent_dim=16, head=HeadConfig(width=16), backbone_kwargs=RESNET,
        **kw,
    ),
    "gd_downscaled": lambda **kw: DownscaledGDClassifier(
        "test_resnet", 5, 64, input_size=32, backbone_kwargs=RESNET, **kw
    ),
    "gd_extended_vit": lambda **kw: GDExtendedClassifier(
        "test_vit", 5, 64, latent_dim=16, head=HeadConfig(width=16), **kw
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_every_method_gives_the_same_output_shape_and_trains_a_step(name):
    model = MODELS[name]().train()
    images, targets = torch.randn(3, 3, 64, 64), torch.tensor([0, 4, 2])
    before = [p.detach().clone() for p in model.parameters()]
    result = model.training_step(images, targets, torch.optim.SGD(model.parameters(), lr=0.1))
    assert result.logits.shape == (3, 5) and result.optimizer_steps >= 1
    assert all(torch.isfinite(torch.tensor(result.losses)))
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(changed) == len(changed), "some parameter received no update"
    probs = model.predict_proba(images)
    assert probs.shape == (3, 5) and model.training
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


@pytest.mark.parametrize("name", MODELS)
def test_every_method_states_what_the_application_needs(name):
    """The ``Classifier`` interface: sizes, steps, parameter groups and the map, per model."""
    model = MODELS[name]()
    assert model.image_size == (64, 64) and model.num_classes == 5 and model.in_chans == 3
    assert model.input_size == ((32, 32) if name == "gd_downscaled" else (64, 64))
    assert model.plans_input_size == (name == "gd_downscaled")
    assert model.reads_patches == (name == "patchgd")
    steps = model.loop.optimizer_steps if name == "patchgd" else 1
    assert model.optimizer_steps == steps
    groups = model.param_groups(encoder_lr=1e-4, head_lr=1e-2)
    assert [(g["name"], g["lr"]) for g in groups] == [("encoder", 1e-4), ("head", 1e-2)]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    head = {id(p) for p in groups[1]["params"]}
    assert head and head == {id(p) for p in model.head_module().parameters()}
    images = torch.randn(2, 3, 64, 64)
    probs, heatmap = model.predict_with_map(images)
    torch.testing.assert_close(probs, model.predict_proba(images))
    if name == "patchgd":
        assert heatmap is not None and heatmap.shape == (2, *model.grid.shape)
        with torch.no_grad():
            z = model.eval().fill_z(images)  # as at inference: running statistics
        torch.testing.assert_close(heatmap, evidence(model.head, z)[1])
    else:
        assert heatmap is None


def test_the_step_counts_the_patches_its_encoder_read():
    """``StepResult.patches_encoded`` equals the patches that passed through the encoder, with
    and without candidates (whose blank patches are not image patches) and with the first
    inner iteration's patches left out of the fill."""
    torch.manual_seed(0)
    model = PatchGDClassifier(
        "test_resnet", 3, 64, 16, latent_dim=8, in_chans=1, head=HeadConfig(width=8),
        loop=InnerLoopConfig(patches_per_iteration=3, max_visit_fraction=0.5),
    ).train()  # fmt: skip
    seen = []
    model.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    images, targets = torch.randn(2, 1, 64, 64), torch.tensor([0, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    candidates = torch.rand(2, model.grid.num_patches) < 0.5
    for mask, blanks in ((None, 0), (candidates, 2)):
        seen.clear()
        result = model.training_step(images, targets, optimizer, candidates=mask)
        assert result.patches_encoded == sum(seen) - blanks


def test_inference_is_the_head_on_a_filled_z_in_eval_mode_and_restores_modes():
    model = MODELS["patchgd"]().train()
    model.training_step(
        torch.randn(4, 3, 64, 64), torch.arange(4), torch.optim.SGD(model.parameters(), lr=0.1)
    )  # running statistics now differ from batch statistics
    frozen = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    images = torch.randn(2, 3, 64, 64)
    logits_in_train_mode = model(images)
    probs = model.predict_proba(images)
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    with torch.no_grad():
        expected = model.head(model.fill_z(images))
    torch.testing.assert_close(logits_in_train_mode, expected)
    torch.testing.assert_close(probs, expected.softmax(dim=1))


def test_downscaled_gd_sees_the_resized_image():
    model = DownscaledGDClassifier("test_resnet", 3, (100, 80), input_size=(40, 32)).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(torch.randn(2, 3, 100, 80))
    assert seen == [(2, 3, 40, 32)]


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_gd_gradient_accumulation_equals_the_whole_batch_step(micro_batch):
    """Micro-batches of 1, 2 and an uneven 3 of a batch of 5: the same gradient, loss and
    logits as the whole batch in one pass (BatchNorm frozen, so normalisation is per image)."""
    images, targets = _fixed_batch(size=32, batch=5)
    grads, results = [], []
    for micro in (None, micro_batch):
        torch.manual_seed(0)
        model = GDClassifier(
            "test_resnet", 3, 32, freeze_bn=True, micro_batch=micro, backbone_kwargs=RESNET
        ).train()
        seen = []
        model.backbone.register_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(len(args[0]))
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        opt.step = lambda *a, **k: None  # keep the gradients for the comparison
        opt.zero_grad = lambda *a, **k: None
        results.append(model.training_step(images, targets, opt))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        expected = [5] if micro is None else [len(t) for t in torch.arange(5).split(micro)]
        assert seen == expected
    whole, accumulated = results
    assert accumulated.optimizer_steps == 1
    torch.testing.assert_close(accumulated.logits, whole.logits)
    assert accumulated.losses[0] == pytest.approx(whole.losses[0], rel=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sampler_state_travels_in_the_state_dict():
    a, b = MODELS["patchgd"](), MODELS["patchgd"]()
    a.sampler.plan(2, 4, 1, 4, 1.0)  # advance a's stream
    b.load_state_dict(a.state_dict())
    assert torch.equal(
        torch.stack(a.sampler.plan(2, 4, 1, 4, 1.0)), torch.stack(b.sampler.plan(2, 4, 1, 4, 1.0))
    )


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    encoder = PatchEncoder("test_resnet", 32, latent_dim=8, pretrained=path)
    loaded = encoder.backbone.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("fc."):  # the classifier is replaced by the projection
            assert torch.equal(loaded[name], value), name


def test_bf16_autocast_training_step_on_cpu():
    model = MODELS["patchgd"]().train()
    hooks = StepHooks(autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    result = model.training_step(
        torch.randn(2, 3, 64, 64),
        torch.tensor([1, 2]),
        torch.optim.Adam(model.parameters()),
        hooks=hooks,
    )
    assert result.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_separate_learning_rates_for_encoder_and_head():
    model = MODELS["patchgd"]()
    opt = torch.optim.Adam(model.param_groups(encoder_lr=1e-4, head_lr=1e-3))
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_vit_weights_saved_at_another_input_size_load_with_resampled_positions(tmp_path):
    source = timm.create_model("test_vit", num_classes=7)  # built for 160 px: 10 × 10 tokens
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    encoder = PatchEncoder("test_vit", 32, latent_dim=8, pretrained=path)  # 2 × 2 tokens
    assert encoder.backbone.pos_embed.shape == (1, 1 + 4, 64)
    loaded = encoder.backbone.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith(("head.", "pos_embed")):
            assert torch.equal(loaded[name], value), name


GROUP_HEAD = HeadConfig(width=16, norm="group")  # a batch of one image must train
FROZEN = {
    "patchgd": lambda: PatchGDClassifier(
        "test_resnet", 5, 64, 32, latent_dim=16, head=GROUP_HEAD, freeze_bn=True
    ),
    "gd": lambda: GDClassifier("test_resnet", 5, 64, freeze_bn=True),
    "gd_extended": lambda: GDExtendedClassifier(
        "test_resnet", 5, 64, latent_dim=16, head=GROUP_HEAD, freeze_bn=True
    ),
    "gd_downscaled": lambda: DownscaledGDClassifier(
        "test_resnet", 5, 64, input_size=32, freeze_bn=True
    ),
}


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_backbone_batchnorm_keeps_its_statistics_while_everything_else_trains(name):
    model = FROZEN[name]()
    model.eval().train()  # as Lightning switches modes between validation and training
    backbone = model.backbone_module()
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert all(m.training for m in model.modules() if not any(m is n for n in norms))
    for m in norms:  # running statistics that batch statistics would visibly differ from
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    affine = [m.weight.detach().clone() for m in norms]
    # One image and one patch per inner iteration: trainable only with frozen BatchNorm.
    images, targets = torch.randn(1, 3, 64, 64), torch.tensor([3])
    if name == "patchgd":
        model.configure_loop(InnerLoopConfig(patches_per_iteration=1))
    model.training_step(images, targets, torch.optim.SGD(model.parameters(), lr=0.1))
    for m, (mean, var) in zip(norms, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    assert any(not torch.equal(m.weight, w) for m, w in zip(norms, affine, strict=True))
    # The backbone normalises with its running statistics: training mode gives eval's features.
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        in_train = backbone(x)
        backbone.eval()
        torch.testing.assert_close(in_train, backbone(x))


@pytest.mark.parametrize(("cls", "most"), [(GDClassifier, 0.8), (GDExtendedClassifier, 0.95)])
def test_activation_checkpointing_gives_the_same_gradients_in_less_memory(cls, most):
    """GD with timm's activation checkpointing: the same gradients, a smaller training peak."""
    from patchgd.memory import measure

    images, targets = torch.randn(2, 3, 128, 128), torch.tensor([0, 1])
    grads, peaks = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = cls("test_efficientnet_gn", 3, 128, grad_checkpointing=checkpointing).train()

        def step(model: torch.nn.Module = model) -> None:
            torch.nn.functional.cross_entropy(model(images), targets).backward()

        _, report = measure(step)
        peaks.append(report.tensor_bytes)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    # GD-extended's head on the feature map is not checkpointed, so it saves less.
    assert peaks[1] < most * peaks[0], peaks


def test_activation_checkpointing_on_a_backbone_without_it_is_refused_naming_the_option():
    from patchgd import ConfigError

    with pytest.raises(ConfigError, match="grad_checkpointing"):
        GDClassifier("cspresnet50", 3, 64, grad_checkpointing=True)  # timm: not supported


def test_fan_out_init_starts_the_projection_and_head_layer_as_timm_starts_a_mobilenet_classifier():
    import math

    from patchgd import ConfigError

    kwargs = dict(latent_dim=16, head=HeadConfig(width=16, stride2_layers=0, pool="avg"))
    torch.manual_seed(0)
    default = PatchGDClassifier("test_resnet", 3, 64, 32, **kwargs)
    torch.manual_seed(0)
    fan_out = PatchGDClassifier("test_resnet", 3, 64, 32, linear_init="fan_out", **kwargs)
    for layer, reference in ((fan_out.encoder.proj, default.encoder.proj),
                             (fan_out.head.fc, default.head.fc)):  # fmt: skip
        bound = 1 / math.sqrt(layer.out_features)
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound  # uniform over the whole range
        assert layer.bias is not None and not layer.bias.any()
        assert not torch.equal(layer.weight, reference.weight)
    # Everything else starts the same: the option touches those two layers only.
    changed = {"encoder.proj.weight", "encoder.proj.bias", "head.fc.weight", "head.fc.bias"}
    for (name, a), (_, b) in zip(
        fan_out.state_dict().items(), default.state_dict().items(), strict=True
    ):
        if name not in changed and isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="linear_init"):
        PatchGDClassifier("test_resnet", 3, 64, 32, linear_init="xavier", **kwargs)


def test_a_compiled_encoder_trains_as_the_eager_one_and_keeps_its_state_dict():
    """``compile_encoder``: the same losses and updates within float32 reassociation, and a
    state dict with the eager model's keys, so checkpoints move between the two."""
    head = HeadConfig(width=8, stride1_layers=0, stride2_layers=1, dropout=0.0, norm="none")

    def build(compile_encoder: bool) -> PatchGDClassifier:
        torch.manual_seed(0)
        return PatchGDClassifier(
            "test_resnet", 3, 32, 16, latent_dim=8, in_chans=1, head=head,
            loop=InnerLoopConfig(patches_per_iteration=2), compile_encoder=compile_encoder,
        )  # fmt: skip

    torch._dynamo.reset()  # count this test's graphs only
    eager, compiled = build(False), build(True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images, targets = torch.randn(2, 2, 1, 32, 32), torch.tensor([[0, 1], [2, 0]])
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        optimizer = torch.optim.SGD(model.train().parameters(), lr=0.1)
        steps = zip(images, targets, strict=True)
        losses[name] = [model.training_step(x, y, optimizer).loss for x, y in steps]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    eager.load_state_dict(compiled.state_dict())  # and back: the keys are the same


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns: a reference that sees every operation,
    not module outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
def test_the_default_fill_chunk_follows_the_backbones_largest_activation(backbone):
    """The probe finds the largest tensor of an inference forward of one patch (a CNN's are
    layer outputs; a ViT's largest is inside its attention, which the probe does not see),
    leaves the model's modes and statistics as they were, and the default chunk divides the
    device's budget by it."""
    model = PatchGDClassifier(backbone, 3, 128, 32, latent_dim=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    largest = model.encoder.largest_activation()
    assert model.training and model.encoder.backbone.training  # modes restored
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no statistics moved
    reference = _LargestTensor()
    backbone_module = copy.deepcopy(model.encoder.backbone).eval()
    with torch.no_grad(), reference:
        backbone_module(torch.zeros(1, 3, 32, 32))
    if backbone == "test_vit":
        assert 0 < largest < reference.largest
    else:
        assert largest == reference.largest
    assert model.chunk_for("cpu") == max(1, DEFAULT_FILL_ACTIVATION["cpu"] // largest)
    assert model.chunk_for("cuda") == max(1, DEFAULT_FILL_ACTIVATION["cuda"] // largest)
    assert default_fill_chunk(10**12, "cpu") == 1  # at least one patch per call


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PatchGDClassifier("test_resnet", None, 64, 32), "num_classes is null"),
        (lambda: PatchGDClassifier("test_resnet", 3, None, 32), "image_size is null"),
        (lambda: PatchGDClassifier("test_resnet", 3, 64), "patch_size must be given"),
        (lambda: GDClassifier("test_resnet", 3), "image_size is null"),
        (lambda: DownscaledGDClassifier("test_resnet", 3, 64), "input_size must be given"),
    ],
)
def test_sizes_left_to_the_data_must_be_given_outside_the_command_line(build, message):
    # `patchgd fit` fills num_classes and image_size from the data; the library API cannot.
    with pytest.raises(ConfigError, match=message):
        build()


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.mark.parametrize("name", MODELS)
def test_backbones_run_channels_last_on_the_cpu_unless_told_otherwise_with_the_same_results(name):
    """``channels_last``: ``None`` (default) and ``True`` give the first convolution
    channels-last input on the CPU in a training step, ``False`` the images as they come;
    ``True`` also stores the weights channels-last. The backbone's outputs and gradients are
    those of the contiguous layout within fp32 rounding (gradients within 1e-3 of their
    largest: these toy backbones' BatchNorm over two images at 1 × 1 amplifies rounding; a
    wrong layout would be off by the whole gradient)."""
    torch.manual_seed(1)
    images, targets = torch.randn(2, 3, 64, 64), torch.tensor([0, 4])
    patches = torch.randn(6, 3, 32, 32)
    results = {}
    for setting in (None, True, False):
        torch.manual_seed(0)
        model = MODELS[name](channels_last=setting).train()
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert _channels_last(conv.weight) == (setting is True)
        seen: list[bool] = []
        hook = conv.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(_channels_last(a[0]))
        )
        model.training_step(images, targets, torch.optim.SGD(model.parameters(), lr=0.0))
        assert seen and all(layout == (setting is not False) for layout in seen), seen
        hook.remove()
        model.zero_grad()
        out = model.encoder(patches) if name == "patchgd" else model(images)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[setting] = out.detach(), [p.grad for p in model.parameters()]
    plain_out, plain_grads = results[False]
    for setting in (None, True):
        out, grads = results[setting]
        torch.testing.assert_close(out, plain_out, rtol=1e-4, atol=1e-5)
        for (param, _), a, b in zip(model.named_parameters(), grads, plain_grads, strict=True):
            if b is not None:
                scale = b.abs().max().item()
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * scale, msg=param)


def test_the_default_layout_is_channels_last_on_the_cpu_only():
    cpu = torch.zeros(2, 3, 8, 8)
    meta = torch.empty(2, 3, 8, 8, device="meta")  # stands for any other device
    assert _channels_last(in_backbone_layout(cpu, None))
    assert not _channels_last(in_backbone_layout(meta, None))
    assert _channels_last(in_backbone_layout(meta, True))
    assert in_backbone_layout(cpu, False) is cpu
    flat = torch.zeros(4, 16)  # not an image batch: left as it is
    assert in_backbone_layout(flat, True) is flat


def test_one_channel_images_run_channels_last_too():
    """An ``(N, 1, H, W)`` batch is channels-last contiguous as it is, but a convolution reads
    its strides: the first layer's output must come out channels-last, the values unchanged."""
    gray = torch.randn(2, 1, 16, 16)
    conv = torch.nn.Conv2d(1, 4, 3)
    assert not _channels_last(conv(gray))
    laid = in_backbone_layout(gray, None)
    assert _channels_last(conv(laid)) and torch.equal(laid, gray)
    model = PatchGDClassifier("test_resnet", 3, 32, 16, latent_dim=8, in_chans=1)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    outputs = []
    first.register_forward_hook(lambda m, a, out: outputs.append(_channels_last(out)))
    model.train().training_step(
        torch.randn(2, 1, 32, 32), torch.tensor([0, 1]), torch.optim.SGD(model.parameters())
    )
    assert outputs and all(outputs)
