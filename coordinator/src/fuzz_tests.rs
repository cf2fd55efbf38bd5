//! Fuzzing what peers send, as proptest harnesses: the worker frame decoder (both
//! directions), the `.npy` reader and the job JSON parser (through validation and tiling)
//! must return an error for anything malformed — never panic, never allocate for what a
//! header merely claims. Inputs are random bytes, and mutations of valid inputs so that
//! the fuzzer gets past the first length or magic check.
//!
//! CI runs the default case count; the long run (10 million inputs per target) is
//! `PROPTEST_CASES=10000000 cargo test --release -p tabgrid-coordinator fuzz_`.

use proptest::prelude::*;
use tabgrid_shared::Dtype;
use tabgrid_shared::protocol::{
    self, Assign, Hello, Limits, Operand, OperandKey, TileResult, ToCoordinator, ToWorker, Welcome,
    WorkerKind,
};
use tabgrid_shared::tiling::PREFERRED_EDGE;

use crate::{api, npy};

fn config() -> ProptestConfig {
    // CI's short run; PROPTEST_CASES overrides it for the long one.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Valid frames of every kind, as seeds for mutation.
fn seed_frames() -> Vec<Vec<u8>> {
    let hello = ToCoordinator::Hello(Hello {
        protocol: protocol::PROTOCOL_VERSION,
        kind: WorkerKind::Browser,
        threads: 4,
        features: vec!["simd128".into()],
        bench_gflops: 12.5,
        cache_bytes: 1 << 20,
        token: Some("t".into()),
        agent: "fuzz".into(),
    });
    let result = ToCoordinator::Result(TileResult {
        lease: 7,
        checksum: protocol::checksum(&[1, 2, 3, 4]),
        compute_micros: 9,
        payload: vec![1, 2, 3, 4],
    });
    let key = OperandKey::of(Dtype::F32, 1, 1, &[0; 4]);
    let assign = ToWorker::Assign(Assign {
        lease: 3,
        job: "j".into(),
        tile: (1, 2),
        dtype: Dtype::F64,
        m: 2,
        n: 2,
        k: 2,
        alpha: 1.0,
        beta: 0.5,
        a: key,
        b: key,
        c: Some(key),
        deadline_ms: 100,
    });
    let operand = ToWorker::Operand(Operand {
        key,
        dtype: Dtype::F32,
        rows: 1,
        cols: 1,
        bytes: vec![0; 4],
    });
    let welcome = ToWorker::Welcome(Welcome {
        worker_id: 1,
        limits: Limits {
            max_frame_bytes: 64,
            max_slots: 2,
            heartbeat_secs: 5,
        },
    });
    vec![
        protocol::encode(&hello),
        protocol::encode(&result),
        protocol::encode(&ToCoordinator::Ready { slots: 2 }),
        protocol::encode(&assign),
        protocol::encode(&operand),
        protocol::encode(&welcome),
    ]
}

/// A valid 2x3 `.npy` of `dtype`, as a seed for mutation.
fn seed_npy(dtype: Dtype) -> Vec<u8> {
    let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let matrix = match dtype {
        Dtype::F32 => tabgrid_shared::Matrix::from_f32(2, 3, &values.map(|v| v as f32)),
        Dtype::F64 => tabgrid_shared::Matrix::from_f64(2, 3, &values),
    };
    npy::write(&matrix.expect("a valid matrix"))
}

const SEED_JSON: &str = r#"{"op":"gemm","dtype":"f32","alpha":1.5,"beta":0.5,
"a":{"shape":[2,3],"data":[1,2,3,4,5,6]},"b":{"shape":[3,1],"data":[1,0,1]},
"c":{"shape":[2,1],"data":[1,1]},"priority":2,"name":"x"}"#;

/// A seed with a few bytes overwritten, inserted or cut off.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len();
    (
        0..count,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(which, edits, cut, truncate)| {
            let mut bytes = seeds[which].clone();
            for (at, byte, kind) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let at = at.index(bytes.len());
                match kind {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            if truncate && !bytes.is_empty() {
                bytes.truncate(cut.index(bytes.len()));
            }
            bytes
        })
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..256)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_frames_never_panic(bytes in prop_oneof![any_bytes(), mutated(seed_frames())]) {
        let _ = protocol::decode::<ToCoordinator>(&bytes);
        let _ = protocol::decode::<ToWorker>(&bytes);
    }

    #[test]
    fn fuzz_npy_never_panics(
        bytes in prop_oneof![
            any_bytes(),
            mutated(vec![seed_npy(Dtype::F32), seed_npy(Dtype::F64)]),
        ],
        f64_job in any::<bool>(),
    ) {
        let dtype = if f64_job { Dtype::F64 } else { Dtype::F32 };
        if let Ok(matrix) = npy::read("a", &bytes, dtype) {
            // Whatever parses holds exactly the bytes its shape needs.
            prop_assert_eq!(matrix.data.len(), matrix.rows * matrix.cols * dtype.size());
        }
    }

    #[test]
    fn fuzz_job_json_never_panics(
        bytes in prop_oneof![any_bytes(), mutated(vec![SEED_JSON.as_bytes().to_vec()])],
    ) {
        let _ = api::parse_json_job(&bytes, PREFERRED_EDGE);
    }
}

#[test]
fn the_seeds_are_valid() {
    for frame in seed_frames() {
        assert!(
            protocol::decode::<ToCoordinator>(&frame).is_ok()
                || protocol::decode::<ToWorker>(&frame).is_ok()
        );
    }
    for dtype in [Dtype::F32, Dtype::F64] {
        assert!(npy::read("a", &seed_npy(dtype), dtype).is_ok());
    }
    assert!(api::parse_json_job(SEED_JSON.as_bytes(), PREFERRED_EDGE).is_ok());
}
