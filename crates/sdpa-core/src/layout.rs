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
    pub fn contiguous(shape: [usize; 4]) -> Self {
        let mut strides = [0isize; 4];
        let mut step = 1isize;
        for axis in (0..4).rev() {
            strides[axis] = step;
            step *= shape[axis].max(1) as isize;
        }
        Layout { shape, strides }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
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

pub(crate) fn fmt_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}
