//! Redis stream jobs against real Redis servers: the shared one on 127.0.0.1:6379, and one
//! of the test's own that it stops and restarts.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;

use crate::fixtures::{assert_right_frames, jpeg_at, pts_of, ModelServer};
use crate::helpers::{pairs, Db, TestApp};

const LONG: Duration = Duration::from_secs(60);
const SHARED: &str = "redis://127.0.0.1:6379";

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {url} is needed for these tests ({e}); scripts/test starts one")
        })
}

async fn add_frame(c: &mut redis::aio::MultiplexedConnection, key: &str, ts_ms: i64) -> String {
    c.xadd(
        key,
        "*",
        &[
            ("frame", jpeg_at(ts_ms, 64, 48)),
            ("ts_ms", ts_ms.to_string().into_bytes()),
        ],
    )
    .await
    .unwrap()
}

fn key() -> String {
    format!("test:frames:{}", uuid::Uuid::new_v4().simple())
}

async fn app(model: &ModelServer) -> TestApp {
    TestApp::spawn_with(Db::Sqlite, &pairs(&model.env())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_sampled_by_time_and_acked_after_storing() {
    let key = key();
    let mut c = conn(SHARED).await;
    for i in 0..20 {
        add_frame(&mut c, &key, i * 100).await;
    }
    let _: String = c
        .xadd(&key, "*", &[("note", "no frame here")])
        .await
        .unwrap();
    let _: String = c
        .xadd(&key, "*", &[("frame", "not an image"), ("ts_ms", "2500")])
        .await
        .unwrap();
    add_frame(&mut c, &key, 3000).await;

    let model = ModelServer::start().await;
    let app = app(&model).await;
    let id = app
        .start_job(
            json!({"stream_ref": format!("{SHARED}/0/{key}"), "fps": 2, "from_beginning": true}),
        )
        .await;
    let status = app.wait_for(&id, LONG, |s| s["results_count"] == 6).await;
    assert_eq!(
        status["status"], "running",
        "a Redis job runs until cancelled"
    );
    assert_eq!(status["source_type"], "redis");
    let results = app.all_results(&id).await;
    let pts = pts_of(&results);
    assert_eq!(pts, vec![0, 500, 1000, 1500, 2500, 3000]);
    // The entry without a frame is skipped; the undecodable one took its sampling slot and
    // its result is an error saying why.
    let refused = &results[4];
    assert!(refused["output"].is_null(), "{refused}");
    let why = refused["error"].as_str().unwrap_or_default();
    assert!(why.contains("not a JPEG, PNG or WebP"), "{refused}");
    assert_eq!(refused["batch_size"], 0, "never sent to the model");
    let answered: Vec<_> = results
        .iter()
        .filter(|r| r["error"].is_null())
        .cloned()
        .collect();
    assert_eq!(answered.len(), 5);
    assert_right_frames(&answered, 60.0);
    let stats = app
        .wait_for(&id, LONG, |s| s["stats"]["entries_invalid"] == 2)
        .await["stats"]
        .clone();
    assert_eq!(stats["entries_read"], 23, "{stats}");

    // Everything read was acknowledged: stored, skipped by the sampler, or invalid.
    let group = format!("free-roam:{id}");
    let pending = crate::fixtures::pending_after_wait(&mut c, &key, &group).await;
    assert_eq!(pending, 0, "no entry left pending");

    // New entries keep flowing; cancel stops the job.
    add_frame(&mut c, &key, 3500).await;
    app.wait_for(&id, LONG, |s| s["results_count"] == 7).await;
    assert_eq!(
        app.delete(&format!("/api/v1/inference/cancel/{id}"))
            .await
            .status,
        reqwest::StatusCode::OK
    );
    // A cancelled job's consumer group is removed; the stream itself is the user's.
    let mut groups = usize::MAX;
    for _ in 0..50 {
        let info: redis::streams::StreamInfoGroupsReply = c.xinfo_groups(&key).await.unwrap();
        groups = info.groups.len();
        if groups == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(groups, 0, "the job's consumer group is gone after cancel");
    let len: usize = c.xlen(&key).await.unwrap();
    assert_eq!(len, 24, "the stream's entries stay");
    let _: () = c.del(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_entries_are_read_before_new_ones() {
    let key = key();
    let job_id = format!("pending-{}", uuid::Uuid::new_v4().simple());
    let group = format!("free-roam:{job_id}");
    let mut c = conn(SHARED).await;
    let _: () = c.xgroup_create_mkstream(&key, &group, "$").await.unwrap();
    for t in [0, 500, 1000] {
        add_frame(&mut c, &key, t).await;
    }
    // An earlier run took these and died before acknowledging them.
    let opts = redis::streams::StreamReadOptions::default()
        .group(&group, "free-roam")
        .count(10);
    let taken: redis::streams::StreamReadReply =
        c.xread_options(&[&key], &[">"], &opts).await.unwrap();
    assert_eq!(taken.keys[0].ids.len(), 3);
    for t in [1500, 2000] {
        add_frame(&mut c, &key, t).await;
    }

    let model = ModelServer::start().await;
    let app = app(&model).await;
    let id = app
        .start_job(json!({"stream_ref": format!("{SHARED}/{key}"), "job_id": job_id, "fps": 2}))
        .await;
    app.wait_for(&id, LONG, |s| s["results_count"] == 5).await;
    let pts = pts_of(&app.all_results(&id).await);
    assert_eq!(
        pts,
        vec![0, 500, 1000, 1500, 2000],
        "pending entries first, then new ones, each once"
    );
    app.delete(&format!("/api/v1/inference/cancel/{id}")).await;
    let _: () = c.del(&key).await.unwrap();
}

struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        Self { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn wait_redis(url: &str) -> redis::aio::MultiplexedConnection {
    for _ in 0..100 {
        if let Ok(client) = redis::Client::open(url) {
            if let Ok(c) = client.get_multiplexed_async_connection().await {
                return c;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis-server at {url} did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_does_not_fail_the_job() {
    let port = crate::helpers::free_port();
    let mut server = OwnRedis::start(port);
    let mut c = wait_redis(&server.url()).await;
    let key = "frames";
    for t in [0, 500, 1000] {
        add_frame(&mut c, key, t).await;
    }
    let model = ModelServer::start().await;
    let app = app(&model).await;
    let id = app
        .start_job(json!({"stream_ref": format!("{}/0/{key}", server.url()), "fps": 2, "from_beginning": true}))
        .await;
    app.wait_for(&id, LONG, |s| s["results_count"] == 3).await;

    server.stop();
    let s = app
        .wait_for(&id, LONG, |s| {
            s["stats"]["source_state"]
                .as_str()
                .is_some_and(|st| st.starts_with("reconnecting"))
        })
        .await;
    assert_eq!(s["status"], "running", "{s}");
    let health = app.get("/health").await;
    assert_eq!(
        health.body["components"]["redis"]["status"], "error",
        "{}",
        health.body
    );

    let server = OwnRedis::start(port);
    let mut c = wait_redis(&server.url()).await;
    for t in [1500, 2000, 2500] {
        add_frame(&mut c, key, t).await;
    }
    let s = app.wait_for(&id, LONG, |s| s["results_count"] == 6).await;
    assert_eq!(s["status"], "running");
    assert_eq!(s["stats"]["source_state"], "connected");
    assert!(s["stats"]["reconnects"].as_u64().unwrap() >= 1);
    let health = app.get("/health").await;
    assert_eq!(
        health.body["components"]["redis"]["status"], "ok",
        "{}",
        health.body
    );
    let pts = pts_of(&app.all_results(&id).await);
    assert_eq!(pts, vec![0, 500, 1000, 1500, 2000, 2500]);
    app.delete(&format!("/api/v1/inference/cancel/{id}")).await;
}
