//! The worker protocol: one WebSocket per worker, binary frames, each frame one
//! postcard-encoded message of [`ToCoordinator`] or [`ToWorker`].
//!
//! postcard encodes struct fields by position and enum variants by index, so reordering a
//! field or a variant silently breaks every deployed worker. Append only, bump
//! [`PROTOCOL_VERSION`] on any incompatible change, and keep the golden-bytes tests below
//! passing. This is the only module whose types derive `Serialize` for the wire; the
//! coordinator's scheduler and store convert from these by hand.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::matrix::Dtype;

/// Version spoken by this build; a `Hello` with another version is refused with a reason.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest frame either side accepts. Operand panels are cut by the tiling policy to fit.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Most tiles a worker may ask for at once (`Ready` credits outstanding).
pub const MAX_SLOTS: u32 = 16;

/// A lease names one assignment of one tile to one worker.
pub type LeaseId = u64;

/// Content address of an operand panel: the first 16 bytes of BLAKE3 over its dtype,
/// shape and bytes. Equal content gets equal keys, so a worker that holds a panel never
/// receives it again, even for another job.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OperandKey(pub [u8; 16]);

impl OperandKey {
    /// The key of a row-major `rows x cols` panel.
    pub fn of(dtype: Dtype, rows: u32, cols: u32, bytes: &[u8]) -> OperandKey {
        let mut hasher = OperandKey::hasher(dtype, rows, cols);
        hasher.update(bytes);
        OperandKey::from_hasher(&hasher)
    }

    /// A hasher that gives [`OperandKey::of`] once fed the operand's bytes (in pieces, so
    /// that a caller can work on each piece while it is in cache).
    pub fn hasher(dtype: Dtype, rows: u32, cols: u32) -> blake3::Hasher {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&[dtype as u8]);
        hasher.update(&rows.to_le_bytes());
        hasher.update(&cols.to_le_bytes());
        hasher
    }

    /// The key of what [`OperandKey::hasher`]'s hasher was fed.
    pub fn from_hasher(hasher: &blake3::Hasher) -> OperandKey {
        let mut key = [0; 16];
        key.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        OperandKey(key)
    }
}

impl fmt::Debug for OperandKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Checksum carried by every result payload, so corruption in transit is told apart from
/// a wrong computation.
pub fn checksum(bytes: &[u8]) -> u64 {
    checksum_of(blake3::Hasher::new().update(bytes))
}

/// [`checksum`] of what `hasher` was fed.
pub fn checksum_of(hasher: &blake3::Hasher) -> u64 {
    let hash = hasher.finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// What kind of machine a worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerKind {
    Native,
    Browser,
}

impl WorkerKind {
    pub const fn name(self) -> &'static str {
        match self {
            WorkerKind::Native => "native",
            WorkerKind::Browser => "browser",
        }
    }
}

/// Frames a worker sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// First frame of every connection.
    Hello(Hello),
    /// The worker can take `slots` more tiles (credits add up).
    Ready { slots: u32 },
    /// A computed tile.
    Result(TileResult),
    /// The worker could not compute a lease (e.g. missing operand, out of memory).
    Failed { lease: LeaseId, reason: String },
    /// Liveness while computing long tiles.
    Heartbeat,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub kind: WorkerKind,
    pub threads: u32,
    /// CPU or browser features the kernels use, e.g. `avx2`, `simd128`.
    pub features: Vec<String>,
    /// Measured GEMM speed of this worker, GFLOP/s, used for lease deadlines.
    pub bench_gflops: f64,
    /// Bytes of operands the worker will cache; the coordinator never exceeds it.
    pub cache_bytes: u64,
    /// Volunteer token for clients that cannot set headers (browsers). Never logged.
    pub token: Option<String>,
    /// Free-form client description (version, user agent).
    pub agent: String,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("protocol", &self.protocol)
            .field("kind", &self.kind)
            .field("threads", &self.threads)
            .field("features", &self.features)
            .field("bench_gflops", &self.bench_gflops)
            .field("cache_bytes", &self.cache_bytes)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("agent", &self.agent)
            .finish()
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TileResult {
    pub lease: LeaseId,
    /// [`checksum`] of `payload`.
    pub checksum: u64,
    /// Time the kernel took, microseconds.
    pub compute_micros: u64,
    /// The tile, row-major little-endian elements of the job's dtype.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl fmt::Debug for TileResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TileResult")
            .field("lease", &self.lease)
            .field("checksum", &self.checksum)
            .field("compute_micros", &self.compute_micros)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// Frames the coordinator sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Welcome(Welcome),
    /// A panel to cache under its key until told to forget it.
    Operand(Operand),
    /// Drop these panels; the coordinator mirrors the worker's cache exactly.
    Forget {
        keys: Vec<OperandKey>,
    },
    Assign(Assign),
    /// Stop working on a lease; its result is no longer wanted.
    Cancel {
        lease: LeaseId,
    },
    /// The coordinator is closing this connection, and why.
    Close {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub worker_id: u64,
    pub limits: Limits,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: u32,
    pub max_slots: u32,
    /// A worker silent for longer than three of these is dropped.
    pub heartbeat_secs: u32,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Operand {
    pub key: OperandKey,
    pub dtype: Dtype,
    pub rows: u32,
    pub cols: u32,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Operand({:?} {}x{} {})",
            self.key, self.rows, self.cols, self.dtype
        )
    }
}

/// One tile to compute: `C_tile = alpha·A_panel·B_panel + beta·C_tile`, where `A_panel` is
/// `m x k`, `B_panel` is `k x n` and the optional `C_tile` is `m x n`, all cached operands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    pub lease: LeaseId,
    pub job: String,
    pub tile: (u32, u32),
    pub dtype: Dtype,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub alpha: f64,
    pub beta: f64,
    pub a: OperandKey,
    pub b: OperandKey,
    pub c: Option<OperandKey>,
    /// Milliseconds the worker has before the lease is given to someone else.
    pub deadline_ms: u64,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("frame does not decode: {0}")]
    Malformed(String),
    #[error("frame has {0} bytes after its message")]
    Trailing(usize),
}

/// Encodes a message as one frame.
pub fn encode<M: Serialize>(message: &M) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail: there is no IO, no map with
    // non-string keys and no length unknown in advance.
    postcard::to_allocvec(message).expect("protocol messages always serialize")
}

/// Encodes `ToWorker::Operand` from a borrowed panel: the same bytes as
/// `encode(&ToWorker::Operand(..))` without first copying the panel into an owned message
/// (panels are megabytes and go to every worker that lacks them).
pub fn encode_operand(
    key: OperandKey,
    dtype: Dtype,
    rows: u32,
    cols: u32,
    bytes: &[u8],
) -> Vec<u8> {
    /// Mirrors [`ToWorker`] up to `Operand`: postcard encodes the variant by position.
    #[derive(Serialize)]
    enum Frame<'a> {
        _Welcome(()),
        Operand(OperandRef<'a>),
    }
    /// Mirrors [`Operand`] field by field.
    #[derive(Serialize)]
    struct OperandRef<'a> {
        key: OperandKey,
        dtype: Dtype,
        rows: u32,
        cols: u32,
        #[serde(with = "serde_bytes")]
        bytes: &'a [u8],
    }
    encode(&Frame::Operand(OperandRef {
        key,
        dtype,
        rows,
        cols,
        bytes,
    }))
}

/// Decodes one frame, refusing oversized frames before looking inside and trailing bytes
/// after the message. Never panics on any input.
pub fn decode<'de, M: Deserialize<'de>>(frame: &'de [u8]) -> Result<M, FrameError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: frame.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    let (message, rest) =
        postcard::take_from_bytes(frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> ToCoordinator {
        ToCoordinator::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            kind: WorkerKind::Native,
            threads: 2,
            features: vec!["avx2".into()],
            bench_gflops: 1.5,
            cache_bytes: 1024,
            token: Some("t".into()),
            agent: "w".into(),
        })
    }

    fn assign() -> ToWorker {
        ToWorker::Assign(Assign {
            lease: 7,
            job: "j".into(),
            tile: (1, 2),
            dtype: Dtype::F64,
            m: 3,
            n: 4,
            k: 5,
            alpha: 1.0,
            beta: 0.0,
            a: OperandKey([1; 16]),
            b: OperandKey([2; 16]),
            c: None,
            deadline_ms: 300,
        })
    }

    /// Golden bytes: if one of these changes, deployed workers break. Bump
    /// PROTOCOL_VERSION and update deliberately.
    #[test]
    fn golden_bytes() {
        assert_eq!(
            encode(&hello()),
            [
                0, 1, 0, 2, 1, 4, 97, 118, 120, 50, 0, 0, 0, 0, 0, 0, 248, 63, 128, 8, 1, 1, 116,
                1, 119
            ]
        );
        assert_eq!(encode(&ToCoordinator::Ready { slots: 3 }), [1, 3]);
        assert_eq!(
            encode(&ToCoordinator::Result(TileResult {
                lease: 9,
                checksum: 1,
                compute_micros: 2,
                payload: vec![5, 6],
            })),
            [2, 9, 1, 2, 2, 5, 6]
        );
        assert_eq!(
            encode(&ToCoordinator::Failed {
                lease: 1,
                reason: "x".into()
            }),
            [3, 1, 1, 120]
        );
        assert_eq!(encode(&ToCoordinator::Heartbeat), [4]);
        let mut expected = vec![3, 7, 1, 106, 1, 2, 1, 3, 4, 5];
        expected.extend([0, 0, 0, 0, 0, 0, 240, 63, 0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend([1; 16]);
        expected.extend([2; 16]);
        expected.extend([0, 172, 2]);
        assert_eq!(encode(&assign()), expected);
        assert_eq!(
            encode(&ToWorker::Welcome(Welcome {
                worker_id: 1,
                limits: Limits {
                    max_frame_bytes: 2,
                    max_slots: 3,
                    heartbeat_secs: 4
                }
            })),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(encode(&ToWorker::Cancel { lease: 5 }), [4, 5]);
        assert_eq!(encode(&ToWorker::Close { reason: "r".into() }), [5, 1, 114]);
    }

    #[test]
    fn borrowed_operand_encodes_like_the_owned_message() {
        let bytes = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let key = OperandKey::of(Dtype::F32, 1, 2, &bytes);
        let owned = encode(&ToWorker::Operand(Operand {
            key,
            dtype: Dtype::F32,
            rows: 1,
            cols: 2,
            bytes: bytes.clone(),
        }));
        assert_eq!(encode_operand(key, Dtype::F32, 1, 2, &bytes), owned);
    }

    #[test]
    fn round_trips() {
        let frame = encode(&hello());
        assert_eq!(decode::<ToCoordinator>(&frame).unwrap(), hello());
        let frame = encode(&assign());
        assert_eq!(decode::<ToWorker>(&frame).unwrap(), assign());
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        assert!(matches!(
            decode::<ToCoordinator>(&[200, 1, 2]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<ToCoordinator>(&[]),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(
            decode::<ToCoordinator>(&[4, 0]),
            Err(FrameError::Trailing(1))
        );
        // Not under wasm32-wasip1: Node 20's WASI segfaults at exit (after every test has
        // passed) once the module's memory has grown by this 64 MiB buffer.
        #[cfg(not(target_os = "wasi"))]
        {
            let big = vec![0u8; MAX_FRAME_BYTES + 1];
            assert!(matches!(
                decode::<ToCoordinator>(&big),
                Err(FrameError::TooLarge { .. })
            ));
        }
        // A length prefix that claims more bytes than the frame has.
        assert!(decode::<ToCoordinator>(&[2, 1, 1, 1, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }

    #[test]
    fn keys_depend_on_shape_and_content() {
        let a = OperandKey::of(Dtype::F32, 1, 2, &[0; 8]);
        assert_eq!(a, OperandKey::of(Dtype::F32, 1, 2, &[0; 8]));
        assert_ne!(a, OperandKey::of(Dtype::F32, 2, 1, &[0; 8]));
        assert_ne!(a, OperandKey::of(Dtype::F64, 1, 1, &[0; 8]));
        assert_ne!(checksum(&[1]), checksum(&[2]));
    }
}
