//! The naive triple loop, summing in `f64`: the ground truth the fast paths are tested
//! against here, in the worker and in the end-to-end tests. Slow on purpose; never use it
//! for real work.

use super::{Element, MatMut, MatRef, ShapeError, check_shapes};

/// `C = alpha·A·B + beta·C`, each element computed independently as
/// `alpha·Σ a·b + beta·c` in `f64` and rounded once to `T`.
///
/// When `beta == 0`, C's old contents (even NaN) are ignored, as in [`super::gemm`].
pub fn gemm<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    mut c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    check_shapes(&a, &b, &c)?;
    let (alpha_f, beta_f) = (alpha.to_f64(), beta.to_f64());
    for i in 0..c.rows() {
        for j in 0..c.cols() {
            let sum: f64 = (0..a.cols())
                .map(|p| a.get(i, p).to_f64() * b.get(p, j).to_f64())
                .sum();
            let scaled = alpha_f * sum;
            let value = if beta == T::ZERO {
                scaled
            } else {
                scaled + beta_f * c.get(i, j).to_f64()
            };
            c.set(i, j, T::from_f64(value));
        }
    }
    Ok(())
}
