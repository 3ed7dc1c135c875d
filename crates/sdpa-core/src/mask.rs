use crate::dtype::DType;
use crate::error::{Result, SdpaError};
use crate::layout::fmt_shape;

/// How an explicit `attn_mask` acts, as in PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskKind {
    /// Boolean: `true` means the key takes part, `false` masks it out.
    Bool,
    /// Additive: added to the scaled scores before the softmax (`-inf` masks out).
    /// Its dtype must equal the query's.
    Additive(DType),
}

/// Shape and strides of an `attn_mask` of rank 0 to 4, broadcast against
/// `[B, Hq, L, S]` the way PyTorch broadcasts (right-aligned; each axis equal or 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaskDesc {
    /// Bool or additive (with its dtype).
    pub kind: MaskKind,
    /// Extent of each axis, outermost first; at most 4 axes.
    pub shape: Vec<usize>,
    /// Element stride of each axis; same length as `shape`.
    pub strides: Vec<isize>,
}

impl MaskDesc {
    /// A row-major mask of `shape`.
    ///
    /// # Panics
    /// When the shape has more than `isize::MAX` elements (zero extents counted as 1);
    /// [`MaskDesc::checked_contiguous`] returns `None` instead.
    pub fn contiguous(kind: MaskKind, shape: &[usize]) -> Self {
        Self::checked_contiguous(kind, shape).unwrap_or_else(|| {
            panic!(
                "MaskDesc::contiguous: shape {} has more than isize::MAX elements",
                fmt_shape(shape)
            )
        })
    }

    /// A row-major mask of `shape`, or `None` when its element count (zero extents
    /// counted as 1) does not fit in `isize`.
    pub fn checked_contiguous(kind: MaskKind, shape: &[usize]) -> Option<Self> {
        let mut strides = vec![0isize; shape.len()];
        let mut step = 1isize;
        for axis in (0..shape.len()).rev() {
            strides[axis] = step;
            step = step.checked_mul(isize::try_from(shape[axis].max(1)).ok()?)?;
        }
        Some(MaskDesc {
            kind,
            shape: shape.to_vec(),
            strides,
        })
    }

    /// Element strides that read this mask as a `[B, Hq, L, S]` tensor: broadcast axes
    /// (missing or of extent 1 where the target is larger) get stride 0, so the mask is
    /// never materialised.
    pub fn broadcast_strides(&self, target: [usize; 4]) -> Result<[isize; 4]> {
        let bad = || {
            SdpaError::invalid(
                "attn_mask",
                format!(
                    "a shape that broadcasts to [B, Hq, L, S] = {}",
                    fmt_shape(&target)
                ),
                fmt_shape(&self.shape),
            )
        };
        if self.shape.len() > 4 || self.strides.len() != self.shape.len() {
            return Err(bad());
        }
        let pad = 4 - self.shape.len();
        let mut strides = [0isize; 4];
        for (axis, &want) in target.iter().enumerate() {
            if axis < pad {
                continue;
            }
            let have = self.shape[axis - pad];
            if have == want {
                strides[axis] = if want == 1 {
                    0
                } else {
                    self.strides[axis - pad]
                };
            } else if have == 1 {
                strides[axis] = 0;
            } else {
                return Err(bad());
            }
        }
        Ok(strides)
    }
}

/// A sliding window (FlashAttention's definition, bottom-right aligned): query `i` of `L`
/// sees key `j` of `S` iff `i + S - L - left <= j <= i + S - L + right`; `-1` on a side
/// is unbounded. ANDed with causal and any mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Keys before the row's diagonal it sees (`-1`: all).
    pub left: i64,
    /// Keys after the row's diagonal it sees (`-1`: all).
    pub right: i64,
}

impl Default for Window {
    fn default() -> Self {
        Window::NONE
    }
}

impl Window {
    /// No window: every key.
    pub const NONE: Window = Window {
        left: -1,
        right: -1,
    };

    /// Whether the window hides any key of some problem (a side is bounded).
    pub fn is_active(self) -> bool {
        self.left >= 0 || self.right >= 0
    }

    /// The keys `lo..hi` query `i` sees, for `L` queries and `S` keys (empty when
    /// `lo >= hi`); clamped to `0..S`.
    pub fn key_range(self, i: usize, len_q: usize, len_kv: usize) -> (usize, usize) {
        let diag = i as i128 + len_kv as i128 - len_q as i128;
        let lo = if self.left < 0 {
            0
        } else {
            (diag - self.left as i128).clamp(0, len_kv as i128)
        };
        let hi = if self.right < 0 {
            len_kv as i128
        } else {
            (diag + self.right as i128 + 1).clamp(0, len_kv as i128)
        };
        (lo as usize, hi as usize)
    }

    /// Whether query `i` may attend to key `j`.
    pub fn allows(self, i: usize, j: usize, len_q: usize, len_kv: usize) -> bool {
        let (lo, hi) = self.key_range(i, len_q, len_kv);
        lo <= j && j < hi
    }
}

/// Causal masking, applied on top of any explicit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Causal {
    /// No causal masking.
    #[default]
    None,
    /// PyTorch's `is_causal=True`: query `i` sees keys `j <= i` (the diagonal starts at
    /// the top-left corner of the `L x S` score matrix).
    TopLeft,
    /// FlashAttention's convention and PyTorch's `causal_lower_right`: query `i` sees
    /// keys `j <= i + S - L` (the diagonal ends at the bottom-right corner).
    BottomRight,
}

impl Causal {
    /// Largest key index query `i` may see, plus one (so `0` means none), for `L`
    /// queries and `S` keys. Saturates at `0` and `S`.
    pub fn key_limit(self, i: usize, len_q: usize, len_kv: usize) -> usize {
        match self {
            Causal::None => len_kv,
            Causal::TopLeft => (i + 1).min(len_kv),
            Causal::BottomRight => {
                let limit = i as i128 + 1 + len_kv as i128 - len_q as i128;
                limit.clamp(0, len_kv as i128) as usize
            }
        }
    }

    /// Whether query `i` may attend to key `j`.
    pub fn allows(self, i: usize, j: usize, len_q: usize, len_kv: usize) -> bool {
        j < self.key_limit(i, len_q, len_kv)
    }

    /// Name used in case files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Causal::None => "none",
            Causal::TopLeft => "top_left",
            Causal::BottomRight => "bottom_right",
        }
    }
}

impl std::str::FromStr for Causal {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" | "" => Ok(Causal::None),
            "top_left" => Ok(Causal::TopLeft),
            "bottom_right" => Ok(Causal::BottomRight),
            other => Err(format!(
                "expected one of none, top_left, bottom_right, got {other:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_bottom_right_aligned_and_clamped() {
        let w = Window { left: 1, right: 0 };
        // L = 3, S = 5: row i's diagonal is key i + 2.
        assert_eq!(w.key_range(0, 3, 5), (1, 3));
        assert_eq!(w.key_range(2, 3, 5), (3, 5));
        // L > S: the first rows' windows fall before key 0.
        assert_eq!(w.key_range(0, 6, 2), (0, 0));
        assert_eq!(w.key_range(5, 6, 2), (0, 2));
        assert_eq!(Window::NONE.key_range(3, 4, 9), (0, 9));
        assert_eq!(Window { left: -1, right: 2 }.key_range(0, 4, 9), (0, 8));
        assert!(Window { left: 0, right: 0 }.allows(1, 6, 4, 9));
        assert!(!Window { left: 0, right: 0 }.allows(1, 5, 4, 9));
        assert!(!Window::NONE.is_active() && Window { left: 0, right: -1 }.is_active());
        assert_eq!(Window::default(), Window::NONE);
    }

    #[test]
    fn broadcast_rules_follow_pytorch() {
        let target = [2, 3, 5, 7];
        let m = MaskDesc::contiguous(MaskKind::Bool, &[5, 7]);
        assert_eq!(m.broadcast_strides(target).unwrap(), [0, 0, 7, 1]);
        let m = MaskDesc::contiguous(MaskKind::Bool, &[2, 1, 5, 7]);
        assert_eq!(m.broadcast_strides(target).unwrap(), [35, 0, 7, 1]);
        let m = MaskDesc::contiguous(MaskKind::Bool, &[1, 3, 1, 7]);
        assert_eq!(m.broadcast_strides(target).unwrap(), [0, 7, 0, 1]);
        let m = MaskDesc::contiguous(MaskKind::Bool, &[]);
        assert_eq!(m.broadcast_strides(target).unwrap(), [0, 0, 0, 0]);
        let m = MaskDesc::contiguous(MaskKind::Bool, &[7]);
        assert_eq!(m.broadcast_strides(target).unwrap(), [0, 0, 0, 1]);
    }

    #[test]
    fn broadcast_rejects_mismatch_and_rank() {
        let target = [2, 3, 5, 7];
        let err = MaskDesc::contiguous(MaskKind::Bool, &[5, 6])
            .broadcast_strides(target)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "attn_mask: expected a shape that broadcasts to [B, Hq, L, S] = [2, 3, 5, 7], got [5, 6]"
        );
        assert!(MaskDesc::contiguous(MaskKind::Bool, &[1, 2, 3, 5, 7])
            .broadcast_strides(target)
            .is_err());
        assert!(MaskDesc::contiguous(MaskKind::Bool, &[3, 3, 5, 7])
            .broadcast_strides(target)
            .is_err());
    }

    #[test]
    fn causal_limits() {
        // L = 3, S = 5: top-left sees j <= i, bottom-right sees j <= i + 2.
        assert_eq!(Causal::TopLeft.key_limit(0, 3, 5), 1);
        assert_eq!(Causal::BottomRight.key_limit(0, 3, 5), 3);
        assert_eq!(Causal::BottomRight.key_limit(2, 3, 5), 5);
        // L = 5, S = 3: bottom-right leaves the first two queries with no key.
        assert_eq!(Causal::BottomRight.key_limit(0, 5, 3), 0);
        assert_eq!(Causal::BottomRight.key_limit(1, 5, 3), 0);
        assert_eq!(Causal::BottomRight.key_limit(2, 5, 3), 1);
        assert_eq!(Causal::TopLeft.key_limit(4, 5, 3), 3);
        assert_eq!(Causal::None.key_limit(0, 5, 3), 3);
        assert!(Causal::TopLeft.allows(2, 2, 3, 5));
        assert!(!Causal::TopLeft.allows(2, 3, 3, 5));
    }
}
