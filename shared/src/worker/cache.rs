//! The operand cache: panels of A and B (and C tiles) the coordinator sent, kept under
//! their content keys until it says to forget them.
//!
//! The coordinator mirrors this cache exactly and decides what lives in it; the worker
//! only checks that each panel is what its key says. Panels are decoded to typed elements
//! once, on arrival, because one row panel of A serves a whole row of tiles.

use std::collections::HashMap;
use std::sync::Arc;

use crate::Dtype;
use crate::matrix::{self, Matrix, f32s, f64s};
use crate::protocol::{Operand, OperandKey};

/// A cached operand, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub rows: usize,
    pub cols: usize,
    pub values: Values,
}

/// Row-major elements of a panel.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Panel {
    pub fn dtype(&self) -> Dtype {
        match self.values {
            Values::F32(_) => Dtype::F32,
            Values::F64(_) => Dtype::F64,
        }
    }

    /// Bytes the panel had on the wire, which is what the coordinator accounts for.
    pub fn byte_len(&self) -> u64 {
        (self.rows * self.cols * self.dtype().size()) as u64
    }
}

/// Why an operand was refused. Either means the bytes were damaged or the coordinator is
/// broken; the connection is dropped rather than computing on them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("corrupted operand {key:?}: {source}")]
    Length {
        key: OperandKey,
        source: matrix::MatrixError,
    },
    #[error("corrupted operand {key:?}: its bytes hash to {actual:?}")]
    KeyMismatch { key: OperandKey, actual: OperandKey },
}

/// Panels by content key, with the bytes they hold.
#[derive(Debug)]
pub struct OperandCache {
    /// `Arc` because a queued task holds its panels: a `Forget` that arrives while the
    /// task waits must not pull them from under it.
    panels: HashMap<OperandKey, Arc<Panel>>,
    bytes: u64,
}

impl OperandCache {
    pub fn new() -> OperandCache {
        OperandCache {
            panels: HashMap::new(),
            bytes: 0,
        }
    }

    /// Verifies an operand against its key and stores it (replacing an equal one).
    pub fn insert(&mut self, operand: Operand) -> Result<(), CacheError> {
        let Operand {
            key,
            dtype,
            rows,
            cols,
            bytes,
        } = operand;
        // Matrix::new checks the length against the shape without overflowing.
        let checked = Matrix::new(dtype, rows as usize, cols as usize, bytes)
            .map_err(|source| CacheError::Length { key, source })?;
        let actual = OperandKey::of(dtype, rows, cols, &checked.data);
        if actual != key {
            return Err(CacheError::KeyMismatch { key, actual });
        }
        let values = match dtype {
            Dtype::F32 => Values::F32(f32s(&checked.data)),
            Dtype::F64 => Values::F64(f64s(&checked.data)),
        };
        let panel = Arc::new(Panel {
            rows: checked.rows,
            cols: checked.cols,
            values,
        });
        self.bytes += panel.byte_len();
        if let Some(old) = self.panels.insert(key, panel) {
            self.bytes -= old.byte_len();
        }
        Ok(())
    }

    pub fn get(&self, key: &OperandKey) -> Option<Arc<Panel>> {
        self.panels.get(key).cloned()
    }

    /// Drops a panel; forgetting an unknown key is harmless.
    pub fn forget(&mut self, key: &OperandKey) {
        if let Some(old) = self.panels.remove(key) {
            self.bytes -= old.byte_len();
        }
    }

    /// Bytes of all cached panels, as sent on the wire.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.panels.is_empty()
    }

    pub fn len(&self) -> usize {
        self.panels.len()
    }
}

impl Default for OperandCache {
    fn default() -> OperandCache {
        OperandCache::new()
    }
}

/// An operand frame for tests, with its correct key.
#[cfg(test)]
pub(crate) fn operand_f64(rows: u32, cols: u32, values: &[f64]) -> Operand {
    let bytes = matrix::f64_bytes(values);
    Operand {
        key: OperandKey::of(Dtype::F64, rows, cols, &bytes),
        dtype: Dtype::F64,
        rows,
        cols,
        bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_forgets_and_counts_bytes() {
        let mut cache = OperandCache::new();
        let a = operand_f64(2, 2, &[1.0, 2.0, 3.0, 4.0]);
        let b = operand_f64(1, 3, &[5.0, 6.0, 7.0]);
        let (ka, kb) = (a.key, b.key);
        cache.insert(a.clone()).unwrap();
        cache.insert(b).unwrap();
        assert_eq!(cache.bytes(), 32 + 24);
        let panel = cache.get(&ka).unwrap();
        assert_eq!((panel.rows, panel.cols, panel.dtype()), (2, 2, Dtype::F64));
        assert_eq!(panel.values, Values::F64(vec![1.0, 2.0, 3.0, 4.0]));
        // Sending the same panel again replaces it without double counting.
        cache.insert(a).unwrap();
        assert_eq!((cache.len(), cache.bytes()), (2, 56));
        cache.forget(&kb);
        cache.forget(&kb);
        assert_eq!((cache.len(), cache.bytes()), (1, 32));
        assert!(cache.get(&kb).is_none());
        // A forgotten panel stays alive for whoever still holds it.
        cache.forget(&ka);
        assert_eq!(panel.rows, 2);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn f32_panels_decode_little_endian() {
        let bytes = matrix::f32_bytes(&[1.5, -2.0]);
        let mut cache = OperandCache::new();
        let key = OperandKey::of(Dtype::F32, 1, 2, &bytes);
        cache
            .insert(Operand {
                key,
                dtype: Dtype::F32,
                rows: 1,
                cols: 2,
                bytes,
            })
            .unwrap();
        assert_eq!(
            cache.get(&key).unwrap().values,
            Values::F32(vec![1.5, -2.0])
        );
        assert_eq!(cache.bytes(), 8);
    }

    #[test]
    fn refuses_operands_that_do_not_match_their_key() {
        let mut cache = OperandCache::new();
        let mut flipped = operand_f64(1, 2, &[1.0, 2.0]);
        flipped.bytes[3] ^= 1;
        let err = cache.insert(flipped).unwrap_err();
        assert!(matches!(err, CacheError::KeyMismatch { .. }));
        assert!(err.to_string().starts_with("corrupted operand"));

        let mut reshaped = operand_f64(1, 2, &[1.0, 2.0]);
        (reshaped.rows, reshaped.cols) = (2, 1);
        assert!(matches!(
            cache.insert(reshaped),
            Err(CacheError::KeyMismatch { .. })
        ));

        let mut short = operand_f64(1, 2, &[1.0, 2.0]);
        short.bytes.pop();
        assert!(matches!(
            cache.insert(short),
            Err(CacheError::Length { .. })
        ));

        let mut huge = operand_f64(1, 2, &[1.0, 2.0]);
        (huge.rows, huge.cols) = (u32::MAX, u32::MAX);
        assert!(matches!(cache.insert(huge), Err(CacheError::Length { .. })));
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }
}
