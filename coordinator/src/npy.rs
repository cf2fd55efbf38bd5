//! Matrices at the edges: NumPy `.npy` bytes to [`Matrix`] and back, through ndarray-npy.

use ndarray::{Array2, ArrayView2};
use ndarray_npy::{ViewNpyError, ViewNpyExt, WriteNpyExt};
use tabgrid_shared::matrix::{f32s, f64s};
use tabgrid_shared::{Dtype, Matrix};

/// Why an `.npy` part was refused; the message names the part.
#[derive(Debug, thiserror::Error)]
#[error("part `{part}`: {detail}")]
pub struct NpyError {
    pub part: String,
    pub detail: String,
}

/// Reads a 2-D C-order `.npy` of `dtype` (`<f4` or `<f8`; `>f4` and `>f8` are byte-swapped).
///
/// Nothing is allocated for what a header only claims: the data is checked against the
/// header's shape in place, and then copied once.
pub fn read(part: &str, bytes: &[u8], dtype: Dtype) -> Result<Matrix, NpyError> {
    let fail = |detail: String| NpyError {
        part: part.to_owned(),
        detail,
    };
    match dtype {
        Dtype::F32 => read_as::<f32>(bytes, dtype),
        Dtype::F64 => read_as::<f64>(bytes, dtype),
    }
    .map_err(fail)
}

fn read_as<T>(bytes: &[u8], dtype: Dtype) -> Result<Matrix, String>
where
    T: bytemuck::Pod + ndarray_npy::ViewElement,
{
    if let Ok(read) = viewed::<T>(bytes, dtype) {
        return read;
    }
    // The other byte order: the same file with the descriptor's `>` made `<` views, and
    // then each element's bytes are swapped.
    let mut native = bytes.to_vec();
    let offset = header_end(&native).ok_or("not a valid .npy file: no header")?;
    let swapped = native[..offset]
        .windows(3)
        .position(|w| w == b"'>f")
        .ok_or("not a valid .npy file: unsupported byte order")?;
    native[swapped + 1] = b'<';
    let size = std::mem::size_of::<T>();
    native[offset..]
        .chunks_exact_mut(size)
        .for_each(|element| element.reverse());
    viewed::<T>(&native, dtype).map_err(|e| describe(e, dtype))?
}

/// Views `bytes` as a 2-D `.npy` of `T` (copying it to an aligned buffer first when its
/// data is not aligned) and makes the matrix; `Err(NonNativeEndian)` is left to the caller,
/// every other error is described.
fn viewed<T>(bytes: &[u8], dtype: Dtype) -> Result<Result<Matrix, String>, ViewNpyError>
where
    T: bytemuck::Pod + ndarray_npy::ViewElement,
{
    let from = |view: ArrayView2<'_, T>| -> Result<Matrix, String> {
        if !view.is_standard_layout() {
            return Err(
                "the .npy is in Fortran order; save it in C order (numpy.ascontiguousarray)".into(),
            );
        }
        let (rows, cols) = view.dim();
        let data = view.as_slice().unwrap_or(&[]);
        Matrix::new(dtype, rows, cols, bytemuck::cast_slice(data).to_vec())
            .map_err(|e| e.to_string())
    };
    match ArrayView2::<T>::view_npy(bytes) {
        Ok(view) => return Ok(from(view)),
        Err(ViewNpyError::MisalignedData) => {}
        Err(ViewNpyError::NonNativeEndian) => return Err(ViewNpyError::NonNativeEndian),
        Err(other) => return Ok(Err(describe(other, dtype))),
    }
    // Misaligned data (the length is right: it is checked first): a copy whose data starts
    // on an 8-byte boundary.
    let offset = header_end(bytes).unwrap_or(0);
    let shift = (8 - offset % 8) % 8;
    let mut words = vec![0u64; (bytes.len() + shift).div_ceil(8)];
    let buffer: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    buffer[shift..shift + bytes.len()].copy_from_slice(bytes);
    let copy = &buffer[shift..shift + bytes.len()];
    Ok(match ArrayView2::<T>::view_npy(copy) {
        Ok(view) => from(view),
        Err(other) => Err(describe(other, dtype)),
    })
}

/// Where the data of an `.npy` starts (format 1.0, 2.0 or 3.0).
fn header_end(bytes: &[u8]) -> Option<usize> {
    if !bytes.starts_with(b"\x93NUMPY") || bytes.len() < 12 {
        return None;
    }
    match bytes[6] {
        1 => Some(10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        _ => Some(12 + u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize),
    }
}

fn describe(err: ViewNpyError, dtype: Dtype) -> String {
    let expected = match dtype {
        Dtype::F32 => "'<f4'",
        Dtype::F64 => "'<f8'",
    };
    match err {
        ViewNpyError::WrongDescriptor(descr) => format!(
            "the .npy holds dtype {descr} but the job's dtype is {dtype} (descriptor {expected})"
        ),
        ViewNpyError::WrongNdim(_, found) => {
            format!("the .npy has {found} dimensions; a matrix needs 2")
        }
        ViewNpyError::MissingBytes(n) => {
            format!("not a valid .npy file: its data is {n} bytes short of its shape")
        }
        ViewNpyError::ExtraBytes(n) => {
            format!("not a valid .npy file: {n} bytes after the data its shape describes")
        }
        other => format!("not a valid .npy file: {other}"),
    }
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

/// The most a header's shape makes [`Streaming`] reserve up front; a bigger matrix's
/// buffer grows as its bytes arrive (a header cannot make the coordinator allocate what
/// the body does not bring).
const RESERVE_AT_MOST: usize = 256 << 20;

/// An `.npy` part read as its pieces arrive. After a canonical header (format 1.0, as
/// NumPy writes it: `<f4` or `<f8`, C order, two dimensions) the data goes straight into
/// the matrix's own buffer: no second copy of the part, no buffer of the whole file.
/// Anything else is kept whole and read by [`read`], which explains what is wrong.
#[derive(Debug, Default)]
pub struct Streaming {
    /// The file's first bytes, up to the end of its header (all of it when not canonical).
    head: Vec<u8>,
    /// After a canonical header: its dtype and shape, and the data so far.
    data: Option<(Dtype, usize, usize, Vec<u8>)>,
}

impl Streaming {
    pub fn push(&mut self, piece: &[u8]) {
        if let Some((.., data)) = &mut self.data {
            data.extend_from_slice(piece);
            return;
        }
        self.head.extend_from_slice(piece);
        let Some(first) = self.head.first_chunk::<10>() else {
            return;
        };
        let Some(offset) = data_offset(first) else {
            return;
        };
        if self.head.len() < offset {
            return;
        }
        if let Some((dtype, rows, cols)) = canonical(&self.head[10..offset]) {
            let total = rows
                .checked_mul(cols)
                .and_then(|n| n.checked_mul(dtype.size()));
            if let Some(total) = total {
                let mut data = Vec::with_capacity(total.min(RESERVE_AT_MOST));
                data.extend_from_slice(&self.head[offset..]);
                self.head.truncate(offset);
                self.data = Some((dtype, rows, cols, data));
            }
        }
    }

    /// The matrix, of `dtype`; errors name `part`.
    pub fn finish(self, part: &str, dtype: Dtype) -> Result<Matrix, NpyError> {
        match self.data {
            Some((found, rows, cols, data))
                if found == dtype && Some(data.len()) == rows.checked_mul(cols * dtype.size()) =>
            {
                Matrix::new(dtype, rows, cols, data).map_err(|e| NpyError {
                    part: part.to_owned(),
                    detail: e.to_string(),
                })
            }
            // Whatever is wrong, `read` says it as it always has.
            Some((.., data)) => {
                let mut whole = self.head;
                whole.extend_from_slice(&data);
                read(part, &whole, dtype)
            }
            None => read(part, &self.head, dtype),
        }
    }
}

/// Dtype and shape from a header dictionary exactly as NumPy (and [`header`]) write it;
/// `None` for anything else.
fn canonical(dict: &[u8]) -> Option<(Dtype, usize, usize)> {
    let text = std::str::from_utf8(dict).ok()?.trim_end();
    let rest = text.strip_prefix("{'descr': '")?;
    let (descr, rest) = rest.split_once('\'')?;
    let dtype = match descr {
        "<f4" => Dtype::F32,
        "<f8" => Dtype::F64,
        _ => return None,
    };
    let shape = rest.strip_prefix(", 'fortran_order': False, 'shape': (")?;
    let (shape, tail) = shape.split_once(')')?;
    if !matches!(tail, ", }" | "}") {
        return None;
    }
    let (rows, cols) = shape.split_once(", ")?;
    let digits = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((dtype, digits(rows)?, digits(cols)?))
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

    /// Read a piece at a time (every split of small files, pieces of 1 to 7 bytes), a
    /// part gives what `read` gives: the same matrix, or the same error.
    #[test]
    fn streaming_reads_as_read_does() {
        use ndarray::ShapeBuilder;
        let m = Matrix::from_f32(3, 2, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let good = write(&m);
        let mut fortran = Vec::new();
        Array2::<f32>::zeros((2, 3).f())
            .write_npy(&mut fortran)
            .unwrap();
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 4]);
        let mut odd_header = header(Dtype::F32, 3, 2);
        let spot = odd_header.iter().position(|&b| b == b'(').unwrap();
        odd_header[spot + 1..spot + 3].copy_from_slice(b"3,");
        odd_header.extend_from_slice(&m.data);
        let files: Vec<Vec<u8>> = vec![
            good.clone(),
            good[..good.len() - 3].to_vec(),
            good[..40].to_vec(),
            longer,
            fortran,
            odd_header,
            write(&Matrix::from_f64(1, 1, &[2.5]).unwrap()),
            b"not an npy at all".to_vec(),
            Vec::new(),
        ];
        for file in &files {
            for dtype in [Dtype::F32, Dtype::F64] {
                let want = read("a", file, dtype).map_err(|e| e.to_string());
                for step in 1..8 {
                    let mut streaming = Streaming::default();
                    for piece in file.chunks(step) {
                        streaming.push(piece);
                    }
                    let got = streaming.finish("a", dtype).map_err(|e| e.to_string());
                    assert_eq!(got, want, "{dtype}, pieces of {step}");
                }
            }
        }
        // The canonical header is taken as such (the data is not copied again).
        let mut streaming = Streaming::default();
        streaming.push(&good);
        assert!(streaming.data.is_some());
        // A shape no body backs reserves no more than the cap.
        let mut huge = header(Dtype::F64, 1 << 30, 1 << 20);
        huge.extend_from_slice(&[0; 16]);
        let mut streaming = Streaming::default();
        streaming.push(&huge);
        let capacity = streaming.data.as_ref().unwrap().3.capacity();
        assert!(capacity <= RESERVE_AT_MOST, "{capacity}");
        assert!(streaming.finish("a", Dtype::F64).is_err());
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

        // Misaligned in memory, and big-endian: the same matrix.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(read("a", &shifted[1..], Dtype::F32).unwrap(), m);
        let m64 = Matrix::from_f64(2, 2, &[1.5, -2.0, 3.25, 1e300]).unwrap();
        let mut big = write(&m64);
        let descr = big.windows(5).position(|w| w == b"'<f8'").unwrap();
        big[descr + 1] = b'>';
        let data = big.len() - 32;
        big[data..].chunks_exact_mut(8).for_each(|v| v.reverse());
        assert_eq!(read("a", &big, Dtype::F64).unwrap(), m64);
        assert!(read("a", &big[..big.len() - 1], Dtype::F64).is_err());

        use ndarray::ShapeBuilder;
        let fortran = Array2::<f32>::zeros((2, 3).f());
        let mut out = Vec::new();
        fortran.write_npy(&mut out).unwrap();
        let err = read("c", &out, Dtype::F32).unwrap_err().to_string();
        assert!(err.contains("Fortran"), "{err}");
    }
}
