//! Dense row-major matrices as little-endian bytes: the form operands and results take on
//! the wire, in the store and in `.npy` files, whatever the element type.

use core::fmt;

use serde::{Deserialize, Serialize};

/// The element type of a job. Part of the wire format (postcard encodes the variant index):
/// append new variants at the end only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    F32,
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }

    /// The name used in the HTTP API (`"f32"`, `"f64"`).
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }

    /// Parses the API name; anything else is an error naming what was given.
    pub fn parse(name: &str) -> Result<Dtype, MatrixError> {
        match name {
            "f32" | "float32" => Ok(Dtype::F32),
            "f64" | "float64" => Ok(Dtype::F64),
            other => Err(MatrixError::UnsupportedDtype(other.to_owned())),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a matrix could not be built or sliced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    #[error("unsupported dtype {0:?}: expected \"f32\" or \"f64\"")]
    UnsupportedDtype(String),
    #[error("data holds {actual} bytes but a {rows}x{cols} {dtype} matrix needs {expected}")]
    Length {
        rows: usize,
        cols: usize,
        dtype: Dtype,
        expected: usize,
        actual: usize,
    },
    #[error("a {rows}x{cols} matrix is too large")]
    TooLarge { rows: usize, cols: usize },
}

/// A dense row-major matrix held as little-endian element bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Matrix {
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols * dtype.size()` little-endian bytes, row-major.
    pub data: Vec<u8>,
}

impl fmt::Debug for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Matrix({}x{} {})", self.rows, self.cols, self.dtype)
    }
}

/// Byte length of a `rows x cols` matrix, or an error when it does not fit in memory.
pub fn byte_len(dtype: Dtype, rows: usize, cols: usize) -> Result<usize, MatrixError> {
    rows.checked_mul(cols)
        .and_then(|n| n.checked_mul(dtype.size()))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or(MatrixError::TooLarge { rows, cols })
}

impl Matrix {
    /// Wraps bytes, checking that their length matches the shape.
    pub fn new(
        dtype: Dtype,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Matrix, MatrixError> {
        let expected = byte_len(dtype, rows, cols)?;
        if data.len() != expected {
            return Err(MatrixError::Length {
                rows,
                cols,
                dtype,
                expected,
                actual: data.len(),
            });
        }
        Ok(Matrix {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// A matrix of zeros.
    pub fn zeros(dtype: Dtype, rows: usize, cols: usize) -> Result<Matrix, MatrixError> {
        let len = byte_len(dtype, rows, cols)?;
        Ok(Matrix {
            dtype,
            rows,
            cols,
            data: vec![0; len],
        })
    }

    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Matrix, MatrixError> {
        Matrix::new(Dtype::F32, rows, cols, f32_bytes(values))
    }

    pub fn from_f64(rows: usize, cols: usize, values: &[f64]) -> Result<Matrix, MatrixError> {
        Matrix::new(Dtype::F64, rows, cols, f64_bytes(values))
    }

    /// Every element widened to f64, row-major (for JSON output and tests).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self.dtype {
            Dtype::F32 => f32s(&self.data).into_iter().map(f64::from).collect(),
            Dtype::F64 => f64s(&self.data),
        }
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        self.cols * self.dtype.size()
    }

    /// Tile `(i, j)` of `plan`, row-major (see [`Matrix::block`]).
    pub fn tile(&self, plan: &crate::tiling::TilePlan, (i, j): (u32, u32)) -> Vec<u8> {
        let (rows, cols) = (plan.rows(i), plan.cols(j));
        self.block(
            rows.start as usize,
            cols.start as usize,
            rows.len(),
            cols.len(),
        )
    }

    /// Copies the block `rows x cols` starting at `(r0, c0)` into a new row-major buffer.
    ///
    /// # Panics
    /// When the block is not inside the matrix (callers cut blocks from a checked plan).
    pub fn block(&self, r0: usize, c0: usize, rows: usize, cols: usize) -> Vec<u8> {
        assert!(
            r0 + rows <= self.rows && c0 + cols <= self.cols,
            "block outside matrix"
        );
        let size = self.dtype.size();
        let row_bytes = self.row_bytes();
        let mut out = Vec::with_capacity(rows * cols * size);
        for r in r0..r0 + rows {
            let start = r * row_bytes + c0 * size;
            out.extend_from_slice(&self.data[start..start + cols * size]);
        }
        out
    }

    /// Writes a row-major block at `(r0, c0)`.
    ///
    /// # Panics
    /// When the block is not inside the matrix or `block` has the wrong length.
    pub fn write_block(&mut self, r0: usize, c0: usize, rows: usize, cols: usize, block: &[u8]) {
        let size = self.dtype.size();
        assert!(
            r0 + rows <= self.rows && c0 + cols <= self.cols,
            "block outside matrix"
        );
        assert_eq!(block.len(), rows * cols * size, "block length");
        let row_bytes = self.row_bytes();
        for (r, src) in block
            .chunks_exact(cols * size.max(1))
            .enumerate()
            .take(rows)
        {
            let start = (r0 + r) * row_bytes + c0 * size;
            self.data[start..start + cols * size].copy_from_slice(src);
        }
    }
}

/// Decodes little-endian f32 bytes (a trailing partial element is ignored).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    let whole = &bytes[..bytes.len() / 4 * 4];
    // On little-endian targets (x86_64, aarch64, wasm32) the wire layout is the memory
    // layout: one copy, no per-element work. This sits on every operand and result path.
    #[cfg(target_endian = "little")]
    {
        copied(whole)
    }
    #[cfg(not(target_endian = "little"))]
    {
        whole
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// Decodes little-endian f64 bytes (a trailing partial element is ignored).
pub fn f64s(bytes: &[u8]) -> Vec<f64> {
    let whole = &bytes[..bytes.len() / 8 * 8];
    #[cfg(target_endian = "little")]
    {
        copied(whole)
    }
    #[cfg(not(target_endian = "little"))]
    {
        whole
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect()
    }
}

/// `bytes` (a whole number of `T`s, any alignment) copied into a new `Vec<T>`: one
/// `memcpy` into fresh memory, without first zeroing it (`bytemuck::pod_collect_to_vec`
/// does, which for an 8 MB panel costs about as much as the copy).
#[cfg(target_endian = "little")]
fn copied<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let len = bytes.len() / size;
    let mut out = Vec::<T>::with_capacity(len);
    // SAFETY: the capacity holds `len` Ts, `len · size` bytes, all of them written here from
    // `bytes` (which has at least that many, and cannot overlap a fresh allocation) before
    // the length is set; every bit pattern is a valid `T` (`Pod`).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().cast::<u8>(), len * size);
        out.set_len(len);
    }
    out
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice(values).to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

pub fn f64_bytes(values: &[f64]) -> Vec<u8> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::cast_slice(values).to_vec()
    }
    #[cfg(not(target_endian = "little"))]
    {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trip() {
        let values: Vec<f64> = (0..12).map(f64::from).collect();
        let mut m = Matrix::from_f64(3, 4, &values).unwrap();
        let block = m.block(1, 1, 2, 2);
        assert_eq!(f64s(&block), vec![5.0, 6.0, 9.0, 10.0]);
        m.write_block(0, 2, 2, 2, &block);
        assert_eq!(
            m.to_f64_vec()[..8],
            [0.0, 1.0, 5.0, 6.0, 4.0, 5.0, 9.0, 10.0]
        );
    }

    /// Decoding reads every element at any alignment, ignores a trailing partial one, and
    /// round-trips through the byte writers.
    #[test]
    fn decoding_reads_misaligned_bytes_and_ignores_a_partial_element() {
        let f32_values: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let f64_values: Vec<f64> = (0..29).map(|i| f64::from(i) * 0.25 - 2.0).collect();
        for shift in 0..8 {
            let mut buffer = vec![0xAAu8; shift];
            buffer.extend_from_slice(&f32_bytes(&f32_values));
            buffer.push(0x55);
            assert_eq!(f32s(&buffer[shift..]), f32_values, "shift {shift}");
            let mut buffer = vec![0xAAu8; shift];
            buffer.extend_from_slice(&f64_bytes(&f64_values));
            buffer.extend_from_slice(&[1, 2, 3]);
            assert_eq!(f64s(&buffer[shift..]), f64_values, "shift {shift}");
        }
        assert!(f32s(&[1, 2, 3]).is_empty());
        assert!(f64s(&[]).is_empty());
    }

    #[test]
    fn length_mismatch_names_shape() {
        let err = Matrix::new(Dtype::F32, 2, 3, vec![0; 20]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "data holds 20 bytes but a 2x3 f32 matrix needs 24"
        );
        assert!(
            Dtype::parse("int8")
                .unwrap_err()
                .to_string()
                .contains("int8")
        );
    }
}
