//! The `tabgrid` CLI as a user runs it: `cluster`, `token`, `submit --wait -o`, `status`,
//! `result`, and server errors shown as the server's message.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;
use tabgrid_shared::claims::Role;
use tabgrid_tests::*;

fn tabgrid(url: &str, token: &str) -> Command {
    let mut command = Command::new(bin("tabgrid"));
    command
        .env("TABGRID_URL", url)
        .env("TABGRID_TOKEN", token)
        .env("RUST_LOG", "warn");
    command
}

#[tokio::test]
async fn submit_wait_status_and_result_from_the_command_line() {
    let c = Coordinator::start(&[]).await;
    let _w = c.worker("w", 2);
    let t = token("ada", Role::Submitter);
    let dir = tempfile::tempdir().unwrap();
    let (m, k, n) = (130, 70, 90);
    let a = random_matrix(m, k, 1);
    let b = random_matrix(k, n, 2);
    let cm = random_matrix(m, n, 3);
    std::fs::write(dir.path().join("a.npy"), npy_f64(m, k, &a)).unwrap();
    std::fs::write(dir.path().join("b.npy"), npy_f64(k, n, &b)).unwrap();
    std::fs::write(dir.path().join("c.npy"), npy_f64(m, n, &cm)).unwrap();
    let out = dir.path().join("out.npy");

    let url = c.url.clone();
    let t2 = t.clone();
    let dir_path = dir.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        tabgrid(&url, &t2)
            .current_dir(&dir_path)
            .args([
                "submit", "a.npy", "b.npy", "--c", "c.npy", "--alpha", "2", "--beta", "-1",
                "--wait", "-o", "out.npy",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("done; wrote out.npy"), "{stdout}");
    let ((rows, cols), got) = read_npy(&std::fs::read(&out).unwrap());
    assert_eq!((rows, cols), (m, n));
    assert_close(
        &got,
        &reference((m, k, n), 2.0, &a, &b, -1.0, Some(&cm)),
        k,
        false,
    );

    let id = stdout
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(';')
        .to_owned();
    let output = tabgrid(&c.url, &t).args(["status", &id]).output().unwrap();
    assert!(output.status.success());
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["state"], "done");
    assert_eq!(status["id"], id.as_str());

    let again = dir.path().join("again.npy");
    let output = tabgrid(&c.url, &t)
        .args(["result", &id, "-o"])
        .arg(&again)
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&out).unwrap());

    // Server errors are the server's words, not a backtrace.
    let forged = token_with("ada", Role::Submitter, now() + 60, "wrong");
    let output = tabgrid(&c.url, &forged)
        .args(["status", &id])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        "error: 401 Unauthorized: token signature is invalid"
    );
    let output = tabgrid(&c.url, &t)
        .args(["submit", "a.npy", "a.npy"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("400 Bad Request: shapes do not fit: A is 130x70 and B is 130x70"),
        "{stderr}"
    );
}

#[tokio::test]
async fn cluster_is_a_working_grid_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("tabgrid"))
        .args([
            "cluster",
            "--workers",
            "2",
            "--threads",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("TABGRID_JWT_SECRET")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Lines::follow(child.stderr.take().unwrap(), "cluster");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines
        .next()
        .unwrap()
        .unwrap()
        .split("listening on ")
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(lines.next().unwrap().unwrap().starts_with("admin token"));
    let admin = lines.next().unwrap().unwrap();

    // The admin token works, and `tabgrid token` mints submitter tokens from the same secret.
    let output = Command::new(bin("tabgrid"))
        .args([
            "token",
            "--role",
            "submitter",
            "--subject",
            "ada",
            "--ttl",
            "1h",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("TABGRID_JWT_SECRET")
        .output()
        .unwrap();
    assert!(output.status.success());
    let submitter = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let api = ApiClient::new(url);
    let (m, k, n) = (300, 100, 280);
    let a = random_matrix(m, k, 5);
    let b = random_matrix(k, n, 6);
    let body = serde_json::json!({"op": "gemm", "dtype": "f64", "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b}});
    let (_, reply) = api.post_json("/jobs", &submitter, &body).await;
    let id = reply["id"].as_str().unwrap().to_owned();

    // Follow the job over SSE until it is done (the stream ends after the final event).
    let response = api.get(&format!("/jobs/{id}/events"), &submitter).await;
    let text = tokio::time::timeout(EVENT_TIMEOUT, response.text())
        .await
        .unwrap()
        .unwrap();
    assert!(text.contains("\"state\":\"done\""), "{text}");
    let got = api.result_values(&id, &submitter).await;
    assert_close(
        &got,
        &reference((m, k, n), 1.0, &a, &b, 0.0, None),
        k,
        false,
    );

    log.wait_for("worker connected", 2).await;
    let workers = api.get_json("/workers", &admin).await;
    assert_eq!(workers["workers"].as_array().unwrap().len(), 2, "{workers}");
    let _ = child.kill();
    let _ = child.wait();
}
