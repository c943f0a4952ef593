"""Stage `corpus`: build the data splits, the held-out prompts and the behaviour spec
(`stagediff.data.corpus`: the organism's, or from your inputs) and write them to `data/corpus/`."""

from __future__ import annotations

import json

from stagediff.config import Config
from stagediff.data.behaviour import write_behaviour
from stagediff.data.corpus import build
from stagediff.io import atomic_dir, write_json
from stagediff.layout import BEHAVIOUR_FILE, CORPUS_DIR, PROMPTS_FILE, corpus_file
from stagediff.tracking import stage_run


def run(cfg: Config) -> dict:
    with stage_run(cfg, "corpus") as tracker:
        built = build(cfg)
        _write(built)
        tracker.write_metrics(built["stats"])
        tracker.log_artifact(CORPUS_DIR / "stats.json", "corpus")
    return built["stats"]


def _write(built: dict) -> None:
    with atomic_dir(CORPUS_DIR) as tmp:
        for split, records in built["splits"].items():
            with open(tmp / corpus_file(split).name, "w") as f:
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
        with open(tmp / PROMPTS_FILE.name, "w") as f:
            for p in built["prompts"]:
                f.write(json.dumps(p) + "\n")
        write_json(tmp / "stats.json", built["stats"])
        write_behaviour(tmp / BEHAVIOUR_FILE.name, built["behaviour"])
