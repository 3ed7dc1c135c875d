use crate::dropout::Dropout;
use crate::dtype::DType;
use crate::error::{Result, SdpaError};
use crate::layout::{checked_offset_bounds, checked_storage_len, fmt_shape, Layout, TensorDesc};
use crate::mask::{Causal, MaskDesc, MaskKind, Window};

/// Everything about a call that is not a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SdpaOptions {
    /// Causal masking (combined with `attn_mask` when both are given: a key takes part
    /// only if both allow it; PyTorch rejects the combination, we define it).
    pub causal: Causal,
    /// Attention dropout; `Dropout::NONE` by default.
    pub dropout: Dropout,
    /// Softmax scale; `None` means `1 / sqrt(E)`. May be negative or 0; must be finite
    /// in f32 (`|scale| <= f32::MAX`) for every dtype, f64 included: the fused kernels
    /// keep it (as `scale * log2(e)`) in f32 and f16/bf16/f32 scores are f32, so a
    /// larger scale would turn finite scores into infinities and the output into NaN.
    pub scale: Option<f64>,
    /// Grouped-query attention: query head `h` reads kv head `h / (Hq / Hkv)`.
    pub enable_gqa: bool,
    /// Sliding window ([`Window`]); `Window::NONE` by default. Every backend runs it
    /// (the fused CUDA kernels skip the key tiles outside it).
    pub window: Window,
    /// Softcap `c > 0`: scores become `c * tanh(scale * q.k / c)` before any mask.
    /// `None` by default; finite in f32. Every backend runs it, forward and backward
    /// (`dS` times `1 - tanh^2` on its way to dq and dk).
    pub softcap: Option<f64>,
}

impl SdpaOptions {
    /// The window, softcap and scale checked (by those names), and the scale a head dim
    /// of `head_dim` gets (`1 / sqrt(E)` when `scale` is `None`).
    ///
    /// # Errors
    /// `window_left` / `window_right` below -1, a softcap not positive and finite in f32,
    /// a scale not finite in f32.
    pub fn checked_scale(&self, head_dim: usize) -> Result<f64> {
        for (side, n) in [
            ("window_left", self.window.left),
            ("window_right", self.window.right),
        ] {
            if n < -1 {
                return Err(SdpaError::invalid(
                    side,
                    "-1 (unbounded) or a key count >= 0",
                    n,
                ));
            }
        }
        if let Some(c) = self.softcap {
            if !(c > 0.0 && (c as f32).is_finite()) {
                return Err(SdpaError::invalid(
                    "softcap",
                    format!("a positive number finite in f32 (at most {:e})", f32::MAX),
                    format!("{c:e}"),
                ));
            }
        }
        match self.scale {
            // The f16/bf16/f32 paths keep scores and the scale (the fused kernels as
            // `scale_log2`, f32 in FwdParams) in f32: a scale past f32's range turns every
            // score into an infinity and the row into NaN. One bound for every dtype,
            // f64 included (only its math path keeps the scale in f64), so a problem
            // valid in one dtype stays valid in another.
            Some(s) if !(s as f32).is_finite() => Err(SdpaError::invalid(
                "scale",
                format!("a number finite in f32 (|scale| <= {:e})", f32::MAX),
                format!("{s:e}"),
            )),
            Some(s) => Ok(s),
            None => Ok(1.0 / (head_dim as f64).sqrt()),
        }
    }
}

/// ALiBi's geometric slopes for `heads_q` query heads, `2^(-8 (h + 1) / Hq)` (the ALiBi
/// paper's for a power of two): what the tests, benchmarks and goldens use.
pub fn geometric_alibi_slopes(heads_q: usize) -> Vec<f32> {
    (0..heads_q)
        .map(|h| 2f32.powf(-8.0 * (h as f32 + 1.0) / heads_q as f32))
        .collect()
}

/// Checks ALiBi slopes (DESIGN.md, "Inference"): shape `[Hq]` or `[B, Hq]`, every slope
/// finite. Returns the slopes' batch stride: 0 for `[Hq]`, `Hq` for `[B, Hq]`. The one
/// check of every backend's slopes.
///
/// # Errors
/// `alibi_slopes` of another shape, or with a slope that is not finite.
pub fn check_alibi_slopes<'a>(
    shape: &[usize],
    slopes: impl IntoIterator<Item = &'a f32>,
    batch: usize,
    heads_q: usize,
) -> Result<usize> {
    let stride = match shape {
        [h] if *h == heads_q => 0,
        [b, h] if *b == batch && *h == heads_q => heads_q,
        other => {
            return Err(SdpaError::invalid(
                "alibi_slopes",
                format!("shape [{heads_q}] or {}", shape_text(&[batch, heads_q])),
                shape_text(other),
            ))
        }
    };
    if let Some(bad) = slopes.into_iter().find(|x| !x.is_finite()) {
        return Err(SdpaError::invalid("alibi_slopes", "finite slopes", bad));
    }
    Ok(stride)
}

/// The explicit mask of a validated problem, read through broadcast strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaskPlan {
    /// Bool or additive.
    pub kind: MaskKind,
    /// Element strides over `[B, Hq, L, S]`; 0 on broadcast axes.
    pub strides: [isize; 4],
}

impl MaskPlan {
    /// Element offset of `(b, h, i, j)` in the mask's storage.
    #[inline]
    pub fn offset(&self, b: usize, h: usize, i: usize, j: usize) -> isize {
        b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + i as isize * self.strides[2]
            + j as isize * self.strides[3]
    }
}

/// A validated SDPA call: `q [B, Hq, L, E]`, `k [B, Hkv, S, E]`, `v [B, Hkv, S, Ev]`
/// -> `out [B, Hq, L, Ev]`, plus mask, causal, dropout and the resolved scale.
///
/// Only [`Problem::new`] makes one, so every backend may rely on its invariants:
/// - every size fits: each of q, k, v and the mask has at most `isize::MAX` elements
///   (zero extents counted as 1) and every element offset its strides reach fits in
///   `isize`; the output `[B, Hq, L, Ev]` and the scores `[B, Hq, L, S]` fit in
///   `isize::MAX` bytes of f32 (or of the dtype, if wider), so `B*Hq*L*S`, `B*Hq*L*Ev`
///   and every flat dropout index fit in `usize` and u64;
/// - the dropout counters of the call, `offset .. offset + ceil(B*Hq*L*S / 4)`, fit in
///   a u64: no counter repeats within the call, and [`Dropout::advanced`] over the
///   problem's dims does not overflow;
/// - `scale` is finite in f32.
///
/// # NaN and Inf
/// A NaN in anything a query row reads gives NaN in that row: its q row or a key it
/// attends to (a NaN score) gives NaN in the whole output row and in its lse; a NaN in
/// an additive mask entry of a key it attends to likewise; a NaN in `v` of a key it
/// attends to gives NaN in the output elements that read it (the lse does not read
/// `v`). Keys masked out (bool mask `false`, outside the causal range) are not read, so
/// a NaN in their `k`, `v` or additive mask entry changes nothing. An additive `-inf`
/// is added like any other value (`NaN + -inf` is NaN). Dropout does not hide a NaN:
/// a dropped key was still read. Finite inputs never produce NaN or Inf, and a fully
/// masked row gives 0 with lse `-inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// `B`.
    pub batch: usize,
    /// `Hq`.
    pub heads_q: usize,
    /// `Hkv` (equal to `Hq` unless GQA).
    pub heads_kv: usize,
    /// `L`.
    pub len_q: usize,
    /// `S`.
    pub len_kv: usize,
    /// `E`.
    pub head_dim: usize,
    /// `Ev`.
    pub head_dim_v: usize,
    /// dtype of q, k, v and the output.
    pub dtype: DType,
    /// Layout of q.
    pub q: Layout,
    /// Layout of k.
    pub k: Layout,
    /// Layout of v.
    pub v: Layout,
    /// Explicit mask, if any.
    pub mask: Option<MaskPlan>,
    /// Causal alignment.
    pub causal: Causal,
    /// Dropout stream.
    pub dropout: Dropout,
    /// Softmax scale, resolved (`1/sqrt(E)` by default).
    pub scale: f64,
    /// Whether GQA was requested.
    pub enable_gqa: bool,
    /// Sliding window (validated: each side `-1` or at least 0).
    pub window: Window,
    /// Softcap (validated: finite in f32 and positive).
    pub softcap: Option<f64>,
    /// How sequences are laid out: dense, or packed with `cu_seqlens`.
    pub kv_layout: KvLayout,
}

/// How the sequences of a batch are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvLayout {
    /// `[B, H, L, E]` tensors; every sequence has the problem's length.
    #[default]
    Dense,
    /// Packed rows `[total, H, E]` with `cu_seqlens` for queries and keys; the
    /// problem's lengths are the longest sequences (the padded index space of dropout).
    Varlen,
}

fn check_eq(arg: &'static str, what: &str, want: usize, whose: &str, got: usize) -> Result<()> {
    if want != got {
        return Err(SdpaError::invalid(
            arg,
            format!("{what} {want} (the {what} of {whose})"),
            got,
        ));
    }
    Ok(())
}

/// `Err` naming `arg` unless its element count (zero extents counted as 1, as ndarray
/// counts them) fits in `isize` and every element offset its strides reach does too.
fn check_layout(arg: &'static str, layout: &Layout) -> Result<()> {
    if checked_storage_len(&layout.shape).is_none() {
        return Err(SdpaError::invalid(
            arg,
            "a shape of at most isize::MAX elements",
            fmt_shape(&layout.shape),
        ));
    }
    if layout.checked_offset_bounds().is_none() {
        return Err(SdpaError::invalid(
            arg,
            "strides whose element offsets fit in isize",
            format!(
                "shape {} strides {:?}",
                fmt_shape(&layout.shape),
                layout.strides
            ),
        ));
    }
    Ok(())
}

impl Problem {
    /// Validates a call the way PyTorch does and resolves its defaults.
    ///
    /// # Errors
    /// An [`SdpaError::InvalidArgument`] naming the first bad argument: dtypes that
    /// differ, batch or length or head-dim mismatches, heads that do not match (or do not
    /// divide under GQA), a mask of another float dtype or one that does not broadcast,
    /// dropout `p` outside `[0, 1]`, a `dropout_offset` whose counter range for this
    /// call passes `u64::MAX`, a scale that is not finite in f32, and any size that
    /// overflows: a tensor or mask of more than `isize::MAX` elements or with strides
    /// whose offsets do not fit in `isize` (naming that tensor), or an output or score
    /// matrix past `isize::MAX` bytes (naming `query`).
    pub fn new(
        q: &TensorDesc,
        k: &TensorDesc,
        v: &TensorDesc,
        mask: Option<&MaskDesc>,
        options: &SdpaOptions,
    ) -> Result<Self> {
        for (arg, t) in [("key", k), ("value", v)] {
            if t.dtype != q.dtype {
                return Err(SdpaError::invalid(
                    arg,
                    format!("dtype {} (the dtype of query)", q.dtype),
                    t.dtype,
                ));
            }
        }
        for (arg, t) in [("query", q), ("key", k), ("value", v)] {
            check_layout(arg, &t.layout)?;
        }
        let [batch, heads_q, len_q, head_dim] = q.layout.shape;
        let [kb, heads_kv, len_kv, ke] = k.layout.shape;
        let [vb, vh, vs, head_dim_v] = v.layout.shape;
        check_eq("key", "batch size", batch, "query", kb)?;
        check_eq("value", "batch size", batch, "query", vb)?;
        check_eq("key", "head dim", head_dim, "query", ke)?;
        check_eq("value", "heads", heads_kv, "key", vh)?;
        check_eq("value", "sequence length", len_kv, "key", vs)?;
        if options.enable_gqa {
            let divides = if heads_kv == 0 {
                heads_q == 0
            } else {
                heads_q % heads_kv == 0
            };
            if !divides {
                return Err(SdpaError::invalid(
                    "key",
                    format!(
                        "a number of heads that divides the query's {heads_q} heads (enable_gqa)"
                    ),
                    heads_kv,
                ));
            }
        } else if heads_kv != heads_q {
            return Err(SdpaError::invalid(
                "key",
                format!(
                    "{heads_q} heads (the heads of query; set enable_gqa for grouped-query attention)"
                ),
                heads_kv,
            ));
        }
        let mask = match mask {
            None => None,
            Some(m) => {
                if let MaskKind::Additive(dt) = m.kind {
                    if dt != q.dtype {
                        return Err(SdpaError::invalid(
                            "attn_mask",
                            format!("dtype bool or {} (the dtype of query)", q.dtype),
                            dt,
                        ));
                    }
                }
                let target = [batch, heads_q, len_q, len_kv];
                let strides = m.broadcast_strides(target)?;
                if checked_storage_len(&m.shape).is_none() {
                    return Err(SdpaError::invalid(
                        "attn_mask",
                        "a shape of at most isize::MAX elements",
                        fmt_shape(&m.shape),
                    ));
                }
                if checked_offset_bounds(&target, &strides).is_none() {
                    return Err(SdpaError::invalid(
                        "attn_mask",
                        "strides whose element offsets fit in isize",
                        format!("shape {} strides {:?}", fmt_shape(&m.shape), m.strides),
                    ));
                }
                Some(MaskPlan {
                    kind: m.kind,
                    strides,
                })
            }
        };
        // Every backend allocates the output and addresses the score matrix (the math
        // backend stores it, dropout numbers its elements): with zero-sized dims in q, k
        // or v, their dims can multiply past what memory can address even though each
        // input is empty. Counted as ndarray counts (zero extents as 1), in bytes of the
        // wider of the dtype and the f32 that half-precision intermediates are kept in.
        for (what, shape) in [
            ("output [B, Hq, L, Ev]", [batch, heads_q, len_q, head_dim_v]),
            ("scores [B, Hq, L, S]", [batch, heads_q, len_q, len_kv]),
        ] {
            let bytes = shape
                .iter()
                .try_fold(q.dtype.size_bytes().max(4), |acc, &d| {
                    acc.checked_mul(d.max(1))
                })
                .filter(|&b| b <= isize::MAX as usize);
            if bytes.is_none() {
                return Err(SdpaError::invalid(
                    "query",
                    format!("dims whose {what} fits in memory (isize::MAX bytes)"),
                    fmt_shape(&shape),
                ));
            }
        }
        options.dropout.validate()?;
        // Without dropout no counter is drawn, so the offset cannot run past 2^64.
        if options.dropout.is_active() {
            options
                .dropout
                .validate_counters(batch, heads_q, len_q, len_kv)?;
        }
        let scale = options.checked_scale(head_dim)?;
        Ok(Problem {
            batch,
            heads_q,
            heads_kv,
            len_q,
            len_kv,
            head_dim,
            head_dim_v,
            dtype: q.dtype,
            q: q.layout,
            k: k.layout,
            v: v.layout,
            mask,
            causal: options.causal,
            dropout: options.dropout,
            scale,
            enable_gqa: options.enable_gqa,
            window: options.window,
            softcap: options.softcap,
            kv_layout: KvLayout::Dense,
        })
    }

    /// The same problem over packed variable-length sequences: `self` was validated on
    /// the padded dense shapes (B sequences of the longest lengths); `q`, `k`, `v` are
    /// the packed tensors' `[1, H, total, dim]` views, whose strides the support checks
    /// read.
    pub fn into_varlen(self, q: Layout, k: Layout, v: Layout) -> Problem {
        Problem {
            q,
            k,
            v,
            kv_layout: KvLayout::Varlen,
            ..self
        }
    }

    /// The options this problem was made with (the scale resolved), so that the same
    /// tensors give the same problem again.
    pub fn options(&self) -> SdpaOptions {
        SdpaOptions {
            causal: self.causal,
            dropout: self.dropout,
            scale: Some(self.scale),
            enable_gqa: self.enable_gqa,
            window: self.window,
            softcap: self.softcap,
        }
    }

    /// Shape of the output, `[B, Hq, L, Ev]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.heads_q, self.len_q, self.head_dim_v]
    }

    /// Shape of the (virtual) score matrix, `[B, Hq, L, S]`.
    pub fn scores_shape(&self) -> [usize; 4] {
        [self.batch, self.heads_q, self.len_q, self.len_kv]
    }

    /// Shape of the log-sum-exp, `[B, Hq, L]`.
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.heads_q, self.len_q]
    }

    /// Query heads that share one kv head (1 without GQA).
    pub fn group_size(&self) -> usize {
        self.heads_q
            .checked_div(self.heads_kv)
            .map_or(1, |group| group.max(1))
    }

    /// The kv head query head `h` reads.
    #[inline]
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.group_size()
    }

    /// True when any of B, Hq, L, S, E, Ev is zero.
    pub fn is_empty(&self) -> bool {
        [
            self.batch,
            self.heads_q,
            self.heads_kv,
            self.len_q,
            self.len_kv,
            self.head_dim,
            self.head_dim_v,
        ]
        .contains(&0)
    }

    /// Floating-point operations of the two matrix products, `2*B*Hq*L*S*(E + Ev)`
    /// (the usual `4*B*H*L*S*E` when `Ev = E`), halved under causal masking.
    pub fn flops(&self) -> f64 {
        let full = 2.0
            * self.batch as f64
            * self.heads_q as f64
            * self.len_q as f64
            * self.len_kv as f64
            * (self.head_dim + self.head_dim_v) as f64;
        if self.causal == Causal::None {
            full
        } else {
            full / 2.0
        }
    }

    /// One-line summary, e.g. `B=2 Hq=8 Hkv=2 L=97 S=113 E=64 Ev=64 f16 causal=top_left`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "B={} Hq={} Hkv={} L={} S={} E={} Ev={} {}",
            self.batch,
            self.heads_q,
            self.heads_kv,
            self.len_q,
            self.len_kv,
            self.head_dim,
            self.head_dim_v,
            self.dtype
        );
        if let Some(m) = &self.mask {
            match m.kind {
                MaskKind::Bool => s.push_str(" mask=bool"),
                MaskKind::Additive(_) => s.push_str(" mask=additive"),
            }
        }
        if self.causal != Causal::None {
            s.push_str(&format!(" causal={}", self.causal.name()));
        }
        if self.dropout.is_active() {
            s.push_str(&format!(" dropout_p={}", self.dropout.p));
        }
        if self.window.is_active() {
            s.push_str(&format!(
                " window=({},{})",
                self.window.left, self.window.right
            ));
        }
        if let Some(c) = self.softcap {
            s.push_str(&format!(" softcap={c}"));
        }
        s
    }
}

/// `[a, b, c, d]` as text, for messages.
pub fn shape_text(shape: &[usize]) -> String {
    fmt_shape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DType, shape: [usize; 4]) -> TensorDesc {
        TensorDesc::contiguous(dtype, shape)
    }

    fn msg(r: Result<Problem>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn valid_problem_resolves_defaults() {
        let p = Problem::new(
            &t(DType::F16, [2, 8, 5, 64]),
            &t(DType::F16, [2, 2, 7, 64]),
            &t(DType::F16, [2, 2, 7, 32]),
            None,
            &SdpaOptions {
                enable_gqa: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.scale, 0.125);
        assert_eq!(p.out_shape(), [2, 8, 5, 32]);
        assert_eq!(p.group_size(), 4);
        assert_eq!(p.kv_head(7), 1);
        assert_eq!(p.kv_head(3), 0);
        assert_eq!(p.flops(), 2.0 * 2.0 * 8.0 * 5.0 * 7.0 * 96.0);
    }

    #[test]
    fn every_bad_argument_is_named() {
        let q = t(DType::F32, [2, 4, 5, 8]);
        let k = t(DType::F32, [2, 4, 6, 8]);
        let v = t(DType::F32, [2, 4, 6, 3]);
        let o = SdpaOptions::default();
        assert_eq!(
            msg(Problem::new(&q, &t(DType::F16, [2, 4, 6, 8]), &v, None, &o)),
            "key: expected dtype f32 (the dtype of query), got f16"
        );
        assert_eq!(
            msg(Problem::new(&q, &k, &t(DType::F64, [2, 4, 6, 3]), None, &o)),
            "value: expected dtype f32 (the dtype of query), got f64"
        );
        assert_eq!(
            msg(Problem::new(&q, &t(DType::F32, [3, 4, 6, 8]), &v, None, &o)),
            "key: expected batch size 2 (the batch size of query), got 3"
        );
        assert_eq!(
            msg(Problem::new(&q, &t(DType::F32, [2, 4, 6, 9]), &v, None, &o)),
            "key: expected head dim 8 (the head dim of query), got 9"
        );
        assert_eq!(
            msg(Problem::new(&q, &k, &t(DType::F32, [2, 4, 7, 3]), None, &o)),
            "value: expected sequence length 6 (the sequence length of key), got 7"
        );
        assert_eq!(
            msg(Problem::new(&q, &k, &t(DType::F32, [2, 2, 6, 3]), None, &o)),
            "value: expected heads 4 (the heads of key), got 2"
        );
        let k2 = t(DType::F32, [2, 2, 6, 8]);
        let v2 = t(DType::F32, [2, 2, 6, 3]);
        assert!(msg(Problem::new(&q, &k2, &v2, None, &o)).starts_with("key: expected 4 heads"));
        let gqa = SdpaOptions {
            enable_gqa: true,
            ..o
        };
        assert!(Problem::new(&q, &k2, &v2, None, &gqa).is_ok());
        let k3 = t(DType::F32, [2, 3, 6, 8]);
        let v3 = t(DType::F32, [2, 3, 6, 3]);
        assert_eq!(
            msg(Problem::new(&q, &k3, &v3, None, &gqa)),
            "key: expected a number of heads that divides the query's 4 heads (enable_gqa), got 3"
        );
        let float_mask = MaskDesc::contiguous(MaskKind::Additive(DType::F64), &[5, 6]);
        assert_eq!(
            msg(Problem::new(&q, &k, &v, Some(&float_mask), &o)),
            "attn_mask: expected dtype bool or f32 (the dtype of query), got f64"
        );
        let wide = MaskDesc::contiguous(MaskKind::Bool, &[5, 7]);
        assert!(msg(Problem::new(&q, &k, &v, Some(&wide), &o)).starts_with("attn_mask:"));
        let bad_p = SdpaOptions {
            dropout: Dropout::new(-0.5, 0, 0),
            ..o
        };
        assert!(msg(Problem::new(&q, &k, &v, None, &bad_p)).starts_with("dropout_p:"));
        for s in [f64::NAN, f64::INFINITY] {
            let bad_scale = SdpaOptions {
                scale: Some(s),
                ..o
            };
            assert!(msg(Problem::new(&q, &k, &v, None, &bad_scale)).starts_with("scale:"));
        }
    }

    #[test]
    fn alibi_slopes_are_checked_by_name() {
        let check = |shape: &[usize], x: f32, batch| {
            let n = shape.iter().product::<usize>();
            check_alibi_slopes(shape, vec![x; n].iter(), batch, 4)
        };
        assert_eq!(check(&[4], 0.5, 2).unwrap(), 0);
        assert_eq!(check(&[2, 4], 0.5, 2).unwrap(), 4);
        let e = check(&[2, 4], 0.5, 3).unwrap_err().to_string();
        assert!(e.contains("alibi_slopes") && e.contains("[3, 4]"), "{e}");
        assert!(check(&[4], f32::NAN, 2).is_err());
    }

    #[test]
    fn window_and_softcap_are_validated_by_name_and_run_on_every_backend() {
        let x = t(DType::F16, [1, 2, 5, 8]);
        let with = |window, softcap| SdpaOptions {
            window,
            softcap,
            ..Default::default()
        };
        let err = |o: SdpaOptions| Problem::new(&x, &x, &x, None, &o).unwrap_err().to_string();
        assert!(err(with(Window { left: -2, right: 0 }, None)).contains("window_left"));
        assert!(err(with(Window { left: 0, right: -3 }, None)).contains("window_right"));
        for c in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            assert!(err(with(Window::NONE, Some(c))).contains("softcap"), "{c}");
        }
        let p = Problem::new(
            &x,
            &x,
            &x,
            None,
            &with(Window { left: 1, right: 0 }, Some(30.0)),
        )
        .unwrap();
        let mut want = with(Window { left: 1, right: 0 }, Some(30.0));
        want.scale = Some(p.scale);
        assert_eq!(p.options(), want);
        assert!(
            p.summary().contains("window=(1,0) softcap=30"),
            "{}",
            p.summary()
        );
        // Every CUDA backend has both (issue 17, item 2), as the CPU reference does.
        for backend in crate::Backend::PRIORITY {
            assert_eq!(
                crate::check_support(backend, &p, crate::Device::Cuda),
                Ok(()),
                "{backend}"
            );
        }
        assert!(crate::check_support(crate::Backend::Math, &p, crate::Device::Cpu).is_ok());
    }

    #[test]
    fn empty_dims_are_accepted() {
        let p = Problem::new(
            &t(DType::F32, [1, 2, 0, 4]),
            &t(DType::F32, [1, 2, 0, 4]),
            &t(DType::F32, [1, 2, 0, 4]),
            None,
            &SdpaOptions::default(),
        )
        .unwrap();
        assert!(p.is_empty());
        // GQA with zero kv heads and zero query heads is consistent.
        let gqa = SdpaOptions {
            enable_gqa: true,
            ..Default::default()
        };
        assert!(Problem::new(
            &t(DType::F32, [1, 0, 3, 4]),
            &t(DType::F32, [1, 0, 3, 4]),
            &t(DType::F32, [1, 0, 3, 4]),
            None,
            &gqa
        )
        .is_ok());
        assert!(Problem::new(
            &t(DType::F32, [1, 2, 3, 4]),
            &t(DType::F32, [1, 0, 3, 4]),
            &t(DType::F32, [1, 0, 3, 4]),
            None,
            &gqa
        )
        .is_err());
    }
}
