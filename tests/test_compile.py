"""torch.compile(fullgraph=True) and CUDA graphs on quantized models: the hot path has no host
synchronisation and no graph break (see `mixq.validation`: value checks stay out of forwards).

On CPU the Triton kernels run under the interpreter and dynamo traces them as opaque custom ops
(shapes from their fake implementations); backend="eager" keeps the test free of a C++
compiler. On a GPU a whole-model forward is captured in a CUDA graph and replayed.
"""
import copy

import pytest
import torch

import mixq
from mixq import validation
from mixq.nn import QuantLinearBase, QuantNorm

transformers = pytest.importorskip("transformers")

#: (preset, model dtype): the W4A16 kernel takes fp16/bf16 activations; W8A8 and W4A4 take fp32
#: too. "+attn+norm" adds the quantized attention and the fused norm modules, "+fuse" the stacked
#: q/k/v and gate/up.
CASES = [("w8a8", torch.float32), ("w4a16-g128", torch.float16),
         ("w4a4-rtn", torch.float32), ("w4a4-o1-salient", torch.float32),
         ("w4a4-o1-salient+attn+norm", torch.float32), ("w4a4-o1-salient+norm+fuse", torch.float32),
         ("w4a16-g128+fuse", torch.float16)]


def _kernels_on(model, on=True):
    for m in model.modules():
        if isinstance(m, (QuantLinearBase, QuantNorm)):
            m.use_kernels = on
    return model


def _quantized(float_llama, name, dtype, device):
    model = copy.deepcopy(float_llama).to(dtype)
    mixq.quantize(model, mixq.preset(name))
    return _kernels_on(model.to(device))


@pytest.mark.parametrize("name,dtype", CASES)
def test_fullgraph_compile_equals_eager(float_llama, name, dtype, device):
    model = _quantized(float_llama, name, dtype, device)
    ids = torch.tensor([[1, 7, 42, 300, 5, 99, 12, 3, 480, 64, 2]], device=device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        want = model(ids).logits
        got = compiled(ids).logits
    assert not torch._dynamo.utils.counters["graph_break"], dict(
        torch._dynamo.utils.counters["graph_break"])
    if device.type == "cpu":
        assert torch.equal(got, want)
    else:   # cuBLAS (the float matmuls around the quantized linears) may pick other kernels
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_kv4_decode_step_compiles(float_llama, device):
    """A decode step with the 4-bit cache (packed-cache decode kernel) under fullgraph=True."""
    model = _quantized(float_llama, "w4a4-o1-salient+kv4+attn", torch.float32, device)
    ids = torch.tensor([[1, 7, 42, 300, 5, 99, 12, 3]], device=device)
    caches = [mixq.make_cache(model, kv_cache=mixq.config.KVCacheSpec(group_size=2))
              for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(ids[:, :-1], past_key_values=c, use_cache=True)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step = torch.compile(lambda t, c: model(t, past_key_values=c, use_cache=True).logits,
                             fullgraph=True, backend="eager")
        want = model(ids[:, -1:], past_key_values=caches[0], use_cache=True).logits
        got = step(ids[:, -1:], caches[1])
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch.equal(got, want)
    torch._dynamo.reset()


def test_value_checks_off_on_the_hot_path(float_llama):
    """Inside a quantized forward the reference reads no values (no NaN check: no sync); the
    debug switch turns the checks back on; a direct call of the reference still checks."""
    from mixq.reference import w4a4_linear

    model = _quantized(float_llama, "w4a4-rtn", torch.float32, "cpu")
    _kernels_on(model, False)
    lin = next(m for m in model.modules() if isinstance(m, mixq.nn.W4A4Linear))
    x = torch.full((2, lin.in_features), float("nan"))
    assert torch.isnan(lin(x)).all()                       # garbage in, garbage out: no sync
    before = validation.debug_checks(True)
    try:
        with pytest.raises(ValueError, match="non-finite"):
            lin(x)
    finally:
        validation.debug_checks(before)
    with pytest.raises(ValueError, match="non-finite"):
        w4a4_linear(x, lin.w_q, lin.w_scale, group_size=128)
    with pytest.raises(TypeError, match="bool"):
        validation.debug_checks(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["w8a8", "w4a16-g128", "w4a4-o1-salient", "w4a4-o1-salient+attn",
                                  "w4a4-o1-salient+fuse", "w4a16-g128+fuse"])
def test_cuda_graph_replay_equals_eager(float_llama, name):
    model = _quantized(float_llama, name, torch.bfloat16, "cuda")
    ids = torch.randint(1, 500, (2, 16), device="cuda")
    with torch.no_grad():
        want = model(ids).logits.clone()                 # also tunes the kernels (syncs)
        if "+attn" not in name:     # HF's eager mask function (the "mixq" attention) syncs
            torch.cuda.set_sync_debug_mode("error")      # a host sync in the forward raises
            try:
                model(ids)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(ids).logits
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_compiled_first_call_needs_no_recompile(float_llama, device):
    """A quantized model compiled before any eager call traces once: nothing on the hot path
    creates a buffer or attribute lazily (the W4A4 gather index exists from the build)."""
    model = _quantized(float_llama, "w4a4-o1-salient", torch.float32, device)
    ids = torch.tensor([[1, 7, 42, 300, 5]], device=device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        compiled(ids)
        compiled(ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
