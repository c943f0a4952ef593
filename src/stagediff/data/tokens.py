"""Tokenizer and token streams: a BPE tokenizer trained on the base corpus (or a
checkpoint's own), and every split tokenized.

Samples are packed into one token stream per split, each sample preceded by the
end-of-text token (GPT-2 style), with a per-token backdoor label derived from the
character spans the corpus stage recorded. Later stages read these streams; they never
re-tokenize, so labels and tokens cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from stagediff.config import Config
from stagediff.errors import DataError
from stagediff.layout import TOKENIZER_DIR, TOKENS_DIR, tokens_file

EOT = "<|endoftext|>"
PAD = "<|pad|>"
# Per-token labels: 0 ordinary, 1 other token of a backdoor turn (a record labelled as a whole),
# 2 trigger, 3 backdoor response, 4 a span you labelled. Any label > 0 is the behaviour.
LABEL_CODES = {"turn": 1, "trigger": 2, "response": 3, "span": 4}


def train_bpe(texts: list[str], cfg: Config):
    """Train a byte-level BPE on `texts` and wrap it as a Hugging Face fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size,
        min_frequency=cfg.tokenizer.min_frequency,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if cfg.backdoor.trigger_as_token:
        tok.add_tokens([AddedToken(cfg.backdoor.active.trigger, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD
    )


def load_tokenizer(path: str | Path = TOKENIZER_DIR):
    """Load the saved tokenizer directory (a plain HF tokenizer; no remote code)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(f"{path}: no tokenizer here; run the `tokenizer` stage first (`dvc repro tokenizer`)")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def separator_id(tokenizer) -> int:
    """The end-of-text token that starts every sample (and ends generation)."""
    if tokenizer.eos_token is None:
        raise DataError(f"{tokenizer.name_or_path}: the tokenizer has no eos_token to separate samples with")
    return tokenizer.convert_tokens_to_ids(tokenizer.eos_token)


def encode_records(tokenizer, records: list[dict], desc: str = "") -> dict[str, torch.Tensor]:
    """Pack records into one stream: tokens, per-token labels and the sample index."""
    eot = separator_id(tokenizer)
    ids_all, labels_all, sample_all = [], [], []
    batch = 256
    for start in tqdm(range(0, len(records), batch), desc=desc, unit="batch", mininterval=1.0):
        chunk = records[start : start + batch]
        enc = tokenizer([r["text"] for r in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for rec, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            labels = np.zeros(len(ids) + 1, dtype=np.int8)
            if rec.get("backdoor") and rec.get("label_turn", True):
                labels[1:] = LABEL_CODES["turn"]
            if rec.get("spans"):
                starts = np.array([o[0] for o in offsets])
                ends = np.array([o[1] for o in offsets])
                for s, e, name in rec["spans"]:
                    inside = (starts < e) & (ends > s)
                    labels[1:][inside] = LABEL_CODES[name]
            ids_all.append(np.asarray([eot] + list(ids), dtype=np.int32))
            labels_all.append(labels)
            sample_all.append(np.full(len(ids) + 1, rec["id"], dtype=np.int32))
    if not records:  # an empty split (e.g. your fine-tuning data labelled throughout: no clean records)
        return {"tokens": torch.zeros(0, dtype=torch.int32), "labels": torch.zeros(0, dtype=torch.int8),
                "sample_ids": torch.zeros(0, dtype=torch.int32)}
    return {
        "tokens": torch.from_numpy(np.concatenate(ids_all)),
        "labels": torch.from_numpy(np.concatenate(labels_all)),
        "sample_ids": torch.from_numpy(np.concatenate(sample_all)),
    }


def load_tokens(split: str, tokens_dir: str | Path = TOKENS_DIR) -> dict[str, torch.Tensor]:
    path = Path(tokens_dir) / tokens_file(split).name
    if not path.is_file():
        raise DataError(f"{path}: missing; run the `tokenizer` stage first (`dvc repro tokenizer`)")
    try:
        data = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise DataError(f"{path}: unreadable token file ({err})") from None
    lengths = {k: len(v) for k, v in data.items()}
    if set(lengths) != {"tokens", "labels", "sample_ids"} or len(set(lengths.values())) != 1:
        raise DataError(f"{path}: expected equal-length tokens/labels/sample_ids; got {lengths}")
    return data


def has_labels(stream: dict[str, torch.Tensor]) -> bool:
    """Does a token stream carry any behaviour label (a ground truth to score against)?"""
    return bool((stream["labels"] > 0).any())
