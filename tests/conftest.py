"""Fixtures the tests share (factories are in helpers.py)."""

from __future__ import annotations

import subprocess

import pytest

import stagediff  # noqa: F401  (offline / no-telemetry environment for every test)
from helpers import (
    GENERALITY,
    MICRO_ORGANISM,
    TEXTS,
    make_config,
    micro_params,
    project_copy,
    stagediff_env,
    with_changes,
)
from stagediff.data.tokens import EOT, load_tokenizer, train_bpe
from stagediff.models.lm import build_model


@pytest.fixture(scope="session")
def micro_runs(tmp_path_factory):
    """Two from-scratch `dvc repro`s of the micro config with the backdoored micro organism
    (tests/params_micro_organism.yaml), run side by side (the stages are
    mostly single-threaded imports, so two fit on two cores). The first serves every
    end-to-end test; the second exists to be compared with it (reproducibility).
    The first run records what every stage reads (`stagediff.audit`, into audit.jsonl); the
    second does not, so the byte-for-byte comparison also shows that recording changes nothing."""
    params = with_changes(micro_params(MICRO_ORGANISM), GENERALITY)
    roots = [project_copy(tmp_path_factory.mktemp(f"micro{i}"), params) for i in range(2)]
    procs = []
    for i, root in enumerate(roots):
        env = stagediff_env()
        if i == 0:
            env["STAGEDIFF_AUDIT"] = str(root / "audit.jsonl")
        with open(root / "repro.log", "w") as log:
            procs.append(subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT))
    for root, proc in zip(roots, procs):
        assert proc.wait() == 0, (root / "repro.log").read_text()[-4000:]
    return roots[0], roots[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory (stages read and write relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small BPE tokenizer trained on TEXTS (saved and reloaded, as the stage does)."""
    tok = train_bpe(TEXTS, make_config({"tokenizer.vocab_size": 400}))
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def model(tokenizer):
    """An untrained micro HookedTransformer with the tokenizer's vocabulary."""
    return build_model(make_config(), tokenizer)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizer):
    """A random 2-layer Llama saved as a local Hugging Face checkpoint (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=eot, eos_token_id=eot)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
