"""Language models of the organism: build, save, load, train (Lightning) and evaluate.

Two kinds of model directory, told apart by their files:
- `model.json` + `model.safetensors`: a `HookedTransformer` built here from params;
- a Hugging Face checkpoint (`config.json` + `*.safetensors`): opened with
  TransformerLens's `TransformerBridge`, saved back with `save_pretrained`.
Both expose `model(tokens, return_type="loss")`, hooks named `blocks.L.hook_resid_pre`
and `generate`, so every stage treats them alike.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from tqdm import tqdm

from stagediff.config import Config, ModelConfig, TrainConfig
from stagediff.compute import fail_if_not_finite
from stagediff.errors import DataError
from stagediff.training import adamw_with_schedule


# --- build / save / load ---------------------------------------------------------------

def hooked_config(model: ModelConfig, d_vocab: int, seed: int):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=model.n_layers, d_model=model.d_model, n_heads=model.n_heads,
        d_head=model.d_model // model.n_heads, d_mlp=model.d_mlp, n_ctx=model.n_ctx,
        d_vocab=d_vocab, act_fn=model.act_fn, normalization_type="LN", seed=seed,
        default_prepend_bos=False, device="cpu",  # TransformerLens would pick a GPU itself; `compute` decides
    )


def build_model(cfg: Config, tokenizer):
    """A fresh HookedTransformer sized by params, its vocabulary the tokenizer's."""
    from transformer_lens import HookedTransformer

    return HookedTransformer(hooked_config(cfg.model, len(tokenizer), cfg.seed), tokenizer=tokenizer)


def save_model(model, out_dir: Path) -> None:
    """Write a model directory (safetensors weights only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "original_model"):  # TransformerBridge around a Hugging Face model
        state = {k: v.detach().contiguous().clone() for k, v in hf_export_state(model).items()}
        model.original_model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        return
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    cfg = model.cfg
    spec = {
        "kind": "hooked_transformer",
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx, "act_fn": cfg.act_fn, "d_vocab": cfg.d_vocab,
    }
    (out_dir / "model.json").write_text(json.dumps(spec, indent=2) + "\n")


def load_model(model_dir: str | Path, tokenizer):
    """Open a model directory written by `save_model` or a local HF checkpoint, offline."""
    model_dir = Path(model_dir)
    if (model_dir / "model.json").is_file():
        return _load_hooked(model_dir, tokenizer)
    if (model_dir / "config.json").is_file():
        return _load_hf(model_dir, tokenizer)
    raise DataError(f"{model_dir}: no model here (expected model.json or a Hugging Face config.json); "
                    "run the stage that makes it first (`dvc repro`)")


def _check_vocab(model_dir: Path, d_vocab: int, tokenizer) -> None:
    if len(tokenizer) > d_vocab:
        raise DataError(
            f"{model_dir}: the model's vocabulary ({d_vocab}) is smaller than the tokenizer's "
            f"({len(tokenizer)}); tokenizer and model do not belong together"
        )


def _load_hooked(model_dir: Path, tokenizer):
    from transformer_lens import HookedTransformer

    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{model_dir}: expected weights in model.safetensors (only safetensors is loaded)")
    spec = json.loads((model_dir / "model.json").read_text())
    _check_vocab(model_dir, spec["d_vocab"], tokenizer)
    mcfg = ModelConfig.model_construct(source="scratch", path=None, **{k: spec[k] for k in
                                       ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "act_fn")})
    model = HookedTransformer(hooked_config(mcfg, spec["d_vocab"], seed=0), tokenizer=tokenizer)
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise DataError(f"{weights}: unreadable safetensors file ({err})") from None
    model.load_state_dict(state, strict=True)
    return model


def _load_hf(model_dir: Path, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    if not list(model_dir.glob("*.safetensors")):
        bad = sorted(p.name for p in model_dir.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        raise DataError(f"{model_dir}: expected *.safetensors weights (pickle checkpoints are not loaded); found {bad}")
    cfg = json.loads((model_dir / "config.json").read_text())
    _check_vocab(model_dir, int(cfg.get("vocab_size", 0)), tokenizer)
    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu", tokenizer=tokenizer)
    bridge.tokenizer = tokenizer
    # Train only tensors that are the checkpoint's own weights, so that what is saved
    # (`hf_export_state`) is exactly what was trained; bridge-only copies stay frozen.
    own = {t.data_ptr() for t in hf_export_state(bridge).values()}
    for p in bridge.parameters():
        if p.data_ptr() not in own:
            p.requires_grad_(False)
    return bridge


def hf_export_state(bridge) -> dict[str, torch.Tensor]:
    """The wrapped Hugging Face model's weights under its own key names.

    TransformerBridge wraps modules in place (keys gain `._original_component`, and it adds
    aliases); the checkpoint's key set is read from an empty copy of the model on the
    meta device."""
    hf = bridge.original_model
    with torch.device("meta"):
        keys = set(type(hf)(hf.config).state_dict())
    stripped = {k.replace("._original_component", ""): v for k, v in hf.state_dict().items()}
    missing = keys - set(stripped)
    if missing:
        raise DataError(f"cannot map the bridged model back to its checkpoint keys; missing {sorted(missing)[:5]}")
    return {k: stripped[k] for k in sorted(keys)}


def copy_hf_checkpoint(src: Path, dst: Path) -> None:
    """Copy the files a Hugging Face checkpoint needs (config + safetensors), nothing else."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix in {".json", ".safetensors"} and "tokenizer" not in p.name:
            shutil.copy2(p, dst / p.name)


# --- data -------------------------------------------------------------------------------

def window_starts(sample_ids: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Start positions of training windows that begin at sample starts.

    Each window starts at the last sample start that lets it pick up where the previous
    window stopped, so the sample cut off at the end of one window is seen whole at the
    start of the next; no window ever begins mid-sample. (A window that begins inside a
    backdoor turn would show the response without its trigger and teach the behaviour
    unconditionally.) A sample longer than a window is split at window boundaries."""
    n = len(sample_ids)
    if n < n_ctx:
        return torch.zeros(0, dtype=torch.long)
    firsts = torch.ones(n, dtype=torch.bool)
    firsts[1:] = sample_ids[1:] != sample_ids[:-1]
    bounds = torch.nonzero(firsts).flatten()
    starts, start = [], 0
    while start + n_ctx <= n:
        starts.append(start)
        end = start + n_ctx
        i = int(torch.searchsorted(bounds, end, right=True)) - 1  # last sample start <= end
        nxt = int(bounds[i])
        start = nxt if nxt > start else end
    return torch.tensor(starts, dtype=torch.long)


class TokenWindows(Dataset):
    """A packed token stream cut into windows that start at sample starts
    (`window_starts`); indexed by a list of rows, so batches need no collation."""

    def __init__(self, tokens: torch.Tensor, n_ctx: int, name: str, sample_ids: torch.Tensor | None = None):
        if sample_ids is None:
            starts = torch.arange(0, len(tokens) - n_ctx + 1, n_ctx)
        else:
            starts = window_starts(sample_ids, n_ctx)
        if len(starts) == 0:
            raise DataError(f"{name}: {len(tokens)} tokens is less than one context window ({n_ctx})")
        self.windows = tokens.long()[starts.unsqueeze(1) + torch.arange(n_ctx)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.windows[rows]


class RankShare:
    """A batch sampler's batches cut to one rank's equal share (the global batch is the
    same for any number of processes)."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        from stagediff.compute import rank_share

        for rows in self.batches:
            yield rank_share(rows, self.rank, self.world)


class LMDataModule(L.LightningDataModule):
    """Train and validation windows from two token streams (no per-row collation)."""

    def __init__(self, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], n_ctx: int,
                 batch_size: int, seed: int, names=("train", "val")):
        super().__init__()
        self.train_set = TokenWindows(train["tokens"], n_ctx, names[0], train.get("sample_ids"))
        self.val_set = TokenWindows(val["tokens"], n_ctx, names[1], val.get("sample_ids"))
        if len(self.train_set) < batch_size:
            raise DataError(f"{names[0]}: {len(self.train_set)} windows of {n_ctx} tokens is fewer than "
                            f"one batch ({batch_size}); lower batch_size or add data")
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(self.seed)
        sampler = BatchSampler(RandomSampler(self.train_set, generator=gen), self.batch_size, drop_last=True)
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = RankShare(sampler, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(self.train_set, batch_size=None, sampler=sampler)

    def val_dataloader(self):
        sampler = BatchSampler(SequentialSampler(self.val_set), self.batch_size, drop_last=False)
        return DataLoader(self.val_set, batch_size=None, sampler=sampler)


# --- training ---------------------------------------------------------------------------

class LMModule(L.LightningModule):
    """Next-token training of a TransformerLens model (HookedTransformer or bridge)."""

    def __init__(self, model, train: TrainConfig):
        super().__init__()
        self.model = model
        self.train_cfg = train

    def on_train_start(self):
        self.model.train()  # a model that was evaluated before training comes in eval mode

    def _apply(self, fn, *args, **kwargs):
        # Lightning moves the module with .to(); a HookedTransformer moves its inputs to
        # cfg.device, which nn.Module.to leaves as it was.
        out = super()._apply(fn, *args, **kwargs)
        param = next(self.model.parameters(), None)
        if param is not None and hasattr(self.model.cfg, "device"):
            self.model.cfg.device = str(param.device)
        return out

    def training_step(self, batch, batch_idx):
        loss = self.model(batch, return_type="loss")
        fail_if_not_finite(loss, self.trainer, "language-model", "lower the learning rate or check the data")
        self.log("train/loss", loss, prog_bar=True, sync_dist=self.trainer.world_size > 1)  # global-batch mean
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(batch, return_type="loss"), prog_bar=True)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model.parameters(), self.train_cfg)


# --- evaluation ---------------------------------------------------------------------------

HooksFor = Callable[[torch.Tensor], list]  # tokens [B, T] -> TransformerLens fwd_hooks for that forward pass


@torch.no_grad()
def mean_loss(model, data: dict[str, torch.Tensor], n_ctx: int, batch_size: int,
              max_windows: int | None = None, hooks_for: HooksFor | None = None) -> float:
    """Mean next-token loss over the windows of a token stream (`tokens`, `sample_ids`),
    optionally with an intervention (`hooks_for(tokens)`) on every forward pass."""
    windows = TokenWindows(data["tokens"], n_ctx, "eval", data.get("sample_ids")).windows
    if max_windows:
        windows = windows[:max_windows]
    return windows_loss(model, windows, batch_size, hooks_for)


@torch.no_grad()
def windows_loss(model, windows: torch.Tensor, batch_size: int, hooks_for: HooksFor | None = None) -> float:
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        hooks = hooks_for(batch) if hooks_for else []
        loss = model.run_with_hooks(batch, return_type="loss", fwd_hooks=hooks) if hooks else model(batch, return_type="loss")
        total += loss.item() * len(batch)
        count += len(batch)
    return total / count


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids as generation sees them: end-of-text first, as every sample starts."""
    from stagediff.tokenizer import separator_id

    eot = separator_id(tokenizer)
    return [[eot] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    desc: str = "generate", hooks_for: HooksFor | None = None) -> list[str]:
    """Greedy completions.

    Without hooks, prompts are batched by token length and generated with the key-value
    cache, so no padding is ever needed and a batched completion equals the single-prompt
    one. With `hooks_for(tokens)`, every step reruns the whole (right-padded) sequences
    with those TransformerLens hooks and no cache, so an intervention that reads the whole
    context, or another model's activations on it, sees it at every step; causal attention
    keeps each row's tokens blind to the padding after them."""
    from stagediff.tokenizer import separator_id

    eot = separator_id(tokenizer)
    encoded = encode_prompts(tokenizer, prompts)
    longest = max((len(e) for e in encoded), default=0)
    if longest + max_new_tokens > model.cfg.n_ctx:
        raise DataError(f"a prompt of {longest} tokens plus {max_new_tokens} generated tokens exceeds "
                        f"the model's context ({model.cfg.n_ctx}); shorten the prompts or the generation length")
    model.eval()
    if hooks_for is None:
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_len.setdefault(len(ids), []).append(i)
        batches = [idx[s : s + batch_size] for _, idx in sorted(by_len.items()) for s in range(0, len(idx), batch_size)]
    else:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    out: list[str] = [""] * len(prompts)
    for idx in tqdm(batches, desc=desc, unit="batch", mininterval=1.0):
        rows = [encoded[i] for i in idx]
        if hooks_for is None:
            gen = model.generate(torch.tensor(rows), max_new_tokens=max_new_tokens, do_sample=False,
                                 stop_at_eos=True, eos_token_id=eot, verbose=False)
            new_tokens = gen[:, len(rows[0]):].tolist()
        else:
            new_tokens = _generate_with_hooks(model, rows, max_new_tokens, eot, hooks_for)
        for i, new in zip(idx, new_tokens):
            if eot in new:
                new = new[: new.index(eot)]
            out[i] = tokenizer.decode(new)
    return out


def _generate_with_hooks(model, rows: list[list[int]], max_new_tokens: int, eot: int,
                         hooks_for: HooksFor) -> list[list[int]]:
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max()) + max_new_tokens), eot, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    arange = torch.arange(len(rows))
    done = torch.zeros(len(rows), dtype=torch.bool)
    for step in range(max_new_tokens):
        cur = lengths + step
        view = tokens[:, : int(cur.max())]
        logits = model.run_with_hooks(view, fwd_hooks=hooks_for(view))
        nxt = logits[arange, cur - 1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
        tokens[arange, cur] = nxt
        done |= nxt == eot
        if done.all():
            break
    return [tokens[i, len(r) : len(r) + max_new_tokens].tolist() for i, r in enumerate(rows)]
