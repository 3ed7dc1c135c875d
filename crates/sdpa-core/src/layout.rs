use crate::dtype::DType;

/// Shape and element strides of a 4-d tensor (`[B, H, L, E]` for q, k, v, out).
///
/// Strides count elements, not bytes, and may be zero or negative, as ndarray allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Extent of each axis.
    pub shape: [usize; 4],
    /// Element step of each axis.
    pub strides: [isize; 4],
}

impl Layout {
    /// Row-major (C-contiguous) layout of `shape`.
    ///
    /// # Panics
    /// When the shape has more than `isize::MAX` elements (zero extents counted as 1,
    /// as ndarray counts them); [`Layout::checked_contiguous`] returns `None` instead.
    pub fn contiguous(shape: [usize; 4]) -> Self {
        Self::checked_contiguous(shape).unwrap_or_else(|| {
            panic!(
                "Layout::contiguous: shape {} has more than isize::MAX elements",
                fmt_shape(&shape)
            )
        })
    }

    /// Row-major layout of `shape`, or `None` when its element count (zero extents
    /// counted as 1) does not fit in `isize`.
    pub fn checked_contiguous(shape: [usize; 4]) -> Option<Self> {
        let mut strides = [0isize; 4];
        let mut step = 1isize;
        for axis in (0..4).rev() {
            strides[axis] = step;
            step = step.checked_mul(isize::try_from(shape[axis].max(1)).ok()?)?;
        }
        Some(Layout { shape, strides })
    }

    /// Number of elements.
    ///
    /// # Panics
    /// When the product of the extents overflows `usize` (never for the layouts of a
    /// validated [`Problem`](crate::Problem)); [`Layout::checked_numel`] returns `None`.
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or_else(|| {
            panic!(
                "Layout::numel: shape {} has more than usize::MAX elements",
                fmt_shape(&self.shape)
            )
        })
    }

    /// Number of elements, or `None` when it overflows `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        checked_product(&self.shape)
    }

    /// The smallest and the largest element offset any index of this layout reaches,
    /// or `None` when one does not fit in `isize`. `[0, 0]` for an empty layout.
    pub fn checked_offset_bounds(&self) -> Option<[isize; 2]> {
        checked_offset_bounds(&self.shape, &self.strides)
    }

    /// True when the last axis has unit stride (or at most one element), as the fused
    /// kernels require.
    pub fn last_dim_contiguous(&self) -> bool {
        self.strides[3] == 1 || self.shape[3] <= 1
    }

    /// Element offset of index `[a, b, c, d]`.
    pub fn offset(&self, index: [usize; 4]) -> isize {
        (0..4)
            .map(|axis| index[axis] as isize * self.strides[axis])
            .sum()
    }
}

/// dtype plus layout: what the specification needs to know of a q, k or v tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    /// Element type.
    pub dtype: DType,
    /// Shape and strides.
    pub layout: Layout,
}

impl TensorDesc {
    /// A contiguous tensor of `shape`.
    pub fn contiguous(dtype: DType, shape: [usize; 4]) -> Self {
        TensorDesc {
            dtype,
            layout: Layout::contiguous(shape),
        }
    }
}

/// Product of `extents`, or `None` when it overflows `usize` (0 when an extent is 0,
/// whatever the others).
pub(crate) fn checked_product(extents: &[usize]) -> Option<usize> {
    if extents.contains(&0) {
        return Some(0);
    }
    extents
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Product of `extents` with zero extents counted as 1 (ndarray's count, which must
/// fit in `isize`), or `None` when it does not fit in `isize`.
pub(crate) fn checked_storage_len(extents: &[usize]) -> Option<usize> {
    extents
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d.max(1)))
        .filter(|&n| n <= isize::MAX as usize)
}

/// Smallest and largest `sum(index[a] * strides[a])` over the indices of `shape`, or
/// `None` on overflow of `isize`; `[0, 0]` when some extent is 0 (nothing is read).
pub(crate) fn checked_offset_bounds(shape: &[usize], strides: &[isize]) -> Option<[isize; 2]> {
    if shape.contains(&0) {
        return Some([0, 0]);
    }
    let mut bounds = [0isize, 0isize];
    for (&extent, &stride) in shape.iter().zip(strides) {
        let last = isize::try_from(extent - 1).ok()?.checked_mul(stride)?;
        if last < 0 {
            bounds[0] = bounds[0].checked_add(last)?;
        } else {
            bounds[1] = bounds[1].checked_add(last)?;
        }
    }
    Some(bounds)
}

pub(crate) fn fmt_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}
