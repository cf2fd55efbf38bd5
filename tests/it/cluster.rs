//! Several coordinators on one PostgreSQL database (a throwaway server per test): they
//! share jobs and never hand one tile to two workers, and when one is killed mid-job a
//! worker given both addresses carries the job to the end through the other.

use serde_json::Value;
use tabgrid_shared::claims::Role;
use tabgrid_tests::postgres::Postgres;
use tabgrid_tests::*;

/// A coordinator on `pg`, with its name in the database.
async fn coordinator(pg: &Postgres, extra: &[&str]) -> (Coordinator, String) {
    let url = pg.url();
    let mut args = vec!["--database-url", url.as_str()];
    args.extend_from_slice(extra);
    let c = Coordinator::start(&args).await;
    let line = c.wait_log("sharing the database", 1).await;
    let name = line
        .split(" as ")
        .nth(1)
        .expect("the coordinator logs its name")
        .trim()
        .to_owned();
    (c, name)
}

#[tokio::test]
async fn coordinators_share_jobs_and_never_hand_one_tile_to_two_workers() {
    let pg = Postgres::start(true).await;
    let (a, a_name) = coordinator(&pg, &["--tile-edge", "16"]).await;
    let (b, b_name) = coordinator(&pg, &["--tile-edge", "16"]).await;
    let _workers = [
        a.worker("a1", 1),
        a.worker("a2", 1),
        b.worker("b1", 1),
        b.worker("b2", 1),
    ];
    a.wait_workers_connected(2).await;
    b.wait_workers_connected(2).await;
    let t = token("ada", Role::Submitter);
    // Two jobs at once, one through each coordinator.
    let first = GemmJob::submit(&a, &t, (192, 48, 160), 1).await;
    let second = GemmJob::submit(&b, &t, (128, 40, 144), 7).await;
    assert!(first.tiles >= 100, "{} tiles", first.tiles);
    for (job, submitted_to, other) in [(&first, &a, &b), (&second, &b, &a)] {
        // Done where it was submitted means done everywhere: the other coordinator serves
        // the result at once, without waiting to hear of it.
        assert_eq!(submitted_to.wait_job(&job.id, &t).await["state"], "done");
        for c in [other, submitted_to] {
            let got = c.result_values(&job.id, &t).await;
            assert_close(&got, &job.want, job.k, false);
            let (shape, npy) = c.result_npy(&job.id, &t).await;
            assert_eq!(shape.0 * shape.1, job.want.len());
            assert_close(&npy, &job.want, job.k, false);
            assert_eq!(c.wait_job(&job.id, &t).await["state"], "done");
        }
    }
    // From the database's own records: within one claim of a tile, every lease came from
    // one coordinator, and no tile had two copies out at once except speculative ones.
    let shared = pg.number(
        "SELECT count(*) FROM (SELECT job_id, i, j, claim FROM leases \
         GROUP BY job_id, i, j, claim HAVING count(DISTINCT coordinator) > 1) AS x",
    );
    assert_eq!(
        shared, 0,
        "a claim's tile was handed out by two coordinators"
    );
    // Nothing failed in this run, so every tile was handed out exactly once (beyond
    // deliberate duplicates of stragglers) across both coordinators.
    let twice = pg.number(
        "SELECT count(*) FROM (SELECT job_id, i, j FROM leases WHERE NOT speculative \
         GROUP BY job_id, i, j HAVING count(*) > 1) AS x",
    );
    assert_eq!(twice, 0, "a tile was handed out twice");
    let reclaimed = pg.number("SELECT count(*) FROM tiles WHERE claims <> 1");
    assert_eq!(
        reclaimed, 0,
        "no claim was lost or given back in a healthy run"
    );
    let tiles = (first.tiles + second.tiles) as i64;
    assert_eq!(
        pg.number("SELECT count(*) FROM tiles WHERE state = 'done' AND digest IS NOT NULL"),
        tiles
    );
    let done_by: Vec<String> = pg
        .query("SELECT DISTINCT done_by FROM tiles ORDER BY 1")
        .lines()
        .map(str::to_owned)
        .collect();
    let mut both = vec![a_name.clone(), b_name.clone()];
    both.sort();
    assert_eq!(done_by, both, "both coordinators' workers computed tiles");
    assert_eq!(
        pg.number("SELECT count(*) FROM leases WHERE NOT speculative"),
        tiles
    );
    // Each job counts as finished once, on one coordinator or the other.
    let done = "tabgrid_jobs_finished_total{state=\"done\"}";
    let finished = metric(&a.metrics().await, done) + metric(&b.metrics().await, done);
    assert_eq!(finished, 2.0);
    // Results are checked against their tiles' checksums: a flipped bit in the database
    // is an error, never a wrong answer.
    pg.query(&format!(
        "UPDATE tiles SET payload = set_byte(payload, 3, get_byte(payload, 3) # 1) \
         WHERE job_id = '{}' AND i = 0 AND j = 0",
        second.id
    ));
    let damaged = b.get(&format!("/jobs/{}/result", second.id), &t).await;
    assert_eq!(damaged.status(), 500);
    b.wait_log("does not match its checksum", 1).await;
    // A deletion through one coordinator is seen by the other.
    assert_eq!(b.delete(&format!("/jobs/{}", first.id), &t).await, 204);
    let gone = a.get(&format!("/jobs/{}", first.id), &t).await;
    assert_eq!(gone.status(), 404);
    assert_eq!(
        pg.number(&format!(
            "SELECT count(*) FROM tiles WHERE job_id = '{}'",
            first.id
        )),
        0
    );
}

#[tokio::test]
async fn a_job_outlives_the_coordinator_it_was_submitted_to() {
    let pg = Postgres::start(true).await;
    let (mut a, a_name) = coordinator(&pg, &["--tile-edge", "32", "--claim-ttl", "2s"]).await;
    let (b, b_name) = coordinator(&pg, &["--tile-edge", "32", "--claim-ttl", "2s"]).await;
    // Each result is held back three seconds: the kill lands mid-job.
    let both = format!("{},{}", a.url, b.url);
    let mut worker = Worker::start_with(
        &both,
        &token("vol", Role::Volunteer),
        1,
        &["--chaos", "slow=1"],
    );
    a.wait_workers_connected(1).await;
    let t = token("ada", Role::Submitter);
    let job = GemmJob::submit(&a, &t, (64, 48, 96), 21).await;
    assert_eq!(job.tiles, 6);
    // Progress made through A, followed through B.
    b.follow(&job.id, &t, |e| e["tiles_done"].as_u64().unwrap_or(0) >= 2)
        .await;
    a.kill9();
    let last: Value = b.wait_job(&job.id, &t).await;
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["tiles_done"], 6);
    let got = b.result_values(&job.id, &t).await;
    assert_close(&got, &job.want, job.k, false);
    worker.wait_log("connecting to coordinator", 2).await;
    // Tiles A had accepted were kept: B never handed them out again.
    let kept = pg.number(&format!(
        "SELECT count(*) FROM tiles WHERE done_by = '{a_name}'"
    ));
    assert!(kept >= 2, "{kept} tiles kept from the killed coordinator");
    let recomputed = pg.number(&format!(
        "SELECT count(*) FROM leases AS l JOIN tiles AS t USING (job_id, i, j) \
         WHERE t.done_by = '{a_name}' AND l.coordinator = '{b_name}'"
    ));
    assert_eq!(recomputed, 0);
    assert_eq!(
        pg.number(&format!(
            "SELECT count(*) FROM tiles WHERE done_by = '{b_name}'"
        )),
        6 - kept
    );
    assert!(worker.try_wait().is_none(), "the worker carried on");
    let metrics = b.metrics().await;
    assert!(metric(&metrics, "tabgrid_tile_claims_total{event=\"reaped\"}") >= 1.0);
    assert!(metric(&metrics, "tabgrid_tile_claims_total{event=\"claimed\"}") >= 1.0);
}

#[tokio::test]
async fn a_coordinator_that_stops_gives_its_tiles_back_at_once() {
    let pg = Postgres::start(true).await;
    // Claims would outlive the test: only giving them back lets B finish the job.
    let ttl = ["--tile-edge", "32", "--claim-ttl", "10m"];
    let (mut a, _) = coordinator(&pg, &ttl).await;
    let (b, _) = coordinator(&pg, &ttl).await;
    let _slow = Worker::start_with(
        &a.url,
        &token("slow", Role::Volunteer),
        1,
        &["--chaos", "slow=1"],
    );
    a.wait_workers_connected(1).await;
    let t = token("ada", Role::Submitter);
    let job = GemmJob::submit(&a, &t, (64, 32, 96), 40).await;
    a.follow(&job.id, &t, |e| e["tiles_done"].as_u64().unwrap_or(0) >= 1)
        .await;
    let held = pg.number("SELECT count(*) FROM tiles WHERE state = 'claimed'");
    assert!(held >= 1, "A holds claims on the tiles its worker computes");
    let _fast = b.worker("fast", 1);
    assert!(a.terminate().success());
    let last = b.wait_job(&job.id, &t).await;
    assert_eq!(last["state"], "done", "{last}");
    let got = b.result_values(&job.id, &t).await;
    assert_close(&got, &job.want, job.k, false);
    assert!(pg.number("SELECT count(*) FROM tiles WHERE claims > 1") >= 1);
}

#[tokio::test]
async fn a_database_that_cannot_be_reached_is_named_at_start() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    for (url, says) in [
        (
            format!("postgres://tabgrid@127.0.0.1:{port}/tabgrid"),
            "opening the store in the database",
        ),
        (
            "postgres://tabgrid@127.0.0.1:notaport/x".to_owned(),
            "--database-url",
        ),
    ] {
        let out = std::process::Command::new(bin("tabgrid"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
            .env("TABGRID_JWT_SECRET", SECRET)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{url}: {stderr}");
    }
}
