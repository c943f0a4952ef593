"""The Lightning training every stage shares: schedule, checkpoints, progress."""

import pytest
import torch

from helpers import make_config
from stagediff.training import warmup_cosine


def test_warmup_cosine_hand_values():
    f = warmup_cosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_checkpoint_dir_keeps_only_the_current_settings(in_tmp):
    from stagediff.training import checkpoint_dir

    first = checkpoint_dir("stage", {"lr": 1e-3})
    (first / "last.ckpt").write_text("x")
    assert checkpoint_dir("stage", {"lr": 1e-3}) == first and (first / "last.ckpt").is_file()  # same settings: resume
    other = checkpoint_dir("stage", {"lr": 2e-3})
    assert other != first and not first.exists()  # other settings: the old checkpoints are dropped


def test_data_fingerprint_follows_the_bytes_of_the_token_files(in_tmp):
    from stagediff.layout import tokens_file
    from stagediff.training import data_fingerprint

    tokens_file("base").parent.mkdir(parents=True)
    tokens_file("base").write_bytes(b"abc")
    before = data_fingerprint("base")
    tokens_file("base").write_bytes(b"abd")
    assert data_fingerprint("base") != before and set(before) == {"base"}


def test_one_progress_bar_counts_optimiser_steps(in_tmp, capsys):
    """A 7-step run draws one bar that ends at 7/7 (not Lightning's epoch bar)."""
    import lightning as L

    from stagediff.compute import trainer_kwargs
    from stagediff.training import StepProgress

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def training_step(self, batch, batch_idx):
            loss = (self.w * batch).sum() ** 2
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    progress = StepProgress("tiny: training", 7)
    trainer = L.Trainer(**trainer_kwargs(make_config().compute), max_steps=7, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[progress])
    trainer.fit(Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.ones(20, 2), batch_size=2))
    err = capsys.readouterr().err
    assert "tiny: training" in err and "7/7" in err and "Epoch" not in err
