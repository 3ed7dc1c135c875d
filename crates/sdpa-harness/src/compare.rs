//! Element-by-element comparison against the truth.

use crate::tolerance::Tolerance;
use ndarray::{ArrayViewD, Dimension};
use std::fmt;

/// Where and how far a result is from the truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Elements compared.
    pub count: usize,
    /// Largest `|got - truth|` (infinite if some element is NaN/Inf where truth is finite).
    pub max_abs: f64,
    /// Index of that element.
    pub max_abs_index: Vec<usize>,
    /// `got` and `truth` there.
    pub worst: (f64, f64),
    /// Largest `|got - truth| / |truth|` over elements with non-zero truth.
    pub max_rel: f64,
    /// Elements that are NaN or infinite where the truth is finite, or differ in kind
    /// from a non-finite truth.
    pub non_finite: usize,
    /// Elements outside the tolerance given to [`compare_with`] (0 for [`compare`]).
    pub outside: usize,
}

impl Report {
    /// True when no element is non-finite where it should not be and none is outside.
    pub fn passes(&self) -> bool {
        self.non_finite == 0 && self.outside == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max abs err {:.3e} at {:?} (got {:?}, truth {:?}), max rel err {:.3e}, {} non-finite, {} outside tolerance, {} elements",
            self.max_abs,
            self.max_abs_index,
            self.worst.0,
            self.worst.1,
            self.max_rel,
            self.non_finite,
            self.outside,
            self.count
        )
    }
}

fn same_non_finite(got: f64, truth: f64) -> bool {
    (got.is_nan() && truth.is_nan()) || got == truth
}

/// Compares `got` with `truth` (same shape) and, with `tolerance`, counts the elements
/// outside `atol + rtol * |truth|`. A shape mismatch counts every element as outside.
pub fn compare_with(
    got: ArrayViewD<'_, f64>,
    truth: ArrayViewD<'_, f64>,
    tolerance: Option<&Tolerance>,
) -> Report {
    let mut r = Report {
        count: truth.len(),
        max_abs: 0.0,
        max_abs_index: Vec::new(),
        worst: (0.0, 0.0),
        max_rel: 0.0,
        non_finite: 0,
        outside: 0,
    };
    if got.shape() != truth.shape() {
        r.max_abs = f64::INFINITY;
        r.outside = truth.len().max(got.len()).max(1);
        return r;
    }
    for ((index, &t), &g) in truth.indexed_iter().zip(got.iter()) {
        let err = if t.is_finite() {
            if !g.is_finite() {
                r.non_finite += 1;
                f64::INFINITY
            } else {
                (g - t).abs()
            }
        } else if same_non_finite(g, t) {
            0.0
        } else {
            r.non_finite += 1;
            f64::INFINITY
        };
        if err > r.max_abs || (err.is_infinite() && r.max_abs_index.is_empty()) {
            r.max_abs = err;
            r.max_abs_index = index.as_array_view().to_vec();
            r.worst = (g, t);
        }
        if t != 0.0 && t.is_finite() {
            r.max_rel = r.max_rel.max(err / t.abs());
        }
        if let Some(tol) = tolerance {
            if err > tol.atol + tol.rtol * t.abs() {
                r.outside += 1;
            }
        }
    }
    r
}

/// [`compare_with`] without a tolerance.
pub fn compare(got: ArrayViewD<'_, f64>, truth: ArrayViewD<'_, f64>) -> Report {
    compare_with(got, truth, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2};

    #[test]
    fn finds_the_worst_element_and_counts_non_finite() {
        let truth = arr2(&[[1.0, 2.0], [3.0, f64::NEG_INFINITY]]).into_dyn();
        let got = arr2(&[[1.0, 2.5], [3.1, f64::NEG_INFINITY]]).into_dyn();
        let r = compare(got.view(), truth.view());
        assert_eq!(r.max_abs, 0.5);
        assert_eq!(r.max_abs_index, vec![0, 1]);
        assert_eq!(r.worst, (2.5, 2.0));
        assert!((r.max_rel - 0.25).abs() < 1e-15);
        assert_eq!(r.non_finite, 0);
        let nan = arr2(&[[1.0, f64::NAN], [3.0, 0.0]]).into_dyn();
        let r = compare(nan.view(), truth.view());
        assert_eq!(r.non_finite, 2);
        assert_eq!(r.max_abs, f64::INFINITY);
        assert!(!r.passes());
    }

    #[test]
    fn tolerance_counts_elements_outside() {
        let truth = arr1(&[1.0, 100.0, 0.0]).into_dyn();
        let got = arr1(&[1.0 + 2e-3, 100.05, 1e-3]).into_dyn();
        let tol = Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
            reason: "test",
        };
        let r = compare_with(got.view(), truth.view(), Some(&tol));
        // 2e-3 > 1e-3 + 1e-3: outside; 0.05 <= 0.101: inside; 1e-3 <= 1e-3: inside.
        assert_eq!(r.outside, 1);
        let short = arr1(&[1.0]).into_dyn();
        assert!(!compare_with(short.view(), truth.view(), Some(&tol)).passes());
    }
}
