//! Nothing lost: the embedded SQLite store keeps jobs, accepted tiles and results through
//! a `kill -9` of the coordinator, a crash mid-upload leaves no half job, `tabgrid backup`
//! copies a serving store, and the disk quota and job size limit refuse cleanly.

use std::io::Write;
use std::process::Command;

use serde_json::{Value, json};
use tabgrid_shared::claims::Role;
use tabgrid_tests::*;

/// Files under a job folder of a data dir.
fn job_dirs(data_dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir.join("jobs"))
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_killed_coordinator_resumes_its_jobs_without_recomputing_accepted_tiles() {
    let c = Coordinator::start(&["--tile-edge", "64"]).await;
    let t = token("ada", Role::Submitter);
    // Each tile takes this worker three seconds: the kill lands mid-job, long after the
    // tiles before it were committed.
    let mut slow = Worker::start_with(
        &c.url,
        &token("slow", Role::Volunteer),
        2,
        &["--chaos", "slow=1"],
    );
    c.wait_workers_connected(1).await;
    let finished = GemmJob::submit(&c, &t, (40, 30, 50), 1).await;
    assert_eq!(c.wait_job(&finished.id, &t).await["state"], "done");
    let running = GemmJob::submit(&c, &t, (256, 96, 192), 10).await;
    assert!(running.tiles >= 8, "{} tiles", running.tiles);
    c.follow(&running.id, &t, |e| {
        e["tiles_done"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    slow.kill9();

    let c = c.restart().await;
    let job = c.get_json(&format!("/jobs/{}", running.id), &t).await;
    let resumed = job["tiles_done"].as_u64().unwrap();
    assert!(
        job["state"] == "running" || job["state"] == "queued",
        "{job}"
    );
    assert!(
        (2..running.tiles).contains(&resumed),
        "{resumed} of {} tiles kept",
        running.tiles
    );
    assert_eq!(
        metric(&c.metrics().await, "tabgrid_tiles_resumed_total"),
        resumed as f64
    );
    // The job finished before the kill is still there, with its result.
    finished.assert_right(&c, &t).await;

    let _honest = c.worker("honest", 1);
    assert_eq!(c.wait_job(&running.id, &t).await["state"], "done");
    running.assert_right(&c, &t).await;
    // Only the tiles that were not kept were computed again.
    let metrics = c.metrics().await;
    assert_eq!(
        metric(&metrics, "tabgrid_tiles_accepted_total"),
        (running.tiles - resumed) as f64,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_crash_during_an_upload_leaves_no_half_job() {
    let c = Coordinator::start(&[]).await;
    let t = token("ada", Role::Submitter);
    // Half of a 4 MB body, then the coordinator dies.
    let mut socket = std::net::TcpStream::connect(&c.addr).unwrap();
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {t}\r\n\
         Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n",
        c.addr
    );
    socket.write_all(head.as_bytes()).unwrap();
    let body = format!(
        "{{\"op\": \"gemm\", \"dtype\": \"f64\", \"a\": {{\"shape\": [500, 500], \"data\": [{}",
        "0.5, ".repeat(300_000)
    );
    socket.write_all(body.as_bytes()).unwrap();
    socket.flush().unwrap();
    let c = c.restart().await;
    drop(socket);

    let list = c.get_json("/jobs", &t).await;
    assert_eq!(list["jobs"], json!([]), "{list}");
    assert!(job_dirs(c.data_dir.path()).is_empty());
}

#[tokio::test]
async fn a_backup_taken_while_serving_restores_every_job() {
    let c = Coordinator::start(&["--tile-edge", "64"]).await;
    let t = token("ada", Role::Submitter);
    let _w = c.worker("w", 1);
    c.wait_workers_connected(1).await;
    let done = GemmJob::submit(&c, &t, (130, 70, 90), 20).await;
    assert_eq!(c.wait_job(&done.id, &t).await["state"], "done");
    // A queued job too: no worker takes it once this one is gone.
    drop(_w);
    c.wait_log("worker disconnected", 1).await;
    let queued = GemmJob::submit(&c, &t, (100, 40, 140), 30).await;

    let backups = tempfile::tempdir().unwrap();
    let file = backups.path().join("grid.tar");
    let out = Command::new(bin("tabgrid"))
        .args(["backup", "--data-dir"])
        .arg(c.data_dir.path())
        .arg("--to")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("2 jobs"), "{said}");
    drop(c);

    // Restore as the docs say: untar into a new data dir.
    let restored = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&file)
        .arg("-C")
        .arg(restored.path())
        .status()
        .unwrap();
    assert!(status.success());
    let c = Coordinator::start_in(restored, &["--tile-edge", "64"]).await;
    done.assert_right(&c, &t).await;
    let list = c.get_json("/jobs", &t).await;
    let ids: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [done.id.as_str(), queued.id.as_str()]);
    let _w = c.worker("w", 1);
    assert_eq!(c.wait_job(&queued.id, &t).await["state"], "done");
    queued.assert_right(&c, &t).await;
}

#[tokio::test]
async fn the_disk_quota_and_job_size_limit_refuse_cleanly() {
    let c = Coordinator::start(&["--disk-quota", "1700KiB", "--max-job-size", "2MiB"]).await;
    let t = token("ada", Role::Submitter);
    // 1.3 MB of matrices (A, B, C and the result), as much on disk.
    let first = GemmJob::submit(&c, &t, (200, 200, 200), 1).await;

    // Over the per-job limit (2.2 MB): 413, before anything is written.
    let big = json!({
        "op": "gemm", "dtype": "f64",
        "a": {"shape": [300, 300], "data": vec![1.0; 90_000]},
        "b": {"shape": [300, 300], "data": vec![1.0; 90_000]},
    });
    let (status, reply) = c.post_json("/jobs", &t, &big).await;
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["detail"]
            .as_str()
            .unwrap()
            .contains("takes jobs up to"),
        "{reply}"
    );

    // Under the limit but over what the quota has left (0.54 MB of 0.46): 507, nothing
    // left behind.
    let second = json!({
        "op": "gemm", "dtype": "f64",
        "a": {"shape": [150, 150], "data": vec![1.0; 22_500]},
        "b": {"shape": [150, 150], "data": vec![1.0; 22_500]},
    });
    let (status, reply) = c.post_json("/jobs", &t, &second).await;
    assert_eq!(status, 507, "{reply}");
    let detail = reply["detail"].as_str().unwrap();
    assert!(detail.contains("storage is full"), "{reply}");
    assert_eq!(job_dirs(c.data_dir.path()), vec![first.id.clone()]);
    let list: Value = c.get_json("/jobs", &t).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);

    // Deleting the first job frees its space: the second fits now.
    assert_eq!(c.delete(&format!("/jobs/{}", first.id), &t).await, 204);
    assert!(job_dirs(c.data_dir.path()).is_empty());
    let (status, reply) = c.post_json("/jobs", &t, &second).await;
    assert_eq!(status, 201, "{reply}");
}
