"""DDP on the CPU (gloo, 2 processes): per-process batch B equals one process with batch 2B."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from patchgd import HeadConfig, InnerLoopConfig, PatchGDClassifier
from patchgd.app.task import PatchGDTask

# ddp_spawn pickles the module to its workers through shared memory; passing storages by file
# name rather than by file descriptor works in sandboxes that restrict fd passing.
torch.multiprocessing.set_sharing_strategy("file_system")


def _fresh_port() -> None:
    """Lightning keeps the first run's MASTER_PORT in os.environ; a run started right after
    another could then meet the previous rendezvous. Every DDP run here gets a free port."""
    import os

    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    os.environ["MASTER_PORT"] = str(find_free_network_port())


class FixedData(L.LightningDataModule):
    """Eight fixed images in a fixed order; under DDP rank r gets images r, r + 2, ..."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(8, 3, 64, 64, generator=generator), torch.arange(8) % 3
        )

    def train_dataloader(self) -> DataLoader:
        # Explicit, so each optimizer step's images are the same 2B images in both runs:
        # rank 0 gets 0, 2, 4, 6 and rank 1 gets 1, 3, 5, 7, batch by batch.
        world = self.trainer.world_size
        sampler = DistributedSampler(self.data, world, self.trainer.global_rank, shuffle=False)
        return DataLoader(
            self.data, batch_size=self.batch_size, sampler=sampler if world > 1 else None
        )


class SaveWeights(L.Callback):
    """Saves rank 0's weights where they were trained (ddp_spawn's copy back to the parent
    process would round float64 weights into the parent's float32 module)."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(_floats(pl_module), self.path / f"rank{trainer.global_rank}.pt")


def _classifier(accumulation: int | None = None, dropout: float = 0.2) -> PatchGDClassifier:
    """BatchNorm-free (GroupNorm backbone, no norm in the head): per-process batch statistics
    would otherwise differ from a single process's; k = 1 of 4 patches, so ζ = 4."""
    torch.manual_seed(0)
    return PatchGDClassifier(
        "test_efficientnet_gn",
        3,
        64,
        32,
        latent_dim=8,
        head=HeadConfig(width=8, norm="none", dropout=dropout),
        loop=InnerLoopConfig(patches_per_iteration=1, accumulation=accumulation),
    )


def _fit(task: PatchGDTask, devices: int, batch_size: int, **trainer_options) -> None:
    """One epoch over FixedData, in ``devices`` spawned processes (or this one)."""
    _fresh_port()
    options = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    L.Trainer(**{**options, **trainer_options}).fit(task, datamodule=FixedData(batch_size))


def _train(devices: int, batch_size: int, accumulation: int | None, tmp_path) -> tuple:
    """Initial weights and every rank's trained weights, in float64 without dropout."""
    task = PatchGDTask(_classifier(accumulation, dropout=0.0).double(), lr=1e-2, warmup_epochs=0)
    initial = _floats(task)
    tmp_path.mkdir(parents=True, exist_ok=True)
    _fit(
        task,
        devices,
        batch_size,
        precision="64-true",
        callbacks=[SaveWeights(tmp_path)],
        default_root_dir=tmp_path,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    return initial, ranks


def _floats(task: L.LightningModule) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in task.state_dict().items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path):
    """ε = ζ and full coverage: the step's gradient is exact whatever patches each process
    samples, so the two runs must agree."""
    initial, (single,) = _train(1, 4, None, tmp_path / "single")
    _, (rank0, rank1) = _train(2, 2, None, tmp_path / "ddp")
    assert single.keys() == rank0.keys()
    for key in single:
        # A wrong sync or a wrong split of the batch moves weights apart by about a step (1e-2).
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-10, atol=1e-12)
        assert torch.equal(rank0[key], rank1[key]), key
    moved = [k for k in single if not torch.allclose(single[k], initial[k])]
    assert len(moved) == len(single), "two optimizer steps should move every parameter"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ranks_stay_identical_when_gradients_accumulate_between_syncs(accumulation, tmp_path):
    """ε < ζ: inner iterations before a step run under no_sync; if their accumulated gradients
    were not all-reduced at the step, the processes' weights would drift apart."""
    initial, (rank0, rank1) = _train(2, 2, accumulation, tmp_path)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)


@pytest.mark.timeout(240)  # a deadlock fails here, not at the suite's 600 s
def test_a_ddp_run_with_the_default_callbacks_writes_its_run_folder(tmp_path, monkeypatch):
    """The run-folder callbacks read trainer.log_dir, which broadcasts: every rank must call it.
    The progress bar reads the epoch's metrics on rank 0 only, before the task's epoch-end hook:
    a metric that synchronised there would leave rank 0 waiting on a collective the others
    never join."""
    import json

    from lightning.pytorch.loggers import CSVLogger

    from patchgd.app.callbacks import RunSummary, TrainingCurves

    monkeypatch.chdir(tmp_path)
    _fit(
        PatchGDTask(_classifier(), warmup_epochs=0),
        2,
        2,
        logger=CSVLogger(tmp_path / "runs"),
        callbacks=[RunSummary(), TrainingCurves()],
        enable_progress_bar=True,
    )
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert json.loads((run / "summary.json").read_text())["fit"]["epochs"] == 1
    assert (run / "curves.png").exists()


class CountAllReduces(L.Callback):
    """Counts DDP's gradient all-reduces (one per bucket per synced backward) on each rank."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.calls = 0

        def counting_hook(state, bucket):
            self.calls += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting_hook)

    def on_train_end(self, trainer, pl_module) -> None:
        (self.path / f"calls{trainer.global_rank}.txt").write_text(str(self.calls))


def _count_all_reduces(accumulation: int | None, tmp_path) -> int:
    tmp_path.mkdir(parents=True, exist_ok=True)
    _fit(
        PatchGDTask(_classifier(accumulation), warmup_epochs=0),
        2,
        2,
        callbacks=[CountAllReduces(tmp_path)],
    )
    counts = {int((tmp_path / f"calls{r}.txt").read_text()) for r in range(2)}
    assert len(counts) == 1
    return counts.pop()


def test_gradients_are_all_reduced_once_per_optimizer_step_not_per_inner_iteration(tmp_path):
    """2 batches per rank, ζ = 4 inner iterations: ε = 4, 2, 1 make 1, 2, 4 optimizer steps per
    batch, and the all-reduces must scale with the steps (not stay at 4 per batch)."""
    per_step = {eps: _count_all_reduces(eps, tmp_path / str(eps)) for eps in (4, 2, 1)}
    buckets = per_step[4] // 2  # 2 batches × 1 step
    assert buckets >= 1 and per_step[4] == 2 * buckets
    assert per_step[2] == 4 * buckets and per_step[1] == 8 * buckets
