"""DropGrad passed to the Hugging Face Trainer, with a checkpoint and a resume, all offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dropgrad import DropGrad, LinearDropRateScheduler

# Set before transformers is imported: nothing may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# A plain import, not importorskip: CI installs transformers, and a silent skip would hide
# a missing install step.
import transformers  # noqa: E402

VOCAB = 100
SEQUENCE = 16
EXAMPLES = 32
BATCH = 4
MAX_STEPS = 12
SAVE_STEPS = 6


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences; the labels are the inputs (causal LM)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, VOCAB, (EXAMPLES, SEQUENCE), generator=generator)

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def _model(seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQUENCE,
        n_embd=32,
        n_layer=2,
        n_head=2,
        # No dropout: the resumed run must be comparable with the uninterrupted one.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _trainer(model: Any, output_dir: Path) -> Any:
    optimizer = DropGrad(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        drop_rate_scheduler=LinearDropRateScheduler(0.1, 0.4, num_steps=MAX_STEPS),
        full_update_drop=0.35,
    )
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=0.1, total_iters=MAX_STEPS
    )
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        optimizers=(optimizer, scheduler),
    )


def _dropgrad_of(trainer: Any) -> DropGrad:
    from accelerate.optimizer import AcceleratedOptimizer

    # Accelerate accepted the DropGrad as an Optimizer and wrapped it.
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, DropGrad)
    return optimizer


def test_hf_trainer_trains_saves_and_resumes(tmp_path: Path) -> None:
    full_model = _model(seed=0)
    full = _trainer(full_model, tmp_path / "full")
    full.train()
    full_opt = _dropgrad_of(full)
    assert full_opt.step_count == MAX_STEPS
    assert 0 < full_opt.skipped_count < MAX_STEPS

    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_STEPS}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    section = saved["param_groups"][0]["dropgrad"]
    assert section["step_count"] == SAVE_STEPS
    # On several GPUs the Trainer loads with map_location=<the rank's GPU>: DropGrad's
    # section holds no tensors, so wherever the tensors go it arrives unchanged.
    elsewhere = torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="meta")
    assert elsewhere["param_groups"][0]["dropgrad"] == section

    # Another seed for the fresh model and DropGrad: the checkpoint must overwrite both.
    resumed_model = _model(seed=1)
    resumed = _trainer(resumed_model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_opt = _dropgrad_of(resumed)

    assert resumed_opt.step_count == full_opt.step_count
    assert resumed_opt.skipped_count == full_opt.skipped_count
    assert resumed_opt.drop_rate == full_opt.drop_rate
    assert resumed_opt.seed == full_opt.seed
    assert resumed_opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]
    for (name, param), full_param in zip(resumed_model.named_parameters(), full_model.parameters()):
        assert torch.equal(param, full_param), name
