use crate::linear::Linear;
use crate::profile::Profiler;
use crate::{NnError, Result};
use ndarray::{Array1, Array2, Array3, Array4, Array5, ArrayView2, ArrayView3, Axis};
use sdpa::{Elem as Element, Exec, Tensor};
use sdpa_core::{Causal, DType, Dropout, SdpaError, SdpaOptions};
use sdpa_nested::{CuSeqlens, Nested};
use std::collections::HashMap;

/// The dropout stream of a module: a Philox seed and a counter offset that advances by
/// what each call consumes, so two calls draw different bits and a run replays from
/// its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutGenerator {
    /// Philox key.
    pub seed: u64,
    /// Next unused counter.
    pub offset: u64,
}

impl DropoutGenerator {
    /// A stream starting at counter 0.
    pub fn new(seed: u64) -> Self {
        DropoutGenerator { seed, offset: 0 }
    }

    /// Dropout with probability `p` over `elements` elements; advances the offset by the
    /// `ceil(elements / 4)` counters it uses.
    pub fn take(&mut self, p: f64, elements: u128) -> Dropout {
        let d = Dropout::new(p, self.seed, self.offset);
        self.offset = self.offset.wrapping_add(elements.div_ceil(4) as u64);
        d
    }
}

/// Multiplies `y [rows, E]` by the keep bits of `d` (element `(r, e)` at flat index
/// `index(r) * E + e`) and the keep scale `1 / (1 - p)`: the residual dropout of the
/// forward and, replayed on the incoming gradient, its backward.
fn apply_keep<T: Element>(d: &Dropout, y: &mut Array2<T>, index: impl Fn(usize) -> u64) {
    let scale = <T::Acc as num_traits::NumCast>::from(d.keep_scale()).expect("finite");
    let e = y.ncols() as u64;
    let mut keep = vec![true; y.ncols()];
    for (r, mut row) in y.outer_iter_mut().enumerate() {
        d.fill_keep_row(index(r) * e, &mut keep);
        for (x, &k) in row.iter_mut().zip(&keep) {
            *x = if k {
                T::from_acc(x.to_acc() * scale)
            } else {
                T::from_acc(num_traits::Zero::zero())
            };
        }
    }
}

/// The host result of an attention call of host arrays.
fn host_result<T: Element>(
    r: sdpa::Result<sdpa::Attention<T>>,
) -> Result<(Array4<T>, ndarray::Array3<f32>)> {
    Ok(r?.into_host().expect("host arrays in, host arrays out"))
}

/// Attention's `[B, H, T, D]` as `c_proj`'s input rows: `[B, T, H, D]` -> `[B*T, H*D]`.
fn heads_to_rows<T: Element>(attn: &Array4<T>) -> Array2<T> {
    let (b, h, t, d) = attn.dim();
    attn.view()
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((b * t, h * d))
        .expect("standard layout reshapes")
}

/// What [`CausalSelfAttention::forward_train`] keeps for the backward.
#[derive(Debug, Clone)]
pub struct Saved<T> {
    /// The input rows `[B*T, E]` (`c_attn`'s input).
    rows: Array2<T>,
    /// `c_attn`'s output `[B, T, 3, H, D]` (q, k, v).
    qkv: ndarray::Array5<T>,
    /// Attention's output `[B, H, T, D]` and lse `[B, H, T]`.
    attn: Array4<T>,
    lse: ndarray::Array3<f32>,
    /// `c_proj`'s input `[B*T, E]`.
    y: Array2<T>,
    /// The attention call's options (its dropout stream included).
    options: SdpaOptions,
    /// The residual dropout drawn, if any.
    resid: Option<Dropout>,
}

/// Gradients of [`CausalSelfAttention::backward`], in the module's dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleGrads<T> {
    /// `[B, T, E]`.
    pub dx: Array3<T>,
    /// `c_attn.weight [3E, E]` and `c_attn.bias [3E]` (if the layer has one).
    pub c_attn: (Array2<T>, Option<Array1<T>>),
    /// `c_proj.weight [E, E]` and `c_proj.bias [E]` (if the layer has one).
    pub c_proj: (Array2<T>, Option<Array1<T>>),
}

/// The KV cache a module owns for incremental decoding ([`CausalSelfAttention::decode`]):
/// dense `[B, H, capacity, D]` keys and values and each batch row's length.
#[derive(Debug, Clone)]
pub struct ModuleCache<T> {
    k: Array4<T>,
    v: Array4<T>,
    lens: Array1<i32>,
}

impl<T: Element> ModuleCache<T> {
    /// An empty cache for `batch` sequences of up to `capacity` tokens of a module of
    /// `heads` heads of `head_dim`.
    ///
    /// # Errors
    /// A capacity past `i32::MAX` (the lengths are i32, as the kernels read them).
    pub fn new(batch: usize, heads: usize, capacity: usize, head_dim: usize) -> Result<Self> {
        if i32::try_from(capacity).is_err() {
            return Err(SdpaError::invalid("capacity", "at most i32::MAX tokens", capacity).into());
        }
        let zero = T::from_acc(num_traits::Zero::zero());
        Ok(ModuleCache {
            k: Array4::from_elem((batch, heads, capacity, head_dim), zero),
            v: Array4::from_elem((batch, heads, capacity, head_dim), zero),
            lens: Array1::zeros(batch),
        })
    }

    /// Tokens cached for each sequence.
    pub fn lens(&self) -> Vec<usize> {
        self.lens.iter().map(|&n| n as usize).collect()
    }
}

/// nanoGPT's causal self-attention block, as the PyTorch SDPA tutorial defines it.
#[derive(Debug, Clone)]
pub struct CausalSelfAttention<T: Element> {
    c_attn: Linear<T>,
    c_proj: Linear<T>,
    heads: usize,
    dropout: f64,
    is_causal: bool,
    training: bool,
    generator: DropoutGenerator,
}

fn get<T: Element>(
    tensors: &safetensors::SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<Option<ndarray::ArrayD<T>>> {
    let view = match tensors.tensor(name) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    let want = match T::DTYPE {
        DType::F64 => safetensors::Dtype::F64,
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
    };
    if view.dtype() != want {
        return Err(NnError::weight(
            name,
            format!("dtype {:?} (the module's)", want),
            format!("{:?}", view.dtype()),
        ));
    }
    if view.shape() != shape {
        return Err(NnError::weight(
            name,
            format!("shape {shape:?}"),
            format!("{:?}", view.shape()),
        ));
    }
    let size = T::DTYPE.size_bytes();
    let values: Vec<T> = view
        .data()
        .chunks_exact(size)
        .map(|c| {
            let wide = match T::DTYPE {
                DType::F64 => f64::from_le_bytes(c.try_into().expect("8 bytes")),
                DType::F32 => f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                DType::F16 => half::f16::from_le_bytes(c.try_into().expect("2 bytes")).to_f64(),
                DType::BF16 => half::bf16::from_le_bytes(c.try_into().expect("2 bytes")).to_f64(),
            };
            // Exact: every value is representable in T (it came from T's bytes).
            T::from_acc(num_traits::cast(wide).expect("finite or inf/nan casts"))
        })
        .collect();
    Ok(Some(
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), values)
            .map_err(|e| NnError::weight(name, "data matching its shape", e))?,
    ))
}

impl<T: Element> CausalSelfAttention<T> {
    /// From the two layers. Starts in training mode (as a fresh `nn.Module`), with
    /// dropout seed 0.
    ///
    /// # Errors
    /// `c_attn` not `[3E, E]`, `c_proj` not `[E, E]`, `E` not divisible by `heads`,
    /// `dropout` outside `[0, 1]`.
    pub fn new(
        c_attn: Linear<T>,
        c_proj: Linear<T>,
        heads: usize,
        dropout: f64,
        is_causal: bool,
    ) -> Result<Self> {
        let e = c_attn.in_features();
        if c_attn.out_features() != 3 * e {
            return Err(NnError::weight(
                "c_attn.weight",
                format!("shape [{}, {e}] ([3E, E])", 3 * e),
                format!("[{}, {e}]", c_attn.out_features()),
            ));
        }
        if c_proj.in_features() != e || c_proj.out_features() != e {
            return Err(NnError::weight(
                "c_proj.weight",
                format!("shape [{e}, {e}] ([E, E])"),
                format!("[{}, {}]", c_proj.out_features(), c_proj.in_features()),
            ));
        }
        if heads == 0 || e % heads != 0 {
            return Err(SdpaError::invalid(
                "heads",
                format!("a divisor of the embedding dim {e}"),
                heads,
            )
            .into());
        }
        Dropout::new(dropout, 0, 0).validate()?;
        Ok(CausalSelfAttention {
            c_attn,
            c_proj,
            heads,
            dropout,
            is_causal,
            training: true,
            generator: DropoutGenerator::new(0),
        })
    }

    /// Loads `c_attn.weight [3E, E]`, `c_proj.weight [E, E]` and the optional
    /// `c_attn.bias`, `c_proj.bias` from safetensors bytes (a torch `state_dict` saved
    /// with `safetensors.torch.save_file`).
    ///
    /// # Errors
    /// Unreadable bytes; a missing weight; a weight or bias of the wrong shape or dtype.
    pub fn from_safetensors(
        bytes: &[u8],
        heads: usize,
        dropout: f64,
        is_causal: bool,
    ) -> Result<Self> {
        let tensors = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| NnError::weight("state_dict", "a safetensors file", e))?;
        let w = tensors
            .tensor("c_attn.weight")
            .map_err(|_| NnError::weight("c_attn.weight", "a tensor [3E, E]", "none"))?;
        let shape = w.shape();
        if shape.len() != 2 || shape[0] != 3 * shape[1] {
            return Err(NnError::weight(
                "c_attn.weight",
                "shape [3E, E]",
                format!("{shape:?}"),
            ));
        }
        let e = shape[1];
        let load2 = |name: &str, rows: usize| -> Result<Array2<T>> {
            let a = get::<T>(&tensors, name, &[rows, e])?
                .ok_or_else(|| NnError::weight(name, format!("a tensor [{rows}, {e}]"), "none"))?;
            Ok(a.into_dimensionality().expect("2-d by its checked shape"))
        };
        let load1 = |name: &str, len: usize| -> Result<Option<Array1<T>>> {
            Ok(get::<T>(&tensors, name, &[len])?
                .map(|a| a.into_dimensionality().expect("1-d by its checked shape")))
        };
        let c_attn = Linear::new(load2("c_attn.weight", 3 * e)?, load1("c_attn.bias", 3 * e)?)?;
        let c_proj = Linear::new(load2("c_proj.weight", e)?, load1("c_proj.bias", e)?)?;
        Self::new(c_attn, c_proj, heads, dropout, is_causal)
    }

    /// Training mode: dropout and the configured causal mask apply.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode: no dropout and, as in the tutorial's module, no causal mask.
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Restarts the dropout stream at `seed`, counter 0.
    pub fn seed(&mut self, seed: u64) {
        self.generator = DropoutGenerator::new(seed);
    }

    /// The dropout stream's current state.
    pub fn generator(&self) -> DropoutGenerator {
        self.generator
    }

    /// The embedding dim `E`.
    pub fn embed_dim(&self) -> usize {
        self.c_attn.in_features()
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// The dropout probability (attention and residual, in training).
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// Whether training applies the causal mask.
    pub fn is_causal(&self) -> bool {
        self.is_causal
    }

    /// The packed q, k, v projection `Linear(E, 3E)`.
    pub fn c_attn(&self) -> &Linear<T> {
        &self.c_attn
    }

    /// The output projection `Linear(E, E)`.
    pub fn c_proj(&self) -> &Linear<T> {
        &self.c_proj
    }

    /// The weights by their state_dict names.
    pub fn state_dict(&self) -> HashMap<String, ndarray::ArrayD<T>> {
        let mut m = HashMap::new();
        m.insert(
            "c_attn.weight".into(),
            self.c_attn.weight().clone().into_dyn(),
        );
        m.insert(
            "c_proj.weight".into(),
            self.c_proj.weight().clone().into_dyn(),
        );
        if let Some(b) = self.c_attn.bias() {
            m.insert("c_attn.bias".into(), b.clone().into_dyn());
        }
        if let Some(b) = self.c_proj.bias() {
            m.insert("c_proj.bias".into(), b.clone().into_dyn());
        }
        m
    }

    fn attention_options(&mut self, batch: usize, len: usize) -> SdpaOptions {
        if !self.training {
            return SdpaOptions::default();
        }
        let elements = batch as u128 * self.heads as u128 * len as u128 * len as u128;
        SdpaOptions {
            causal: if self.is_causal {
                Causal::TopLeft
            } else {
                Causal::None
            },
            dropout: if self.dropout > 0.0 {
                self.generator.take(self.dropout, elements)
            } else {
                Dropout::NONE
            },
            ..Default::default()
        }
    }

    /// Residual dropout on `y [rows, E]` in place; element `(r, e)` draws flat index
    /// `index(r) * E + e` of the stream. Returns the dropout drawn, if any.
    fn resid_dropout(
        &mut self,
        y: &mut Array2<T>,
        elements: u128,
        index: impl Fn(usize) -> u64,
    ) -> Option<Dropout> {
        if !self.training || self.dropout <= 0.0 {
            return None;
        }
        let d = self.generator.take(self.dropout, elements);
        apply_keep(&d, y, index);
        Some(d)
    }

    fn check_input(&self, e: usize) -> Result<()> {
        if e != self.embed_dim() {
            return Err(SdpaError::invalid(
                "input",
                format!("embedding dim {} (the module's)", self.embed_dim()),
                e,
            )
            .into());
        }
        Ok(())
    }

    /// `x [B, T, E] -> [B, T, E]`.
    ///
    /// # Errors
    /// `x` whose last dim is not `E`.
    pub fn forward(&mut self, x: ArrayView3<'_, T>) -> Result<Array3<T>> {
        self.forward_profiled(x, &mut Profiler::disabled())
    }

    /// [`forward`](Self::forward), recording each op in `profiler`.
    pub fn forward_profiled(
        &mut self,
        x: ArrayView3<'_, T>,
        profiler: &mut Profiler,
    ) -> Result<Array3<T>> {
        Ok(self.forward_inner(x, profiler, false, &Exec::cpu())?.0)
    }

    /// The forward of a training step: [`forward`](Self::forward)'s result and what
    /// [`backward`](Self::backward) needs (the layers' inputs, attention's out and lse,
    /// the dropout streams drawn). The dropout stream advances as in `forward`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_train(&mut self, x: ArrayView3<'_, T>) -> Result<(Array3<T>, Saved<T>)> {
        self.forward_train_on(x, &Exec::cpu())
    }

    /// [`forward_train`](Self::forward_train) with the attention run by `exec` (the
    /// layers stay on the host): `Exec::cuda(&gpu)` runs it on a CUDA device.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and what the device refuses.
    pub fn forward_train_on(
        &mut self,
        x: ArrayView3<'_, T>,
        exec: &Exec<'_>,
    ) -> Result<(Array3<T>, Saved<T>)> {
        let (out, saved) = self.forward_inner(x, &mut Profiler::disabled(), true, exec)?;
        Ok((out, saved.expect("saved on request")))
    }

    fn forward_inner(
        &mut self,
        x: ArrayView3<'_, T>,
        profiler: &mut Profiler,
        save: bool,
        exec: &Exec<'_>,
    ) -> Result<(Array3<T>, Option<Saved<T>>)> {
        let (batch, len, e) = x.dim();
        self.check_input(e)?;
        let d = e / self.heads;
        let rows = x.as_standard_layout();
        let rows = rows
            .view()
            .into_shape_with_order((batch * len, e))
            .expect("standard layout reshapes");
        let qkv = profiler.cpu("c_attn (linear)", || self.c_attn.forward(rows))?;
        // [B*T, 3E] -> [B, T, 3, H, D]: q, k, v are views of it, [B, H, T, D] each.
        let qkv = qkv
            .into_shape_with_order((batch, len, 3, self.heads, d))
            .expect("contiguous [B*T, 3E] reshapes");
        let view = |i: usize| qkv.index_axis(Axis(2), i).permuted_axes([0, 2, 1, 3]);
        let options = self.attention_options(batch, len);
        let attn = profiler.cpu("sdpa (math, cpu)", || {
            sdpa::attention(
                Tensor::Host(view(0)),
                Tensor::Host(view(1)),
                Tensor::Host(view(2)),
                None,
                &options,
                exec,
            )
        });
        let (attn, lse) = host_result(attn)?;
        let y = heads_to_rows(&attn);
        let mut out = profiler.cpu("c_proj (linear)", || self.c_proj.forward(y.view()))?;
        let elements = (batch * len * e) as u128;
        let resid = profiler.cpu("resid_dropout", || {
            self.resid_dropout(&mut out, elements, |r| r as u64)
        });
        // The attention's views of qkv are done with: it moves into `saved`, uncopied.
        let saved = save.then(|| Saved {
            rows: rows.to_owned(),
            qkv,
            y,
            attn,
            lse,
            options,
            resid,
        });
        Ok((
            out.into_shape_with_order((batch, len, e))
                .expect("contiguous reshapes"),
            saved,
        ))
    }

    /// Incremental decoding: `x [B, T_new, E]` (the next tokens of each sequence, one or
    /// a few) attends to everything `cache` holds and to itself (causal: bottom-right, as
    /// the last rows of a full causal forward), and its keys and values are appended to
    /// `cache`. In eval mode only (no dropout); the attention runs on `exec` (the decode
    /// kernels on CUDA). Token by token it equals the rows of the full forward over the
    /// whole sequence with the module's causal flag (that of training mode at dropout 0:
    /// the eval-mode [`forward`](Self::forward) follows the PyTorch tutorial, which turns
    /// `is_causal` off in eval).
    ///
    /// # Errors
    /// Training mode, `x` of another embedding dim or batch than the cache's, more tokens
    /// than the cache holds (`cache_seqlens`, naming the row), what the device refuses.
    pub fn decode(
        &mut self,
        x: ArrayView3<'_, T>,
        cache: &mut ModuleCache<T>,
        exec: &Exec<'_>,
    ) -> Result<Array3<T>> {
        if self.training {
            return Err(SdpaError::invalid(
                "decode",
                "a module in eval mode (no dropout)",
                "training mode",
            )
            .into());
        }
        let (batch, len, e) = x.dim();
        self.check_input(e)?;
        if batch != cache.lens.len() || cache.k.shape()[1] != self.heads {
            return Err(SdpaError::invalid(
                "cache",
                format!("a cache of {batch} sequences and {} heads", self.heads),
                format!(
                    "{} sequences, {} heads",
                    cache.lens.len(),
                    cache.k.shape()[1]
                ),
            )
            .into());
        }
        let d = e / self.heads;
        let rows = x.as_standard_layout();
        let rows = rows
            .view()
            .into_shape_with_order((batch * len, e))
            .expect("standard layout reshapes");
        let qkv = self
            .c_attn
            .forward(rows)?
            .into_shape_with_order((batch, len, 3, self.heads, d))
            .expect("contiguous [B*T, 3E] reshapes");
        let view = |i: usize| qkv.index_axis(Axis(2), i).permuted_axes([0, 2, 1, 3]);
        let options = SdpaOptions {
            causal: if self.is_causal {
                Causal::BottomRight
            } else {
                Causal::None
            },
            ..Default::default()
        };
        let r = sdpa::attention_with_kvcache(
            Tensor::Host(view(0)),
            sdpa::KvCache::Host(sdpa_ref::kvcache::KvCache::Dense {
                k: cache.k.view_mut(),
                v: cache.v.view_mut(),
            }),
            cache.lens.view(),
            Some((Tensor::Host(view(1)), Tensor::Host(view(2)))),
            None,
            &options,
            exec,
        )?;
        cache.lens += len as i32;
        let attn = r.out.into_host().expect("host arrays in, host arrays out");
        let y = heads_to_rows(&attn);
        Ok(self
            .c_proj
            .forward(y.view())?
            .into_shape_with_order((batch, len, e))
            .expect("contiguous reshapes"))
    }

    /// The backward of the [`forward_train`](Self::forward_train) call that gave
    /// `saved`, for the incoming gradient `dout [B, T, E]`: the gradients of `x`, of both
    /// layers' weights and biases. Dropout (attention and residual) replays the keep bits
    /// the forward drew; the attention's backward is [`sdpa::attention_backward`] on the
    /// CPU. Each gradient is accumulated in `T::Acc` and rounded once per op.
    ///
    /// # Errors
    /// `dout` of a shape other than the forward's output.
    pub fn backward(&self, saved: &Saved<T>, dout: ArrayView3<'_, T>) -> Result<ModuleGrads<T>> {
        self.backward_on(saved, dout, &Exec::cpu())
    }

    /// [`backward`](Self::backward) with the attention's backward run by `exec` (on CUDA
    /// the math backend's backward; the layers stay on the host).
    ///
    /// # Errors
    /// As [`backward`](Self::backward), and what the device refuses.
    pub fn backward_on(
        &self,
        saved: &Saved<T>,
        dout: ArrayView3<'_, T>,
        exec: &Exec<'_>,
    ) -> Result<ModuleGrads<T>> {
        let (batch, len, three, heads, d) = saved.qkv.dim();
        debug_assert_eq!(three, 3);
        let e = heads * d;
        if dout.dim() != (batch, len, e) {
            return Err(SdpaError::invalid(
                "grad_out",
                format!("shape [{batch}, {len}, {e}] (the forward's output)"),
                format!("{:?}", dout.shape()),
            )
            .into());
        }
        let mut dpre = dout
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((batch * len, e))
            .expect("standard layout reshapes");
        if let Some(resid) = &saved.resid {
            apply_keep(resid, &mut dpre, |r| r as u64);
        }
        let proj = self.c_proj.backward(saved.y.view(), dpre.view())?;
        // dy [B*T, E] = [B, T, H, D] -> dout of attention [B, H, T, D].
        let dattn = proj
            .dx
            .into_shape_with_order((batch, len, heads, d))
            .expect("contiguous reshapes");
        let dattn = dattn.permuted_axes([0, 2, 1, 3]);
        let view = |i: usize| saved.qkv.index_axis(Axis(2), i).permuted_axes([0, 2, 1, 3]);
        let grads = sdpa::attention_backward(
            view(0),
            view(1),
            view(2),
            saved.attn.view(),
            saved.lse.view(),
            dattn.view(),
            None,
            &saved.options,
            exec,
        );
        let grads = grads?;
        // dq, dk, dv [B, H, T, D] -> dqkv [B, T, 3, H, D] -> [B*T, 3E].
        let mut dqkv = Array5::<T>::from_elem(
            (batch, len, 3, heads, d),
            T::from_acc(num_traits::Zero::zero()),
        );
        for (i, g) in [&grads.dq, &grads.dk, &grads.dv].into_iter().enumerate() {
            dqkv.index_axis_mut(Axis(2), i)
                .assign(&g.view().permuted_axes([0, 2, 1, 3]));
        }
        let dqkv = dqkv
            .into_shape_with_order((batch * len, 3 * e))
            .expect("contiguous reshapes");
        let attn_grads = self.c_attn.backward(saved.rows.view(), dqkv.view())?;
        Ok(ModuleGrads {
            dx: attn_grads
                .dx
                .into_shape_with_order((batch, len, e))
                .expect("contiguous reshapes"),
            c_attn: (attn_grads.weight, attn_grads.bias),
            c_proj: (proj.weight, proj.bias),
        })
    }

    /// The layers, mutably (an optimizer's step sets their parameters through
    /// [`Linear::set_parameters`], which keeps their shapes).
    pub fn layers_mut(&mut self) -> (&mut Linear<T>, &mut Linear<T>) {
        (&mut self.c_attn, &mut self.c_proj)
    }

    /// A nested batch: packed rows `x [total, E]` with `cu_seqlens`, each sequence
    /// attending only to itself (causal per sequence). Dropout draws from the padded
    /// index space `[B, H, Tmax, Tmax]` (attention) and `[B, Tmax, E]` (residual), so
    /// the result equals the padded batch's rows.
    ///
    /// # Errors
    /// `x` whose last dim is not `E`, or `cu_seqlens` that do not end at `total`.
    pub fn forward_nested(
        &mut self,
        x: ArrayView2<'_, T>,
        cu_seqlens: &CuSeqlens,
    ) -> Result<Array2<T>> {
        let (total, e) = x.dim();
        self.check_input(e)?;
        if cu_seqlens.total() != total {
            return Err(SdpaError::invalid(
                "cu_seqlens",
                format!("a last offset equal to the packed rows, {total}"),
                cu_seqlens.total(),
            )
            .into());
        }
        let d = e / self.heads;
        let qkv = self.c_attn.forward(x)?;
        let qkv = qkv
            .into_shape_with_order((total, 3, self.heads, d))
            .expect("contiguous [total, 3E] reshapes");
        let part =
            |i: usize| Nested::new(qkv.index_axis(Axis(1), i).to_owned(), cu_seqlens.clone());
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let max = cu_seqlens.max_len();
        let options = self.attention_options(cu_seqlens.batch(), max);
        let attn = sdpa_nested::sdpa_nested(&q, &k, &v, &options)?;
        let y = attn
            .out
            .values()
            .view()
            .into_shape_with_order((total, e))
            .expect("contiguous [total, H, D] reshapes")
            .to_owned();
        let mut out = self.c_proj.forward(y.view())?;
        // Packed row r of sequence b at position i is row b*Tmax + i of the padded batch.
        let offsets = cu_seqlens.offsets().to_vec();
        let padded_row = move |r: usize| {
            let b = offsets.partition_point(|&o| o <= r) - 1;
            (b * max + (r - offsets[b])) as u64
        };
        let elements = (cu_seqlens.batch() * max * e) as u128;
        self.resid_dropout(&mut out, elements, padded_row);
        Ok(out)
    }
}
