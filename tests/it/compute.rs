//! Jobs computed by real worker processes come back equal to the reference, over JSON and
//! `.npy`, in f32 and f64, with and without C, several at once from several submitters.

use reqwest::multipart::{Form, Part};
use serde_json::json;
use tabgrid_shared::claims::Role;
use tabgrid_tests::*;

/// One job to check.
pub(crate) struct Case {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) alpha: f64,
    pub(crate) beta: f64,
    pub(crate) with_c: bool,
    pub(crate) f32: bool,
    pub(crate) npy: bool,
}

impl Case {
    pub(crate) fn new(m: usize, k: usize, n: usize) -> Case {
        Case {
            m,
            k,
            n,
            alpha: 1.0,
            beta: 0.0,
            with_c: false,
            f32: false,
            npy: false,
        }
    }
}

/// Submits a case, waits for it and checks the result against the reference.
pub(crate) async fn run_case(c: &Coordinator, bearer: &str, case: &Case, seed: u64) {
    let Case {
        m,
        k,
        n,
        alpha,
        beta,
        with_c,
        f32,
        npy,
    } = *case;
    let mut a = random_matrix(m, k, seed);
    let mut b = random_matrix(k, n, seed + 1);
    let mut cm = with_c.then(|| random_matrix(m, n, seed + 2));
    if f32 {
        a = as_f32(&a);
        b = as_f32(&b);
        cm = cm.map(|c| as_f32(&c));
    }
    let dtype = if f32 { "f32" } else { "f64" };
    let (status, reply) = if npy {
        let encode = |r, c, d: &[f64]| {
            if f32 {
                npy_f32(r, c, d)
            } else {
                npy_f64(r, c, d)
            }
        };
        let spec = json!({"op": "gemm", "dtype": dtype, "alpha": alpha, "beta": beta});
        let mut form = Form::new()
            .part("spec", Part::text(spec.to_string()))
            .part("a", Part::bytes(encode(m, k, &a)))
            .part("b", Part::bytes(encode(k, n, &b)));
        if let Some(cm) = &cm {
            form = form.part("c", Part::bytes(encode(m, n, cm)));
        }
        c.post_form("/jobs", bearer, form).await
    } else {
        let mut body = json!({
            "op": "gemm", "dtype": dtype, "alpha": alpha, "beta": beta,
            "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b},
        });
        if let Some(cm) = &cm {
            body["c"] = json!({"shape": [m, n], "data": cm});
        }
        c.post_json("/jobs", bearer, &body).await
    };
    assert_eq!(status, 201, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();
    let last = c.wait_job(&id, bearer).await;
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["tiles_done"], last["tiles_total"]);

    let want = reference((m, k, n), alpha, &a, &b, beta, cm.as_deref());
    let path = format!("/jobs/{id}/result");
    let got = if npy {
        // Not `result_npy`: this also checks the reply says it is `.npy`.
        let response = c.get_npy(&path, bearer).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/x-npy");
        let length: usize = response.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let bytes = response.bytes().await.unwrap();
        assert_eq!(bytes.len(), length);
        let ((rows, cols), values) = read_npy(&bytes);
        assert_eq!((rows, cols), (m, n));
        values
    } else {
        // Not `result_values`: this also checks the shape and dtype beside the data.
        let body = c.get_json(&path, bearer).await;
        assert_eq!(body["shape"], json!([m, n]));
        assert_eq!(body["dtype"], dtype);
        values(&body["data"])
    };
    assert_close(&got, &want, k, f32);
}

#[tokio::test]
async fn odd_shapes_dtypes_and_paths_match_the_reference() {
    let c = Coordinator::start(&[]).await;
    let _w1 = c.worker("w1", 1);
    let _w2 = c.worker("w2", 1);
    c.wait_workers_connected(2).await;
    let t = token("ada", Role::Submitter);

    let cases = [
        Case::new(1, 1, 1),
        Case {
            npy: true,
            ..Case::new(1, 300, 1)
        },
        Case {
            f32: true,
            ..Case::new(37, 53, 29)
        },
        Case {
            f32: true,
            npy: true,
            ..Case::new(37, 53, 29)
        },
        Case::new(700, 3, 5),
        Case {
            npy: true,
            ..Case::new(3, 5000, 4)
        },
        Case {
            alpha: -0.5,
            beta: 2.0,
            with_c: true,
            ..Case::new(300, 17, 260)
        },
        Case {
            alpha: 1.5,
            beta: 0.25,
            with_c: true,
            f32: true,
            npy: true,
            ..Case::new(257, 33, 513)
        },
        Case {
            alpha: 2.0,
            beta: 3.0,
            ..Case::new(20, 20, 20)
        },
        Case {
            beta: 0.0,
            with_c: true,
            f32: true,
            ..Case::new(9, 9, 9)
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        run_case(&c, &t, case, 10 * i as u64).await;
    }
    let admin = token("root", Role::Admin);
    let workers = c.get_json("/workers", &admin).await;
    let workers = workers["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert!(
        workers
            .iter()
            .all(|w| w["kind"] == "native" && w["threads"] == 1)
    );
    let tiles: u64 = workers
        .iter()
        .map(|w| w["tiles_done"].as_u64().unwrap())
        .sum();
    assert!(tiles >= cases.len() as u64);
}

#[tokio::test]
async fn several_jobs_from_several_submitters_at_once() {
    let c = Coordinator::start(&[]).await;
    let _w1 = c.worker("w1", 1);
    let _w2 = c.worker("w2", 1);
    c.wait_workers_connected(2).await;
    let users: Vec<String> = (0..3)
        .map(|i| token(&format!("user{i}"), Role::Submitter))
        .collect();
    let runs = users.iter().enumerate().flat_map(|(u, t)| {
        let c = &c;
        (0..2).map(move |j| async move {
            let case = Case {
                f32: j == 0,
                npy: u % 2 == 0,
                ..Case::new(300 + 10 * u, 200, 280 + j)
            };
            run_case(c, t, &case, 100 * u as u64 + j as u64).await;
        })
    });
    futures_util::future::join_all(runs).await;
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("tabgrid_jobs_finished_total{state=\"done\"} 6"),
        "{metrics}"
    );
}

#[tokio::test]
async fn progress_events_end_with_the_final_state() {
    let c = Coordinator::start(&[]).await;
    let t = token("ada", Role::Submitter);
    let body = json!({
        "op": "gemm", "dtype": "f32",
        "a": {"shape": [600, 64], "data": random_matrix(600, 64, 1)},
        "b": {"shape": [64, 600], "data": random_matrix(64, 600, 2)},
    });
    let (_, reply) = c.post_json("/jobs", &t, &body).await;
    let id = reply["id"].as_str().unwrap().to_owned();
    assert_eq!(reply["tiles_total"], 9);
    // The first event shows the queued job; a worker joining later runs it.
    let first = c.follow(&id, &t, |_| true).await;
    assert_eq!(first["state"], "queued");
    let _w = c.worker("w", 2);
    let last = c.wait_job(&id, &t).await;
    assert_eq!(last["state"], "done");
    assert_eq!(last["tiles_done"], 9);
    // A finished job's stream is one final event.
    let again = c.follow(&id, &t, |_| true).await;
    assert_eq!(again["state"], "done");
}
