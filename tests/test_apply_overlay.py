"""scripts/apply_overlay.py: the README's recipe merges an overlay into params.yaml, keeping
its comments, and refuses a bad overlay without touching the file."""

import shutil

import apply_overlay  # scripts/ (pytest's pythonpath)
from helpers import ROOT, write_jsonl
from stagediff.config import load_config


def test_an_overlay_is_merged_with_comments_kept(tmp_path):
    params = shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    data = write_jsonl(tmp_path / "corpus.jsonl", [{"human": "q", "assistant": "a"}])
    (tmp_path / "mine.yaml").write_text(f"corpus: {{source: local}}\ninputs: {{corpus: {data}}}\n"
                                        "backdoor: {train_fraction: 0.2}\n")
    assert apply_overlay.main([str(tmp_path / "mine.yaml"), "--params", str(params)]) == 0
    cfg = load_config(params)
    assert cfg.corpus.source == "local" and cfg.inputs == {"corpus": str(data)} and cfg.backdoor.train_fraction == 0.2
    assert cfg.backdoor.fraction == 0.01  # untouched keys stay
    text = params.read_text()
    assert "# stagediff settings: the single source of every setting" in text and "(the paper's 1%)" in text


def test_a_bad_overlay_is_refused_and_params_is_left_as_it_was(tmp_path, capsys):
    params = shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = params.read_bytes()
    (tmp_path / "bad.yaml").write_text("pair: {sorce: checkpoints}\n")
    assert apply_overlay.main([str(tmp_path / "bad.yaml"), "--params", str(params)]) == 2
    assert "pair.sorce: not a setting of the params file" in capsys.readouterr().err
    assert params.read_bytes() == before


def test_an_empty_section_in_an_overlay_changes_nothing(tmp_path):
    params = shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "empty.yaml").write_text("behaviour: {}\ninputs: {}\n")
    assert apply_overlay.main([str(tmp_path / "empty.yaml"), "--params", str(params)]) == 0
    assert load_config(params) == load_config(ROOT / "params.yaml")
