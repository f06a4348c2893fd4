//! Dense arrays, affine layers and the activations the naive model uses.

/// A dense row-major `f64` array.
#[derive(Debug, Clone)]
pub struct Array {
    /// Extent of each dimension.
    pub shape: Vec<usize>,
    /// The elements, last dimension contiguous.
    pub data: Vec<f64>,
}

impl Array {
    /// An array of `shape` holding `data` (row-major).
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "data does not fill shape {shape:?}"
        );
        Self { shape, data }
    }

    /// Zeros of `shape`.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let len = shape.iter().product();
        Self::new(shape, vec![0.0; len])
    }

    /// Offset of the last-dimension vector at `prefix` (every coordinate but the last).
    fn offset(&self, prefix: &[usize]) -> usize {
        assert_eq!(prefix.len() + 1, self.shape.len(), "prefix rank");
        let mut offset = 0;
        for (axis, &index) in prefix.iter().enumerate() {
            assert!(
                index < self.shape[axis],
                "index {prefix:?} out of {:?}",
                self.shape
            );
            offset = offset * self.shape[axis] + index;
        }
        offset * self.shape[self.shape.len() - 1]
    }

    /// The last-dimension vector at `prefix`, e.g. `q.vec(&[b, t, h])` is query head `h` of
    /// token `t`, `[d_k]`.
    pub fn vec(&self, prefix: &[usize]) -> &[f64] {
        let start = self.offset(prefix);
        &self.data[start..start + self.shape[self.shape.len() - 1]]
    }

    /// Mutable [`Array::vec`].
    pub fn vec_mut(&mut self, prefix: &[usize]) -> &mut [f64] {
        let start = self.offset(prefix);
        let len = self.shape[self.shape.len() - 1];
        &mut self.data[start..start + len]
    }
}

/// An affine layer `y = x W + b`, `W: [d_in, d_out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// `[d_in, d_out]`, row-major.
    pub weight: Vec<f64>,
    /// `[d_out]`, if any.
    pub bias: Option<Vec<f64>>,
}

impl Linear {
    /// `y[o] = sum_i x[i] * W[i, o] + b[o]`; `x: [d_in]` -> `[d_out]`.
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.d_in, "Linear input width");
        let mut y = match &self.bias {
            Some(bias) => bias.clone(),
            None => vec![0.0; self.d_out],
        };
        for (i, &xi) in x.iter().enumerate() {
            for (o, yo) in y.iter_mut().enumerate() {
                *yo += xi * self.weight[i * self.d_out + o];
            }
        }
        y
    }
}

/// The error function, to about 1e-14 (Taylor series near 0, continued fraction for erfc in
/// the tails). `std` has no stable `erf`.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let value = if a < 2.5 {
        // erf(a) = 2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let mut term = a; // (-1)^n a^(2n+1) / n!
        let mut sum = a;
        for n in 1..200 {
            term *= -a * a / n as f64;
            let contribution = term / (2 * n + 1) as f64;
            sum += contribution;
            if contribution.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let mut fraction = a;
        for k in (1..=80).rev() {
            fraction = a + (k as f64 / 2.0) / fraction;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / fraction
    };
    value.copysign(x)
}

/// Exact GELU, `x/2 * (1 + erf(x / sqrt 2))`.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// Logistic sigmoid.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// SiLU, `x * sigmoid(x)`.
pub fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}
