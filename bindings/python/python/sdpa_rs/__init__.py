"""sdpa_rs: scaled dot-product attention from the sdpa Rust workspace, over torch
tensors (CPU or CUDA) and numpy arrays (CPU).

    import torch, sdpa_rs
    q = torch.randn(2, 8, 128, 64, dtype=torch.float16, device="cuda")
    out = sdpa_rs.scaled_dot_product_attention(q, q, q, is_causal=True)
    print(sdpa_rs.judge(q, q, q, out, is_causal=True))

* ``scaled_dot_product_attention`` takes PyTorch's signature plus ours (bottom-right
  causal, the Philox dropout seed and offset, the backend set, window, softcap, ALiBi)
  and returns torch tensors on the inputs' device (numpy arrays for numpy inputs).
  Inputs are read where they are, never copied; CUDA work runs on the caller's current
  stream. With inputs that require grad it goes through ``torch.autograd``, whose
  backward is ours too.
* ``judge`` holds anyone's result (PyTorch's, a custom kernel's) against our f64
  reference by the project's tolerance policy and returns a :class:`Report`.
* ``backends`` says which backend would run and every backend's reason.

Bad input raises ``ValueError`` with the message of the Rust library (the argument,
what was expected, what came); a device failure raises ``RuntimeError``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _native

__all__ = [
    "scaled_dot_product_attention",
    "judge",
    "backends",
    "Report",
    "__version__",
]

__version__ = _native.__version__

try:  # torch is optional: numpy arrays work without it.
    import torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None  # type: ignore[assignment]

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

_BACKENDS = ("flash", "efficient", "math")


class _Absent:  # what isinstance tests against where torch or numpy is not installed
    pass


_TENSOR: Any = torch.Tensor if torch is not None else _Absent
_NDARRAY: Any = np.ndarray if np is not None else _Absent


def _is_torch(x: Any) -> bool:
    return isinstance(x, _TENSOR)


def _is_numpy(x: Any) -> bool:
    return isinstance(x, _NDARRAY)


_TORCH_DTYPES: Dict[Any, str] = (
    {
        torch.float64: "f64",
        torch.float32: "f32",
        torch.float16: "f16",
        torch.bfloat16: "bf16",
        torch.bool: "bool",
    }
    if torch is not None
    else {}
)
_STRIDED = torch.strided if torch is not None else None
_NUMPY_DTYPES = {"float64": "f64", "float32": "f32", "float16": "f16", "bool": "bool"}


def _describe(x: Any, name: str) -> Tuple[str, int, Any, Any, str, int]:
    """What the native module needs to read ``x`` where it is: ``(name, address, shape,
    element strides, dtype, device)``, device -1 for the CPU. Built for every tensor of
    every call, so kept to a few attribute reads."""
    if isinstance(x, _TENSOR):
        dtype = _TORCH_DTYPES.get(x.dtype)
        if dtype is None:
            raise ValueError(
                f"{name}: expected a float64, float32, float16, bfloat16 (or, for "
                f"attn_mask, bool) tensor, got {x.dtype}"
            )
        if x.layout is not _STRIDED:
            raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")
        device = x.get_device()  # -1 on the CPU, the ordinal on CUDA
        if device < 0 and not x.is_cpu:
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {x.device}")
        # torch strides are never negative.
        return (name, x.data_ptr(), x.shape, x.stride(), dtype, device)
    if _is_numpy(x):
        itemsize = x.dtype.itemsize
        dtype = _NUMPY_DTYPES.get(str(x.dtype))
        if dtype is None:
            raise ValueError(
                f"{name}: expected a float64, float32, float16 (or, for attn_mask, bool) "
                f"array, got {x.dtype}"
            )
        if any(s < 0 or s % itemsize for s in x.strides):
            raise ValueError(
                f"{name}: expected non-negative strides in whole elements, got {x.strides} "
                f"bytes for {itemsize}-byte elements"
            )
        return (
            name,
            x.__array_interface__["data"][0],
            x.shape,
            [s // itemsize for s in x.strides],
            dtype,
            -1,
        )
    raise ValueError(f"{name}: expected a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def _causal(is_causal: bool, causal: Optional[Union[str, bool]]) -> str:
    if causal is None or causal is False:
        return "top_left" if is_causal else "none"
    if causal is True:
        causal = "top_left"
    if not isinstance(causal, str) or causal not in ("top_left", "bottom_right"):
        raise ValueError(
            f'causal: expected None, "top_left" or "bottom_right", got {causal!r}'
        )
    if is_causal and causal != "top_left":
        raise ValueError(
            f'is_causal: expected False with causal={causal!r} (is_causal=True means '
            f'"top_left"), got True'
        )
    return causal


def _backend_list(backend: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(backend, str):
        if backend == "auto":
            return list(_BACKENDS)
        names = [backend]
    else:
        names = list(backend)
    for n in names:
        if n not in _BACKENDS:
            raise ValueError(
                f'backend: expected "auto", one of {_BACKENDS} or a list of them, got {n!r}'
            )
    if not names:
        raise ValueError("backend: expected at least one backend, got an empty list")
    return names


def _seed(dropout_p: float, seed: Optional[int]) -> int:
    if seed is not None:
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed: expected an integer in [0, 2^64), got {seed!r}")
        return seed
    if dropout_p == 0.0:
        return 0
    # From torch's generator where there is one, so torch.manual_seed reproduces a run.
    if torch is not None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(np.random.randint(0, 2**62, dtype=np.int64))


def _opts(
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
    causal: Optional[Union[str, bool]],
    seed: Optional[int],
    offset: int,
    backend: Union[str, Sequence[str]],
    window: Optional[Tuple[int, int]],
    softcap: Optional[float],
    stream: int,
) -> Dict[str, Any]:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")
    if not isinstance(offset, int) or not 0 <= offset < 2**64:
        raise ValueError(f"offset: expected an integer in [0, 2^64), got {offset!r}")
    if window is None:
        left, right = -1, -1
    else:
        try:
            left, right = (int(w) for w in window)
        except (TypeError, ValueError):
            raise ValueError(
                f"window: expected (window_left, window_right), -1 = unbounded, got {window!r}"
            ) from None
    return {
        "causal": _causal(bool(is_causal), causal),
        "dropout_p": float(dropout_p),
        "seed": _seed(float(dropout_p), seed),
        "offset": offset,
        "scale": None if scale is None else float(scale),
        "enable_gqa": bool(enable_gqa),
        "window_left": left,
        "window_right": right,
        "softcap": None if softcap is None else float(softcap),
        "backends": _backend_list(backend),
        "stream": stream,
    }


def _slopes(alibi_slopes: Any) -> Optional[Dict[str, Any]]:
    if alibi_slopes is None:
        return None
    if _is_torch(alibi_slopes):
        a = alibi_slopes.detach().to("cpu", torch.float32)
        return {"values": a.reshape(-1).tolist(), "shape": list(a.shape)}
    a = np.asarray(alibi_slopes, dtype=np.float32)
    return {"values": a.reshape(-1).tolist(), "shape": list(a.shape)}


def _four_d(x: Any, name: str) -> Any:
    """[H, L, E] -> [1, H, L, E]; [B, H, L, E] as it is; anything else refused."""
    if not (_is_torch(x) or _is_numpy(x)):
        raise ValueError(
            f"{name}: expected a torch.Tensor or a numpy.ndarray, got {type(x).__name__}"
        )
    if x.ndim == 4:
        return x
    if x.ndim == 3:
        return x[None]
    raise ValueError(f"{name}: expected a 3-d [H, L, E] or 4-d [B, H, L, E] tensor, got shape {tuple(x.shape)}")


_RAW_STREAM = getattr(getattr(torch, "_C", None), "_cuda_getCurrentRawStream", None)


def _stream_of(q: Any) -> int:
    """The handle of torch's current CUDA stream on q's device (0 for the CPU)."""
    if _is_torch(q) and q.is_cuda:
        if _RAW_STREAM is not None:  # what torch.cuda.current_stream reads, without the object
            return int(_RAW_STREAM(q.get_device()))
        return int(torch.cuda.current_stream(q.device).cuda_stream)
    return 0


def _same_kind(q: Any, others: Sequence[Tuple[str, Any]]) -> None:
    for name, x in others:
        if x is None:
            continue
        if _is_torch(q) != _is_torch(x):
            raise ValueError(
                f"{name}: expected a {'torch.Tensor' if _is_torch(q) else 'numpy.ndarray'} "
                f"like query, got {type(x).__name__}"
            )
        if _is_torch(q) and x.get_device() != q.get_device():
            raise ValueError(f"{name}: expected a tensor on {q.device} like query, got one on {x.device}")


_CUDA_LIBS_LOADED = False


def _load_cuda_libs() -> None:
    """Makes NVRTC and cuBLAS findable by the native module (which loads them by name at
    run time): where they are not on the loader's path, the copies of the nvidia wheels
    that torch brings (site-packages/nvidia/*/lib) are loaded first, globally, so that
    the native module's load by soname finds them."""
    global _CUDA_LIBS_LOADED
    if _CUDA_LIBS_LOADED:
        return
    _CUDA_LIBS_LOADED = True
    import ctypes
    import glob
    import os
    import sys

    for lib in ("libnvrtc.so", "libcublasLt.so", "libcublas.so"):
        try:
            ctypes.CDLL(lib + ".13", mode=ctypes.RTLD_GLOBAL)
            continue
        except OSError:
            pass
        for base in sys.path:
            hits = sorted(
                glob.glob(os.path.join(base, "nvidia", "*", "lib", lib + ".*"))
                + glob.glob(os.path.join(base, "nvidia", "lib", lib + ".*"))
            )
            if hits:
                try:
                    ctypes.CDLL(hits[-1], mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    continue


def _empty(like: Any, shape: Sequence[int], dtype: Any = None) -> Any:
    if _is_torch(like):
        return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)
    return np.empty(tuple(shape), dtype=dtype or like.dtype)


def _forward(q, k, v, mask, slopes, opts) -> Tuple[Any, Any, str]:
    if _is_torch(q) and q.is_cuda:
        _load_cuda_libs()
    b, hq, l, _ = q.shape
    ev = v.shape[3]
    out = _empty(q, (b, hq, l, ev))
    lse = _empty(q, (b, hq, l), torch.float32 if _is_torch(q) else np.float32)
    backend = _native.forward(
        _describe(q, "query"),
        _describe(k, "key"),
        _describe(v, "value"),
        None if mask is None else _describe(mask, "attn_mask"),
        slopes,
        opts,
        _describe(out, "out"),
        _describe(lse, "lse"),
    )
    return out, lse, backend


def _backward(q, k, v, mask, slopes, opts, out, lse, dout, want_dmask: bool):
    grads = [
        _empty(q, q.shape),
        _empty(k, k.shape),
        _empty(v, v.shape),
    ]
    if want_dmask:
        grads.append(_empty(mask, mask.shape))
    names = ["dq", "dk", "dv", "dmask"]
    _native.backward(
        _describe(q, "query"),
        _describe(k, "key"),
        _describe(v, "value"),
        None if mask is None else _describe(mask, "attn_mask"),
        slopes,
        opts,
        _describe(out, "out"),
        _describe(lse, "lse"),
        _describe(dout, "grad_out"),
        [_describe(g, n) for g, n in zip(grads, names)],
    )
    return grads


if torch is not None:

    class _Attention(torch.autograd.Function):
        """The forward and backward of one call, both ours."""

        @staticmethod
        def forward(ctx, q, k, v, mask, slopes, opts):  # type: ignore[override]
            out, lse, backend = _forward(q.detach(), k.detach(), v.detach(),
                                         None if mask is None else mask.detach(), slopes, opts)
            ctx.save_for_backward(q, k, v, mask, out, lse)
            ctx.slopes = slopes
            ctx.opts = opts
            ctx.backend = backend
            ctx.mark_non_differentiable(lse)
            ctx.set_materialize_grads(False)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):  # type: ignore[override]
            q, k, v, mask, out, lse = ctx.saved_tensors
            want_dmask = (
                mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[3]
            )
            if dout is None:
                zeros = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
                return (*zeros, torch.zeros_like(mask) if want_dmask else None, None, None)
            # The kernels read the incoming gradient with a unit last-dim stride.
            dout = dout.contiguous()
            opts = dict(ctx.opts, stream=_stream_of(q))
            grads = _backward(q.detach(), k.detach(), v.detach(),
                              None if mask is None else mask.detach(),
                              ctx.slopes, opts, out, lse, dout, want_dmask)
            dq, dk, dv = grads[:3]
            dmask = grads[3] if want_dmask else None
            return dq, dk, dv, dmask, None, None


def scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal: Optional[Union[str, bool]] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    backend: Union[str, Sequence[str]] = "auto",
    return_lse: bool = False,
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Any = None,
):
    """``torch.nn.functional.scaled_dot_product_attention`` with our kernels.

    query ``[B, Hq, L, E]`` (or ``[Hq, L, E]``), key ``[B, Hkv, S, E]``, value
    ``[B, Hkv, S, Ev]``; ``attn_mask`` bool (True = takes part) or additive in the
    query's dtype, broadcastable to ``[B, Hq, L, S]``. Ours beyond PyTorch's:

    * ``causal``: ``"top_left"`` (what ``is_causal=True`` means) or ``"bottom_right"``
      (FlashAttention's); combined with ``attn_mask`` as an AND (PyTorch refuses both).
    * ``seed``, ``offset``: the Philox stream of dropout (DESIGN.md "Dropout"); without a
      seed one is drawn from torch's generator.
    * ``backend``: ``"auto"`` (flash > efficient > math, the first that can run) or some
      of ``"flash"``, ``"efficient"``, ``"math"``; the CPU runs math (our f64-accumulating
      reference).
    * ``window=(left, right)`` (-1 = unbounded), ``softcap``, ``alibi_slopes``
      (``[Hq]`` or ``[B, Hq]``).
    * ``return_lse``: also return the log-sum-exp ``[B, Hq, L]`` (f32).

    Returns ``out`` ``[B, Hq, L, Ev]`` (``[Hq, L, Ev]`` for 3-d inputs), and ``lse`` too
    with ``return_lse``.
    """
    squeeze = getattr(query, "ndim", 4) == 3
    q = _four_d(query, "query")
    k = _four_d(key, "key")
    v = _four_d(value, "value")
    _same_kind(q, [("key", k), ("value", v), ("attn_mask", attn_mask)])
    opts = _opts(dropout_p, is_causal, scale, enable_gqa, causal, seed, offset, backend,
                 window, softcap, _stream_of(q))
    slopes = _slopes(alibi_slopes)
    mask = attn_mask
    grad = (
        _is_torch(q)
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (q, k, v, mask))
    )
    if grad:
        out, lse = _Attention.apply(q, k, v, mask, slopes, opts)
    else:
        out, lse, _ = _forward(q, k, v, mask, slopes, opts)
    if squeeze:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


class Report:
    """How a result fared against our f64 reference (``judge``'s answer).

    ``passed``; ``max_abs`` and ``index`` (where it is) with ``got`` / ``truth`` there;
    ``bound`` (the peer rule's) or ``atol`` / ``rtol`` (the dtype's preset); ``rule``;
    ``worst_rows``: ``(b, h, i, max abs err)`` of the worst query rows; ``lse`` (a dict)
    where an lse was given; ``peer`` where a peer result was given. ``str()`` prints it
    as ``sdpa eval`` does.
    """

    def __init__(self, raw: Dict[str, Any]):
        self.raw = raw
        ours = raw["ours"]
        self.passed: bool = raw["passed"]
        self.max_abs: float = ours["max_abs"]
        self.index: Tuple[int, ...] = tuple(ours["index"])
        self.got: float = ours["got"]
        self.truth: float = ours["truth"]
        self.max_rel: float = ours["max_rel"]
        self.non_finite: int = ours["non_finite"]
        self.outside: int = ours["outside"]
        self.count: int = ours["count"]
        self.bound: Optional[float] = raw["bound"]
        self.rule: str = raw["rule"]
        self.atol: float = raw["atol"]
        self.rtol: float = raw["rtol"]
        self.dtype: str = raw["dtype"]
        self.lse: Optional[Dict[str, Any]] = raw["lse"]
        self.peer: Optional[Dict[str, Any]] = raw["peer"]
        self.worst_rows: List[Tuple[int, int, int, float]] = [tuple(r) for r in raw["worst_rows"]]

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        if self.rule == "peer":
            rule = f"peer rule: within 2 x the peer's error + floor = {self.bound:.3e}"
        else:
            rule = f"{self.dtype} preset: |err| <= {self.atol:g} + {self.rtol:g} |truth|"
        lines = [f"  vs out_f64: {self.raw['line']}", f"  rule: {rule}"]
        if self.worst_rows:
            rows = ", ".join(
                f"[{b}, {h}, {i}] {e:.3e}" for b, h, i, e in self.worst_rows
            )
            lines.append(f"  worst rows (b, h, i): {rows}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Report(passed={self.passed}, max_abs={self.max_abs:.3e}, index={self.index}, "
            f"rule={self.rule!r})"
        )


def _host(x: Any) -> Any:
    if _is_torch(x):
        return x.detach().cpu()
    return x


def judge(
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal: Optional[Union[str, bool]] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Any = None,
    lse: Any = None,
    peer: Any = None,
    rows: int = 5,
) -> Report:
    """Holds ``out`` (anyone's result of this call, in the inputs' dtype) against our
    f64 reference on the same inputs by the tolerance policy (DESIGN.md): with ``peer``
    (a trusted implementation's result in the same dtype, e.g. PyTorch's math backend)
    ``max|out - truth| <= 2 max|peer - truth| + floor``; without it, the dtype's preset
    element by element. NaN or Inf where the truth is finite never passes. ``lse``
    ([B, Hq, L], f32), when given, is judged too. Device tensors are copied to the host
    (the reference runs on the CPU). Dropout, when ``dropout_p > 0``, is our Philox
    stream from ``seed`` and ``offset``: only our own results match it.
    """
    if dropout_p and seed is None:
        raise ValueError("seed: expected the seed of the dropout stream with dropout_p > 0, got None")
    squeeze = getattr(query, "ndim", 4) == 3
    q, k, v = (_host(_four_d(x, n)) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    o = _host(out)
    if squeeze and getattr(o, "ndim", 0) == 3:
        o = o[None]
    mask = None if attn_mask is None else _host(attn_mask)
    l = None if lse is None else _host(lse)
    if l is not None and squeeze and l.ndim == 2:
        l = l[None]
    p = None if peer is None else _host(peer)
    if p is not None and squeeze and p.ndim == 3:
        p = p[None]
    _same_kind(q, [("key", k), ("value", v), ("out", o), ("attn_mask", mask), ("lse", l), ("peer", p)])
    if l is not None:
        l = l.float() if _is_torch(l) else l.astype(np.float32)
    opts = _opts(dropout_p, is_causal, scale, enable_gqa, causal, seed, offset, "auto",
                 window, softcap, 0)
    raw = _native.judge(
        _describe(q, "query"),
        _describe(k, "key"),
        _describe(v, "value"),
        None if mask is None else _describe(mask, "attn_mask"),
        _slopes(alibi_slopes),
        opts,
        _describe(o, "out"),
        None if l is None else _describe(l, "lse"),
        None if p is None else _describe(p, "peer"),
        int(rows),
    )
    return Report(raw)


def backends(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal: Optional[Union[str, bool]] = None,
    backend: Union[str, Sequence[str]] = "auto",
    window: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
) -> Dict[str, Any]:
    """Which backend this call would run and why the others would not, without running
    it: ``{"forward": name or None, "backward": name or None, "reasons": {backend:
    None (can run) or the reason}, "problem": summary}``."""
    q = _four_d(query, "query")
    k = _four_d(key, "key")
    v = _four_d(value, "value")
    _same_kind(q, [("key", k), ("value", v), ("attn_mask", attn_mask)])
    opts = _opts(dropout_p, is_causal, scale, enable_gqa, causal, 0, 0, backend, window,
                 softcap, 0)
    return _native.backends(
        _describe(q, "query"),
        _describe(k, "key"),
        _describe(v, "value"),
        None if attn_mask is None else _describe(attn_mask, "attn_mask"),
        opts,
    )
