//! Nested (variable-length) batches: a batch of sequences of different lengths stored
//! packed, `values [total, H, E]`, with `cu_seqlens` (length `B + 1`, starting at 0,
//! non-decreasing) marking where each sequence starts, the encoding FlashAttention's
//! varlen kernels take. Nothing is padded and no padding is computed.
//!
//! [`sdpa_nested`] attends each query sequence to its own key sequence (lengths of q
//! and k/v may differ: cross-attention), with causal masking aligned per sequence, GQA,
//! and dropout drawn from the padded index space of DESIGN.md, so that the nested
//! result equals the padded dense result with a key-padding mask, row for row.
//!
//! # Shapes
//! `q`: `[total_q, Hq, E]` + `cu_seqlens_q`; `k`: `[total_kv, Hkv, E]`, `v`:
//! `[total_kv, Hkv, Ev]` + `cu_seqlens_kv` (k and v share it) -> `out [total_q, Hq, Ev]`
//! with `cu_seqlens_q`, `lse [total_q, Hq]`.
//!
//! ```
//! use ndarray::Array3;
//! use sdpa_nested::{sdpa_nested, Nested};
//!
//! // Two sequences of lengths 3 and 5, 2 heads, head dim 4.
//! let seqs = [Array3::<f32>::ones((3, 2, 4)), Array3::<f32>::ones((5, 2, 4))];
//! let x = Nested::from_sequences(&[seqs[0].view(), seqs[1].view()])?;
//! assert_eq!(x.cu_seqlens().offsets(), &[0, 3, 8]);
//! let out = sdpa_nested(&x, &x, &x, &Default::default())?;
//! assert_eq!(out.out.values().shape(), &[8, 2, 4]);
//! let padded = out.out.to_padded(0.0); // [B, Lmax, H, E]
//! assert_eq!(padded.shape(), &[2, 5, 2, 4]);
//! # Ok::<(), sdpa_core::SdpaError>(())
//! ```
#![warn(missing_docs)]
// deny, not forbid: ndarray's `s!` expands to an `allow(unsafe_code)` of its own.
#![deny(unsafe_code)]

pub mod cuda;

use ndarray::{s, Array2, Array3, Array4, ArrayView3, ArrayView4, Axis};
use rayon::prelude::*;
use sdpa::{BackendSet, DropoutSpace};
use sdpa_core::{Result, SdpaError, SdpaOptions};
use sdpa_ref::Element;

/// Validated cumulative sequence lengths: `offsets[b]..offsets[b + 1]` are the rows of
/// sequence `b` in the packed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuSeqlens {
    offsets: Vec<usize>,
}

impl CuSeqlens {
    /// From offsets as `u32` (what device code takes).
    ///
    /// # Errors
    /// Empty, not starting at 0, or decreasing.
    pub fn from_u32(offsets: &[u32]) -> Result<Self> {
        Self::from_offsets(offsets.iter().map(|&x| x as usize).collect())
    }

    /// From offsets as `i32` (what PyTorch's `offsets()` gives).
    ///
    /// # Errors
    /// Empty, negative, not starting at 0, or decreasing.
    pub fn from_i32(offsets: &[i32]) -> Result<Self> {
        let mut out = Vec::with_capacity(offsets.len());
        for (i, &x) in offsets.iter().enumerate() {
            if x < 0 {
                return Err(SdpaError::invalid(
                    "cu_seqlens",
                    format!("non-negative offsets (entry {i})"),
                    x,
                ));
            }
            out.push(x as usize);
        }
        Self::from_offsets(out)
    }

    /// From the sequence lengths.
    pub fn from_lengths(lengths: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        let mut total = 0usize;
        for &len in lengths {
            total += len;
            offsets.push(total);
        }
        CuSeqlens { offsets }
    }

    fn from_offsets(offsets: Vec<usize>) -> Result<Self> {
        match offsets.first() {
            None => {
                return Err(SdpaError::invalid(
                    "cu_seqlens",
                    "B + 1 offsets starting at 0",
                    "an empty list",
                ))
            }
            Some(&first) if first != 0 => {
                return Err(SdpaError::invalid(
                    "cu_seqlens",
                    "a first offset of 0",
                    first,
                ))
            }
            _ => {}
        }
        if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(SdpaError::invalid(
                "cu_seqlens",
                format!("non-decreasing offsets (entry {} is {})", i, offsets[i]),
                format!("{} at entry {}", offsets[i + 1], i + 1),
            ));
        }
        Ok(CuSeqlens { offsets })
    }

    /// The offsets, `B + 1` of them.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The offsets as `u32` for device code, or `None` if one exceeds `u32::MAX`.
    pub fn to_u32(&self) -> Option<Vec<u32>> {
        self.offsets
            .iter()
            .map(|&x| u32::try_from(x).ok())
            .collect()
    }

    /// Number of sequences `B`.
    pub fn batch(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Rows in all sequences together.
    pub fn total(&self) -> usize {
        *self.offsets.last().expect("at least one offset")
    }

    /// Length of sequence `b`.
    pub fn len(&self, b: usize) -> usize {
        self.offsets[b + 1] - self.offsets[b]
    }

    /// True when every sequence is empty.
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// The longest sequence (0 for an empty batch).
    pub fn max_len(&self) -> usize {
        (0..self.batch()).map(|b| self.len(b)).max().unwrap_or(0)
    }

    /// Every sequence length.
    pub fn lengths(&self) -> Vec<usize> {
        (0..self.batch()).map(|b| self.len(b)).collect()
    }
}

/// A nested batch: packed values `[total, H, E]` and the offsets of each sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Nested<T> {
    values: Array3<T>,
    cu_seqlens: CuSeqlens,
}

impl<T: Element> Nested<T> {
    /// From packed values and offsets.
    ///
    /// # Errors
    /// Offsets that do not end at `values.shape()[0]` (the lengths do not add up).
    pub fn new(values: Array3<T>, cu_seqlens: CuSeqlens) -> Result<Self> {
        if cu_seqlens.total() != values.shape()[0] {
            return Err(SdpaError::invalid(
                "cu_seqlens",
                format!(
                    "a last offset equal to the packed rows, {}",
                    values.shape()[0]
                ),
                cu_seqlens.total(),
            ));
        }
        Ok(Nested { values, cu_seqlens })
    }

    /// Packs a list of sequences, each `[len, H, E]` (lengths may be 0).
    ///
    /// # Errors
    /// An empty list, or sequences whose `H` or `E` differ.
    pub fn from_sequences(seqs: &[ArrayView3<'_, T>]) -> Result<Self> {
        let first = seqs
            .first()
            .ok_or_else(|| SdpaError::invalid("sequences", "at least one sequence", "none"))?;
        let (heads, dim) = (first.shape()[1], first.shape()[2]);
        for (i, seq) in seqs.iter().enumerate() {
            if seq.shape()[1..] != [heads, dim] {
                return Err(SdpaError::invalid(
                    "sequences",
                    format!("[len, {heads}, {dim}] for every sequence (as sequence 0)"),
                    format!("{:?} for sequence {i}", seq.shape()),
                ));
            }
        }
        let lengths: Vec<usize> = seqs.iter().map(|s| s.shape()[0]).collect();
        let views: Vec<ArrayView3<'_, T>> = seqs.to_vec();
        let values = ndarray::concatenate(Axis(0), &views)
            .map_err(|e| SdpaError::invalid("sequences", "sequences that concatenate", e))?;
        Ok(Nested {
            values,
            cu_seqlens: CuSeqlens::from_lengths(&lengths),
        })
    }

    /// Unpads a padded batch `[B, Lmax, H, E]` keeping the first `lengths[b]` rows of
    /// each sequence.
    ///
    /// # Errors
    /// `lengths` of another count than `B`, or a length above `Lmax`.
    pub fn from_padded(padded: ArrayView4<'_, T>, lengths: &[usize]) -> Result<Self> {
        let (batch, max_len) = (padded.shape()[0], padded.shape()[1]);
        if lengths.len() != batch {
            return Err(SdpaError::invalid(
                "lengths",
                format!("{batch} lengths (the padded batch size)"),
                lengths.len(),
            ));
        }
        if let Some((b, &len)) = lengths.iter().enumerate().find(|(_, &l)| l > max_len) {
            return Err(SdpaError::invalid(
                "lengths",
                format!("lengths of at most {max_len} (the padded length)"),
                format!("{len} for sequence {b}"),
            ));
        }
        if batch == 0 {
            return Ok(Nested {
                values: Array3::from_elem((0, padded.shape()[2], padded.shape()[3]), pad0()),
                cu_seqlens: CuSeqlens::from_lengths(&[]),
            });
        }
        let views: Vec<ArrayView3<'_, T>> = lengths
            .iter()
            .enumerate()
            .map(|(b, &len)| padded.slice_move(s![b, ..len, .., ..]))
            .collect();
        Self::from_sequences(&views)
    }

    /// Pads to `[B, Lmax, H, E]`, filling rows past each sequence's end with `pad`.
    pub fn to_padded(&self, pad: T) -> Array4<T> {
        let [_, heads, dim] = self.values.shape() else {
            unreachable!("values are 3-d")
        };
        let mut out =
            Array4::from_elem((self.batch(), self.cu_seqlens.max_len(), *heads, *dim), pad);
        for b in 0..self.batch() {
            let len = self.cu_seqlens.len(b);
            out.slice_mut(s![b, ..len, .., ..]).assign(&self.seq(b));
        }
        out
    }

    /// Packed values `[total, H, E]`.
    pub fn values(&self) -> &Array3<T> {
        &self.values
    }

    /// The offsets.
    pub fn cu_seqlens(&self) -> &CuSeqlens {
        &self.cu_seqlens
    }

    /// `B`.
    pub fn batch(&self) -> usize {
        self.cu_seqlens.batch()
    }

    /// `H`.
    pub fn heads(&self) -> usize {
        self.values.shape()[1]
    }

    /// Sequence `b`, `[len, H, E]`.
    pub fn seq(&self, b: usize) -> ArrayView3<'_, T> {
        let o = self.cu_seqlens.offsets();
        self.values.slice(s![o[b]..o[b + 1], .., ..])
    }
}

fn pad0<T: Element>() -> T {
    T::from_acc(num_traits::Zero::zero())
}

/// Output of [`sdpa_nested`].
#[derive(Debug, Clone, PartialEq)]
pub struct NestedOutput<T> {
    /// `[total_q, Hq, Ev]` with the query offsets.
    pub out: Nested<T>,
    /// `[total_q, Hq]`; `-inf` for a query with no key.
    pub lse: Array2<f32>,
}

/// Scaled dot-product attention over a nested batch, on the CPU reference.
///
/// Sequence `b` of `q` attends to sequence `b` of `k`/`v` only. Causal masking is
/// aligned per sequence (top-left: query `i` sees keys `j <= i`; bottom-right: `j <= i +
/// S_b - L_b`). Dropout draws element `(b, h, i, j)` from the padded index space
/// `[B, Hq, max L_b, max S_b]`, so the result equals the padded dense call with a
/// key-padding mask. A query sequence whose key sequence is empty gives 0.
///
/// # Errors
/// Batch counts of q and k/v that differ, k and v offsets that differ, dtype/head/dim
/// mismatches as the dense call reports them.
pub fn sdpa_nested<T: sdpa::Elem>(
    q: &Nested<T>,
    k: &Nested<T>,
    v: &Nested<T>,
    options: &SdpaOptions,
) -> Result<NestedOutput<T>> {
    if k.batch() != q.batch() {
        return Err(SdpaError::invalid(
            "key",
            format!("{} sequences (the query's)", q.batch()),
            k.batch(),
        ));
    }
    if v.cu_seqlens != k.cu_seqlens {
        return Err(SdpaError::invalid(
            "value",
            format!("the key's cu_seqlens {:?}", k.cu_seqlens.offsets()),
            format!("{:?}", v.cu_seqlens.offsets()),
        ));
    }
    let heads_q = q.heads();
    let head_dim_v = v.values.shape()[2];
    let space = (q.cu_seqlens.max_len(), k.cu_seqlens.max_len());
    // Validate shapes once on a representative empty problem, so that errors name the
    // tensors even for a batch of empty sequences.
    let empty_q = q.values.slice(s![0..0, .., ..]);
    let empty_k = k.values.slice(s![0..0, .., ..]);
    let empty_v = v.values.slice(s![0..0, .., ..]);
    sdpa_ref::problem(
        &as_bhle(empty_q),
        &as_bhle(empty_k),
        &as_bhle(empty_v),
        None,
        options,
    )?;
    let results: Vec<Result<sdpa::Attention<T>, sdpa::Error>> = (0..q.batch())
        .into_par_iter()
        .map(|b| {
            sdpa::attention_in_space(
                as_bhle(q.seq(b)),
                as_bhle(k.seq(b)),
                as_bhle(v.seq(b)),
                options,
                DropoutSpace {
                    batch_offset: b,
                    heads_q,
                    len_q: space.0,
                    len_kv: space.1,
                },
                BackendSet::ALL,
            )
        })
        .collect();
    let total_q = q.cu_seqlens.total();
    let mut out = Array3::from_elem((total_q, heads_q, head_dim_v), pad0());
    let mut lse = Array2::from_elem((total_q, heads_q), f32::NEG_INFINITY);
    for (b, result) in results.into_iter().enumerate() {
        // A CPU call of host arrays fails only on the specification.
        let (seq_out, seq_lse) = result
            .map_err(|e| match e {
                sdpa::Error::Spec(spec) => spec,
                other => SdpaError::invalid("query", "a call the CPU reference runs", other),
            })?
            .into_host()
            .expect("host arrays in, host arrays out");
        let o = q.cu_seqlens.offsets();
        // [1, Hq, L_b, Ev] -> [L_b, Hq, Ev]
        out.slice_mut(s![o[b]..o[b + 1], .., ..])
            .assign(&seq_out.index_axis(Axis(0), 0).permuted_axes([1, 0, 2]));
        lse.slice_mut(s![o[b]..o[b + 1], ..])
            .assign(&seq_lse.index_axis(Axis(0), 0).t());
    }
    Ok(NestedOutput {
        out: Nested {
            values: out,
            cu_seqlens: q.cu_seqlens.clone(),
        },
        lse,
    })
}

/// `[L, H, E]` seen as `[1, H, L, E]`, without a copy.
fn as_bhle<T>(x: ArrayView3<'_, T>) -> ArrayView4<'_, T> {
    x.insert_axis(Axis(0)).permuted_axes([0, 2, 1, 3])
}

/// The key-padding mask `[B, 1, 1, Smax]` (true = a real key) that makes a padded dense
/// call equal to the nested one.
pub fn key_padding_mask(cu_seqlens_kv: &CuSeqlens) -> ndarray::ArrayD<bool> {
    let max = cu_seqlens_kv.max_len();
    ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[cu_seqlens_kv.batch(), 1, 1, max]), |ix| {
        ix[3] < cu_seqlens_kv.len(ix[0])
    })
}
