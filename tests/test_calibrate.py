"""mixq.calibrate: running statistics, layer-by-layer replay, calibration batches."""
import copy

import pytest
import torch

from mixq.calibrate import (LayerStats, LinearStats, StatsAccumulator, calibrate_layerwise,
                            calibration_batches, capture_layer_inputs)
from mixq.hf.models import get_adapter

pytest.importorskip("transformers")


# ------------------------------------------------------------------------------- accumulator
def test_accumulator_matches_direct(seed):
    k = 13
    parts = [torch.randn(n, k) * (1 + torch.arange(k)) for n in (5, 1, 17, 9)]
    parts[1] = parts[1].reshape(1, 1, k)          # leading dims are tokens
    acc = StatsAccumulator(k, max_rows=1000, hessian=True)
    for p in parts:
        acc.update(p)
    st = acc.finalize()
    x = torch.cat([p.reshape(-1, k) for p in parts]).double()
    assert isinstance(st, LinearStats) and st.n_tokens == x.shape[0] == 32
    torch.testing.assert_close(st.absmax, x.abs().amax(0).float())
    torch.testing.assert_close(st.mean_abs, x.abs().mean(0).float())
    torch.testing.assert_close(st.std, x.std(0, correction=0).float())
    torch.testing.assert_close(st.hessian, (2 / x.shape[0] * x.T @ x).float(), rtol=1e-5, atol=1e-4)
    assert torch.equal(st.inputs, x.float())      # all rows kept, in order


def test_accumulator_row_sample(seed):
    k, max_rows = 6, 10
    x = torch.randn(47, k)
    acc = StatsAccumulator(k, max_rows=max_rows, hessian=False,
                           generator=torch.Generator().manual_seed(seed))
    for chunk in x.split(7):
        acc.update(chunk)
    st = acc.finalize()
    assert st.inputs.shape == (max_rows, k) and st.hessian is None
    # every sampled row is a distinct row of x, in arrival order
    idx = [int(torch.nonzero((x == r).all(1)).flatten()[0]) for r in st.inputs]
    assert idx == sorted(set(idx))


def test_accumulator_bad_input():
    acc = StatsAccumulator(4)
    with pytest.raises(ValueError, match="no input rows"):
        acc.finalize()
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        acc.update(torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        acc.update(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_rows"):
        StatsAccumulator(4, max_rows=-1)


# ------------------------------------------------------------------------------- layer replay
def _hooked_absmax(model, ids, prefix_fn, n_layers, groups_fn):
    """absmax of every linear's input from ONE ordinary forward of the whole model."""
    seen, handles = {}, []
    for i in range(n_layers):
        for g in groups_fn(i):
            for name, lin in zip(g.names, g.linears):
                key = f"{prefix_fn(i)}.{name}"

                def hook(_m, args, key=key):
                    a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)
                    seen[key] = a if key not in seen else torch.maximum(seen[key], a)
                handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layerwise_stats_equal_full_forward(family, llama, tiny_opt, seed):
    model = llama if family == "llama" else tiny_opt()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 19))
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    ref = _hooked_absmax(model, ids, adapter.layer_prefix, len(layers),
                         lambda i: adapter.linear_groups(layers[i]))
    calls = []

    def on_layer(i, layer, groups, stats):
        assert isinstance(stats, LayerStats)
        assert layer is layers[i]
        assert set(stats) == {n for g in groups for n in g.names}
        calls.append(i)
        for name, st in stats.items():
            assert st.n_tokens == ids.numel() and st.inputs.shape[0] == min(8, ids.numel())
            torch.testing.assert_close(st.absmax, ref[f"{adapter.layer_prefix(i)}.{name}"],
                                       rtol=1e-5, atol=1e-6)

    calibrate_layerwise(model, ids, on_layer=on_layer, max_rows=8, progress=False)
    assert calls == list(range(len(layers)))


def test_layerwise_is_sequential(llama, seed):
    """Layer i+1 is calibrated on the outputs of the layer as on_layer left it."""
    ids = torch.randint(0, 512, (2, 23))
    edited = copy.deepcopy(llama)
    with torch.no_grad():
        edited.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    adapter = get_adapter(llama)
    ref = _hooked_absmax(edited, ids, adapter.layer_prefix, 2,
                         lambda i: adapter.linear_groups(edited.model.layers[i]))
    got = {}

    def on_layer(i, layer, groups, stats):
        if i == 0:
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(3.0)
        got.update({f"{adapter.layer_prefix(i)}.{n}": s.absmax for n, s in stats.items()})

    calibrate_layerwise(llama, ids, on_layer=on_layer, batch_size=2, progress=False)
    key = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)


def test_layer_stats_refresh(llama, seed):
    ids = torch.randint(0, 512, (2, 9))
    seen = {}

    def on_layer(i, layer, groups, stats):
        if i:
            return
        before = stats["mlp.down_proj"].absmax.clone()
        with torch.no_grad():
            layer.mlp.up_proj.weight.mul_(2.0)    # down_proj input = silu(gate) * up: doubles
        stats.refresh()
        seen["ratio"] = stats["mlp.down_proj"].absmax / before

    calibrate_layerwise(llama, ids, on_layer=on_layer, progress=False)
    torch.testing.assert_close(seen["ratio"], torch.full_like(seen["ratio"], 2.0))


def test_capture_layer_inputs(llama, seed):
    ids = torch.randint(0, 512, (5, 7))
    caps = capture_layer_inputs(llama, ids, batch_size=2)
    assert len(caps) == 3
    args, kwargs = caps[0]
    h = args[0] if args else kwargs["hidden_states"]
    torch.testing.assert_close(h, llama.model.embed_tokens(ids[:2]))
    with pytest.raises(ValueError, match="batch_size"):
        capture_layer_inputs(llama, ids, batch_size=0)
    with pytest.raises(TypeError, match="dtype"):
        capture_layer_inputs(llama, ids.float())
    with pytest.raises(TypeError, match="on_layer"):
        calibrate_layerwise(llama, ids, on_layer=None)


# ------------------------------------------------------------------------------- batches
def test_calibration_batches(tok):
    a = calibration_batches(tok, n_samples=4, seqlen=33, seed=1)
    b = calibration_batches(tok, n_samples=4, seqlen=33, seed=1)
    c = calibration_batches(tok, n_samples=4, seqlen=33, seed=2)
    assert a.shape == (4, 33) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < tok.vocab_size
    with pytest.raises(ValueError, match="n_samples"):
        calibration_batches(tok, n_samples=0)
    with pytest.raises(ValueError, match="exceeds"):
        calibration_batches(tok, n_samples=1, seqlen=10 ** 8)


def test_accumulator_sink_hessian_is_the_first_positions_part(seed):
    """For (B, T, K) inputs the rows x[:, 0] (each sequence's first token, the attention sink)
    give `sink_hessian`, their share of `hessian`; 2-D inputs have no sequence dim."""
    k = 7
    a, b = torch.randn(3, 5, k), torch.randn(2, 5, k)
    acc = StatsAccumulator(k, max_rows=0, hessian=True)
    acc.update(a)
    acc.update(b)
    st = acc.finalize()
    first = torch.cat([a[:, 0], b[:, 0]]).double()
    assert st.n_sequences == 5 and st.n_tokens == 25
    torch.testing.assert_close(st.sink_hessian, (2 / 25 * first.T @ first).float(),
                               rtol=1e-5, atol=1e-5)
    flat = StatsAccumulator(k, max_rows=0, hessian=True)
    flat.update(a.reshape(-1, k))
    st2 = flat.finalize()
    assert st2.sink_hessian is None and st2.n_sequences == 0
