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

/// The header of a 2-D C-order `.npy` (format 1.0) of `dtype`, padded with spaces so that
/// the data starts on a 64-byte boundary, as NumPy writes it. Header and the matrix's
/// bytes make the file: [`write`] without the copy.
pub fn header(dtype: Dtype, rows: usize, cols: usize) -> Vec<u8> {
    let descr = match dtype {
        Dtype::F32 => "<f4",
        Dtype::F64 => "<f8",
    };
    let dict =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic, version and length (10 bytes), the dictionary, a newline.
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// Where the data of an `.npy` file starts, from its first 10 bytes (format 1.0).
pub fn data_offset(first: &[u8; 10]) -> Option<usize> {
    (first.starts_with(b"\x93NUMPY\x01"))
        .then(|| 10 + u16::from_le_bytes([first[8], first[9]]) as usize)
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
    fn the_handmade_header_reads_back_and_matches_the_writer() {
        for (dtype, rows, cols) in [
            (Dtype::F32, 2, 3),
            (Dtype::F64, 1000, 1),
            (Dtype::F64, 0, 7),
        ] {
            let m = Matrix::zeros(dtype, rows, cols).unwrap();
            let mut bytes = header(dtype, rows, cols);
            assert_eq!(bytes.len() % 64, 0);
            let first: [u8; 10] = bytes[..10].try_into().unwrap();
            assert_eq!(data_offset(&first), Some(bytes.len()));
            bytes.extend_from_slice(&m.data);
            assert_eq!(read("x", &bytes, dtype).unwrap(), m);
            assert_eq!(bytes.len(), write(&m).len());
        }
        assert_eq!(data_offset(b"PK\x03\x04abcdef"), None);
    }

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
