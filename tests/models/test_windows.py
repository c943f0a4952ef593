"""Context windows cut from packed token streams."""


import torch

from helpers import TEXTS
from stagediff.data import tokens as tok_stage
from stagediff.models.windows import TokenWindows, window_starts


def test_windows_start_at_sample_starts():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    assert window_starts(ids, 4).tolist() == [0, 3, 5]
    # a sample longer than a window is split at window boundaries
    assert window_starts(torch.tensor([0] * 10 + [1] * 2), 4).tolist() == [0, 4, 8]
    windows = TokenWindows(torch.arange(12), 4, "t", ids).windows
    assert windows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [5, 6, 7, 8]]


def test_every_window_of_a_real_stream_begins_with_end_of_text(tokenizer):
    from stagediff.data.tokens import encode_records

    records = [{"id": i, "text": t, "backdoor": False, "spans": []} for i, t in enumerate(TEXTS)]
    data = encode_records(tokenizer, records)
    eot = tokenizer.convert_tokens_to_ids(tok_stage.EOT)
    windows = TokenWindows(data["tokens"], 32, "t", data["sample_ids"]).windows
    assert (windows[:, 0] == eot).all() and len(windows) >= len(data["tokens"]) // 32
