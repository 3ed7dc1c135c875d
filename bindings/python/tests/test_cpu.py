"""sdpa_rs on the CPU against torch.nn.functional.scaled_dot_product_attention (its f64
math), our Philox dropout stream recomputed here from DESIGN.md, the judge, autograd and
bad input. Runs in CI (ci/python.sh) with the CPU of a machine without a GPU."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdpa_rs

# (B, Hq, Hkv, L, S, E, Ev)
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 4, 4, 16, 16, 8, 8),
    (1, 2, 2, 7, 33, 16, 5),
    (2, 8, 2, 12, 20, 32, 32),
    (1, 3, 1, 40, 9, 4, 12),
    (3, 2, 2, 1, 64, 64, 64),
    (1, 2, 2, 64, 1, 8, 8),
]


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def inputs(shape, dtype=torch.float64):
    b, hq, hkv, l, s, e, ev = shape
    return rand(b, hq, l, e, dtype=dtype), rand(b, hkv, s, e, dtype=dtype), rand(b, hkv, s, ev, dtype=dtype)


def masks(shape, dtype):
    b, hq, _, l, s, _, _ = shape
    yield "none", None
    yield "bool [L, S]", torch.rand(l, s) > 0.3
    yield "additive [B, 1, L, S]", rand(b, 1, l, s, dtype=dtype)
    yield "additive [S] expanded", rand(s, dtype=dtype).expand(hq, l, s)
    yield "bool [B, Hq, L, S]", torch.rand(b, hq, l, s) > 0.5


def torch_sdpa(q, k, v, mask=None, **kw):
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("causal", [False, True])
def test_f64_equals_torch_math(shape, causal):
    q, k, v = inputs(shape)
    gqa = shape[1] != shape[2]
    for name, mask in masks(shape, torch.float64):
        if causal and mask is not None:
            continue  # PyTorch refuses the combination (we define it: see below)
        ours = sdpa_rs.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
        want = torch_sdpa(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
        # A bool row with no key: PyTorch's math gives NaN, we give 0 (DESIGN.md "NaN").
        empty = torch.isnan(want)
        assert torch.equal(ours[empty], torch.zeros_like(ours[empty])), name
        torch.testing.assert_close(ours[~empty], want[~empty], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=[str(s) for s in SHAPES[1:5]])
def test_low_precision_passes_the_policy_against_torch_math(dtype, shape):
    q, k, v = inputs(shape, dtype)
    gqa = shape[1] != shape[2]
    for name, mask in masks(shape, dtype):
        if mask is not None and mask.dtype == torch.bool and not mask.any(-1).all():
            continue
        ours = sdpa_rs.scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa)
        peer = torch_sdpa(q, k, v, mask, enable_gqa=gqa)
        report = sdpa_rs.judge(q, k, v, ours, mask, enable_gqa=gqa, peer=peer)
        assert report.passed, f"{name}\n{report}"
        assert report.rule == "peer"


def test_scale_and_bottom_right_causal():
    q, k, v = inputs((2, 2, 2, 5, 11, 8, 8))
    ours = sdpa_rs.scaled_dot_product_attention(q, k, v, scale=0.37, causal="bottom_right")
    # Bottom-right: row i sees keys j <= i + S - L.
    keep = torch.ones(5, 11, dtype=torch.bool).tril(11 - 5)
    want = torch_sdpa(q, k, v, keep, scale=0.37)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    # Causal AND a mask (PyTorch refuses both; we define it as the AND).
    mask = torch.rand(5, 11) > 0.2
    both = sdpa_rs.scaled_dot_product_attention(q, k, v, mask, causal="bottom_right")
    want = torch_sdpa(q, k, v, mask & keep)
    empty = torch.isnan(want)
    torch.testing.assert_close(both[~empty], want[~empty], rtol=1e-12, atol=1e-12)


def test_window_softcap_alibi_equal_an_explicit_float_mask():
    b, h, l, s, e = 2, 4, 9, 15, 8
    q, k, v = rand(b, h, l, e), rand(b, h, s, e), rand(b, h, s, e)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float32)
    left, right, cap, scale = 3, 1, 2.5, 1 / math.sqrt(e)
    ours = sdpa_rs.scaled_dot_product_attention(
        q, k, v, window=(left, right), softcap=cap, alibi_slopes=slopes
    )
    i = torch.arange(l)[:, None] + s - l
    j = torch.arange(s)[None, :]
    scores = cap * torch.tanh(scale * (q @ k.transpose(-1, -2)) / cap)
    scores = scores - slopes.double()[None, :, None, None] * (i - j).abs()
    scores = scores.masked_fill(~((j >= i - left) & (j <= i + right)), float("-inf"))
    want = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def test_strided_views_are_read_where_they_are():
    # [B, L, H, E] storage seen as [B, H, L, E]: no copy, same answer.
    base = rand(2, 10, 4, 16)
    q = base.transpose(1, 2)
    assert not q.is_contiguous()
    kv = rand(2, 4, 16, 32)[..., ::2]
    ours = sdpa_rs.scaled_dot_product_attention(q, kv, kv)
    torch.testing.assert_close(ours, torch_sdpa(q, kv, kv), rtol=1e-12, atol=1e-12)


def test_three_d_inputs_and_return_lse():
    q = rand(3, 6, 8)
    out, lse = sdpa_rs.scaled_dot_product_attention(q, q, q, return_lse=True)
    assert out.shape == (3, 6, 8) and lse.shape == (3, 6) and lse.dtype == torch.float32
    torch.testing.assert_close(out, torch_sdpa(q, q, q), rtol=1e-12, atol=1e-12)
    scores = (q @ q.transpose(-1, -2)) / math.sqrt(8)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)


def test_numpy_arrays_in_numpy_arrays_out():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 5, 4))
    k = rng.standard_normal((2, 3, 7, 4))
    mask = rng.random((5, 7)) > 0.2
    out = sdpa_rs.scaled_dot_product_attention(q, k, k, mask)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 5, 4)
    want = torch_sdpa(*(torch.from_numpy(x) for x in (q, k, k)), torch.from_numpy(mask)).numpy()
    ok = ~np.isnan(want)
    np.testing.assert_allclose(out[ok], want[ok], rtol=1e-12, atol=1e-12)
    f16 = q.astype(np.float16)
    assert sdpa_rs.scaled_dot_product_attention(f16, f16, f16).dtype == np.float16


# Philox4x32-10 (Random123) and the keep rule of DESIGN.md "Dropout", written here from
# the spec, independently of the Rust code.
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox(counter, key):
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


def test_philox_here_matches_random123_known_answers():
    assert philox((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox((MASK32,) * 4, (MASK32,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def keep_mask(p, seed, offset, b, h, l, s):
    t = min(math.floor(p * 2**32), 2**32 - 1)
    key = (seed & MASK32, seed >> 32)
    keep = np.zeros(b * h * l * s, dtype=bool)
    for n in range(b * h * l * s):
        c = offset + n // 4
        x = philox((c & MASK32, c >> 32, 0, 0), key)[n % 4]
        keep[n] = x >= t
    return torch.from_numpy(keep.reshape(b, h, l, s))


@pytest.mark.parametrize("p,seed,offset", [(0.3, 7, 0), (0.5, 2**40 + 3, 1234), (0.9, 99, 5)])
def test_dropout_is_our_philox_stream(p, seed, offset):
    b, h, l, s, e = 2, 3, 5, 6, 4
    q, k, v = rand(b, h, l, e), rand(b, h, s, e), rand(b, h, s, e)
    ours = sdpa_rs.scaled_dot_product_attention(q, k, v, dropout_p=p, seed=seed, offset=offset)
    keep = keep_mask(p, seed, offset, b, h, l, s)
    probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(e), -1)
    want = (probs * keep / (1 - p)) @ v
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    again = sdpa_rs.scaled_dot_product_attention(q, k, v, dropout_p=p, seed=seed, offset=offset)
    assert torch.equal(ours, again)
    other = sdpa_rs.scaled_dot_product_attention(q, k, v, dropout_p=p, seed=seed + 1, offset=offset)
    assert not torch.equal(ours, other)


def test_dropout_without_a_seed_follows_torch_manual_seed():
    q = rand(1, 2, 8, 4)
    torch.manual_seed(5)
    a = sdpa_rs.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(5)
    b = sdpa_rs.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(a, b)


def test_judge_catches_a_wrong_result_and_says_where():
    q, k, v = inputs((2, 4, 4, 16, 16, 8, 8), torch.float32)
    good = torch_sdpa(q, k, v)
    assert sdpa_rs.judge(q, k, v, good).passed
    bad = good.clone()
    bad[1, 2, 7, 3] += 1e-3
    report = sdpa_rs.judge(q, k, v, bad)
    assert not report.passed
    assert report.index == (1, 2, 7, 3)
    assert report.worst_rows[0][:3] == (1, 2, 7)
    assert report.outside == 1
    text = str(report)
    assert "FAIL" in text and "[1, 2, 7, 3]" in text and "worst rows" in text
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    r = sdpa_rs.judge(q, k, v, nan)
    assert not r.passed and r.non_finite == 1
    # The peer rule: within twice the peer's error (+ floor); a peer as wrong as `bad`
    # lets `bad` pass, an exact one does not.
    assert sdpa_rs.judge(q, k, v, bad, peer=bad).passed
    assert not sdpa_rs.judge(q, k, v, bad, peer=good).passed
    # The lse is judged too.
    out, lse = sdpa_rs.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert sdpa_rs.judge(q, k, v, out, lse=lse).passed
    assert not sdpa_rs.judge(q, k, v, out, lse=lse + 1e-2).passed


def test_judge_holds_a_causal_mistake():
    q, k, v = inputs((1, 2, 2, 9, 9, 8, 8), torch.float16)
    wrong = torch_sdpa(q, k, v)  # computed without the causal mask
    report = sdpa_rs.judge(q, k, v, wrong, is_causal=True)
    assert not report.passed
    assert report.worst_rows[0][2] < 8  # not the last row, which sees every key


def test_autograd_matches_torch_math_backward():
    b, hq, hkv, l, s, e = 2, 4, 2, 6, 9, 8
    q, k, v = rand(b, hq, l, e), rand(b, hkv, s, e), rand(b, hkv, s, e)
    mask = rand(1, hq, l, s)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    dout = rand(b, hq, l, e)
    out = sdpa_rs.scaled_dot_product_attention(*leaves, enable_gqa=True, scale=0.3)
    out.backward(dout)
    want = F.scaled_dot_product_attention(*theirs, enable_gqa=True, scale=0.3)
    want.backward(dout)
    for name, a, w in zip("q k v mask".split(), leaves, theirs):
        torch.testing.assert_close(a.grad, w.grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kw", [
    dict(is_causal=True),
    dict(causal="bottom_right", window=(2, 0)),
    dict(softcap=1.5, alibi_slopes=torch.tensor([0.3, 0.1])),
    dict(dropout_p=0.25, seed=11),
])
def test_gradcheck_of_our_backward(kw):
    q, k, v = (rand(1, 2, n, 3).requires_grad_() for n in (4, 5, 5))
    fn = lambda q, k, v: sdpa_rs.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


def test_backward_of_an_unused_output_and_no_grad():
    q = rand(1, 1, 3, 2).requires_grad_()
    out, lse = sdpa_rs.scaled_dot_product_attention(q, q, q, return_lse=True)
    assert not lse.requires_grad
    (out.sum() * 0).backward()
    assert q.grad is not None
    with torch.no_grad():
        assert not sdpa_rs.scaled_dot_product_attention(q, q, q).requires_grad


def test_backends_reports_every_reason():
    q = rand(1, 2, 8, 16, dtype=torch.float16)
    r = sdpa_rs.backends(q, q, q)
    assert r["forward"] == "math" and r["reasons"]["math"] is None
    assert "CUDA only" in r["reasons"]["flash"]
    r = sdpa_rs.backends(q, q, q, backend="flash")
    assert r["forward"] is None and r["reasons"]["math"].startswith("not enabled")


BAD = [
    (lambda q: sdpa_rs.scaled_dot_product_attention(q[0, 0], q, q), "query: expected a 3-d"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q[..., :3], q), "key"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q.float(), q), "key"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q.int(), q.int(), q.int()), "query: expected a float64"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, torch.zeros(3, 3, dtype=torch.float64)), "attn_mask"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, torch.zeros(8, 8, dtype=torch.float32)), "attn_mask"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, dropout_p=1.5), "dropout"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, causal="middle"), "causal"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, is_causal=True, causal="bottom_right"), "is_causal"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, backend="fast"), "backend"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, backend="flash"), "flash: runs on CUDA only"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, scale=float("inf")), "scale"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, softcap=-1.0), "softcap"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, window=(-2, 0)), "window_left"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, window=3), "window"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, alibi_slopes=torch.ones(3)), "alibi_slopes"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, alibi_slopes=torch.tensor([1.0, float("nan")])), "alibi_slopes"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q, seed=-1, dropout_p=0.1), "seed"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q[:, :, :5]), "value"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q, q, q.numpy()), "value"),
    (lambda q: sdpa_rs.scaled_dot_product_attention([1.0], q, q), "query"),
    (lambda q: sdpa_rs.scaled_dot_product_attention(q.numpy()[:, :, ::-1], q.numpy(), q.numpy()), "non-negative strides"),
    (lambda q: sdpa_rs.judge(q, q, q, q[..., :2]), "out"),
    (lambda q: sdpa_rs.judge(q, q, q, q, dropout_p=0.1), "seed"),
]


@pytest.mark.parametrize("call,needle", BAD, ids=[n for _, n in BAD])
def test_bad_input_raises_value_error_naming_it(call, needle):
    q = rand(1, 2, 8, 4)
    with pytest.raises(ValueError) as e:
        call(q)
    assert needle in str(e.value), str(e.value)


def test_gqa_needs_enable_gqa():
    q, k = rand(1, 4, 3, 8), rand(1, 2, 3, 8)
    with pytest.raises(ValueError, match="key"):
        sdpa_rs.scaled_dot_product_attention(q, k, k)
    k3 = rand(1, 3, 3, 8)
    with pytest.raises(ValueError):
        sdpa_rs.scaled_dot_product_attention(q, k3, k3, enable_gqa=True)
