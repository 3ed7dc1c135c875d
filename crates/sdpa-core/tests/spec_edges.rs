//! The corners of the specification the unit tests leave open: names and parsing,
//! layouts and offsets, problem shapes and summaries, every support-check reason, and
//! the dropout stream's boundaries. Added when mutation testing (ci/mutants.sh) showed
//! which changes to sdpa-core no test noticed; expected values come from DESIGN.md or
//! from first principles (row-major strides, the Philox definition), never from a run.

use sdpa_core::dropout::flat_index;
use sdpa_core::{
    check_support, philox4x32_10, select, shape_text, Backend, BackendSet, Causal, DType, Device,
    Dropout, Layout, MaskDesc, MaskKind, MaskPlan, Problem, SdpaError, SdpaOptions, TensorDesc,
    EFFICIENT_MAX_HEAD_DIM, FLASH_MAX_HEAD_DIM,
};

fn problem_with(
    dtype: DType,
    q: [usize; 4],
    k: [usize; 4],
    v: [usize; 4],
    mask: Option<&MaskDesc>,
    options: SdpaOptions,
) -> Problem {
    Problem::new(
        &TensorDesc::contiguous(dtype, q),
        &TensorDesc::contiguous(dtype, k),
        &TensorDesc::contiguous(dtype, v),
        mask,
        &options,
    )
    .expect("a valid problem")
}

fn simple(dtype: DType, e: usize, ev: usize) -> Problem {
    problem_with(
        dtype,
        [1, 2, 3, e],
        [1, 2, 4, e],
        [1, 2, 4, ev],
        None,
        SdpaOptions::default(),
    )
}

#[test]
fn dtype_names_sizes_and_parsing() {
    let expected = [
        (DType::F64, "f64", 8, false),
        (DType::F32, "f32", 4, false),
        (DType::F16, "f16", 2, true),
        (DType::BF16, "bf16", 2, true),
    ];
    for (dtype, name, size, half) in expected {
        assert_eq!(dtype.name(), name);
        assert_eq!(dtype.to_string(), name);
        assert_eq!(dtype.size_bytes(), size);
        assert_eq!(dtype.is_half(), half);
        assert_eq!(name.parse::<DType>(), Ok(dtype));
        assert_eq!(name.to_uppercase().parse::<DType>(), Ok(dtype));
    }
    for (alias, dtype) in [
        ("float64", DType::F64),
        ("double", DType::F64),
        ("float32", DType::F32),
        ("float", DType::F32),
        ("float16", DType::F16),
        ("half", DType::F16),
        ("bfloat16", DType::BF16),
    ] {
        assert_eq!(alias.parse::<DType>(), Ok(dtype), "{alias}");
    }
    assert_eq!(
        "int8".parse::<DType>(),
        Err("expected one of f64, f32, f16, bf16, got \"int8\"".to_string())
    );
    assert_eq!(
        DType::ALL,
        [DType::F64, DType::F32, DType::F16, DType::BF16]
    );
}

#[test]
fn causal_backend_device_names_round_trip() {
    for causal in [Causal::None, Causal::TopLeft, Causal::BottomRight] {
        assert_eq!(causal.name().parse::<Causal>(), Ok(causal));
    }
    assert_eq!(Causal::TopLeft.name(), "top_left");
    assert_eq!(Causal::BottomRight.name(), "bottom_right");
    assert_eq!(Causal::None.name(), "none");
    assert_eq!("".parse::<Causal>(), Ok(Causal::None));
    assert!("diagonal"
        .parse::<Causal>()
        .unwrap_err()
        .contains("\"diagonal\""));
    for backend in Backend::PRIORITY {
        assert_eq!(backend.name().parse::<Backend>(), Ok(backend));
        assert_eq!(backend.to_string(), backend.name());
    }
    assert_eq!(
        [Backend::Flash, Backend::Efficient, Backend::Math].map(Backend::name),
        ["flash", "efficient", "math"]
    );
    assert_eq!(
        "memory_efficient".parse::<Backend>(),
        Ok(Backend::Efficient)
    );
    assert_eq!(
        "cudnn".parse::<Backend>(),
        Err("expected one of flash, efficient, math, got \"cudnn\"".to_string())
    );
    assert_eq!(Device::Cpu.to_string(), "cpu");
    assert_eq!(Device::Cuda.to_string(), "cuda");
}

#[test]
fn backend_sets() {
    assert_eq!(
        BackendSet::ALL.iter().collect::<Vec<_>>(),
        Backend::PRIORITY
    );
    assert_eq!(BackendSet::EMPTY.iter().count(), 0);
    for backend in Backend::PRIORITY {
        let only = BackendSet::only(backend);
        assert!(only.contains(backend));
        assert_eq!(only.iter().collect::<Vec<_>>(), vec![backend]);
        assert_eq!(BackendSet::EMPTY.with(backend), only);
        assert_eq!(only.with(backend), only, "adding a member keeps it");
        assert_eq!(BackendSet::ALL.with(backend), BackendSet::ALL);
        assert_eq!(only.without(backend), BackendSet::EMPTY);
        let rest = BackendSet::ALL.without(backend);
        assert!(!rest.contains(backend));
        assert_eq!(rest.iter().count(), 2);
        assert_eq!(rest.with(backend), BackendSet::ALL);
        for other in Backend::PRIORITY {
            assert_eq!(only.contains(other), other == backend);
        }
    }
}

#[test]
fn error_messages() {
    let e = SdpaError::invalid("scale", "a finite number", f64::NAN);
    assert_eq!(
        e,
        SdpaError::InvalidArgument {
            arg: "scale",
            expected: "a finite number".into(),
            actual: "NaN".into()
        }
    );
    assert_eq!(e.to_string(), "scale: expected a finite number, got NaN");
    assert_eq!(
        SdpaError::NoBackend(vec![]).to_string(),
        "no enabled backend can run this problem: the backend set is empty"
    );
    let p = simple(DType::F32, 8, 8);
    assert_eq!(
        select(BackendSet::EMPTY, &p, Device::Cpu),
        Err(SdpaError::NoBackend(vec![]))
    );
    assert_eq!(
        SdpaError::NoBackend(vec![
            (Backend::Flash, "a".into()),
            (Backend::Math, "b".into())
        ])
        .to_string(),
        "no enabled backend can run this problem: flash: a; math: b"
    );
}

#[test]
fn layouts_and_offsets() {
    let l = Layout::contiguous([2, 3, 4, 5]);
    assert_eq!(l.strides, [60, 20, 5, 1]);
    assert_eq!(l.numel(), 120);
    assert_eq!(l.offset([1, 2, 3, 4]), 60 + 40 + 15 + 4);
    assert_eq!(l.offset([0, 0, 0, 0]), 0);
    // A zero extent must not zero the strides of the axes outside it.
    let z = Layout::contiguous([2, 0, 4, 5]);
    assert_eq!(z.strides, [20, 20, 5, 1]);
    assert_eq!(z.numel(), 0);
    let strided = Layout {
        shape: [1, 1, 2, 3],
        strides: [0, 0, -6, -2],
    };
    assert_eq!(strided.offset([0, 0, 1, 2]), -10);
    assert!(!strided.last_dim_contiguous());
    assert!(Layout {
        shape: [1, 1, 2, 1],
        strides: [0, 0, 1, 7],
    }
    .last_dim_contiguous());
    assert!(Layout {
        shape: [1, 1, 2, 0],
        strides: [0, 0, 1, 7],
    }
    .last_dim_contiguous());
    assert!(l.last_dim_contiguous());
    let m = MaskDesc::contiguous(MaskKind::Bool, &[3, 0, 2]);
    assert_eq!(m.strides, vec![2, 2, 1]);
    let plan = MaskPlan {
        kind: MaskKind::Bool,
        strides: [100, 10, 3, 1],
    };
    assert_eq!(plan.offset(2, 3, 4, 5), 200 + 30 + 12 + 5);
    assert_eq!(
        MaskPlan {
            strides: [-1, 0, -3, 2],
            ..plan
        }
        .offset(2, 3, 4, 5),
        -2 - 12 + 10
    );
    assert_eq!(shape_text(&[2, 0, 7]), "[2, 0, 7]");
    assert_eq!(shape_text(&[]), "[]");
}

#[test]
fn mask_strides_keep_their_own_stride_on_full_axes() {
    // A transposed [S, L] storage read as [L, S]: strides (1, L) must survive.
    let m = MaskDesc {
        kind: MaskKind::Bool,
        shape: vec![3, 4],
        strides: vec![1, 3],
    };
    assert_eq!(m.broadcast_strides([2, 2, 3, 4]).unwrap(), [0, 0, 1, 3]);
    // Extent 1 on both sides broadcasts (stride 0, whatever the stored stride).
    let one = MaskDesc {
        kind: MaskKind::Bool,
        shape: vec![1, 4],
        strides: vec![9, 1],
    };
    assert_eq!(one.broadcast_strides([1, 1, 1, 4]).unwrap(), [0, 0, 0, 1]);
    // Mismatched stride and shape lengths are refused.
    let bad = MaskDesc {
        kind: MaskKind::Bool,
        shape: vec![3, 4],
        strides: vec![1],
    };
    assert!(bad.broadcast_strides([1, 1, 3, 4]).is_err());
    // Rank 4, exact.
    let full = MaskDesc::contiguous(MaskKind::Additive(DType::F32), &[2, 3, 4, 5]);
    assert_eq!(
        full.broadcast_strides([2, 3, 4, 5]).unwrap(),
        [60, 20, 5, 1]
    );
}

#[test]
fn causal_bounds_at_the_edges() {
    for (l, s) in [(1, 1), (3, 5), (5, 3), (4, 4), (0, 3), (3, 0)] {
        for i in 0..l {
            let top = Causal::TopLeft.key_limit(i, l, s);
            let bottom = Causal::BottomRight.key_limit(i, l, s);
            assert_eq!(top, (i + 1).min(s), "top-left i={i} L={l} S={s}");
            let want = (i as i64 + 1 + s as i64 - l as i64).clamp(0, s as i64) as usize;
            assert_eq!(bottom, want, "bottom-right i={i} L={l} S={s}");
            assert_eq!(Causal::None.key_limit(i, l, s), s);
            for j in 0..s {
                assert_eq!(Causal::TopLeft.allows(i, j, l, s), j <= i);
                assert_eq!(
                    Causal::BottomRight.allows(i, j, l, s),
                    (j as i64) <= i as i64 + s as i64 - l as i64
                );
                assert!(Causal::None.allows(i, j, l, s));
            }
        }
    }
}

#[test]
fn problem_shapes_groups_and_summary() {
    let options = SdpaOptions {
        causal: Causal::BottomRight,
        dropout: Dropout::new(0.25, 1, 2),
        scale: Some(-0.5),
        enable_gqa: true,
        ..Default::default()
    };
    let mask = MaskDesc::contiguous(MaskKind::Additive(DType::BF16), &[7, 11]);
    let p = problem_with(
        DType::BF16,
        [2, 6, 7, 16],
        [2, 2, 11, 16],
        [2, 2, 11, 4],
        Some(&mask),
        options,
    );
    assert_eq!(p.out_shape(), [2, 6, 7, 4]);
    assert_eq!(p.scores_shape(), [2, 6, 7, 11]);
    assert_eq!(p.lse_shape(), [2, 6, 7]);
    assert_eq!(p.group_size(), 3);
    assert_eq!(
        (0..6).map(|h| p.kv_head(h)).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 1]
    );
    assert_eq!(p.scale, -0.5);
    assert_eq!(p.dropout, Dropout::new(0.25, 1, 2));
    assert!(p.enable_gqa);
    assert_eq!(p.mask.unwrap().strides, [0, 0, 11, 1]);
    // Causal halves the flops of the two products.
    assert_eq!(p.flops(), 2.0 * 2.0 * 6.0 * 7.0 * 11.0 * 20.0 / 2.0);
    assert_eq!(
        p.summary(),
        "B=2 Hq=6 Hkv=2 L=7 S=11 E=16 Ev=4 bf16 mask=additive causal=bottom_right dropout_p=0.25"
    );
    let bool_mask = MaskDesc::contiguous(MaskKind::Bool, &[]);
    let q = problem_with(
        DType::F32,
        [1, 1, 2, 3],
        [1, 1, 2, 3],
        [1, 1, 2, 3],
        Some(&bool_mask),
        SdpaOptions::default(),
    );
    assert_eq!(q.summary(), "B=1 Hq=1 Hkv=1 L=2 S=2 E=3 Ev=3 f32 mask=bool");
    assert_eq!(q.group_size(), 1);
    assert_eq!(q.scale, 1.0 / 3f64.sqrt());
    assert!(!q.enable_gqa);
    assert_eq!(q.flops(), 2.0 * 2.0 * 2.0 * 6.0);
    // Each zero extent alone makes the problem empty.
    let base = [1usize, 2, 3, 4, 5, 6];
    for zero in 0..6 {
        let mut d = base;
        d[zero] = 0;
        let [b, h, l, s, e, ev] = d;
        let p = problem_with(
            DType::F32,
            [b, h, l, e],
            [b, h, s, e],
            [b, h, s, ev],
            None,
            SdpaOptions::default(),
        );
        assert!(p.is_empty(), "zero at {zero}");
    }
    assert!(!simple(DType::F32, 2, 2).is_empty());
}

#[test]
fn every_support_reason() {
    let reason = |b: Backend, p: &Problem| check_support(b, p, Device::Cuda).unwrap_err();
    for backend in Backend::PRIORITY {
        let p = simple(DType::F16, 8, 8);
        assert_eq!(check_support(backend, &p, Device::Cuda), Ok(()));
        if backend != Backend::Math {
            assert_eq!(
                check_support(backend, &p, Device::Cpu).unwrap_err(),
                "runs on CUDA only; this call is on the cpu"
            );
        }
    }
    assert_eq!(
        check_support(Backend::Math, &simple(DType::F64, 8, 8), Device::Cpu),
        Ok(())
    );
    assert_eq!(
        reason(Backend::Efficient, &simple(DType::F64, 8, 8)),
        "needs f32, f16 or bf16 inputs, got f64"
    );
    assert_eq!(
        check_support(Backend::Efficient, &simple(DType::F32, 8, 8), Device::Cuda),
        Ok(())
    );
    assert_eq!(
        reason(Backend::Flash, &simple(DType::BF16, 8, 16)),
        "needs the same head dim for q/k and v, got E=8 and Ev=16"
    );
    // The head-dim limits are inclusive, on E and on Ev.
    assert_eq!(FLASH_MAX_HEAD_DIM, 256);
    assert_eq!(EFFICIENT_MAX_HEAD_DIM, 256);
    let at_limit = simple(DType::F16, 256, 256);
    assert_eq!(
        check_support(Backend::Flash, &at_limit, Device::Cuda),
        Ok(())
    );
    assert_eq!(
        check_support(Backend::Efficient, &at_limit, Device::Cuda),
        Ok(())
    );
    assert_eq!(
        reason(Backend::Flash, &simple(DType::F16, 257, 257)),
        "takes head dims up to 256, got 257"
    );
    assert_eq!(
        reason(Backend::Efficient, &simple(DType::F16, 8, 300)),
        "takes head dims up to 256, got 300"
    );
    assert_eq!(
        reason(Backend::Efficient, &simple(DType::F16, 300, 8)),
        "takes head dims up to 256, got 300"
    );
    let empty = problem_with(
        DType::F16,
        [1, 2, 0, 8],
        [1, 2, 4, 8],
        [1, 2, 4, 8],
        None,
        SdpaOptions::default(),
    );
    assert_eq!(
        reason(Backend::Efficient, &empty),
        "needs non-empty dims, got B=1 Hq=2 Hkv=2 L=0 S=4 E=8 Ev=8 f16"
    );
    for (name, which) in [("query", 0), ("key", 1), ("value", 2)] {
        let mut p = simple(DType::F16, 8, 8);
        let layout = match which {
            0 => &mut p.q,
            1 => &mut p.k,
            _ => &mut p.v,
        };
        layout.strides[3] = -1;
        assert_eq!(
            reason(Backend::Flash, &p),
            format!("needs a unit stride in the last dim of {name}, got -1")
        );
    }
    // select: the first enabled backend that passes, with every earlier reason listed
    // only when none passes.
    let masked_f32 = problem_with(
        DType::F32,
        [1, 1, 2, 8],
        [1, 1, 2, 8],
        [1, 1, 2, 8],
        Some(&MaskDesc::contiguous(MaskKind::Bool, &[2, 2])),
        SdpaOptions::default(),
    );
    assert_eq!(
        select(BackendSet::ALL, &masked_f32, Device::Cuda),
        Ok(Backend::Efficient)
    );
    assert_eq!(
        select(
            BackendSet::ALL.without(Backend::Efficient),
            &masked_f32,
            Device::Cuda
        ),
        Ok(Backend::Math)
    );
    assert_eq!(
        select(BackendSet::only(Backend::Flash), &masked_f32, Device::Cuda),
        Err(SdpaError::NoBackend(vec![(
            Backend::Flash,
            "needs f16 or bf16 inputs, got f32".into()
        )]))
    );
}

#[test]
fn validation_boundaries() {
    let q = TensorDesc::contiguous(DType::F32, [1, 2, 3, 4]);
    let ok = |options: SdpaOptions| Problem::new(&q, &q, &q, None, &options);
    for p in [0.0, 1.0, 0.5, f64::MIN_POSITIVE] {
        assert!(ok(SdpaOptions {
            dropout: Dropout::new(p, 0, 0),
            ..Default::default()
        })
        .is_ok());
    }
    for p in [
        -f64::MIN_POSITIVE,
        1.0 + f64::EPSILON,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        assert!(ok(SdpaOptions {
            dropout: Dropout::new(p, 0, 0),
            ..Default::default()
        })
        .is_err());
    }
    // Finite in f32 is the bound, for every dtype (the kernels keep the scale in f32).
    for s in [0.0, -3.0, f32::MAX as f64, -(f32::MAX as f64)] {
        assert_eq!(
            ok(SdpaOptions {
                scale: Some(s),
                ..Default::default()
            })
            .unwrap()
            .scale,
            s
        );
    }
    for s in [f64::NEG_INFINITY, f64::MAX, 1e39, -1e300] {
        assert!(ok(SdpaOptions {
            scale: Some(s),
            ..Default::default()
        })
        .is_err());
    }
    // GQA with equal heads is plain attention; enable_gqa with heads that divide.
    let gqa = SdpaOptions {
        enable_gqa: true,
        ..Default::default()
    };
    assert_eq!(ok(gqa).unwrap().group_size(), 1);
    // A mask of the query's float dtype is accepted; an additive one of another is not.
    let m = MaskDesc::contiguous(MaskKind::Additive(DType::F32), &[3, 3]);
    assert!(Problem::new(&q, &q, &q, Some(&m), &SdpaOptions::default()).is_ok());
    let wrong = MaskDesc::contiguous(MaskKind::Additive(DType::F16), &[3, 3]);
    assert!(Problem::new(&q, &q, &q, Some(&wrong), &SdpaOptions::default()).is_err());
    // The mismatches of value are checked against key, not query.
    let k = TensorDesc::contiguous(DType::F32, [1, 2, 5, 4]);
    let v = TensorDesc::contiguous(DType::F32, [1, 2, 5, 9]);
    assert!(Problem::new(&q, &k, &v, None, &SdpaOptions::default()).is_ok());
    let v_batch = TensorDesc::contiguous(DType::F32, [2, 2, 5, 9]);
    assert_eq!(
        Problem::new(&q, &k, &v_batch, None, &SdpaOptions::default())
            .unwrap_err()
            .to_string(),
        "value: expected batch size 1 (the batch size of query), got 2"
    );
}

#[test]
fn dropout_stream_boundaries() {
    assert!(!Dropout::NONE.is_active());
    assert_eq!(Dropout::default(), Dropout::NONE);
    assert!(Dropout::new(f64::MIN_POSITIVE, 0, 0).is_active());
    assert_eq!(Dropout::new(0.75, 0, 0).keep_threshold(), 3 << 30);
    assert_eq!(Dropout::new(0.5, 0, 0).keep_scale(), 2.0);
    assert_eq!(Dropout::new(0.0, 0, 0).keep_scale(), 1.0);
    // floor(p * 2^32): the smallest p that moves the threshold.
    assert_eq!(
        Dropout::new(1.0 / 4_294_967_296.0, 0, 0).keep_threshold(),
        1
    );
    assert_eq!(
        Dropout::new(0.9 / 4_294_967_296.0, 0, 0).keep_threshold(),
        0
    );
    // ceil(n / 4).
    for (n, want) in [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)] {
        assert_eq!(Dropout::counters_used(1, 1, 1, n), want, "n = {n}");
    }
    assert_eq!(Dropout::counters_used(2, 3, 5, 7), 53); // ceil(210 / 4)
                                                        // Advancing to exactly u64::MAX fits; one counter more would wrap and is refused.
    let d = Dropout::new(0.5, 9, u64::MAX - 3);
    let next = d.advanced(1, 1, 1, 12);
    assert_eq!(next.offset, u64::MAX);
    assert_eq!((next.p, next.seed), (0.5, 9));
    assert_eq!(d.checked_advanced(1, 1, 1, 12), Some(next));
    assert_eq!(
        Dropout::new(0.5, 9, u64::MAX - 1).checked_advanced(1, 1, 1, 12),
        None
    );
    // The Philox counter itself is modulo 2^64, as on the device: block 2 of offset
    // 2^64 - 1 is counter 1 (a validated problem never gets there).
    assert_eq!(
        Dropout::new(0.5, 9, u64::MAX).words(2),
        philox4x32_10([1, 0, 0, 0], [9, 0])
    );
    // The seed's high word is the key's second word.
    let seeded = Dropout::new(0.5, (5u64 << 32) | 6, 0);
    assert_eq!(seeded.words(0), philox4x32_10([0, 0, 0, 0], [6, 5]));
    // keeps(n) is word(n) >= threshold, word n % 4 of block n / 4.
    let d = Dropout::new(0.4, 1234, 77);
    let threshold = (0.4f64 * 4_294_967_296.0).floor() as u64;
    let mut kept = 0;
    for n in 0..400u64 {
        let word = philox4x32_10([(77 + n / 4) as u32, 0, 0, 0], [1234, 0])[(n % 4) as usize];
        assert_eq!(d.word(n), word);
        assert_eq!(d.keeps(n), word as u64 >= threshold, "n = {n}");
        kept += d.keeps(n) as usize;
    }
    assert!((200..=280).contains(&kept), "kept {kept} of 400 at p = 0.4");
    // An inactive stream keeps everything without drawing.
    let mut row = [false; 9];
    Dropout::new(0.0, 1, 1).fill_keep_row(3, &mut row);
    assert_eq!(row, [true; 9]);
    let mut row = [true; 9];
    Dropout::new(1.0, 1, 1).fill_keep_row(3, &mut row);
    assert_eq!(row, [false; 9]);
    // Rows that start mid-block and span several blocks.
    for first in 0..8u64 {
        let mut row = vec![false; 11];
        d.fill_keep_row(first, &mut row);
        let want: Vec<bool> = (0..11).map(|j| d.keeps(first + j)).collect();
        assert_eq!(row, want, "first {first}");
    }
    assert_eq!(flat_index(0, 0, 0, 0, 3, 5, 7), 0);
    assert_eq!(flat_index(1, 0, 0, 0, 3, 5, 7), 3 * 5 * 7);
    assert_eq!(flat_index(0, 1, 0, 0, 3, 5, 7), 5 * 7);
    assert_eq!(flat_index(0, 0, 1, 0, 3, 5, 7), 7);
    assert_eq!(flat_index(0, 0, 0, 1, 3, 5, 7), 1);
}

/// Found with the `case_file` fuzz target (fuzz/regressions/case_file/
/// overflow_out_shape.safetensors): empty q, k and v whose dims multiply to an output
/// no memory can hold. It was accepted, and the reference aborted allocating it.
#[test]
fn outputs_too_large_to_address_are_refused() {
    let big = 1usize << 40;
    let q = TensorDesc::contiguous(DType::F32, [1, 1, big, 0]);
    let k = TensorDesc::contiguous(DType::F32, [1, 1, 0, 0]);
    let v = TensorDesc::contiguous(DType::F32, [1, 1, 0, big]);
    let err = Problem::new(&q, &k, &v, None, &SdpaOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "query: expected dims whose output [B, Hq, L, Ev] fits in memory (isize::MAX bytes), got [1, 1, {big}, {big}]"
        )
    );
    // The score matrix counts too, with zero extents counted as 1, as ndarray does.
    let k = TensorDesc::contiguous(DType::F32, [1, 1, big, 0]);
    let v = TensorDesc::contiguous(DType::F32, [1, 1, big, 0]);
    let err = Problem::new(&q, &k, &v, None, &SdpaOptions::default()).unwrap_err();
    assert!(err.to_string().contains("scores [B, Hq, L, S]"), "{err}");
    let q0 = TensorDesc::contiguous(DType::F32, [0, 1, big, 0]);
    let k0 = TensorDesc::contiguous(DType::F32, [0, 1, big, 0]);
    assert!(Problem::new(&q0, &k0, &k0, None, &SdpaOptions::default()).is_err());
    // Large but addressable empty problems stay valid (PyTorch accepts them).
    let q = TensorDesc::contiguous(DType::F64, [1, 1, 1 << 20, 0]);
    let k = TensorDesc::contiguous(DType::F64, [1, 1, 1 << 20, 0]);
    assert!(Problem::new(&q, &k, &k, None, &SdpaOptions::default()).is_ok());
}
