"""Stage `tokenizer`: train the BPE tokenizer on the base corpus (or take the base
checkpoint's) and write every split as a packed token stream with per-token labels.

With your own checkpoints it first refuses a pair that cannot be compared (architecture,
depth, width, vocabulary or tokenizer differ), before any model is loaded."""

from __future__ import annotations

from safetensors.torch import save_file

from stagediff.config import Config
from stagediff.data.corpus import read_records
from stagediff.data.tokens import encode_records, load_tokenizer, train_bpe
from stagediff.io import atomic_dir, write_json
from stagediff.layout import CORPUS_SPLITS, MODEL_ROLES, TOKENIZER_DIR, TOKENS_DIR, corpus_file, input_path, tokens_file
from stagediff.models.checkpoints import check_pair
from stagediff.tracking import stage_run


def run(cfg: Config) -> dict:
    with stage_run(cfg, "tokenizer") as tracker:
        stats = _build(cfg)
        tracker.write_metrics(stats)
    return stats


def _build(cfg: Config) -> dict:
    records = {split: read_records(corpus_file(split)) for split in CORPUS_SPLITS}
    stats: dict = {}
    if cfg.from_checkpoints:
        shape = check_pair({role: input_path(role) for role in MODEL_ROLES.values() if role in cfg.inputs})
        stats.update({k: v for k, v in shape.items() if k != "architectures"})
    if cfg.base_checkpoint:
        tokenizer = load_tokenizer(input_path("base_model"))
    else:
        tokenizer = train_bpe([r["text"] for r in records["base"]], cfg)
    stats["vocab_size"] = len(tokenizer)
    with atomic_dir(TOKENIZER_DIR) as tok_tmp:
        tokenizer.save_pretrained(str(tok_tmp))
        # Load back from disk: TransformerLens needs a tokenizer that has a name_or_path.
        tokenizer = load_tokenizer(tok_tmp)
        if not cfg.from_checkpoints:
            trigger_ids = tokenizer(cfg.backdoor.active.trigger, add_special_tokens=False)["input_ids"]
            stats["trigger_tokens"] = len(trigger_ids)
        with atomic_dir(TOKENS_DIR) as tmp:
            for split in CORPUS_SPLITS:
                data = encode_records(tokenizer, records[split], desc=f"tokenizer: {split}")
                save_file(data, str(tmp / tokens_file(split).name))
                stats[f"{split}_tokens"] = int(len(data["tokens"]))
                stats[f"{split}_backdoor_tokens"] = int((data["labels"] > 0).sum())
            write_json(tmp / "stats.json", stats)
    return stats
