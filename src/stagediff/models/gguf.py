"""A GGUF checkpoint (llama.cpp's single-file format) as a Hugging Face checkpoint folder.

Quantised chat models are often published only as GGUF. The `import@<role>` stage turns
one into a plain float32 checkpoint the rest of the pipeline treats like any other:
transformers (with the `gguf` package) dequantises it, the weights are copied into a fresh
model of the same architecture (a GGUF-loaded model refuses `save_pretrained`), and the
folder gets safetensors, config, tokenizer and chat template. The copy's logits equal the
GGUF-loaded model's (tested on SmolLM2-135M-Instruct within 1e-4).
"""

from __future__ import annotations

from pathlib import Path

from stagediff.errors import DataError

GGUF_SUFFIX = ".gguf"
# `gguf`, `torch` and `transformers` are imported where a GGUF file is read: config
# validation imports this module (through `checkpoints`; `stagediff check` stays light),
# and most runs never read a GGUF.


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix == GGUF_SUFFIX and Path(path).is_file()


def gguf_shape(path: str | Path) -> dict:
    """The config keys `checkpoints.shape` reads, from the GGUF's metadata (no tensors read)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
        arch = fields["general.architecture"].contents()
        tokens = fields.get("tokenizer.ggml.tokens")
        return {"model_type": arch, "num_hidden_layers": int(fields[f"{arch}.block_count"].contents()),
                "hidden_size": int(fields[f"{arch}.embedding_length"].contents()),
                "vocab_size": len(tokens.data) if tokens is not None else None}
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable GGUF model file ({type(err).__name__}: {err})") from None


def load_gguf(path: str | Path):
    """(model, tokenizer) dequantised to float32 by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        folder, name = str(path.parent), path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        raise DataError(f"{path}: transformers cannot load this GGUF file ({err})") from None
    return model.eval(), tokenizer


def convert_gguf(path: str | Path, out_dir: str | Path) -> dict:
    """Write the GGUF model at `path` as a Hugging Face checkpoint into `out_dir`; returns
    what was written (architecture, layers, width, parameters)."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded, tokenizer = load_gguf(path)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # (the float32 copy is not quantised)
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out_dir = Path(out_dir)
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return {"architecture": type(plain).__name__, "n_layers": config.num_hidden_layers,
            "d_model": config.hidden_size, "n_params": sum(p.numel() for p in plain.parameters())}
