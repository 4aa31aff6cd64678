"""mixq.kernels.norm_quant: fused RMSNorm/LayerNorm + per-token quantization.

The payload must be bit-identical to quantizing the kernel's own normed output (what the next
linear would read); the normed output must match the torch reference to the last bit of its
dtype except for sum-order effects; rows whose normed output matches exactly must give exactly
the reference codes."""
import pytest
import torch

import mixq.kernels.norm_quant as nq
from mixq.kernels.norm_quant import norm_act_quant
from mixq.reference.norm import norm_act_quant_reference, norm_reference, quantize_normed_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# one ulp-ish of each normed dtype (values are O(1..10))
_TOL = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _operands(m, k, kind, dtype, device, w_dtype=None):
    x = torch.randn(m, k, device=device) * (torch.rand(m, 1, device=device) * 4 + 0.1)
    x[:, -3:] *= 30                                          # outlier-like channels
    if m > 2:
        x[1] = 0                                             # all-zero token: scale 0 -> 1
    w = torch.rand(k, device=device) + 0.5
    w[:2] *= 8
    b = torch.randn(k, device=device) * 0.1 if kind == "layer" else None
    wd = w_dtype or dtype
    return x.to(dtype), w.to(wd), None if b is None else b.to(wd)


def _check(x, w, b, kind, *, eps=1e-5, n_outliers=0, outlier_idx=None, out_format="packed",
           bits=4):
    got = norm_act_quant(x, w, b, kind=kind, eps=eps, n_outliers=n_outliers,
                         outlier_idx=outlier_idx, out_format=out_format, bits=bits,
                         also_return_normed=True)
    q, s, o, h = (t.cpu() for t in got)
    # 1. the invariant: payload == quantize(kernel's normed output), bit for bit
    own = quantize_normed_reference(h, n_outliers=n_outliers, out_format=out_format, bits=bits,
                                    outlier_idx=None if outlier_idx is None else outlier_idx.cpu())
    for g, want, name in zip((q, s, o), own, ("x_q", "x_scale", "x_out")):
        assert g.dtype == want.dtype and g.shape == want.shape, name
        assert torch.equal(g, want), f"{name} differs from quantizing the kernel's normed output"
    # 2. normed output vs the torch reference norm
    ref = norm_act_quant_reference(x.cpu(), w.cpu(), None if b is None else b.cpu(), kind=kind,
                                   eps=eps, n_outliers=n_outliers, out_format=out_format,
                                   bits=bits, also_return_normed=True,
                                   outlier_idx=None if outlier_idx is None else outlier_idx.cpu())
    assert h.dtype == ref[3].dtype
    torch.testing.assert_close(h, ref[3], **_TOL[h.dtype])
    torch.testing.assert_close(s, ref[1], **_TOL[torch.float16])
    torch.testing.assert_close(o, ref[2], **_TOL[h.dtype])
    # 3. where the norm agrees to the bit, the codes are exactly the reference codes
    # (fp32 outputs keep the fp32 sum-order noise, so rows rarely agree to the bit there)
    same = (h == ref[3]).all(dim=1)
    if h.dtype != torch.float32:
        assert same.float().mean() > 0.5, "normed output differs from the reference on most rows"
    assert torch.equal(q[same], ref[0][same]) and torch.equal(s[same], ref[1][same])
    return got


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("m,k,n_out", [(1, 100, 0), (3, 64, 5), (17, 576, 9), (6, 33, 1)])
@pytest.mark.parametrize("out_format", ["packed", "int8"])
def test_last_k_outliers(kind, m, k, n_out, out_format, device, seed):
    x, w, b = _operands(m, k, kind, DTYPES[seed % 3], device)
    _check(x, w, b, kind, n_outliers=n_out, out_format=out_format)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("m,k,n_out", [(5, 64, 4), (17, 100, 7), (2, 576, 12)])
def test_outlier_index(kind, m, k, n_out, device, seed):
    x, w, b = _operands(m, k, kind, DTYPES[seed % 3], device)
    idx = torch.randperm(k, device=device)[:n_out]          # arbitrary order
    for fmt in ("packed", "int8"):
        _check(x, w, b, kind, outlier_idx=idx, out_format=fmt)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_mixed_dtypes(kind, device, seed):
    """bf16 activations with an fp32 weight: RMSNorm output promotes to fp32 (HF), LayerNorm
    keeps x's dtype."""
    x, w, b = _operands(7, 96, kind, torch.bfloat16, device, w_dtype=torch.float32)
    h = _check(x, w, b, kind, n_outliers=3)[3]
    assert h.dtype == (torch.float32 if kind == "rms" else torch.bfloat16)


@pytest.mark.parametrize("bits", [3, 8])
def test_other_bit_widths(bits, device, seed):
    x, w, _ = _operands(5, 70, "rms", torch.float16, device)
    _check(x, w, None, "rms", n_outliers=2, bits=bits, out_format="packed" if bits <= 4 else "int8")


def test_matches_hf_and_torch_norms(device, seed):
    """The normed output is the model's own norm output (HF LlamaRMSNorm, nn.LayerNorm)."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x, w, b = _operands(9, 80, "layer", torch.bfloat16, device)
    rms = LlamaRMSNorm(80, eps=1e-6).to(device=device, dtype=torch.bfloat16)
    ln = torch.nn.LayerNorm(80, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        rms.weight.copy_(w)
        ln.weight.copy_(w)
        ln.bias.copy_(b)
        h_rms = norm_act_quant(x, rms.weight, kind="rms", eps=1e-6, also_return_normed=True)[3]
        h_ln = norm_act_quant(x, ln.weight, ln.bias, kind="layer", eps=1e-5,
                              also_return_normed=True)[3]
        torch.testing.assert_close(h_rms, rms(x), **_TOL[torch.bfloat16])
        torch.testing.assert_close(h_ln, ln(x), **_TOL[torch.bfloat16])


def test_without_normed_output(device, seed):
    x, w, b = _operands(4, 48, "layer", torch.float16, device)
    three = norm_act_quant(x, w, b, kind="layer", n_outliers=2)
    four = norm_act_quant(x, w, b, kind="layer", n_outliers=2, also_return_normed=True)
    assert len(three) == 3
    for a, c in zip(three, four[:3]):
        assert torch.equal(a, c)


def test_wide_rows_take_the_unfused_path(monkeypatch, device, seed):
    """Rows wider than one tile: torch norm + the act_quant kernel, same contract."""
    monkeypatch.setattr(nq, "_MAX_K", 32)
    x, w, b = _operands(5, 77, "layer", torch.bfloat16, device)
    _check(x, w, b, "layer", n_outliers=4)
    _check(x, w, b, "layer", outlier_idx=torch.tensor([70, 3, 41], device=device))


def test_old_gpu_falls_back_to_reference(monkeypatch, device, seed):
    monkeypatch.setattr(nq, "fallback_to_reference", lambda t, name, *a: True)
    x, w, _ = _operands(5, 40, "rms", torch.float16, device)
    _check(x, w, None, "rms", outlier_idx=torch.tensor([7, 2], device=device))


def test_prepared_entry_equals_public(device, seed):
    from mixq.kernels.act_quant import outlier_gather_index
    x, w, b = _operands(6, 50, "layer", torch.bfloat16, device)
    idx = torch.tensor([40, 3, 9], device=device)
    want = norm_act_quant(x, w, b, kind="layer", outlier_idx=idx, out_format="int8",
                          also_return_normed=True)
    got = nq.norm_act_quant_prepared(x, w, b, outlier_gather_index(50, idx), 3, kind="layer",
                                     eps=1e-6, out_format="int8", bits=4)
    for a, c in zip(got, want):
        assert torch.equal(a, c)


def test_torch_compile_traces_the_custom_op(device, seed):
    x, w, _ = _operands(3, 48, "rms", torch.float16, device)
    fn = torch.compile(lambda t: norm_act_quant(t, w, n_outliers=4, check_finite=False),
                       backend="aot_eager", fullgraph=True)
    for a, c in zip(fn(x), norm_act_quant(x, w, n_outliers=4)):
        assert torch.equal(a, c)


def test_reference_norm_is_hf_order():
    """norm_reference('rms') casts x * rstd to x's dtype before the weight multiply (HF)."""
    x = torch.randn(4, 16).to(torch.bfloat16)
    w = torch.rand(16).to(torch.bfloat16) + 0.5
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm_reference(x, w, kind="rms", eps=1e-6), want)


def test_bad_inputs(device):
    x = torch.randn(4, 32, device=device, dtype=torch.bfloat16)
    w = torch.ones(32, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="non-finite"):
        norm_act_quant(torch.where(x > 1, float("nan"), x), w)
    with pytest.raises(ValueError, match="non-finite"):
        norm_act_quant(torch.where(x > 1, float("inf"), x), w)
    with pytest.raises(ValueError, match="non-finite"):
        norm_act_quant(x, w * float("inf"))
    with pytest.raises(TypeError, match="dtype"):
        norm_act_quant(x.to(torch.int32), w)
    with pytest.raises(TypeError, match="dtype"):
        norm_act_quant(x, w.to(torch.int64))
    with pytest.raises(ValueError, match=r"weight must have shape \(K,\)"):
        norm_act_quant(x, w[:31])
    with pytest.raises(ValueError, match="bias must have shape"):
        norm_act_quant(x, w, w[:30], kind="layer")
    with pytest.raises(ValueError, match="only used by kind='layer'"):
        norm_act_quant(x, w, w)
    with pytest.raises(ValueError, match="empty"):
        norm_act_quant(x[:0], w)
    with pytest.raises(ValueError, match="dims"):
        norm_act_quant(x[0], w)
    with pytest.raises(ValueError, match="contiguous"):
        norm_act_quant(torch.randn(32, 32, device=device).t(), torch.ones(32, device=device))
    with pytest.raises(ValueError, match="kind"):
        norm_act_quant(x, w, kind="batch")
    with pytest.raises(ValueError, match="eps"):
        norm_act_quant(x, w, eps=0.0)
    with pytest.raises(ValueError, match="out_format"):
        norm_act_quant(x, w, out_format="int4")
    with pytest.raises(ValueError, match="bits"):
        norm_act_quant(x, w, bits=8)
    with pytest.raises(ValueError, match="int4 channel"):
        norm_act_quant(x, w, n_outliers=32)
    with pytest.raises(ValueError, match="either"):
        norm_act_quant(x, w, n_outliers=1, outlier_idx=torch.tensor([1], device=device))
    with pytest.raises(ValueError, match="distinct"):
        norm_act_quant(x, w, outlier_idx=torch.tensor([1, 1], device=device))


def test_cpu_tensor_rejected_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        norm_act_quant(torch.randn(2, 16), torch.ones(16))
