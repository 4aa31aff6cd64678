"""mixq.eval: WikiText-2 text, perplexity, tokens/s, weight bytes."""
import copy
import math

import pytest
import torch

from mixq.api import quantize
from mixq.config import QuantConfig
from mixq.data import find_data
from mixq.eval import (perplexity, rows_to_raw_text, tokens_per_second, weight_bytes,
                       wikitext2_text)
from mixq.nn import QuantLinearBase

pytest.importorskip("transformers")


@pytest.mark.parametrize("split", ["test", "valid"])
def test_datasets_rows_rebuild_raw_file(split):
    """The `datasets` wikitext builder yields each line, blank lines as "" -> we rebuild exactly."""
    path = find_data(f"wikitext-2-raw/wiki.{split}.raw", required=False)
    if path is None:
        pytest.skip("WikiText-2 not staged")
    raw = path.read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    assert rows_to_raw_text(rows) == raw == wikitext2_text(split)
    assert "\n\n".join(rows) != raw        # the GPTQ-script join is a different text
    with pytest.raises(ValueError, match="split"):
        wikitext2_text("train")


def test_perplexity_matches_hf_loss(float_llama, tok):
    text = wikitext2_text("test")[:2500]
    seqlen = 96
    r = perplexity(float_llama, tok, text=text, seqlen=seqlen, progress=False)
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = ids.numel()
    assert r["n_windows"] == math.ceil((n - 1) / seqlen)
    assert r["n_tokens"] == sum(min(seqlen, n - s) - 1 for s in range(0, n - 1, seqlen))
    nll = 0.0
    with torch.no_grad():
        for s in range(0, n - 1, seqlen):
            w = ids[s:s + seqlen][None]
            nll += float(float_llama(w, labels=w).loss) * (w.shape[1] - 1)
    assert r["ppl"] == pytest.approx(math.exp(nll / r["n_tokens"]), rel=1e-4)
    again = perplexity(float_llama, tok, text=text, seqlen=seqlen, batch_size=3, progress=False)
    assert again["n_tokens"] == r["n_tokens"]
    assert again["ppl"] == pytest.approx(r["ppl"], rel=1e-5)


def test_perplexity_wikitext_windows(float_llama, tok):
    a = perplexity(float_llama, tok, max_windows=2, progress=False)       # default seqlen: 512
    b = perplexity(float_llama, tok, max_windows=2, progress=False)
    assert a == b and a["seqlen"] == 512 and a["n_windows"] == 2 and a["n_tokens"] == 2 * 511
    assert math.isfinite(a["ppl"]) and a["ppl"] > 1
    text = wikitext2_text("valid")[:4000]
    c = perplexity(float_llama, tok, text=text, seqlen=100, max_tokens=250, progress=False)
    assert c["n_windows"] == 3 and c["n_tokens"] == 99 + 99 + 49


@pytest.mark.parametrize("kwargs, match", [
    (dict(seqlen=1), "seqlen"), (dict(seqlen=1024), "max_position"),
    (dict(max_windows=0), "max_windows"), (dict(batch_size=0), "batch_size"),
    (dict(split="train"), "split"), (dict(text="x", max_tokens=1), "nothing to score"),
])
def test_perplexity_bad_args(float_llama, tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(float_llama, tok, progress=False, **kwargs)


def test_tokens_per_second(float_llama):
    r = tokens_per_second(float_llama, prompt_len=16, new_tokens=3, warmup=0, repeats=1)
    assert r["prompt_len"] == 16 and r["new_tokens"] == 3
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    with pytest.raises(ValueError, match="new_tokens"):
        tokens_per_second(float_llama, new_tokens=0)


def test_weight_bytes(float_llama):
    uniq = {id(p): p for p in float_llama.parameters()}      # tied embedding counted once
    expect = sum(p.numel() * p.element_size() for p in uniq.values())
    assert weight_bytes(float_llama) == expect
    q = copy.deepcopy(float_llama)
    quantize(q, QuantConfig(), progress=False)
    qmods = [m for m in q.modules() if isinstance(m, QuantLinearBase)]
    rest = {id(p): p for p in q.parameters()}
    assert weight_bytes(q) == sum(m.weight_nbytes() for m in qmods) + \
        sum(p.numel() * p.element_size() for p in rest.values())
    assert weight_bytes(q) < expect
    with pytest.raises(TypeError, match="nn.Module"):
        weight_bytes("model")
