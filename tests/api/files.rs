//! Files as sources: an MP4 over HTTP read with Range requests (its index at the end), a file
//! from a server that ignores Range, local files under MEDIA_ROOT and nothing outside it.
//! Each is read once like a VOD, its frames the ones at their `pts_ms`, then `completed`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{assert_right_frames, make_file, pts_of, ModelServer, Origin, Route};
use crate::helpers::{assert_error, pairs, Db, TestApp};
use crate::replicas::{all_results, start_then_kill, wait_all, Replica};

const LONG: Duration = Duration::from_secs(60);

async fn app_with_model(model: &ModelServer, env: &[(&str, &str)]) -> TestApp {
    let owned = model.env();
    let mut all = pairs(&owned);
    all.extend_from_slice(env);
    TestApp::spawn_with(Db::Sqlite, &all).await
}

/// Runs a job on `stream_ref` at 2 fps to its end and returns its results.
async fn read_whole(app: &TestApp, stream_ref: &str) -> (Value, Vec<Value>) {
    let id = app
        .start_job(json!({"stream_ref": stream_ref, "fps": 2}))
        .await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["source_type"], "file", "{status}");
    (status, app.all_results(&id).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mp4_over_http_with_its_index_at_the_end_is_read_with_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = make_file(dir.path(), "clip.mp4", 6.0);
    let bytes = std::fs::read(&mp4).unwrap();
    let moov = bytes.windows(4).position(|w| w == b"moov").unwrap();
    let mdat = bytes.windows(4).position(|w| w == b"mdat").unwrap();
    assert!(moov > mdat, "the test file keeps its index at the end");
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = app_with_model(&model, &[]).await;

    let (status, results) = read_whole(&app, &origin.url("clip.mp4")).await;
    assert_eq!(
        pts_of(&results),
        (0..12).map(|i| i * 500).collect::<Vec<_>>(),
        "every sample of the 6 s file, once"
    );
    assert_right_frames(&results, 80.0);
    assert_eq!(status["stats"]["frames_sampled"], 12, "{status}");
    let ranges = origin.ranges();
    assert!(
        !ranges.is_empty() && ranges.iter().all(|r| r.starts_with("bytes=")),
        "read with Range requests: {ranges:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_from_a_server_without_range_support_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let ts = make_file(dir.path(), "clip.ts", 4.0);
    let origin = Origin::start(dir.path()).await;
    // This route answers 200 with the whole body whatever the Range.
    origin.route("plain/clip.ts", Route::Bytes(std::fs::read(ts).unwrap()));
    let model = ModelServer::start().await;
    let app = app_with_model(&model, &[]).await;
    let (_, results) = read_whole(&app, &origin.url("plain/clip.ts")).await;
    assert_eq!(
        pts_of(&results),
        (0..8).map(|i| i * 500).collect::<Vec<_>>()
    );
    assert_right_frames(&results, 80.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_are_read_under_media_root_only() {
    let root = tempfile::tempdir().unwrap();
    let mkv = make_file(root.path(), "clip.mkv", 3.0);
    let model = ModelServer::start().await;
    let media_root = root.path().to_str().unwrap();
    let app = app_with_model(&model, &[("MEDIA_ROOT", media_root)]).await;

    let (_, results) = read_whole(&app, &format!("file://{}", mkv.display())).await;
    assert_eq!(
        pts_of(&results),
        (0..6).map(|i| i * 500).collect::<Vec<_>>()
    );
    assert_right_frames(&results, 80.0);

    // Out of MEDIA_ROOT by `..`, a file that is not there, not a file at all: refused at once.
    for (stream_ref, says) in [
        (
            format!("file://{media_root}/../../etc/passwd"),
            "outside MEDIA_ROOT",
        ),
        (
            format!("file://{media_root}/%2e%2e/%2e%2e/etc/hostname"),
            "outside MEDIA_ROOT",
        ),
        (
            format!("file://{media_root}/missing.mp4"),
            "no readable file",
        ),
        (format!("file://{media_root}"), "not a regular file"),
    ] {
        let reply = app
            .post("/api/v1/inference/start", json!({"stream_ref": stream_ref}))
            .await;
        assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{stream_ref}: {message}");
        assert_eq!(reply.body["error"]["param"], "stream_ref");
    }

    // Without MEDIA_ROOT no local file is read, and the error says how to allow it.
    let closed = app_with_model(&model, &[]).await;
    let reply = closed
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": format!("file://{}", mkv.display())}),
        )
        .await;
    assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert!(reply.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("set MEDIA_ROOT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_video_fails_the_job_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("notes.mp4"),
        b"these are not frames".repeat(100),
    )
    .unwrap();
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = app_with_model(&model, &[]).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("notes.mp4")}))
        .await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "failed", "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("not a readable video file"),
        "{status}"
    );
    // The service goes on: the next request is served.
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_job_killed_midway_resumes_and_answers_each_frame_once() {
    let dir = tempfile::tempdir().unwrap();
    make_file(dir.path(), "clip.mp4", 6.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    model.set_delay(Duration::from_millis(150));
    let db = format!("sqlite://{}/free-roam.db?mode=rwc", dir.path().display());
    // One request at a time, so the process is killed with most of the file still to read.
    let slow = [("MAX_BATCH_SIZE", "1"), ("OPENAI_MAX_CONCURRENCY", "1")];
    let mut first = Replica::start_env("one", &db, &model, 1, dir.path(), &slow).await;
    let body = json!({"stream_ref": origin.url("clip.mp4"), "fps": 2});
    let id = start_then_kill(&mut first, &body, 5).await;
    let again = Replica::start_env("one-again", &db, &model, 1, dir.path(), &slow).await;
    let st = wait_all(&again.base, std::slice::from_ref(&id), LONG).await;
    assert_eq!(st[0]["status"], "completed", "{}", st[0]);
    let results = all_results(&again.base, &id).await;
    assert_eq!(
        pts_of(&results),
        (0..12).map(|i| i * 500).collect::<Vec<_>>(),
        "each frame of the file answered once, in order"
    );
    assert_right_frames(&results, 80.0);
}
