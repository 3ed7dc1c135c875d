//! `nested`: arbitrary offset lists and length lists through `sdpa-nested`.
//!
//! Properties:
//! - `CuSeqlens::from_u32` / `from_i32` accept exactly the lists DESIGN.md allows
//!   (non-empty, starting at 0, non-decreasing, no negative entry) and then report the
//!   batch, total, lengths and max length those offsets mean;
//! - `Nested::new` refuses values whose row count is not the last offset;
//! - pad/unpad round-trips: `from_padded(p, lengths).to_padded(pad)` equals `p` on the
//!   rows below each length and `pad` elsewhere; unpadding that again gives the same
//!   nested batch; lengths above the padded length or of the wrong count are refused;
//! - `sdpa_nested` (f64) equals the dense reference on the padded batch with a
//!   key-padding mask, row for row, dropout included (the padded index space), within
//!   the f64 preset; causal top-left, which per-sequence alignment leaves unchanged.

use arbitrary::{Arbitrary, Unstructured};
use ndarray::{s, Array4, ArrayView4};
use sdpa_core::{Causal, Dropout, SdpaOptions};
use sdpa_harness::compare::compare_with;
use sdpa_harness::strategies::SplitMix64;
use sdpa_harness::tolerance;
use sdpa_nested::{key_padding_mask, sdpa_nested, CuSeqlens, Nested};

#[derive(Debug, Clone, Arbitrary)]
struct Input {
    /// Raw offsets, read as u32 and as i32.
    raw_offsets: Vec<u32>,
    /// Query lengths (each mod 6), at most 4 sequences.
    lengths_q: Vec<u8>,
    /// Key lengths for cross-attention (each mod 6); self-attention when absent.
    lengths_kv: Option<Vec<u8>>,
    /// A wrong length list for `from_padded`: `(index, length)`.
    bad_length: Option<(u8, u8)>,
    /// `Hkv` (1-2), group (1-2), `E` (1-4), `Ev` (1-4).
    dims: [u8; 4],
    top_left: bool,
    /// `p = x / 65536 * 0.9`, seed, offset.
    dropout: Option<(u16, u64, u64)>,
    data_seed: u64,
}

/// Reference semantics of a cu_seqlens list.
fn valid_offsets(offsets: &[i64]) -> bool {
    offsets.first() == Some(&0) && offsets.windows(2).all(|w| w[0] <= w[1])
}

fn check_offsets(parsed: &CuSeqlens, offsets: &[i64]) {
    let lengths: Vec<usize> = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    assert_eq!(parsed.batch(), offsets.len() - 1);
    assert_eq!(parsed.total() as i64, *offsets.last().expect("non-empty"));
    assert_eq!(parsed.lengths(), lengths);
    assert_eq!(parsed.max_len(), lengths.iter().copied().max().unwrap_or(0));
    assert_eq!(parsed.is_empty(), parsed.total() == 0);
    assert_eq!(
        parsed
            .offsets()
            .iter()
            .map(|&o| o as i64)
            .collect::<Vec<_>>(),
        offsets
    );
}

/// One fuzz input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    offsets(&input);
    pad_and_attend(&input);
}

fn offsets(input: &Input) {
    let raw = &input.raw_offsets[..input.raw_offsets.len().min(8)];
    let as_u32: Vec<i64> = raw.iter().map(|&x| x as i64).collect();
    match CuSeqlens::from_u32(raw) {
        Ok(parsed) => {
            assert!(valid_offsets(&as_u32), "accepted {raw:?}");
            check_offsets(&parsed, &as_u32);
            assert_eq!(parsed.to_u32().as_deref(), Some(raw));
        }
        Err(e) => assert!(!valid_offsets(&as_u32), "refused {raw:?}: {e}"),
    }
    let signed: Vec<i32> = raw.iter().map(|&x| x as i32).collect();
    let as_i32: Vec<i64> = signed.iter().map(|&x| x as i64).collect();
    match CuSeqlens::from_i32(&signed) {
        Ok(parsed) => {
            assert!(valid_offsets(&as_i32), "accepted {signed:?}");
            check_offsets(&parsed, &as_i32);
        }
        Err(e) => assert!(!valid_offsets(&as_i32), "refused {signed:?}: {e}"),
    }
}

fn to_bhle(p: &Array4<f64>) -> ArrayView4<'_, f64> {
    p.view().permuted_axes([0, 2, 1, 3])
}

fn lengths(raw: &[u8]) -> Vec<usize> {
    raw.iter().take(4).map(|&l| l as usize % 6).collect()
}

fn pad_and_attend(input: &Input) {
    let lengths_q = lengths(&input.lengths_q);
    if lengths_q.is_empty() {
        return;
    }
    let lengths_kv = match &input.lengths_kv {
        Some(raw) => {
            let mut l = lengths(raw);
            l.resize(lengths_q.len(), 0);
            l
        }
        None => lengths_q.clone(),
    };
    let [heads_kv, group, head_dim, head_dim_v] = [
        1 + input.dims[0] as usize % 2,
        1 + input.dims[1] as usize % 2,
        1 + input.dims[2] as usize % 4,
        1 + input.dims[3] as usize % 4,
    ];
    let heads_q = heads_kv * group;
    let batch = lengths_q.len();
    let max_q = lengths_q.iter().copied().max().unwrap_or(0);
    let max_kv = lengths_kv.iter().copied().max().unwrap_or(0);
    let mut rng = SplitMix64(input.data_seed);
    let mut padded = |len: usize, heads: usize, dim: usize| {
        Array4::from_shape_simple_fn((batch, len, heads, dim), || rng.symmetric())
    };
    // [B, Lmax, H, E], the layout pad/unpad use.
    let q_pad = padded(max_q, heads_q, head_dim);
    let k_pad = padded(max_kv, heads_kv, head_dim);
    let v_pad = padded(max_kv, heads_kv, head_dim_v);

    let unpad = |p: &Array4<f64>, lengths: &[usize]| {
        Nested::from_padded(p.view(), lengths).expect("lengths fit the padded batch")
    };
    let q = unpad(&q_pad, &lengths_q);
    let k = unpad(&k_pad, &lengths_kv);
    let v = unpad(&v_pad, &lengths_kv);
    assert_eq!(q.cu_seqlens(), &CuSeqlens::from_lengths(&lengths_q));
    const PAD: f64 = 7.5;
    let repadded = q.to_padded(PAD);
    assert_eq!(repadded.shape(), [batch, max_q, heads_q, head_dim]);
    for (b, &len) in lengths_q.iter().enumerate() {
        assert_eq!(
            repadded.slice(s![b, ..len, .., ..]),
            q_pad.slice(s![b, ..len, .., ..]),
            "sequence {b} changed by unpad -> pad"
        );
        assert!(
            repadded
                .slice(s![b, len.., .., ..])
                .iter()
                .all(|&x| x == PAD),
            "padding of sequence {b} not {PAD}"
        );
    }
    assert_eq!(
        unpad(&repadded, &lengths_q),
        q,
        "pad -> unpad changed the batch"
    );
    // Packed rows that disagree with the offsets are refused.
    let more = CuSeqlens::from_lengths(&[q.cu_seqlens().total() + 1]);
    assert!(Nested::new(q.values().clone(), more).is_err());
    if let Some((index, length)) = input.bad_length {
        let mut wrong = lengths_q.clone();
        if index % 2 == 0 {
            wrong.push(length as usize % 6);
        } else {
            wrong[index as usize % batch] = max_q + 1 + length as usize % 3;
        }
        assert!(
            Nested::from_padded(q_pad.view(), &wrong).is_err(),
            "accepted {wrong:?}"
        );
    }

    let options = SdpaOptions {
        causal: if input.top_left {
            Causal::TopLeft
        } else {
            Causal::None
        },
        dropout: input.dropout.map_or(Dropout::NONE, |(p, seed, offset)| {
            // Offsets below 2^62: a generated problem must be valid, and an offset
            // whose counters run past 2^64 is refused (the api target covers that).
            Dropout::new(p as f64 / 65536.0 * 0.9, seed, offset >> 2)
        }),
        scale: None,
        enable_gqa: group > 1,
        ..Default::default()
    };
    let nested = sdpa_nested(&q, &k, &v, &options).expect("a consistent nested batch");
    let key_mask = key_padding_mask(k.cu_seqlens());
    let (dense_out, _) = sdpa::attention(
        sdpa::Tensor::Host(to_bhle(&q_pad)),
        sdpa::Tensor::Host(to_bhle(&k_pad)),
        sdpa::Tensor::Host(to_bhle(&v_pad)),
        Some(sdpa::Mask::Bool(key_mask.view())),
        &options,
        &sdpa::Exec::cpu(),
    )
    .expect("a consistent dense batch")
    .into_host()
    .expect("host arrays in, host arrays out");
    let nested_out = nested.out.to_padded(0.0);
    for (b, &len) in lengths_q.iter().enumerate() {
        let got = nested_out.slice(s![b, ..len, .., ..]);
        let want = dense_out.slice(s![b, .., ..len, ..]);
        let want = want.permuted_axes([1, 0, 2]);
        let report = compare_with(got.into_dyn(), want.into_dyn(), Some(&tolerance::F64));
        assert!(
            report.passes(),
            "sequence {b}: nested vs padded dense: {report}"
        );
    }
}
