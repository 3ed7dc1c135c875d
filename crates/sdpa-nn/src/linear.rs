use crate::{NnError, Result};
use ndarray::{Array1, Array2, ArrayView2};
use num_traits::Zero;
use sdpa_ref::Element;

/// `y = x W^T + b` with `W [out, in]` as PyTorch stores it and an optional bias `[out]`.
/// Computed through a GEMM in the accumulation type (f32 for f16/bf16), rounded once.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear<T: Element> {
    weight: Array2<T>,
    bias: Option<Array1<T>>,
    /// The weight widened once, transposed view taken at use.
    weight_acc: Array2<T::Acc>,
    bias_acc: Option<Array1<T::Acc>>,
}

impl<T: Element> Linear<T> {
    /// From a weight `[out, in]` and an optional bias `[out]`.
    ///
    /// # Errors
    /// A bias whose length is not `out`.
    pub fn new(weight: Array2<T>, bias: Option<Array1<T>>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != weight.nrows() {
                return Err(NnError::weight(
                    "bias",
                    format!("shape [{}] (the weight's out features)", weight.nrows()),
                    format!("[{}]", b.len()),
                ));
            }
        }
        Ok(Linear {
            weight_acc: weight.mapv(T::to_acc),
            bias_acc: bias.as_ref().map(|b| b.mapv(T::to_acc)),
            weight,
            bias,
        })
    }

    /// In features.
    pub fn in_features(&self) -> usize {
        self.weight.ncols()
    }

    /// Out features.
    pub fn out_features(&self) -> usize {
        self.weight.nrows()
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Array2<T> {
        &self.weight
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Array1<T>> {
        self.bias.as_ref()
    }

    /// `x [N, in] -> [N, out]`.
    ///
    /// # Errors
    /// `x` whose last dim is not `in`.
    pub fn forward(&self, x: ArrayView2<'_, T>) -> Result<Array2<T>> {
        if x.ncols() != self.in_features() {
            return Err(sdpa_core::SdpaError::invalid(
                "input",
                format!("{} features (the layer's in features)", self.in_features()),
                x.ncols(),
            )
            .into());
        }
        let xa = x.mapv(T::to_acc);
        let mut y = Array2::<T::Acc>::zeros((x.nrows(), self.out_features()));
        if self.in_features() > 0 {
            ndarray::linalg::general_mat_mul(
                T::Acc::one(),
                &xa,
                &self.weight_acc.t(),
                T::Acc::zero(),
                &mut y,
            );
        }
        if let Some(b) = &self.bias_acc {
            for mut row in y.outer_iter_mut() {
                row.zip_mut_with(b, |yv, &bv| *yv = *yv + bv);
            }
        }
        Ok(y.mapv(T::from_acc))
    }
}

use num_traits::One;

/// Gradients of a [`Linear`] layer, in its dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads<T> {
    /// `[N, in]`: the gradient of the layer's input.
    pub dx: Array2<T>,
    /// `[out, in]`: `dy^T x`.
    pub weight: Array2<T>,
    /// `[out]`: `dy` summed over rows, when the layer has a bias.
    pub bias: Option<Array1<T>>,
}

impl<T: Element> Linear<T> {
    /// Replaces the weight (and bias) with ones of the same shapes, e.g. after an
    /// optimizer step.
    ///
    /// # Errors
    /// A weight of another shape; a bias given to a layer without one or the other way
    /// round, or of another length.
    pub fn set_parameters(&mut self, weight: Array2<T>, bias: Option<Array1<T>>) -> Result<()> {
        if weight.dim() != self.weight.dim() {
            return Err(NnError::weight(
                "weight",
                format!("shape {:?} (the layer's)", self.weight.shape()),
                format!("{:?}", weight.shape()),
            ));
        }
        match (&self.bias, &bias) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(NnError::weight(
                    "bias",
                    if self.bias.is_some() {
                        "a bias (the layer has one)"
                    } else {
                        "no bias (the layer has none)"
                    },
                    if bias.is_some() { "a bias" } else { "none" },
                ))
            }
            _ => {}
        }
        *self = Linear::new(weight, bias)?;
        Ok(())
    }

    /// The backward of [`forward`](Self::forward) at input `x [N, in]` for the
    /// incoming gradient `dy [N, out]`: `dx = dy W`, `dW = dy^T x`, `db = sum_rows dy`,
    /// accumulated in `T::Acc` and rounded once.
    ///
    /// # Errors
    /// `x` or `dy` whose shape does not match the layer or each other.
    pub fn backward(&self, x: ArrayView2<'_, T>, dy: ArrayView2<'_, T>) -> Result<LinearGrads<T>> {
        if x.ncols() != self.in_features() {
            return Err(sdpa_core::SdpaError::invalid(
                "input",
                format!("{} features (the layer's in features)", self.in_features()),
                x.ncols(),
            )
            .into());
        }
        if dy.dim() != (x.nrows(), self.out_features()) {
            return Err(sdpa_core::SdpaError::invalid(
                "grad_out",
                format!(
                    "shape [{}, {}] (the input's rows, the layer's out features)",
                    x.nrows(),
                    self.out_features()
                ),
                format!("{:?}", dy.shape()),
            )
            .into());
        }
        let xa = x.mapv(T::to_acc);
        let dya = dy.mapv(T::to_acc);
        let mut dx = Array2::<T::Acc>::zeros((x.nrows(), self.in_features()));
        let mut dw = Array2::<T::Acc>::zeros(self.weight.dim());
        if x.nrows() > 0 && self.out_features() > 0 && self.in_features() > 0 {
            ndarray::linalg::general_mat_mul(
                T::Acc::one(),
                &dya,
                &self.weight_acc,
                T::Acc::zero(),
                &mut dx,
            );
            ndarray::linalg::general_mat_mul(T::Acc::one(), &dya.t(), &xa, T::Acc::zero(), &mut dw);
        }
        let bias = self
            .bias
            .as_ref()
            .map(|_| dya.sum_axis(ndarray::Axis(0)).mapv(T::from_acc));
        Ok(LinearGrads {
            dx: dx.mapv(T::from_acc),
            weight: dw.mapv(T::from_acc),
            bias,
        })
    }
}
