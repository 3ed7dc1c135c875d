//! The golden cases: what each one covers, as data. Names are file names, so they are
//! unique, stable and say what the case is.

use sdpa_core::{Causal, Dropout};

/// Element type of a case's `q`, `k`, `v`, `out` (and an additive mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    Bf16,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// How the values of an explicit mask are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskPattern {
    /// Bool: keep with this probability. Additive: finite values in [-2, 2], and `-inf`
    /// with probability `1 - keep`.
    Random { keep: f64 },
    /// Diagonal bands of masked keys (`-inf` / false) across every row, finite elsewhere.
    Bands,
    /// Every third query row (1, 4, 7, ...) masked out entirely; the rest random.
    FullyMaskedRows,
    /// Additive only: query row 0 is `-inf` everywhere, the rest finite.
    NegInfRow,
    /// Key padding: keys at or past a length drawn per (b, h) (at least 1) are masked;
    /// the length does not depend on the query row. Meant for `[B, 1, 1, S]`.
    KeyPadding,
}

/// An explicit `attn_mask`: bool or additive, its stored (broadcast) shape given as
/// axis letters over `[B, H, L, S]` (`'1'` for a size-1 axis), e.g. `"B11S"`, `"LS"`.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskSpec {
    pub bool_mask: bool,
    pub axes: &'static str,
    pub pattern: MaskPattern,
}

impl MaskSpec {
    pub fn shape(&self, b: usize, h: usize, l: usize, s: usize) -> Vec<usize> {
        self.axes
            .chars()
            .map(|c| match c {
                'B' => b,
                'H' => h,
                'L' => l,
                'S' => s,
                '1' => 1,
                other => panic!("mask axis letter {other:?}"),
            })
            .collect()
    }
}

/// What fills q and k (v is always random).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Approximately standard normal (Irwin-Hall of four uniforms), from the case seed.
    Random,
    /// q and k full of 133120.0: every score is huge and equal (overflows f16 arithmetic).
    Large,
    /// q full of 133120.0, k = +-133120.0 at random: huge scores of both signs, ties.
    LargeSigned,
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    /// What bullet of the coverage list this case is for.
    pub group: &'static str,
    pub dtype: DType,
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub l: usize,
    pub s: usize,
    pub e: usize,
    pub ev: usize,
    pub mask: Option<MaskSpec>,
    pub causal: Causal,
    pub dropout: Dropout,
    pub scale: Option<f64>,
    pub enable_gqa: bool,
    pub fill: Fill,
}

pub struct Shape {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub l: usize,
    pub s: usize,
    pub e: usize,
    pub ev: usize,
}

pub fn shape(b: usize, h: usize, l: usize, s: usize, e: usize) -> Shape {
    Shape {
        b,
        hq: h,
        hkv: h,
        l,
        s,
        e,
        ev: e,
    }
}

pub fn case(group: &'static str, name: String, dtype: DType, sh: Shape) -> Case {
    Case {
        name: format!("{group}_{name}_{}", dtype.name()),
        group,
        dtype,
        b: sh.b,
        hq: sh.hq,
        hkv: sh.hkv,
        l: sh.l,
        s: sh.s,
        e: sh.e,
        ev: sh.ev,
        mask: None,
        causal: Causal::None,
        dropout: Dropout::NONE,
        scale: None,
        enable_gqa: false,
        fill: Fill::Random,
    }
}

pub fn bool_mask(axes: &'static str, pattern: MaskPattern) -> Option<MaskSpec> {
    Some(MaskSpec {
        bool_mask: true,
        axes,
        pattern,
    })
}

pub fn float_mask(axes: &'static str, pattern: MaskPattern) -> Option<MaskSpec> {
    Some(MaskSpec {
        bool_mask: false,
        axes,
        pattern,
    })
}

/// Every golden case, in a fixed order.
pub fn all() -> Vec<Case> {
    let mut cases = Vec::new();
    let half_and_full = [DType::F32, DType::F16, DType::Bf16];

    // Dtypes: one plain shape in each.
    for dt in DType::ALL {
        cases.push(case(
            "dtype",
            "b2_h3_l17_s23_e32".into(),
            dt,
            shape(2, 3, 17, 23, 32),
        ));
    }

    // Head dims 1..256, in every dtype but f64 (f64 at a few).
    for e in [1, 8, 16, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 256] {
        for dt in half_and_full {
            cases.push(case("headdim", format!("e{e}"), dt, shape(1, 1, 19, 21, e)));
        }
    }
    for e in [1, 59, 256] {
        cases.push(case(
            "headdim",
            format!("e{e}"),
            DType::F64,
            shape(1, 1, 19, 21, e),
        ));
    }

    // Ev != E, both ways.
    for (e, ev) in [(64, 32), (32, 64), (40, 111), (128, 8), (1, 16)] {
        for dt in [DType::F32, DType::Bf16] {
            let mut sh = shape(1, 2, 13, 29, e);
            sh.ev = ev;
            cases.push(case("ev", format!("e{e}_ev{ev}"), dt, sh));
        }
    }

    // Lengths L = S, small batch and heads for the long ones.
    for n in [1, 3, 17, 97, 113, 127, 128, 129, 257] {
        for dt in half_and_full {
            cases.push(case("len", format!("l{n}_s{n}"), dt, shape(1, 1, n, n, 16)));
        }
    }
    for n in [1023, 1025] {
        for dt in [DType::F32, DType::F16, DType::Bf16] {
            cases.push(case("len", format!("l{n}_s{n}"), dt, shape(1, 1, n, n, 8)));
        }
    }
    // L != S both ways.
    for (l, s) in [
        (113, 203),
        (203, 113),
        (1, 239),
        (239, 1),
        (512, 256),
        (256, 512),
        (3, 129),
        (129, 3),
    ] {
        for dt in half_and_full {
            cases.push(case(
                "lenpair",
                format!("l{l}_s{s}"),
                dt,
                shape(1, 1, l, s, 16),
            ));
        }
    }
    cases.push(case(
        "lenpair",
        "l97_s1025".into(),
        DType::F32,
        shape(1, 1, 97, 1025, 8),
    ));

    // Masks: every broadcast shape, bool and float.
    let mask_shapes: [&'static str; 10] = [
        "LS", "11LS", "B1LS", "1HLS", "BHLS", "BH1S", "B11S", "1LS", "HLS", "L1",
    ];
    for axes in mask_shapes {
        let lower = axes.to_lowercase();
        let mut c = case(
            "mask",
            format!("bool_{lower}"),
            DType::F32,
            shape(2, 3, 11, 13, 16),
        );
        c.mask = bool_mask(axes, MaskPattern::Random { keep: 0.7 });
        cases.push(c);
        let mut c = case(
            "mask",
            format!("float_{lower}"),
            DType::F32,
            shape(2, 3, 11, 13, 16),
        );
        c.mask = float_mask(axes, MaskPattern::Random { keep: 0.85 });
        cases.push(c);
    }
    for dt in [DType::F64, DType::F16, DType::Bf16] {
        let mut c = case("mask", "bool_b1ls".into(), dt, shape(2, 3, 11, 13, 16));
        c.mask = bool_mask("B1LS", MaskPattern::Random { keep: 0.7 });
        cases.push(c);
        let mut c = case("mask", "float_1hls".into(), dt, shape(2, 3, 11, 13, 16));
        c.mask = float_mask("1HLS", MaskPattern::Random { keep: 0.85 });
        cases.push(c);
    }
    // Key padding on long sequences (the usual varlen-as-dense mask).
    for dt in [DType::F32, DType::Bf16] {
        let mut c = case(
            "mask",
            "keypad_b11s_l129_s257".into(),
            dt,
            shape(3, 1, 129, 257, 8),
        );
        c.mask = bool_mask("B11S", MaskPattern::KeyPadding);
        cases.push(c);
    }
    // -inf bands, fully masked rows, a float row of all -inf.
    for dt in DType::ALL {
        let mut c = case(
            "maskinf",
            "bands_float_ls".into(),
            dt,
            shape(1, 2, 33, 47, 32),
        );
        c.mask = float_mask("LS", MaskPattern::Bands);
        cases.push(c);
        let mut c = case(
            "maskinf",
            "bands_bool_bhls".into(),
            dt,
            shape(2, 2, 33, 47, 32),
        );
        c.mask = bool_mask("BHLS", MaskPattern::Bands);
        cases.push(c);
        let mut c = case(
            "maskinf",
            "fullrows_bool_b1ls".into(),
            dt,
            shape(2, 2, 10, 17, 16),
        );
        c.mask = bool_mask("B1LS", MaskPattern::FullyMaskedRows);
        cases.push(c);
        let mut c = case(
            "maskinf",
            "fullrows_float_ls".into(),
            dt,
            shape(1, 2, 10, 17, 16),
        );
        c.mask = float_mask("LS", MaskPattern::FullyMaskedRows);
        cases.push(c);
        let mut c = case(
            "maskinf",
            "neginfrow_float_ls".into(),
            dt,
            shape(1, 2, 7, 9, 16),
        );
        c.mask = float_mask("LS", MaskPattern::NegInfRow);
        cases.push(c);
    }
    let mut c = case(
        "maskinf",
        "fullrows_bool_l1".into(),
        DType::F32,
        shape(2, 2, 10, 17, 16),
    );
    c.mask = bool_mask("L1", MaskPattern::FullyMaskedRows);
    cases.push(c);

    // Causal: top-left and bottom-right, L < S, L = S, L > S.
    for (l, s) in [
        (17, 17),
        (13, 37),
        (37, 13),
        (1, 64),
        (64, 1),
        (127, 257),
        (257, 127),
    ] {
        let dtypes: &[DType] = if l * s > 10_000 {
            &[DType::F32, DType::Bf16]
        } else {
            &half_and_full
        };
        for causal in [Causal::TopLeft, Causal::BottomRight] {
            for &dt in dtypes {
                let mut c = case(
                    "causal",
                    format!("{}_l{l}_s{s}", causal.name()),
                    dt,
                    shape(1, 1, l, s, 16),
                );
                c.causal = causal;
                cases.push(c);
            }
        }
    }
    for causal in [Causal::TopLeft, Causal::BottomRight] {
        let mut c = case(
            "causal",
            format!("{}_l33_s21", causal.name()),
            DType::F64,
            shape(1, 2, 33, 21, 16),
        );
        c.causal = causal;
        cases.push(c);
        // Causal together with an explicit mask (the spec combines them; libtorch gets
        // the intersection as one explicit mask).
        let mut c = case(
            "causal",
            format!("{}_bool_b11s_l21_s29", causal.name()),
            DType::F32,
            shape(2, 2, 21, 29, 16),
        );
        c.causal = causal;
        c.mask = bool_mask("B11S", MaskPattern::KeyPadding);
        cases.push(c);
        let mut c = case(
            "causal",
            format!("{}_float_ls_l29_s21", causal.name()),
            DType::Bf16,
            shape(1, 2, 29, 21, 16),
        );
        c.causal = causal;
        c.mask = float_mask("LS", MaskPattern::Random { keep: 0.9 });
        cases.push(c);
    }

    // Scale: custom and negative (default is everywhere else).
    for (tag, scale) in [
        ("0p3", 0.3),
        ("1p7", 1.7),
        ("neg0p5", -0.5),
        ("neg0p125", -0.125),
    ] {
        for dt in DType::ALL {
            let mut c = case("scale", tag.into(), dt, shape(1, 2, 19, 27, 48));
            c.scale = Some(scale);
            cases.push(c);
        }
    }
    let mut c = case(
        "scale",
        "neg0p3_causal".into(),
        DType::F32,
        shape(1, 2, 19, 27, 48),
    );
    c.scale = Some(-0.3);
    c.causal = Causal::TopLeft;
    cases.push(c);

    // GQA 8/2 and MQA 6/1.
    for (hq, hkv) in [(8, 2), (6, 1)] {
        for dt in DType::ALL {
            let mut sh = shape(2, hq, 13, 21, 16);
            sh.hkv = hkv;
            let mut c = case("gqa", format!("hq{hq}_hkv{hkv}"), dt, sh);
            c.enable_gqa = true;
            cases.push(c);
        }
        let mut sh = shape(1, hq, 31, 23, 64);
        sh.hkv = hkv;
        let mut c = case("gqa", format!("hq{hq}_hkv{hkv}_causal_br"), DType::Bf16, sh);
        c.enable_gqa = true;
        c.causal = Causal::BottomRight;
        cases.push(c);
        let mut sh = shape(2, hq, 17, 19, 32);
        sh.hkv = hkv;
        let mut c = case("gqa", format!("hq{hq}_hkv{hkv}_bool_bhls"), DType::F32, sh);
        c.enable_gqa = true;
        c.mask = bool_mask("BHLS", MaskPattern::Random { keep: 0.6 });
        cases.push(c);
        let mut sh = shape(1, hq, 17, 19, 32);
        sh.hkv = hkv;
        let mut c = case("gqa", format!("hq{hq}_hkv{hkv}_causal_tl"), DType::F16, sh);
        c.enable_gqa = true;
        c.causal = Causal::TopLeft;
        cases.push(c);
    }

    // Dropout: the keep-mask of the spec's Philox stream.
    let dropout_params: [(f64, u64, u64); 8] = [
        (0.1, 0, 0),
        (0.25, 42, 0),
        (0.5, 42, 7),
        (0.5, 0x299f_31d0_a409_3822, 3),
        (0.9, 7, 1 << 20),
        (0.3, 123_456_789, u32::MAX as u64 - 5),
        (0.75, u64::MAX, 1 << 40),
        (0.0, 5, 0),
    ];
    for (i, &(p, seed, offset)) in dropout_params.iter().enumerate() {
        for dt in DType::ALL {
            let mut c = case(
                "dropout",
                format!("{i}_p{}", p_tag(p)),
                dt,
                shape(2, 2, 13, 21, 16),
            );
            c.dropout = Dropout::new(p, seed, offset);
            cases.push(c);
        }
    }
    let mut c = case(
        "dropout",
        "p0p2_causal_br_l9_s33".into(),
        DType::F32,
        shape(1, 3, 9, 33, 32),
    );
    c.dropout = Dropout::new(0.2, 11, 99);
    c.causal = Causal::BottomRight;
    cases.push(c);
    let mut c = case(
        "dropout",
        "p0p2_causal_tl_l33_s9".into(),
        DType::Bf16,
        shape(1, 3, 33, 9, 32),
    );
    c.dropout = Dropout::new(0.2, 12, 0);
    c.causal = Causal::TopLeft;
    cases.push(c);
    let mut c = case(
        "dropout",
        "p0p4_fullrows_bool".into(),
        DType::F32,
        shape(2, 2, 10, 17, 16),
    );
    c.dropout = Dropout::new(0.4, 13, 5);
    c.mask = bool_mask("B1LS", MaskPattern::FullyMaskedRows);
    cases.push(c);
    let mut sh = shape(2, 8, 11, 15, 32);
    sh.hkv = 2;
    let mut c = case("dropout", "p0p3_gqa_hq8_hkv2".into(), DType::F16, sh);
    c.dropout = Dropout::new(0.3, 14, 1000);
    c.enable_gqa = true;
    cases.push(c);
    let mut c = case(
        "dropout",
        "p0p1_l129_s257".into(),
        DType::F32,
        shape(1, 1, 129, 257, 32),
    );
    c.dropout = Dropout::new(0.1, 15, 0);
    cases.push(c);

    // Large values: bf16 q, k full of 133120.0.
    for (tag, fill) in [("const", Fill::Large), ("signed", Fill::LargeSigned)] {
        for e in [16, 64, 128] {
            let mut c = case(
                "large",
                format!("{tag}_e{e}"),
                DType::Bf16,
                shape(1, 2, 17, 33, e),
            );
            c.fill = fill;
            cases.push(c);
        }
        let mut c = case(
            "large",
            format!("{tag}_e64_causal"),
            DType::Bf16,
            shape(1, 2, 33, 33, 64),
        );
        c.fill = fill;
        c.causal = Causal::TopLeft;
        cases.push(c);
        // Not f16: 133120 is past f16's largest finite value.
        for dt in [DType::F32, DType::F64] {
            let mut c = case("large", format!("{tag}_e64"), dt, shape(1, 2, 17, 33, 64));
            c.fill = fill;
            cases.push(c);
        }
    }

    cases
}

pub fn p_tag(p: f64) -> String {
    format!("{p}").replace('.', "p")
}
