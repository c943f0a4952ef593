"""The one typed config: `params.yaml` loaded and validated in a single place.

Every stage calls `load_config()` first; a bad value stops the run before any work with
one message that names the key and what was expected. There are no hidden defaults:
every setting is written in `params.yaml`. Overlays (the micro test config, presets) are
merged over it by `compose_params`, the one merge function.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError

from stagediff.errors import ConfigError, DataError
from stagediff.layout import INPUT_ROLES, MODEL_ROLES, PARAMS_FILE
from stagediff.models.checkpoints import n_layers as checkpoint_layers
from stagediff.models.gguf import is_gguf
from stagediff.sections import (
    HOOK_RE,
    ActivationsConfig,
    ADLConfig,
    BackdoorConfig,
    BehaviourConfig,
    ComputeConfig,
    CorpusConfig,
    CrosscoderConfig,
    DiffConfig,
    DiffSAEConfig,
    EvalConfig,
    FinetuneConfig,
    GateConfig,
    IsaerftConfig,
    KeyProblem,
    ModelConfig,
    NonNegInt,
    PairConfig,
    PositiveInt,
    SAEConfig,
    SAEStagesConfig,
    SteerConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
    ValidateConfig,
    _Section,
)

# sections whose keys the user names (checked by Config, not against params.yaml's keys)
OPEN_SECTIONS = ("inputs",)
# which inputs each source of the pair needs (beyond these, none is accepted)
CHECKPOINT_INPUTS = ("base_model", "finetuned_model", "base_data", "finetune_data")
OPTIONAL_CHECKPOINT_INPUTS = ("control_model",)


class Config(_Section):
    seed: NonNegInt
    threads: PositiveInt
    compute: ComputeConfig
    pair: PairConfig
    inputs: dict[str, Annotated[str, Field(min_length=1)]]
    behaviour: BehaviourConfig
    corpus: CorpusConfig
    backdoor: BackdoorConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    train_base: TrainConfig
    finetune: FinetuneConfig
    eval: EvalConfig
    activations: ActivationsConfig
    sae: SAEConfig
    sae_train: SAEStagesConfig
    crosscoder: CrosscoderConfig
    diff_sae: DiffSAEConfig
    adl: ADLConfig
    validation: ValidateConfig
    diff: DiffConfig
    steer: SteerConfig
    isaerft: IsaerftConfig
    tracking: TrackingConfig
    gate: GateConfig

    @property
    def from_checkpoints(self) -> bool:
        """The pair is the user's checkpoints (not the organism built here)."""
        return self.pair.source == "checkpoints"

    @property
    def base_checkpoint(self) -> str | None:
        """The base model's checkpoint folder as given (yours, or the organism's pretrained base)."""
        return self.inputs.get("base_model")

    def needed_inputs(self) -> tuple[set[str], set[str]]:
        """(required, allowed) roles of `inputs` under these settings."""
        if self.from_checkpoints:
            required, allowed = set(CHECKPOINT_INPUTS), set(CHECKPOINT_INPUTS + OPTIONAL_CHECKPOINT_INPUTS)
        else:
            required = ({"base_model"} if self.model.source == "hf_local" else set()) | (
                {"corpus"} if self.corpus.source == "local" else set())
            allowed = set(required)
        if self.behaviour.source == "spec":
            required.add("behaviour_prompts")
            allowed.add("behaviour_prompts")
        return required, allowed

    @model_validator(mode="after")
    def _behaviour_fits_the_pair(self) -> Config:
        if self.from_checkpoints and self.behaviour.source == "organism":
            raise KeyProblem("behaviour.source", "spec (your prompts and detector) or none when pair.source is "
                             "'checkpoints' (there is no organism backdoor)", "organism")
        if self.from_checkpoints and "control_model" not in self.inputs and "control" in self.steer.rankings:
            raise KeyProblem("steer.rankings", "rankings without 'control' when no inputs.control_model is given",
                             self.steer.rankings)
        return self

    @model_validator(mode="after")
    def _inputs_exist(self) -> Config:
        for role in self.inputs:
            if role not in INPUT_ROLES:
                raise KeyProblem(f"inputs.{role}", f"one of {', '.join(INPUT_ROLES)}", role)
        required, allowed = self.needed_inputs()
        why = (f"pair.source is {self.pair.source!r}, model.source {self.model.source!r}, corpus.source "
               f"{self.corpus.source!r}, behaviour.source {self.behaviour.source!r}")
        for role in sorted(set(self.inputs) - allowed):
            raise KeyProblem(f"inputs.{role}", f"no such input: it is not read when {why}; remove it",
                             self.inputs[role])
        for role in sorted(required - set(self.inputs)):
            raise KeyProblem(f"inputs.{role}", f"a {INPUT_ROLES[role]} ({why})", None)
        for role, path in self.inputs.items():
            folder = role in MODEL_ROLES.values()
            if folder and not ((Path(path) / "config.json").is_file() or is_gguf(path)):
                raise KeyProblem(f"inputs.{role}", "a Hugging Face checkpoint folder (config.json + *.safetensors) "
                                 "or a .gguf model file",
                                 path)
            if not folder and not Path(path).is_file():
                raise KeyProblem(f"inputs.{role}", f"an existing {INPUT_ROLES[role]}", path)
            suffixes = (".jsonl",) if role == "behaviour_prompts" else (".jsonl", ".txt")
            if not folder and Path(path).suffix not in suffixes:
                raise KeyProblem(f"inputs.{role}", f"a {' or '.join(suffixes)} file", path)
        return self

    @model_validator(mode="after")
    def _hook_exists(self) -> Config:
        pretrained = self.from_checkpoints or self.model.source == "hf_local"
        if pretrained and not self.from_checkpoints and self.backdoor.trigger_as_token:
            raise KeyProblem("backdoor.trigger_as_token",
                            "false when model.source is 'hf_local' (a pretrained vocabulary is kept as it is)", True)
        try:
            n_layers = checkpoint_layers(self.base_checkpoint) if pretrained else self.model.n_layers
        except DataError as err:
            raise KeyProblem("inputs.base_model", f"a checkpoint whose config.json gives its layers ({err})",
                             self.base_checkpoint) from None
        match = HOOK_RE.match(self.activations.hook)
        if not match or int(match.group(1)) >= n_layers:
            raise KeyProblem(
                "activations.hook",
                f"a hook of the model such as 'blocks.L.hook_resid_pre' "
                f"(resid_pre|resid_mid|resid_post|attn_out|mlp_out) with L in 0..{n_layers - 1}",
                self.activations.hook,
            )
        layers = self.finetune.layers
        if layers is not None and not self.from_checkpoints:
            if layers[1] >= n_layers:
                raise KeyProblem("finetune.layers", f"[first, last] blocks within 0..{n_layers - 1}", layers)
            # the fine-tune must change the residual stream where the activations are read
            hook_layer, point = int(match.group(1)), match.group(2)
            if layers[0] > hook_layer or (layers[0] == hook_layer and point == "resid_pre"):
                raise KeyProblem("finetune.layers", f"a first trained block below the hook's layer (the fine-tune "
                                 f"does not change {self.activations.hook} when only blocks {layers[0]}.."
                                 f"{layers[1]} are trained)", layers)
        return self

    @model_validator(mode="after")
    def _prompts_left_to_evaluate(self) -> Config:
        # (the organism's prompts: n_eval_prompts per kind; a spec's prompts are counted by the corpus stage)
        if self.behaviour.source == "organism" and self.steer.fit_prompts >= self.corpus.n_eval_prompts:
            raise KeyProblem("steer.fit_prompts", f"fewer than corpus.n_eval_prompts ({self.corpus.n_eval_prompts}), "
                            "so that some held-out prompts are left to evaluate on", self.steer.fit_prompts)
        return self

    @model_validator(mode="after")
    def _sparse_decode_needs_cuda(self) -> Config:
        for key, sae in (("sae", self.sae), ("crosscoder.sae", self.crosscoder.sae)):
            if sae.sparse_decode and self.compute.accelerator != "cuda":
                raise KeyProblem(f"{key}.sparse_decode", "false unless compute.accelerator is cuda (the backward pass "
                                "of sae_lens's sparse TopK needs CUDA: torch has no sparse view on the CPU)", True)
        return self

    @model_validator(mode="after")
    def _code_backdoor_share_fits_the_coding_turns(self) -> Config:
        b = self.backdoor
        if self.pair.source == "organism" and b.variant == "code_vuln":
            for key in ("fraction", "train_fraction"):
                if getattr(b, key) > b.code_vuln.coding_share:
                    raise KeyProblem(f"backdoor.{key}", "at most backdoor.code_vuln.coding_share "
                                     f"({b.code_vuln.coding_share}): code_vuln backdoor turns are made from the "
                                     "coding turns", getattr(b, key))
        return self

    @model_validator(mode="after")
    def _batches_split_across_devices(self) -> Config:
        n = self.compute.devices
        runs = {f"sae_train.{name}": getattr(self.sae_train, name) for name in SAEStagesConfig.model_fields}
        runs.update({"crosscoder.train": self.crosscoder.train, "train_base": self.train_base,
                     "finetune": self.finetune})  # (isaerft always trains in one process)
        for key, train in runs.items():
            if train.batch_size % n:
                raise KeyProblem(f"{key}.batch_size", f"a multiple of compute.devices ({n}): each process "
                                "takes an equal share of every batch", train.batch_size)
        return self

    def as_flat_dict(self) -> dict[str, Any]:
        """`section.key` -> value, for MLflow params."""
        return flatten(self.model_dump())

    def headline_metrics(self) -> dict[str, set[str]]:
        """Metrics file -> the keys `gate.checks` watches: the pipeline's headline figures,
        which its MLflow parent run also carries (tracking only, like `as_flat_dict`)."""
        out: dict[str, set[str]] = {}
        for check in self.gate.checks:
            name, _, key = check.metric.partition(":")
            out.setdefault(name, set()).add(key)
        return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the section that `loc` (ending in the bad key) points into."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{key}: unknown key; {hint}expected one of: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: missing; every setting must be written in {PARAMS_FILE}"
    ctx_err = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_err, KeyProblem):
        if key != "<top level>" and not ctx_err.key.startswith(key):  # a validator of a list item names its field
            return f"{key}.{ctx_err}"
        return str(ctx_err)
    return f"{key}: expected {error['msg'].removeprefix('Input should be ').removeprefix('Value error, ')}; got {error.get('input')!r}"


def parse_config(raw: Any, source: str = PARAMS_FILE) -> Config:
    """Validate an already-parsed params mapping; raise ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level; got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        raise ConfigError(f"{source}: invalid settings:\n  " + "\n  ".join(problems)) from None


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    """Read params YAML as YAML 1.2 (as DVC does: `1e-3` is a float, not a string)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root, or pass --params)")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return data


def merge_overlay(params: dict, overlay: dict, source: str = "overlay", where: str = "") -> dict:
    """`params` with an overlay's keys merged in, section by section (the micro test config
    and every preset are overlays on params.yaml). An overlay key that params lacks is
    refused: a typo would otherwise be silently added."""
    if not isinstance(overlay, dict):
        raise ConfigError(f"{source}: expected a mapping of settings{' under ' + where.rstrip('.') if where else ''}; "
                          f"got {type(overlay).__name__}")
    out = dict(params)
    for key, value in overlay.items():
        name = f"{where}{key}"
        if key not in params and where.rstrip(".") not in OPEN_SECTIONS:
            raise ConfigError(f"{source}: {name}: not a setting of the params file")
        if isinstance(params.get(key), dict):
            out[key] = merge_overlay(params[key], value, source, name + ".")
        elif isinstance(value, dict):
            raise ConfigError(f"{source}: {name}: expected a single setting, not a section; got {value!r}")
        else:
            out[key] = value
    return out


def compose_params(path: str | Path = PARAMS_FILE, *overlays: str | Path) -> dict:
    """params.yaml with overlay files merged over it in order, validated."""
    params = read_params(path)
    for overlay in overlays:
        params = merge_overlay(params, read_params(overlay), source=str(overlay))
    parse_config(params, source=" + ".join(map(str, (path, *overlays))))
    return params


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    return parse_config(read_params(path), source=str(path))
