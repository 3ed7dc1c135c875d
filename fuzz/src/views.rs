//! Strided views of fuzzer-chosen layouts: permuted axes, reversed axes (negative
//! strides), every other element (stride 2) and broadcast axes (stride 0), so the
//! reference sees every layout ndarray can describe, not just contiguous arrays.

use arbitrary::Arbitrary;
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice};

/// How to lay out a tensor of given dims in memory; one bit per axis for each trick.
#[derive(Debug, Clone, Copy, Default, Arbitrary)]
pub struct ViewSpec {
    /// Lehmer code of the storage order of the axes.
    pub perm: u8,
    /// Axes read backwards.
    pub flip: u8,
    /// Axes stored with a gap (stride doubled).
    pub step: u8,
    /// Axes of extent >= 2 stored once and broadcast (stride 0).
    pub broadcast: u8,
}

fn bit(bits: u8, axis: usize) -> bool {
    bits >> axis & 1 == 1
}

/// The permutation of `0..rank` with Lehmer code `code` (mod `rank!`).
fn permutation(code: u8, rank: usize) -> Vec<usize> {
    let mut left: Vec<usize> = (0..rank).collect();
    let mut code = code as usize;
    let mut out = Vec::with_capacity(rank);
    for n in (1..=rank).rev() {
        out.push(left.remove(code % n));
        code /= n;
    }
    out
}

impl ViewSpec {
    fn broadcasts(&self, axis: usize, dim: usize) -> bool {
        bit(self.broadcast, axis) && dim >= 2
    }

    fn steps(&self, axis: usize, dim: usize) -> bool {
        bit(self.step, axis) && dim >= 1 && !self.broadcasts(axis, dim)
    }

    /// Storage order: storage axis `i` holds logical axis `order[i]`.
    fn order(&self, rank: usize) -> Vec<usize> {
        permutation(self.perm, rank)
    }

    /// Shape of the backing array for a view of `dims`, in storage order.
    pub fn storage_shape(&self, dims: &[usize]) -> Vec<usize> {
        self.order(dims.len())
            .into_iter()
            .map(|axis| {
                let d = dims[axis];
                if self.broadcasts(axis, d) {
                    1
                } else if self.steps(axis, d) {
                    2 * d
                } else {
                    d
                }
            })
            .collect()
    }

    /// The view of `dims` into `storage` (made with [`ViewSpec::storage_shape`]).
    pub fn view<'a, T>(&self, storage: &'a ArrayD<T>, dims: &[usize]) -> ArrayViewD<'a, T> {
        let order = self.order(dims.len());
        let broadcast_to: Vec<usize> = order.iter().map(|&axis| dims[axis]).collect();
        let stretched: Vec<usize> = storage
            .shape()
            .iter()
            .zip(&order)
            .zip(&broadcast_to)
            .map(|((&have, &axis), &want)| {
                if self.broadcasts(axis, want) {
                    want
                } else {
                    have
                }
            })
            .collect();
        let broadcast = storage
            .broadcast(IxDyn(&stretched))
            .expect("extent-1 axes broadcast");
        let mut inverse = vec![0; order.len()];
        for (i, &axis) in order.iter().enumerate() {
            inverse[axis] = i;
        }
        let mut view = broadcast.permuted_axes(IxDyn(&inverse));
        view.slice_each_axis_inplace(|ax| {
            let axis = ax.axis.index();
            if self.steps(axis, dims[axis]) {
                Slice::new(0, None, 2)
            } else {
                Slice::from(..)
            }
        });
        for (axis, &d) in dims.iter().enumerate() {
            if bit(self.flip, axis) && d > 1 {
                view.invert_axis(Axis(axis));
            }
        }
        debug_assert_eq!(view.shape(), dims);
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Dimension;

    #[test]
    fn every_layout_reads_the_same_logical_tensor() {
        let dims = [2, 3, 1, 4];
        for perm in 0..24 {
            for bits in 0..16u8 {
                let spec = ViewSpec {
                    perm,
                    flip: bits,
                    step: bits.rotate_left(1),
                    broadcast: 0,
                };
                let storage = ArrayD::from_shape_fn(IxDyn(&spec.storage_shape(&dims)), |i| {
                    i.as_array_view()
                        .iter()
                        .fold(0usize, |acc, &x| acc * 10 + x)
                });
                let view = spec.view(&storage, &dims);
                assert_eq!(view.shape(), dims);
                // Distinct logical indices read distinct storage elements.
                let mut seen: Vec<usize> = view.iter().copied().collect();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen.len(), 24, "perm {perm} bits {bits}");
            }
        }
        let spec = ViewSpec {
            broadcast: 0b0010,
            ..Default::default()
        };
        let storage = ArrayD::from_elem(IxDyn(&spec.storage_shape(&dims)), 7);
        let view = spec.view(&storage, &dims);
        assert_eq!(view.strides()[1], 0);
        assert_eq!(view.shape(), dims);
    }
}
