//! Matrices at the edges: NumPy `.npy` bytes to [`Matrix`] and back, through ndarray-npy.

use std::io::Cursor;

use ndarray::{Array2, ArrayView2};
use ndarray_npy::{ReadNpyExt, ViewNpyExt, WriteNpyExt};
use tabgrid_shared::matrix::{f32_bytes, f32s, f64_bytes, f64s};
use tabgrid_shared::{Dtype, Matrix};

/// Why an `.npy` part was refused; the message names the part.
#[derive(Debug, thiserror::Error)]
#[error("part `{part}`: {detail}")]
pub struct NpyError {
    pub part: String,
    pub detail: String,
}

/// Reads a 2-D C-order `.npy` of `dtype` (`<f4` or `<f8`).
pub fn read(part: &str, bytes: &[u8], dtype: Dtype) -> Result<Matrix, NpyError> {
    // The common case, an aligned little-endian C-order file, is one copy of its data.
    if let Some(matrix) = view(bytes, dtype) {
        return Ok(matrix);
    }
    read_copying(part, bytes, dtype)
}

/// The matrix of a well-formed, aligned, native-endian C-order `.npy`, copied once;
/// `None` for anything else, which [`read_copying`] handles and explains.
fn view(bytes: &[u8], dtype: Dtype) -> Option<Matrix> {
    fn raw<T: bytemuck::Pod + ndarray_npy::ViewElement>(
        bytes: &[u8],
    ) -> Option<(usize, usize, Vec<u8>)> {
        let view = ArrayView2::<T>::view_npy(bytes).ok()?;
        let (rows, cols) = view.dim();
        let data = view.as_slice()?;
        Some((rows, cols, bytemuck::cast_slice(data).to_vec()))
    }
    let (rows, cols, data) = match dtype {
        Dtype::F32 => raw::<f32>(bytes)?,
        Dtype::F64 => raw::<f64>(bytes)?,
    };
    Matrix::new(dtype, rows, cols, data).ok()
}

fn read_copying(part: &str, bytes: &[u8], dtype: Dtype) -> Result<Matrix, NpyError> {
    let fail = |detail: String| NpyError {
        part: part.to_owned(),
        detail,
    };
    let expected = match dtype {
        Dtype::F32 => "'<f4'",
        Dtype::F64 => "'<f8'",
    };
    let describe = |err: ndarray_npy::ReadNpyError| match err {
        ndarray_npy::ReadNpyError::WrongDescriptor(descr) => format!(
            "the .npy holds dtype {descr} but the job's dtype is {dtype} (descriptor {expected})"
        ),
        ndarray_npy::ReadNpyError::WrongNdim(_, found) => {
            format!("the .npy has {found} dimensions; a matrix needs 2")
        }
        other => format!("not a valid .npy file: {other}"),
    };
    let (rows, cols, standard, data) = match dtype {
        Dtype::F32 => {
            let array =
                Array2::<f32>::read_npy(Cursor::new(bytes)).map_err(|e| fail(describe(e)))?;
            let (r, c) = array.dim();
            let standard = array.is_standard_layout();
            (
                r,
                c,
                standard,
                f32_bytes(array.as_slice_memory_order().unwrap_or(&[])),
            )
        }
        Dtype::F64 => {
            let array =
                Array2::<f64>::read_npy(Cursor::new(bytes)).map_err(|e| fail(describe(e)))?;
            let (r, c) = array.dim();
            let standard = array.is_standard_layout();
            (
                r,
                c,
                standard,
                f64_bytes(array.as_slice_memory_order().unwrap_or(&[])),
            )
        }
    };
    if !standard {
        return Err(fail(
            "the .npy is in Fortran order; save it in C order (numpy.ascontiguousarray)".into(),
        ));
    }
    Matrix::new(dtype, rows, cols, data).map_err(|e| fail(e.to_string()))
}

/// Writes a matrix as a C-order `.npy`.
pub fn write(matrix: &Matrix) -> Vec<u8> {
    let mut out = Vec::with_capacity(matrix.data.len() + 128);
    let shape = (matrix.rows, matrix.cols);
    // Straight from the matrix's bytes when they are aligned for the element type (they
    // are whenever the allocator aligns to 8, i.e. always in practice); else via a copy.
    let direct = match matrix.dtype {
        Dtype::F32 => bytemuck::try_cast_slice::<u8, f32>(&matrix.data)
            .ok()
            .map(|values| ArrayView2::from_shape(shape, values).map(|v| v.write_npy(&mut out))),
        Dtype::F64 => bytemuck::try_cast_slice::<u8, f64>(&matrix.data)
            .ok()
            .map(|values| ArrayView2::from_shape(shape, values).map(|v| v.write_npy(&mut out))),
    };
    if let Some(Ok(written)) = direct {
        written.expect("writing .npy to memory cannot fail");
        return out;
    }
    out.clear();
    let written = match matrix.dtype {
        Dtype::F32 => Array2::from_shape_vec(shape, f32s(&matrix.data))
            .expect("matrix length matches its shape")
            .write_npy(&mut out),
        Dtype::F64 => Array2::from_shape_vec(shape, f64s(&matrix.data))
            .expect("matrix length matches its shape")
            .write_npy(&mut out),
    };
    written.expect("writing .npy to memory cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let m = Matrix::from_f32(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let bytes = write(&m);
        assert_eq!(read("a", &bytes, Dtype::F32).unwrap(), m);

        let err = read("b", &bytes, Dtype::F64).unwrap_err().to_string();
        assert!(err.starts_with("part `b`:"), "{err}");
        assert!(err.contains("f64"), "{err}");

        let err = read("a", &bytes[..bytes.len() - 3], Dtype::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("part `a`"), "{err}");

        use ndarray::ShapeBuilder;
        let fortran = Array2::<f32>::zeros((2, 3).f());
        let mut out = Vec::new();
        fortran.write_npy(&mut out).unwrap();
        let err = read("c", &out, Dtype::F32).unwrap_err().to_string();
        assert!(err.contains("Fortran"), "{err}");
    }
}
