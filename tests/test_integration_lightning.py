"""DropGrad returned from a LightningModule's configure_optimizers, with checkpoint resume."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

# A plain import, not importorskip: CI installs lightning, and a silent skip would hide
# a missing install step.
import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropgrad import DropGrad, LinearDropRateScheduler

EPOCHS = 4
RESUME_EPOCH = 2
BATCHES_PER_EPOCH = 4


class DropGradModule(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> Any:
        optimizer = DropGrad(
            torch.optim.Adam(self.parameters(), lr=1e-2),
            drop_rate_scheduler=LinearDropRateScheduler(0.1, 0.5, num_steps=12),
            full_update_drop=0.3,
        )
        # Built on the DropGrad itself: Lightning checks that each scheduler
        # belongs to an optimizer that configure_optimizers returned.
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8 * BATCHES_PER_EPOCH, 6, generator=generator)
    targets = torch.randn(8 * BATCHES_PER_EPOCH, 2, generator=generator)
    # No shuffling, so a resumed run sees the same batches as an uninterrupted one.
    return DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=False)


def _fit(
    module: DropGradModule, root: Path, callbacks: list[Any], ckpt_path: Path | None = None
) -> Any:
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        # Lightning suggests more DataLoader workers; irrelevant here.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # The resumed run deliberately saves no further checkpoints.
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer


def test_lightning_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    checkpoint_dir = tmp_path / "checkpoints"
    torch.manual_seed(0)
    uninterrupted = DropGradModule()
    saver = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1
    )
    trainer = _fit(uninterrupted, tmp_path / "full", [saver])
    full_opt = trainer.optimizers[0]
    assert isinstance(full_opt, DropGrad)
    assert full_opt.step_count == EPOCHS * BATCHES_PER_EPOCH
    assert 0 < full_opt.skipped_count < full_opt.step_count

    checkpoint = checkpoint_dir / f"epoch={RESUME_EPOCH - 1}.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]
    saved = saved["param_groups"][0]["dropgrad"]
    assert saved["step_count"] == RESUME_EPOCH * BATCHES_PER_EPOCH

    # Different torch seed: different initial weights and a different DropGrad
    # seed, all of which the checkpoint must overwrite.
    torch.manual_seed(12345)
    resumed = DropGradModule()
    trainer = _fit(resumed, tmp_path / "resumed", [], ckpt_path=checkpoint)
    resumed_opt = trainer.optimizers[0]
    assert isinstance(resumed_opt, DropGrad)

    for param, full_param in zip(resumed.parameters(), uninterrupted.parameters()):
        assert torch.equal(param, full_param)
    resumed_state = resumed_opt.state_dict()
    full_state = full_opt.state_dict()
    resumed_section = resumed_state["param_groups"][0]["dropgrad"]
    full_section = full_state["param_groups"][0]["dropgrad"]
    for key in ("seed", "step_count", "skipped_count", "schedulers", "drop_rate"):
        assert resumed_section[key] == full_section[key]
    assert resumed_opt.drop_rate == full_opt.drop_rate
    assert resumed_opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == EPOCHS
