"""python -m mixq quantize / eval (mixq.experiments.llm_cli) and mixq.load_model."""
import json

import pytest


def test_load_model_and_cli(tmp_path, stories_dir):
    from mixq.experiments.llm_cli import eval_main, parse_method, quantize_main
    from mixq.io import load_model

    model, tok = load_model("stories260k")
    assert model.config.model_type == "llama" and tok is not None
    out = tmp_path / "q"
    rc = quantize_main(["--model", "stories260k", "--mode", "w4a4", "--outlier-frac", "0.05",
                        "--n-calib", "2", "--calib-seqlen", "64", "--dtype", "fp32",
                        "--device", "cpu", "--out", str(out)])
    assert rc == 0 and (out / "quant_config.json").is_file()
    res = tmp_path / "res.json"
    rc = eval_main(["--model", str(out), "--max-windows", "1", "--seqlen", "128",
                    "--device", "cpu", "--json", str(res)])
    rows = json.loads(res.read_text())
    assert rc == 0 and rows[0]["mode"] == "w4a4" and rows[0]["n_tokens"] == 127
    loaded, tok2 = load_model(out)
    assert tok2 is not None and loaded.mixq_config.outlier_frac == 0.05
    methods = pytest.importorskip("mixq.methods")
    m = parse_method("smoothquant:alpha=0.6")
    assert isinstance(m, methods.SmoothQuant) and m.alpha == 0.6
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("nosuchmethod")
    with pytest.raises(ValueError, match="key=value"):
        parse_method("gptq:oops")
