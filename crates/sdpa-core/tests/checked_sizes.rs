//! Sizes, extents and dropout counters never overflow silently (issue 14): the
//! `checked_*` forms return `None`, the plain forms panic, and `Problem::new` refuses
//! the call with an error naming the argument. The huge shapes use stride-0 layouts,
//! which describe tensors that need no memory.

use sdpa_core::dropout::{checked_flat_index, flat_index};
use sdpa_core::{
    DType, Dropout, Layout, MaskDesc, MaskKind, Problem, SdpaError, SdpaOptions, TensorDesc,
};

const BIG: usize = 1 << 32;

fn broadcast(dtype: DType, shape: [usize; 4]) -> TensorDesc {
    TensorDesc {
        dtype,
        layout: Layout {
            shape,
            strides: [0; 4],
        },
    }
}

fn err(
    q: &TensorDesc,
    k: &TensorDesc,
    v: &TensorDesc,
    mask: Option<&MaskDesc>,
    options: &SdpaOptions,
) -> (&'static str, String) {
    match Problem::new(q, k, v, mask, options) {
        Err(e @ SdpaError::InvalidArgument { arg, .. }) => (arg, e.to_string()),
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

#[test]
fn layout_sizes_are_checked() {
    let shape = [2, 3, 4, 5];
    assert_eq!(
        Layout::checked_contiguous(shape),
        Some(Layout::contiguous(shape))
    );
    assert_eq!(Layout::contiguous(shape).strides, [60, 20, 5, 1]);
    assert_eq!(Layout::checked_contiguous([BIG, BIG, 1, 1]), None);
    assert_eq!(Layout::checked_contiguous([usize::MAX, 1, 1, 1]), None);
    // Zero extents count as 1, as ndarray counts them.
    assert_eq!(Layout::checked_contiguous([0, BIG, BIG, 0]), None);
    let at_limit = Layout::checked_contiguous([1 << 31, 1 << 31, 1, 1]).unwrap();
    assert_eq!(at_limit.numel(), 1 << 62);

    let huge = Layout {
        shape: [BIG, BIG, 2, 1],
        strides: [0; 4],
    };
    assert_eq!(huge.checked_numel(), None);
    let empty = Layout {
        shape: [BIG, BIG, 2, 0],
        ..huge
    };
    assert_eq!(empty.checked_numel(), Some(0));

    let strided = Layout {
        shape: [3, 2, 1, 4],
        strides: [-10, 5, 0, 1],
    };
    assert_eq!(strided.checked_offset_bounds(), Some([-20, 8]));
    let far = Layout {
        shape: [3, 1, 1, 1],
        strides: [isize::MAX / 2 + 1, 0, 0, 1],
    };
    assert_eq!(far.checked_offset_bounds(), None);
    // Nothing is read from an empty layout, whatever its strides.
    let far_empty = Layout {
        shape: [3, 1, 0, 1],
        ..far
    };
    assert_eq!(far_empty.checked_offset_bounds(), Some([0, 0]));
}

#[test]
#[should_panic(expected = "more than isize::MAX elements")]
fn contiguous_panics_instead_of_wrapping() {
    Layout::contiguous([BIG, BIG, 1, 1]);
}

#[test]
#[should_panic(expected = "more than usize::MAX elements")]
fn numel_panics_instead_of_wrapping() {
    Layout {
        shape: [BIG, BIG, 2, 1],
        strides: [0; 4],
    }
    .numel();
}

#[test]
fn mask_sizes_are_checked() {
    assert_eq!(
        MaskDesc::checked_contiguous(MaskKind::Bool, &[5, 7]),
        Some(MaskDesc::contiguous(MaskKind::Bool, &[5, 7]))
    );
    assert_eq!(
        MaskDesc::checked_contiguous(MaskKind::Bool, &[BIG, BIG]),
        None
    );
}

#[test]
#[should_panic(expected = "more than isize::MAX elements")]
fn mask_contiguous_panics_instead_of_wrapping() {
    MaskDesc::contiguous(MaskKind::Bool, &[2, BIG, BIG]);
}

#[test]
fn dropout_counters_are_checked() {
    assert_eq!(Dropout::checked_counters_used(2, 3, 5, 7), Some(53));
    assert_eq!(
        Dropout::checked_counters_used(BIG, BIG / 2, 1, 1),
        Some(1 << 61)
    );
    assert_eq!(Dropout::checked_counters_used(BIG, BIG, 2, 8), None);
    assert_eq!(Dropout::checked_counters_used(BIG, BIG, BIG, 0), Some(0));
    let d = Dropout::new(0.5, 1, u64::MAX - 4);
    assert_eq!(
        d.checked_advanced(1, 1, 4, 4).map(|n| n.offset),
        Some(u64::MAX)
    );
    assert_eq!(d.checked_advanced(1, 1, 4, 5), None);
    assert!(d.validate_counters(1, 1, 4, 4).is_ok());
    assert_eq!(
        d.validate_counters(1, 1, 4, 5).unwrap_err().to_string(),
        format!(
            "dropout_offset: expected an offset of at most {} (2^64 - 1 minus the 5 Philox \
             counters the call uses), got {}",
            u64::MAX - 5,
            u64::MAX - 4
        )
    );
    assert_eq!(
        checked_flat_index(1, 2, 3, 4, 3, 5, 7),
        Some(((3 + 2) * 5 + 3) * 7 + 4)
    );
    assert_eq!(
        checked_flat_index(BIG - 1, BIG - 1, 0, 0, BIG, 1, 1),
        Some(u64::MAX)
    );
    assert_eq!(checked_flat_index(BIG, 0, 0, 0, BIG, 1, 1), None);
    assert_eq!(checked_flat_index(0, 0, 1, 1, 1, 2, usize::MAX), None);
}

#[test]
#[should_panic(expected = "overflows u64")]
fn counters_used_panics_instead_of_truncating() {
    Dropout::counters_used(BIG, BIG, BIG, 1);
}

#[test]
#[should_panic(expected = "overflows u64")]
fn advanced_panics_instead_of_wrapping() {
    Dropout::new(0.5, 1, u64::MAX).advanced(1, 1, 1, 1);
}

#[test]
#[should_panic(expected = "overflows u64")]
fn flat_index_panics_instead_of_wrapping() {
    flat_index(BIG, 0, 0, 0, BIG, 1, 1);
}

#[test]
fn problem_new_names_the_argument_on_overflow() {
    let o = SdpaOptions::default();
    let small = broadcast(DType::F16, [1, 1, 4, 8]);

    // A tensor of more than isize::MAX elements, each argument in turn.
    let huge = broadcast(DType::F16, [1, BIG, BIG, 8]);
    let (arg, msg) = err(&huge, &small, &small, None, &o);
    assert_eq!(arg, "query");
    assert_eq!(
        msg,
        format!("query: expected a shape of at most isize::MAX elements, got [1, {BIG}, {BIG}, 8]")
    );
    let huge_kv = broadcast(DType::F16, [1, BIG, BIG / 2, 16]);
    assert_eq!(err(&small, &huge_kv, &small, None, &o).0, "key");
    assert_eq!(err(&small, &small, &huge_kv, None, &o).0, "value");

    // Strides whose offsets pass isize::MAX.
    let far = TensorDesc {
        dtype: DType::F16,
        layout: Layout {
            shape: [3, 1, 4, 8],
            strides: [isize::MAX / 2 + 1, 0, 8, 1],
        },
    };
    let (arg, msg) = err(&small, &far, &small, None, &o);
    assert_eq!(arg, "key");
    assert!(
        msg.starts_with(
            "key: expected strides whose element offsets fit in isize, got shape [3, 1, 4, 8]"
        ),
        "{msg}"
    );

    // Every input fits, the score matrix B*Hq*L*S (2^16 * 2^16 * 2^32) does not.
    let q = broadcast(DType::F32, [1 << 16, 1, 1 << 16, 8]);
    let k = broadcast(DType::F32, [1 << 16, 1, BIG, 8]);
    let (arg, msg) = err(&q, &k, &k, None, &o);
    assert_eq!(arg, "query");
    assert!(msg.contains("scores [B, Hq, L, S] fits in memory"), "{msg}");
    // And the output B*Hq*L*Ev alone.
    let q = broadcast(DType::F32, [1 << 20, 1, 1 << 20, 8]);
    let k = broadcast(DType::F32, [1 << 20, 1, 1, 8]);
    let v = broadcast(DType::F32, [1 << 20, 1, 1, 1 << 22]);
    let (arg, msg) = err(&q, &k, &v, None, &o);
    assert_eq!(arg, "query");
    assert!(
        msg.contains("output [B, Hq, L, Ev] fits in memory"),
        "{msg}"
    );

    // A mask of too many elements, and one whose strides overflow.
    let q = broadcast(DType::F16, [1, 1, BIG, 8]);
    let k = broadcast(DType::F16, [1, 1, BIG, 8]);
    let mask = MaskDesc {
        kind: MaskKind::Bool,
        shape: vec![BIG, BIG],
        strides: vec![0, 0],
    };
    let (arg, msg) = err(&q, &k, &k, Some(&mask), &o);
    assert_eq!(arg, "attn_mask");
    assert_eq!(
        msg,
        format!("attn_mask: expected a shape of at most isize::MAX elements, got [{BIG}, {BIG}]")
    );
    let mask = MaskDesc {
        kind: MaskKind::Bool,
        shape: vec![4, 4],
        strides: vec![isize::MAX / 2, 1],
    };
    let (arg, msg) = err(&small, &small, &small, Some(&mask), &o);
    assert_eq!(arg, "attn_mask");
    assert!(
        msg.contains("strides whose element offsets fit in isize"),
        "{msg}"
    );

    // The dropout counter range: 4 * 8 = 32 elements use 8 counters.
    let qk = broadcast(DType::F16, [1, 1, 4, 8]);
    let kk = broadcast(DType::F16, [1, 1, 8, 8]);
    let at = |offset| SdpaOptions {
        dropout: Dropout::new(0.1, 0, offset),
        ..o
    };
    let p = Problem::new(&qk, &kk, &kk, None, &at(u64::MAX - 8)).unwrap();
    assert_eq!(p.dropout.advanced(1, 1, 4, 8).offset, u64::MAX);
    let (arg, _) = err(&qk, &kk, &kk, None, &at(u64::MAX - 7));
    assert_eq!(arg, "dropout_offset");
}

#[test]
fn a_scale_past_f32_is_refused_for_every_dtype() {
    for dtype in DType::ALL {
        let t = TensorDesc::contiguous(dtype, [1, 2, 3, 4]);
        for scale in [1e300, -1e39, f64::MAX, f64::INFINITY, f64::NAN] {
            let options = SdpaOptions {
                scale: Some(scale),
                ..Default::default()
            };
            let (arg, msg) = err(&t, &t, &t, None, &options);
            assert_eq!(arg, "scale", "{dtype} {scale}");
            assert!(
                msg.starts_with(
                    "scale: expected a number finite in f32 (|scale| <= 3.4028235e38), got "
                ),
                "{msg}"
            );
        }
        let (_, msg) = err(
            &t,
            &t,
            &t,
            None,
            &SdpaOptions {
                scale: Some(1e300),
                ..Default::default()
            },
        );
        assert!(msg.ends_with("got 1e300"), "{msg}");
        for scale in [f32::MAX as f64, -(f32::MAX as f64), 1e-300, 0.0] {
            let options = SdpaOptions {
                scale: Some(scale),
                ..Default::default()
            };
            let p = Problem::new(&t, &t, &t, None, &options).unwrap();
            assert_eq!(p.scale, scale);
        }
    }
}
