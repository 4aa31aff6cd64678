"""mixq.experiments.ablation: layer_sensitivity on stories260k (a tiny Llama): rows per kind /
block, finite, bad args; the CLI."""
import math

import pytest

from mixq.config import QuantConfig
from mixq.experiments.ablation import layer_sensitivity, main, model_kinds
from mixq.methods import AdaRound

LLAMA_KINDS = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def stories(stories_dir):
    from mixq.io import load_model
    model, tok = load_model("stories260k")
    return model, tok


def _setup(stories):
    import copy

    from mixq.eval import perplexity
    model, tok = stories
    factory = lambda: copy.deepcopy(model)  # noqa: E731
    evaluate = lambda m: perplexity(m, tok, max_windows=1, seqlen=128, progress=False)  # noqa: E731
    return factory, evaluate


def test_sensitivity_by_kind(stories):
    factory, evaluate = _setup(stories)
    n_layers = stories[0].config.num_hidden_layers
    rows = layer_sensitivity(factory, evaluate, config=QuantConfig(mode="w4a4", outlier_frac=0.0),
                             by="kind", progress=False)
    assert [r["what"] for r in rows] == ["float"] + [f"kind:{k}" for k in LLAMA_KINDS] + ["all"]
    assert rows[0]["delta_vs_float"] == 0.0
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and math.isfinite(r["delta_vs_float"])
        assert r["delta_vs_float"] == pytest.approx(r["ppl"] - rows[0]["ppl"])
    assert all(r["n_quantized"] == n_layers for r in rows[1:-1])      # one kind per layer
    assert rows[-1]["n_quantized"] == 7 * n_layers
    # W4A4 everywhere hurts more than the gentlest single kind
    assert rows[-1]["ppl"] > min(r["ppl"] for r in rows[1:-1])


def test_sensitivity_by_block_with_method(stories):
    from mixq.calibrate import calibration_batches
    factory, evaluate = _setup(stories)
    model, tok = stories
    n_layers = model.config.num_hidden_layers
    calib = calibration_batches(tok, n_samples=2, seqlen=64)
    cfg = QuantConfig(mode="w4a4", outlier_frac=0.05, methods=(AdaRound(n_steps=5),))
    rows = layer_sensitivity(factory, evaluate, config=cfg, by="block", calib_data=calib,
                             progress=False, include_all=False)
    assert [r["what"] for r in rows] == ["float"] + [f"block:{i}" for i in range(n_layers)]
    assert all(math.isfinite(r["ppl"]) for r in rows)
    assert all(r["n_quantized"] == 7 for r in rows[1:])


def test_model_kinds(stories):
    assert model_kinds(stories[0]) == LLAMA_KINDS


def test_sensitivity_bad_args(stories, tiny_opt):
    factory, evaluate = _setup(stories)
    cfg = QuantConfig(mode="w4a4")
    with pytest.raises(ValueError, match="by must be"):
        layer_sensitivity(factory, evaluate, config=cfg, by="layer")
    with pytest.raises(TypeError):
        layer_sensitivity(factory, evaluate, config={"mode": "w4a4"})
    with pytest.raises(ValueError, match="nothing to ablate"):     # OPT has no gate_proj
        layer_sensitivity(tiny_opt, lambda m: 1.0, config=QuantConfig(mode="w4a4",
                                                                     targets=("gate",)))


def test_cli_writes_rows_and_meta(tmp_path, stories_dir):
    import json

    out = tmp_path / "ablation.json"
    assert main(["--model", "stories260k", "--preset", "w4a4-rtn", "--max-windows", "1",
                 "--seqlen", "128", "--device", "cpu", "--no-all", "--quiet",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["what"] for r in rows] == ["float"] + [f"kind:{k}" for k in LLAMA_KINDS]
    assert all(r["preset"] == "w4a4-rtn" and r["device"] == "cpu" for r in rows)
    assert json.loads((tmp_path / "ablation.meta.json").read_text())["by"] == "kind"
