//! The HTTP API's contract for bad input and access control, against a real coordinator
//! process (no workers needed: nothing here computes).

use reqwest::multipart::{Form, Part};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tabgrid_shared::claims::Role;
use tabgrid_tests::*;

fn job(m: usize, k: usize, n: usize) -> Value {
    json!({
        "op": "gemm", "dtype": "f64", "alpha": 1.0, "beta": 0.0,
        "a": {"shape": [m, k], "data": random_matrix(m, k, 1)},
        "b": {"shape": [k, n], "data": random_matrix(k, n, 2)},
    })
}

/// Submits `.npy` parts with file names, as the CLI sends them.
async fn multipart(
    c: &Coordinator,
    bearer: &str,
    spec: Value,
    parts: Vec<(&'static str, Vec<u8>)>,
) -> (StatusCode, Value) {
    let mut form = Form::new().part("spec", Part::text(spec.to_string()));
    for (name, bytes) in parts {
        form = form.part(name, Part::bytes(bytes).file_name(format!("{name}.npy")));
    }
    c.post_form("/jobs", bearer, form).await
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn bad_input_gets_400_naming_the_part() {
    let c = Coordinator::start(&[]).await;
    let t = token("ada", Role::Submitter);

    let mut body = job(2, 3, 4);
    body["b"]["shape"] = json!([4, 3]);
    body["b"]["data"] = json!(random_matrix(4, 3, 2));
    let (status, reply) = c.post_json("/jobs", &t, &body).await;
    assert_eq!(status, 400);
    assert!(detail(&reply).contains("A is 2x3 and B is 4x3"), "{reply}");
    assert_eq!(reply["error"], "bad_request");

    let mut body = job(2, 3, 4);
    body["dtype"] = json!("int8");
    let (status, reply) = c.post_json("/jobs", &t, &body).await;
    assert_eq!(status, 400);
    assert!(detail(&reply).contains("int8"), "{reply}");

    let mut body = job(2, 3, 4);
    body["a"]["data"] = json!([1.0, 2.0]);
    let (status, reply) = c.post_json("/jobs", &t, &body).await;
    assert_eq!(status, 400);
    assert!(
        detail(&reply).contains("a: data has 2 values but shape [2, 3] needs 6"),
        "{reply}"
    );

    let mut body = job(2, 3, 4);
    body["c"] = json!({"shape": [3, 3], "data": random_matrix(3, 3, 3)});
    let (status, reply) = c.post_json("/jobs", &t, &body).await;
    assert_eq!(status, 400);
    assert!(
        detail(&reply).contains("C is 3x3 but A·B is 2x4"),
        "{reply}"
    );

    let truncated_json = c
        .request(Method::POST, "/jobs", &t)
        .header("content-type", "application/json")
        .body("{\"op\": \"gemm\", ");
    let (status, reply) = status_and_json(truncated_json).await;
    assert_eq!(status, 400);
    assert!(detail(&reply).contains("not valid job JSON"), "{reply}");

    let mut body = job(1, 1, 1);
    body["op"] = json!("conv2d");
    let (status, reply) = c.post_json("/jobs", &t, &body).await;
    assert_eq!(status, 400);
    assert!(detail(&reply).contains("conv2d"), "{reply}");

    // .npy parts: wrong dtype, Fortran order, truncated, missing part, not 2-D.
    let spec = json!({"op": "gemm", "dtype": "f32"});
    let a = npy_f64(2, 3, &random_matrix(2, 3, 1));
    let b = npy_f32(3, 2, &random_matrix(3, 2, 2));
    let (status, reply) = multipart(&c, &t, spec.clone(), vec![("a", a), ("b", b.clone())]).await;
    assert_eq!(status, 400);
    assert!(
        detail(&reply).starts_with("part `a`:") && detail(&reply).contains("f32"),
        "{reply}"
    );

    let fortran = {
        use ndarray::ShapeBuilder;
        use ndarray_npy::WriteNpyExt;
        let mut out = Vec::new();
        ndarray::Array2::<f32>::zeros((2, 3).f())
            .write_npy(&mut out)
            .unwrap();
        out
    };
    let (status, reply) =
        multipart(&c, &t, spec.clone(), vec![("a", fortran), ("b", b.clone())]).await;
    assert_eq!(status, 400);
    assert!(
        detail(&reply).contains("part `a`") && detail(&reply).contains("Fortran"),
        "{reply}"
    );

    let good_a = npy_f32(2, 3, &random_matrix(2, 3, 1));
    let truncated = good_a[..good_a.len() - 5].to_vec();
    let (status, reply) = multipart(
        &c,
        &t,
        spec.clone(),
        vec![("a", good_a.clone()), ("b", truncated)],
    )
    .await;
    assert_eq!(status, 400);
    assert!(detail(&reply).starts_with("part `b`:"), "{reply}");

    // A header claiming a matrix of 2^50 elements over 16 bytes of data: refused, and
    // nothing allocated for it (this used to abort the coordinator).
    let mut huge = good_a.clone();
    let find = |file: &[u8], what: &[u8]| file.windows(what.len()).position(|w| w == what);
    let shape = find(&huge, b"(2, 3)").unwrap();
    let claim = b"(1073741824, 1048576)";
    huge.splice(shape..shape + 6, claim.iter().copied());
    let end = huge.iter().position(|&b| b == b'\n').unwrap();
    huge.drain(end - (claim.len() - 6)..end);
    let (status, reply) =
        multipart(&c, &t, spec.clone(), vec![("a", huge), ("b", b.clone())]).await;
    assert_eq!(status, 400);
    assert!(
        detail(&reply).starts_with("part `a`:") && detail(&reply).contains("short of its shape"),
        "{reply}"
    );

    // Big-endian data (as `numpy.dtype('>f4')` writes it) is read, byte-swapped.
    let big_endian = {
        let mut file = good_a.clone();
        let descr = find(&file, b"'<f4'").unwrap();
        file[descr + 1] = b'>';
        let data = file.len() - 6 * 4;
        file[data..].chunks_exact_mut(4).for_each(|v| v.reverse());
        file
    };
    let (status, reply) = multipart(
        &c,
        &t,
        spec.clone(),
        vec![("a", big_endian), ("b", b.clone())],
    )
    .await;
    assert_eq!(status, 201, "{reply}");

    let (status, reply) = multipart(&c, &t, spec.clone(), vec![("a", good_a.clone())]).await;
    assert_eq!(status, 400);
    assert!(detail(&reply).contains("part `b` is missing"), "{reply}");

    let (status, reply) = multipart(
        &c,
        &t,
        spec.clone(),
        vec![("a", good_a.clone()), ("b", b.clone()), ("x", vec![1])],
    )
    .await;
    assert_eq!(status, 400);
    assert!(detail(&reply).contains("unknown part `x`"), "{reply}");

    let (status, reply) = multipart(
        &c,
        &t,
        spec,
        vec![("a", good_a), ("b", npy_f32(2, 2, &[1.0; 4]))],
    )
    .await;
    assert_eq!(status, 400);
    assert!(detail(&reply).contains("A is 2x3 and B is 2x2"), "{reply}");

    let mut c = c;
    assert!(c.alive(), "the coordinator survived bad input");
}

/// Sends raw HTTP/1.1 bytes and returns the response's status line and body.
async fn raw_http(c: &Coordinator, head: &str, body_chunks: &[&[u8]]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&c.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body_chunks {
        // The server may answer and close before it has read everything; that is the point.
        if stream.write_all(chunk).await.is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let c = Coordinator::start(&["--max-body", "64KiB"]).await;
    let t = token("ada", Role::Submitter);

    // A declared length over the limit is refused before a byte of the body is sent.
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: application/json\r\ncontent-length: 10000000000\r\nconnection: close\r\n\r\n"
    );
    let (status, body) = raw_http(&c, &head, &[]).await;
    assert!(status.contains("413"), "{status}");
    assert!(body.contains("\"too_large\""), "{body}");

    // A chunked body has no declared length: refused once the stream passes the limit.
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    let chunks: Vec<&[u8]> = (0..80).map(|_| chunk.as_bytes()).collect();
    let (status, body) = raw_http(&c, &head, &chunks).await;
    assert!(status.contains("413"), "{status}");
    assert!(body.contains("too_large"), "{body}");

    let (status, _) = c.post_json("/jobs", &t, &job(10, 10, 2)).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a body under the limit still goes through"
    );
}

#[tokio::test]
async fn tokens_roles_and_ownership() {
    let c = Coordinator::start(&[]).await;
    let ada = token("ada", Role::Submitter);
    let bob = token("bob", Role::Submitter);
    let admin = token("root", Role::Admin);

    // Built by hand: every helper sends a bearer token.
    let (status, reply) = status_and_json(c.http.post(c.api("/jobs")).json(&job(2, 2, 2))).await;
    assert_eq!(status, 401);
    assert!(detail(&reply).contains("missing bearer token"), "{reply}");

    let forged = token_with("ada", Role::Admin, now() + 3600, "not-the-secret");
    let (status, reply) = c.post_json("/jobs", &forged, &job(2, 2, 2)).await;
    assert_eq!(status, 401);
    assert!(detail(&reply).contains("signature"), "{reply}");

    let expired = token_with("ada", Role::Submitter, now() - 600, SECRET);
    let (status, reply) = c.post_json("/jobs", &expired, &job(2, 2, 2)).await;
    assert_eq!(status, 401);
    assert!(detail(&reply).contains("expired"), "{reply}");

    let volunteer = token("vic", Role::Volunteer);
    let (status, reply) = c.post_json("/jobs", &volunteer, &job(2, 2, 2)).await;
    assert_eq!(status, 403);
    assert!(detail(&reply).contains("volunteer"), "{reply}");

    let (status, reply) = c.post_json("/jobs", &ada, &job(2, 2, 2)).await;
    assert_eq!(status, 201, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();
    assert_eq!(reply["state"], "queued");
    assert_eq!(reply["tiles_total"], 1);

    let job_path = format!("/jobs/{id}");
    let result_path = format!("/jobs/{id}/result");
    assert_eq!(c.get(&job_path, &bob).await.status(), 403);
    assert_eq!(c.get(&result_path, &bob).await.status(), 403);
    assert_eq!(c.delete(&job_path, &bob).await, 403);
    assert_eq!(c.get(&job_path, &ada).await.status(), 200);
    assert_eq!(c.get(&job_path, &admin).await.status(), 200);

    // No worker is connected, so the job cannot be done yet.
    let response = c.get(&result_path, &ada).await;
    assert_eq!(response.status(), 409);
    let reply: Value = response.json().await.unwrap();
    assert!(detail(&reply).contains("queued"), "{reply}");

    let unknown = "/jobs/00000000-0000-0000-0000-000000000000";
    assert_eq!(c.get(unknown, &ada).await.status(), 404);
    let list = c.get_json("/jobs", &bob).await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        0,
        "bob sees only his jobs"
    );
    let list = c.get_json("/jobs", &admin).await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        1,
        "admin sees all jobs"
    );

    assert_eq!(c.get("/workers", &ada).await.status(), 403);
    assert_eq!(c.get("/workers", &admin).await.status(), 200);

    assert_eq!(c.delete(&job_path, &ada).await, 204);
    assert_eq!(c.get(&job_path, &ada).await.status(), 404);

    let (_, health) = status_and_json(c.http.get(c.api("/healthz"))).await;
    assert_eq!(health["status"], "ok");
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("tabgrid_auth_failures_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tabgrid_jobs_submitted_total 1"),
        "{metrics}"
    );
}
