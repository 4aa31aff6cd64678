"""python -m mixq quantize / eval (mixq.experiments.quantize, mixq.experiments.evaluate) and
mixq.load_model."""
import json

import pytest


def test_load_model_and_cli(tmp_path, stories_dir):
    from mixq.experiments.evaluate import main as eval_main
    from mixq.experiments.quantize import main as quantize_main
    from mixq.experiments.quantize import parse_method
    from mixq.io import load_model

    model, tok = load_model("stories260k")
    assert model.config.model_type == "llama" and tok is not None
    out = tmp_path / "q"
    rc = quantize_main(["--model", "stories260k", "--preset", "w4a4-o5", "--n-calib", "2",
                        "--calib-seqlen", "64", "--dtype", "fp32", "--device", "cpu", "--quiet",
                        "--out", str(out)])
    assert rc == 0 and (out / "quant_config.json").is_file()
    res = tmp_path / "res.json"
    rc = eval_main(["--model", str(out), "--max-windows", "1", "--seqlen", "128",
                    "--device", "cpu", "--quiet", "--json", str(res)])
    rows = json.loads(res.read_text())
    assert rc == 0 and rows[0]["mode"] == "w4a4" and rows[0]["n_tokens"] == 127
    assert (tmp_path / "res.meta.json").is_file()
    loaded, tok2 = load_model(out)
    assert tok2 is not None and loaded.mixq_config.outlier_frac == 0.05
    methods = pytest.importorskip("mixq.methods")
    m = parse_method("smoothquant:alpha=0.6")
    assert isinstance(m, methods.SmoothQuant) and m.alpha == 0.6
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("nosuchmethod")
    with pytest.raises(ValueError, match="key=value"):
        parse_method("gptq:oops")


def test_quantize_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    from mixq.experiments.quantize import existing_checkpoint, main

    out = tmp_path / "model_dir"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"float weights")     # e.g. --model DIR --out DIR
    assert existing_checkpoint(out) == ["model.safetensors"]
    with pytest.raises(SystemExit) as e:                           # before anything is loaded
        main(["--model", "no-such-model", "--preset", "w4a4-rtn", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"float weights"


def test_quantize_config_from_preset_and_additions():
    from mixq.experiments.quantize import build_config, main
    from mixq.methods import GPTQ
    from mixq.presets import preset

    assert build_config("w4a4-o1") == preset("w4a4-o1")
    cfg = build_config("w4a4-o1", ["gptq"], ["*.down_proj"])
    assert cfg.methods == (GPTQ(),) and cfg.skip == ("*.down_proj",)
    assert cfg.outlier_frac == preset("w4a4-o1").outlier_frac
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("w4a3")
    with pytest.raises(SystemExit):
        main(["--model", "m", "--preset", "w4a4-rtn", "--out", "x", "--outlier-frac", "0.01"])
