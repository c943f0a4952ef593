"""Stage import@<role>: a copy of your file or checkpoint folder that DVC can track."""

import json

import pytest

from helpers import make_config, write_jsonl
from stagediff.errors import DataError
from stagediff.stages import inputs as inputs_stage


def _checkpoint(path, weights="model.safetensors"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (path / weights).write_bytes(b"w")
    for name in ("tokenizer.json", "chat_template.jinja", "training_args.bin", "notes.md"):
        (path / name).write_text("x")
    (path / "optimizer").mkdir()
    return path


def _cfg(inputs):
    return make_config({"pair.source": "checkpoints", "behaviour.source": "none", "backdoor.trigger_as_token": False,
                        "inputs": {k: str(v) for k, v in inputs.items()}, "steer.rankings": ["stagewise"]})


@pytest.fixture
def pair(in_tmp):
    ckpt = _checkpoint(in_tmp / "ckpt")
    return {"base_model": ckpt, "finetuned_model": ckpt, "base_data": write_jsonl(in_tmp / "b.jsonl", [{"text": "a"}]),
            "finetune_data": write_jsonl(in_tmp / "f.jsonl", [{"text": "b", "label": True}])}


def test_a_checkpoint_is_copied_without_pickles_or_subfolders(pair, in_tmp):
    inputs_stage.run(_cfg(pair), "base_model")
    copied = sorted(p.name for p in (in_tmp / "data/inputs/base_model/imported").iterdir())
    assert copied == ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"]


def test_a_data_file_is_copied_byte_for_byte(pair, in_tmp):
    inputs_stage.run(_cfg(pair), "finetune_data")
    assert (in_tmp / "data/inputs/finetune_data/imported").read_bytes() == pair["finetune_data"].read_bytes()


def test_pickle_only_checkpoint_and_empty_data_are_refused_and_nothing_is_written(pair, in_tmp):
    pair["finetuned_model"] = _checkpoint(in_tmp / "pickled", weights="pytorch_model.bin")
    with pytest.raises(DataError, match="pickle checkpoints are not loaded"):
        inputs_stage.run(_cfg(pair), "finetuned_model")
    pair["base_data"].write_text("  \n")
    with pytest.raises(DataError, match=r"inputs.base_data: .*b.jsonl is empty"):
        inputs_stage.run(_cfg(pair), "base_data")
    assert not (in_tmp / "data/inputs").exists()


def test_a_role_not_in_params_is_named(pair):
    with pytest.raises(DataError, match="inputs.control_model is not set"):
        inputs_stage.run(_cfg(pair), "control_model")
