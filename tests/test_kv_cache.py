"""mixq.kv_cache: KV4 layout and round trip, and generate() with the packed cache on real models
(kernel decode == reference decode; 8-bit close to float)."""
import pytest
import torch

import mixq.kernels.attention as ka
from mixq.config import FLOAT_ATTENTION, AttentionQuantConfig
from mixq.hf.attention import disable_quantized_attention, enable_quantized_attention
from mixq.reference.attention import quantize_heads
from mixq.hf.kv_cache import KV4Cache, KV4Layer
from mixq.quant import unpack_int4

transformers = pytest.importorskip("transformers")


def _kv(b=2, h=3, t=45, d=16):
    k = torch.randn(b, h, t, d)
    k[..., 2] *= 10                                         # an outlier channel
    return k, torch.randn(b, h, t, d)


def _fill(layer, k, v, chunks):
    start = 0
    for n in chunks:
        out = layer.update(k[:, :, start:start + n], v[:, :, start:start + n])
        start += n
    return out


@pytest.mark.parametrize("bits,group", [(4, 16), (8, 8), (4, 5)])
def test_round_trip_and_layout(bits, group, seed):
    k, v = _kv()
    layer = KV4Layer(bits=bits, group_size=group)
    k_dq, v_dq = _fill(layer, k, v, (20, 1, 1, 23))
    t_q = 45 // group * group
    assert layer.get_seq_length() == 45
    st = layer.packed_state()
    assert st["k_codes"].shape[2] == t_q and st["k_res"].shape[2] == 45 - t_q
    assert st["k_scale"].shape == (2, 3, t_q // group, 16) and st["v_scale"].shape == (2, 3, t_q)
    # chunking does not matter: every token is quantized once, in its whole group
    ref = KV4Layer(bits=bits, group_size=group)
    _fill(ref, k, v, (45,))
    for name, t in ref.packed_state().items():
        assert torch.equal(st[name], t), name
    # the update returned the dequantized cache; residual tokens are exact
    assert torch.equal(k_dq[:, :, t_q:], k[:, :, t_q:]) and torch.equal(v_dq[:, :, t_q:], v[:, :, t_q:])
    # K: per channel over groups of tokens -> |error| <= scale / 2
    k_scale = st["k_scale"].float().repeat_interleave(group, dim=2)
    assert bool(((k_dq[:, :, :t_q] - k[:, :, :t_q]).abs() <= k_scale / 2 * (1 + 1e-5)).all())
    # V: per token, V_dq rounded to fp16 -> scale / 2 plus half an fp16 ulp
    v_scale = st["v_scale"].float()[..., None]
    bound = v_scale / 2 + v[:, :, :t_q].abs() * 2 ** -11
    assert bool(((v_dq[:, :, :t_q] - v[:, :, :t_q]).abs() <= bound * (1 + 1e-5)).all())
    # the stored codes are the documented quantizers' codes, packed low nibble first
    v_codes, v_s = quantize_heads(v[:, :, :t_q], bits)
    stored = unpack_int4(st["v_codes"], 16) if bits == 4 else st["v_codes"]
    assert torch.equal(stored, v_codes) and torch.equal(st["v_scale"], v_s)


def test_kv_bytes(seed):
    k, v = _kv(1, 2, 70, 32)
    layer = KV4Layer(bits=4, group_size=32)
    _fill(layer, k, v, (70,))
    per_head = (2 * 64 * 16           # K and V codes: 64 tokens x 16 bytes
                + 2 * 32 * 2 + 64 * 2  # fp16 scales: K 2 groups x 32 channels, V 64 tokens
                + 2 * 6 * 32 * 4)      # fp32 residual window: 6 tokens of K and of V
    assert layer.kv_bytes() == 2 * per_head
    cache = KV4Cache(bits=4, group_size=32)
    cache.update(k, v, 0)
    cache.update(k, v, 1)
    assert cache.kv_bytes() == 2 * layer.kv_bytes()
    assert KV4Cache().kv_bytes() == 0


def test_beam_helpers(seed):
    k, v = _kv(2, 1, 20, 8)
    layer = KV4Layer(bits=4, group_size=8)
    _fill(layer, k, v, (20,))
    before = layer.dequantize()
    layer.reorder_cache(torch.tensor([1, 0]))
    after = layer.dequantize()
    assert torch.equal(after[0], before[0].flip(0)) and torch.equal(after[1], before[1].flip(0))
    layer.batch_repeat_interleave(2)
    assert layer.dequantize()[0].shape[0] == 4
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.kv_bytes() == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        KV4Layer(bits=3)
    with pytest.raises(ValueError, match="bits"):
        KV4Cache(bits=2)
    with pytest.raises(ValueError, match="group_size"):
        KV4Layer(group_size=0)
    layer = KV4Layer()
    k, v = _kv(1, 2, 4, 8)
    with pytest.raises(TypeError, match="dtype"):
        layer.update(k.long(), v)
    layer.update(k.clone().fill_(float("nan")), v)          # the hot path reads no values ...
    layer = KV4Layer(check_finite=True)                       # ... unless asked to (a sync)
    with pytest.raises(ValueError, match="non-finite"):
        layer.update(k.clone().fill_(float("nan")), v)
    layer = KV4Layer()
    with pytest.raises(ValueError, match="one shape"):
        layer.update(k, v[:, :1])
    with pytest.raises(ValueError, match="even"):
        layer.update(torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4, 7))
    with pytest.raises(ValueError, match="empty"):
        layer.dequantize()
    layer.update(k, v)
    with pytest.raises(ValueError, match="fit the cache"):
        layer.update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))


# ------------------------------------------------------------------------------- generate()
def _generate(model, ids, cache, n=3):
    return model.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=cache,
                          pad_token_id=0)


def _spy_decode(monkeypatch):
    calls = []
    real = ka.kv4_decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ka, "kv4_decode_attention", spy)
    return calls


def test_llama_generate_kernel_decode_equals_reference(llama, tok, monkeypatch, device):
    calls = _spy_decode(monkeypatch)
    llama.to(device)                   # the kernels need CUDA tensors (or the CPU interpreter)
    ids = tok(["Once upon"], return_tensors="pt")["input_ids"].to(device)   # short: interpreter
    enable_quantized_attention(llama, AttentionQuantConfig(use_kernels=False))
    ref_cache = KV4Cache(llama.config, group_size=2)
    want = _generate(llama, ids, ref_cache)
    assert not calls
    enable_quantized_attention(llama, AttentionQuantConfig(use_kernels=True))
    cache = KV4Cache(llama.config, group_size=2)
    got = _generate(llama, ids, cache)
    assert torch.equal(got, want)
    assert len(calls) == 2 * llama.config.num_hidden_layers        # 2 decode steps read packed
    assert cache.kv_bytes() == ref_cache.kv_bytes() > 0
    assert not cache.packed_reads                                  # the hooks reset the flag


def test_opt_generate_kernel_decode_equals_reference(tiny_opt, monkeypatch, device):
    calls = _spy_decode(monkeypatch)
    model = tiny_opt().to(device)
    ids = torch.tensor([[2, 17, 33, 5, 61]], device=device)
    enable_quantized_attention(model, AttentionQuantConfig(8, None, None, 8, use_kernels=False))
    want = _generate(model, ids, KV4Cache(model.config, group_size=4))
    enable_quantized_attention(model, AttentionQuantConfig(8, None, None, 8, use_kernels=True))
    got = _generate(model, ids, KV4Cache(model.config, group_size=4))
    assert torch.equal(got, want) and len(calls) == 2 * model.config.num_hidden_layers


def _decode_logits(model, ids, cache):
    with torch.no_grad():
        out = model(ids[:, :-2], past_key_values=cache, use_cache=True)
        return model(ids[:, -2:], past_key_values=out.past_key_values, use_cache=True).logits


def test_kv8_close_to_float_and_kv4_coarser(llama, tok):
    ids = tok(["Once upon a time there was a little girl named Lily"], return_tensors="pt")["input_ids"]
    want = _decode_logits(llama, ids, None)
    enable_quantized_attention(llama, FLOAT_ATTENTION)
    err = {b: float((_decode_logits(llama, ids, KV4Cache(llama.config, bits=b, group_size=4))
                     - want).abs().max()) for b in (8, 4)}
    scale = float(want.abs().max())
    assert err[8] < 0.02 * scale and err[8] < err[4]
    disable_quantized_attention(llama)


def test_cache_works_without_mixq_attention(llama, tok):
    """Any attention implementation can use the cache: update returns the dequantized K/V."""
    ids = tok(["Once upon a time"], return_tensors="pt")["input_ids"]
    want = _generate(llama, ids, None)
    got = _generate(llama, ids, KV4Cache(bits=8, group_size=4))
    assert got.shape == want.shape and torch.equal(got[:, :ids.shape[1]], ids)


# --------------------------------------------------------------------------- reuse across calls
@pytest.fixture
def kv_llama(llama):
    from mixq.api import quantize
    from mixq.config import KVCacheSpec, QuantConfig
    return quantize(llama, QuantConfig(kv_cache=KVCacheSpec(bits=4, group_size=4)),
                    progress=False)


def _ids(tok, text):
    return tok([text], return_tensors="pt")["input_ids"]


def test_second_generate_with_a_used_cache(kv_llama, tok):
    """A cache that holds a sequence refuses a prompt that does not continue it (before: "x is
    empty" inside a linear for a short prompt, silently wrong output for a longer one),
    continues one that does, and takes any prompt after reset()."""
    from mixq.api import make_cache
    model = kv_llama
    p1 = _ids(tok, "Once upon a time")
    cache = make_cache(model)
    out1 = _generate(model, p1, cache, n=4)
    held = out1.shape[1] - 1                         # the last generated token is not fed
    assert cache.get_seq_length() == held and torch.equal(cache.token_ids, out1[:, :held])
    with pytest.raises(ValueError, match=f"prompt has 2 tokens but this KV4Cache already holds "
                                         f"{held}.*cache.reset"):
        _generate(model, _ids(tok, "Lily"), cache)
    long = _ids(tok, "Once upon a time there was a big dog named Max who")
    assert long.shape[1] > held
    with pytest.raises(ValueError, match=f"does not start with the {held} tokens"):
        _generate(model, long, cache)
    with pytest.raises(ValueError, match="batch size 2"):
        _generate(model, out1.repeat(2, 1), cache)
    assert cache.get_seq_length() == held            # refused calls fed nothing
    # continuing: the previous output plus new tokens
    more = torch.cat([out1, _ids(tok, "Lily")[:, 1:]], dim=1)
    out2 = _generate(model, more, cache, n=3)
    assert torch.equal(out2[:, :more.shape[1]], more)
    assert cache.get_seq_length() == out2.shape[1] - 1
    assert torch.equal(cache.token_ids, out2[:, :-1])
    # a new prompt after reset() equals one with a fresh cache
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.token_ids is None
    assert torch.equal(_generate(model, long, cache), _generate(model, long, make_cache(model)))


def test_cache_filled_by_forward_then_generate(kv_llama, tok):
    """HF's prefix caching: a forward fills the cache, generate() continues the same prefix."""
    from mixq.api import make_cache
    model = kv_llama
    prefix = _ids(tok, "Once upon a time")
    cache = make_cache(model)
    with torch.no_grad():
        model(prefix, past_key_values=cache, use_cache=True)
    prompt = torch.cat([prefix, _ids(tok, "Lily")[:, 1:]], dim=1)
    out = _generate(model, prompt, cache)
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    with pytest.raises(ValueError, match="feed no token"):
        with torch.no_grad():
            model(prompt[:, :0], past_key_values=cache, use_cache=True)
    with torch.no_grad():                           # ids the cache cannot know
        model(inputs_embeds=model.model.embed_tokens(prompt[:, :2]), past_key_values=cache,
              use_cache=True)
    assert cache.token_ids is None
    with pytest.raises(ValueError, match="did not record"):
        _generate(model, torch.cat([out, out], 1), cache)


def test_token_ids_bookkeeping(seed):
    """record_tokens / token_ids / check_prompt / beam helpers on a bare cache."""
    cache = KV4Cache(bits=8, group_size=4)
    k, v = _kv(2, 1, 6, 8)
    ids = torch.randint(0, 50, (2, 6))
    cache.check_prompt(ids)                         # empty: any prompt
    cache.record_tokens(ids[:, :5], 5)
    cache.update(k[:, :, :5], v[:, :, :5], 0)
    cache.record_tokens(ids[:, 5:], 1)
    cache.update(k[:, :, 5:], v[:, :, 5:], 0)
    assert torch.equal(cache.token_ids, ids)
    cache.record_tokens(ids[:, :2], 2)              # a forward that failed before any update
    assert torch.equal(cache.token_ids, ids)
    cache.check_prompt(torch.cat([ids, ids[:, :1]], 1))
    with pytest.raises(ValueError, match="int input_ids"):
        cache.check_prompt(None)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.token_ids, ids.flip(0))
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.token_ids, ids.flip(0).repeat_interleave(2, 0))
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(cache.token_ids, ids.flip(0))
    cache.update(k[:, :, :1], v[:, :, :1], 1)       # layer 1 behind layer 0
    with pytest.raises(ValueError, match=r"inconsistent.*\[1, 6\]"):
        cache.check_prompt(torch.cat([ids, ids], 1))
    cache.reset()
    assert cache.token_ids is None and cache.get_seq_length() == 0
    cache.check_prompt(ids[:, :1])


def test_guard_generate_on_a_float_model(llama, tok):
    """guard_generate works on any HF causal LM with a hand-built KV4Cache; idempotent; a model
    copy keeps it; other caches pass unchanged."""
    import copy

    from mixq.hf.kv_cache import guard_generate
    assert guard_generate(guard_generate(llama)) is llama
    assert len(llama._forward_pre_hooks) == 1
    twin = copy.deepcopy(llama)
    p = _ids(tok, "Once upon a time")
    cache = KV4Cache(twin.config, bits=8, group_size=4)
    out = _generate(twin, p, cache)
    with pytest.raises(ValueError, match="does not start with"):
        _generate(twin, out.flip(1), cache)
    assert torch.equal(_generate(twin, p, None), _generate(llama, p, None))
    with pytest.raises(TypeError, match="generate"):
        guard_generate(torch.nn.Linear(2, 2))
