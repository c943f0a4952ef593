"""Activation caches: one model's activations at the hook point on one data split, on
disk for the SAE stages (written by the `activations` stage, read by every later one).

A cache (`data/activations/<model>-<data>/`) holds sharded safetensors files of the kept
tokens' activations together with their token ids, backdoor labels, sample ids and
position in the split's token stream, a held-out evaluation set (whole context windows,
so the SAE can be spliced back into the model), and `manifest.json` with shapes, counts,
checksums and the normalisation constant (scale to sqrt(d_in) mean norm, as SAELens
does) that every stage reading the cache applies.

Windows start at sample starts (as in training), so a token's activation is the one the
model has with its whole sample in context; the tokens a window shares with the next
one are kept only in the next, so no token is cached twice. The same data split gets the
same windows for every model; rows of caches of different models are matched by
`stream_pos` (the outlier filter is per model, so row indices need not line up).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from stagediff.compute import autocast
from stagediff.config import Config
from stagediff.errors import DataError
from stagediff.io import dir_digest, file_digest, write_json
from stagediff.layout import DATA_SPLITS, MODEL_DIRS, tokens_file
from stagediff.models.windows import window_starts

MANIFEST = "manifest.json"
EVAL_FILE = "eval.safetensors"


# --- planning which tokens to cache --------------------------------------------------------

def plan_windows(sample_ids: torch.Tensor, n_ctx: int, eval_windows: int, max_tokens: int | None,
                 seed: int, split: str) -> dict[str, torch.Tensor]:
    """Window starts, the number of leading positions of each window that are its own
    (not repeated in the next window), and a seeded split into eval and train windows.

    The order depends only on the seed and the split's name, never on the model."""
    starts = window_starts(sample_ids, n_ctx)
    if len(starts) <= eval_windows:
        raise DataError(f"{tokens_file(split)}: {len(starts)} context windows of {n_ctx} tokens; "
                        f"activations.eval_windows ({eval_windows}) must leave some for training")
    own = torch.full((len(starts),), n_ctx, dtype=torch.long)
    own[:-1] = torch.clamp(starts[1:] - starts[:-1], max=n_ctx)
    gen = torch.Generator().manual_seed(seed * 7919 + DATA_SPLITS.index(split) + 1)
    order = torch.randperm(len(starts), generator=gen)
    eval_idx, train_idx = order[:eval_windows], order[eval_windows:]
    if max_tokens is not None:
        cumulative = torch.cumsum(own[train_idx], 0)
        n_keep = int(torch.searchsorted(cumulative, max_tokens)) + 1
        train_idx = train_idx[:n_keep]
    return {"starts": starts, "own": own, "train": train_idx, "eval": eval_idx}


def hook_layer(hook: str) -> int:
    return int(hook.split(".")[1])


@torch.no_grad()
def hook_activations(model, tokens: torch.Tensor, hook: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Activations at `hook` for a batch of windows (`attention_mask`: 0 on left padding);
    layers after the hook are not run."""
    layer = hook_layer(hook)
    padding = {} if attention_mask is None else {"attention_mask": attention_mask}
    if hook.endswith(".hook_resid_pre"):
        # The residual stream entering block L is what the model returns when stopped there.
        return model(tokens, stop_at_layer=layer, **padding).detach().float()
    captured: dict[str, torch.Tensor] = {}

    def grab(act, hook):  # noqa: ARG001 (TransformerLens passes the hook point)
        captured["act"] = act.detach()
        return act

    model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], stop_at_layer=layer + 1, **padding)
    return captured["act"].float()


def check_hook(model, hook: str, where: str) -> None:
    names = set(getattr(model, "hook_dict", {}))
    if hook not in names:
        sample = sorted(n for n in names if n.endswith("resid_pre"))[:4]
        raise DataError(f"{where}: the model has no hook {hook!r} (activations.hook); e.g. {sample}")


# --- writing --------------------------------------------------------------------------------

class _ShardWriter:
    """Buffers kept tokens and writes fixed-size shards, so memory does not grow with the data."""

    def __init__(self, out_dir: Path, shard_tokens: int, dtype: torch.dtype):
        self.out_dir, self.shard_tokens, self.dtype = out_dir, shard_tokens, dtype
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        for key, value in rows.items():
            self.buffer.setdefault(key, []).append(value)
        self.buffered += len(rows["acts"])
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> list[dict]:
        if self.buffered:
            self._write(self.buffered)
        return self.shards

    def _write(self, n: int) -> None:
        joined = {k: torch.cat(v) for k, v in self.buffer.items()}
        shard = {k: v[:n].contiguous() for k, v in joined.items()}
        shard["acts"] = shard["acts"].to(self.dtype)
        self.buffer = {k: [v[n:]] for k, v in joined.items()}
        self.buffered -= n
        name = f"train-{len(self.shards):05d}.safetensors"
        save_file(shard, str(self.out_dir / name))
        self.shards.append({"file": name, "n": n, "bytes": (self.out_dir / name).stat().st_size,
                            "sha256": file_digest(self.out_dir / name)})


def _window_rows(acts: torch.Tensor, keep: torch.Tensor, windows: torch.Tensor, stream: dict[str, torch.Tensor],
                 positions: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "acts": acts[keep],
        "tokens": windows[keep].to(torch.int32),
        "labels": stream["labels"][positions][keep],
        "sample_ids": stream["sample_ids"][positions][keep],
        "stream_pos": positions[keep].to(torch.int32),
    }


class _CacheBuilder:
    """Runs the model over one split's planned windows: the kept rows of each batch
    (own positions, not special tokens, norm under the outlier threshold fixed by the
    first batch), the shards of the training windows and the held-out set."""

    def __init__(self, model, tokenizer, stream: dict[str, torch.Tensor], cfg: Config, model_kind: str, data: str):
        self.model, self.stream, self.cfg = model, stream, cfg
        self.acfg, self.where = cfg.activations, f"{model_kind} model, {data} data"
        self.plan = plan_windows(stream["sample_ids"], cfg.model.n_ctx, self.acfg.eval_windows, self.acfg.max_tokens,
                                 cfg.seed, data)
        special = sorted(set(tokenizer.all_special_ids)) if self.acfg.exclude_special else []
        self.special = torch.tensor(special, dtype=torch.long)
        self.offsets = torch.arange(cfg.model.n_ctx)
        self.on = next(model.parameters()).device  # the forward runs there; everything after it on the CPU
        self.threshold: float | None = None
        self.stats = {"excluded_special": 0, "dropped_outliers": 0, "norm_sum": 0.0, "norm_max": 0.0, "n": 0,
                      "backdoor": 0}

    def batches(self, idx: torch.Tensor, desc: str):
        size = self.acfg.batch_size
        for b in tqdm(range(0, len(idx), size), desc=f"activations: {self.where}{desc}", unit="batch",
                      mininterval=1.0):
            yield idx[b : b + size]

    def process(self, win_idx: torch.Tensor):
        positions = self.plan["starts"][win_idx].unsqueeze(1) + self.offsets
        windows = self.stream["tokens"][positions].long()
        with autocast(self.cfg.compute, self.on):
            acts = hook_activations(self.model, windows.to(self.on), self.acfg.hook).float().cpu()
        if not torch.isfinite(acts).all():
            raise DataError(f"{self.where}: non-finite activations at {self.acfg.hook}")
        own = self.offsets < self.plan["own"][win_idx].unsqueeze(1)
        is_special = torch.isin(windows, self.special)
        candidates = own & ~is_special
        norms = acts.norm(dim=-1)
        if self.threshold is None:
            factor = self.acfg.outlier_factor
            self.threshold = factor * float(norms[candidates].median()) if factor is not None else math.inf
        keep = candidates & (norms <= self.threshold)
        self.stats["excluded_special"] += int((own & is_special).sum())
        self.stats["dropped_outliers"] += int((candidates & ~keep).sum())
        return acts, keep, windows, positions, norms

    def train_shards(self, writer: _ShardWriter) -> list[dict]:
        stats = self.stats
        for win_idx in self.batches(self.plan["train"], ""):
            acts, keep, windows, positions, norms = self.process(win_idx)
            kept_norms = norms[keep].double()
            stats["norm_sum"] += float(kept_norms.sum())
            stats["norm_max"] = max(stats["norm_max"], float(kept_norms.max()) if len(kept_norms) else 0.0)
            rows = _window_rows(acts, keep, windows, self.stream, positions)
            stats["n"] += len(rows["acts"])
            stats["backdoor"] += int((rows["labels"] > 0).sum())
            writer.add(rows)
        if stats["n"] == 0:
            raise DataError(f"{self.where}: no tokens left to cache after exclusions")
        return writer.close()

    def eval_set(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for win_idx in self.batches(self.plan["eval"], " (eval)"):
            acts, keep, windows, positions, _ = self.process(win_idx)
            rows = _window_rows(acts, keep, windows, self.stream, positions)
            rows.update({"windows": windows.to(torch.int32), "window_keep": keep.to(torch.uint8)})
            for key, value in rows.items():
                parts.setdefault(key, []).append(value)
        eval_set = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        eval_set["acts"] = eval_set["acts"].to(dtype)
        return eval_set


@torch.no_grad()
def build_cache(model, tokenizer, stream: dict[str, torch.Tensor], cfg: Config, model_kind: str, data: str,
                out_dir: Path, model_digest: str | None = None) -> dict:
    """Run `model` over the planned windows of one split and write the cache into `out_dir`
    (`model_digest`, of the model's directory, is recorded so a stale cache can be refused)."""
    acfg = cfg.activations
    dtype = getattr(torch, acfg.dtype)
    builder = _CacheBuilder(model, tokenizer, stream, cfg, model_kind, data)
    shards = builder.train_shards(_ShardWriter(out_dir, acfg.shard_tokens, dtype))
    eval_set = builder.eval_set(dtype)
    stats, threshold = builder.stats, builder.threshold
    meta = {"model": model_kind, "data": data, "hook": acfg.hook, "n_ctx": cfg.model.n_ctx,
            "activations": acfg.model_dump(), "model_digest": model_digest,
            "n_train_windows": int(len(builder.plan["train"])), "n_eval_windows": int(len(builder.plan["eval"])),
            "backdoor_tokens": stats["backdoor"], "excluded_special": stats["excluded_special"],
            "dropped_outliers": stats["dropped_outliers"],
            "outlier_threshold": threshold if math.isfinite(threshold) else None}
    return write_manifest(out_dir, shards, eval_set, stats["norm_sum"] / stats["n"], stats["norm_max"], meta, acfg.dtype)


def write_manifest(out_dir: Path, shards: list[dict], eval_set: dict[str, torch.Tensor], mean_norm: float,
                   max_norm: float, meta: dict, dtype: str) -> dict:
    """Save the eval set and write `manifest.json` (last, so a cache with a manifest is whole)."""
    save_file(eval_set, str(out_dir / EVAL_FILE))
    d_in = int(eval_set["acts"].shape[-1])
    manifest = {
        **meta, "d_in": d_in, "dtype": dtype,
        "n_tokens": sum(s["n"] for s in shards), "n_eval_tokens": int(len(eval_set["acts"])),
        "mean_norm": mean_norm, "max_norm": max_norm, "scaling_factor": math.sqrt(d_in) / mean_norm,
        "shards": shards,
        "eval": {"file": EVAL_FILE, "n": int(len(eval_set["acts"])), "bytes": (out_dir / EVAL_FILE).stat().st_size,
                 "sha256": file_digest(out_dir / EVAL_FILE)},
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def write_tensor_cache(out_dir: Path, acts: torch.Tensor, eval_acts: torch.Tensor, shard_tokens: int,
                       dtype: str = "float32", meta: dict | None = None) -> dict:
    """A cache from activations already in memory (synthetic data for tests and benchmarks);
    token ids and labels are zero, stream positions count rows (the held-out set after the rest)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, shard_tokens, getattr(torch, dtype))

    def rows(x: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        def zeros(dtype=torch.int32):
            return torch.zeros(len(x), dtype=dtype)

        return {"acts": x, "tokens": zeros(), "labels": zeros(torch.int8), "sample_ids": zeros(),
                "stream_pos": torch.arange(start, start + len(x), dtype=torch.int32)}

    for start in range(0, len(acts), shard_tokens):
        writer.add(rows(acts[start:start + shard_tokens], start))
    eval_set = rows(eval_acts, len(acts))
    eval_set["acts"] = eval_acts.to(getattr(torch, dtype))
    norms = acts.float().norm(dim=-1)
    info = {"model": "synthetic", "data": "synthetic", "hook": "synthetic", **(meta or {})}
    return write_manifest(out_dir, writer.close(), eval_set, float(norms.mean()), float(norms.max()), info, dtype)


# --- reading --------------------------------------------------------------------------------

class ActivationCache:
    """A cache written by `build_cache`, checked against its manifest when opened: every
    file present, of the recorded size and (with `verify`) of the recorded sha256."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{self.path}: no activation cache here (no {MANIFEST}); "
                            f"run the activations stage first (`dvc repro`)")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{manifest}: not valid JSON ({err})") from None
        for entry in self.manifest["shards"] + [self.manifest["eval"]]:
            self._check(entry, verify)

    def _check(self, entry: dict, verify: bool) -> None:
        file = self.path / entry["file"]
        if not file.is_file():
            raise DataError(f"{file}: shard missing from the activation cache; rerun its activations stage")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{file}: {size} bytes, the manifest records {entry['bytes']} (truncated or replaced); "
                            "rerun its activations stage")
        if verify and file_digest(file) != entry["sha256"]:
            raise DataError(f"{file}: checksum mismatch against {self.path / MANIFEST} (corrupted); "
                            "rerun its activations stage")

    @property
    def d_in(self) -> int:
        return self.manifest["d_in"]

    @property
    def hook(self) -> str:
        return self.manifest["hook"]

    @property
    def scaling_factor(self) -> float:
        return self.manifest["scaling_factor"]

    @property
    def shard_sizes(self) -> list[int]:
        return [s["n"] for s in self.manifest["shards"]]

    def _load(self, entry: dict) -> dict[str, torch.Tensor]:
        file = self.path / entry["file"]
        try:
            data = load_file(str(file))
        except Exception as err:  # safetensors raises its own error types
            raise DataError(f"{file}: unreadable activation shard ({err})") from None
        acts = data.get("acts")
        if acts is None or acts.shape != (entry["n"], self.d_in):
            raise DataError(f"{file}: expected acts of shape ({entry['n']}, {self.d_in}); "
                            f"got {None if acts is None else tuple(acts.shape)}")
        return data

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        return self._load(self.manifest["shards"][i])

    def eval_set(self) -> dict[str, torch.Tensor]:
        return self._load(self.manifest["eval"])


def check_cache_is_current(cache: ActivationCache, cfg: Config, model_kind: str) -> None:
    """Refuse a cache built with other activation settings or from another version of the
    model (possible when a stage is run by hand after a failed or changed activations run)."""
    stale = []
    if cache.manifest.get("activations") != cfg.activations.model_dump():
        stale.append(f"built with activations settings {cache.manifest.get('activations')}, params say "
                     f"{cfg.activations.model_dump()}")
    if cache.manifest.get("model_digest") != dir_digest(MODEL_DIRS[model_kind]):
        stale.append(f"built from another version of {MODEL_DIRS[model_kind]}")
    if stale:
        raise DataError(f"{cache.path}: stale activation cache ({'; '.join(stale)}); "
                        f"rerun `dvc repro activations@{model_kind}`")
