//! Evidence and retention: every result keeps the frame the model was asked about (in the
//! database or in a directory), served as JPEG with caching headers; retention deletes
//! frames, results and finished jobs on time, per job where a job says so.

use std::io::Cursor;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{make_hls, Container, ModelServer, Origin};
use crate::helpers::{assert_error, pairs, Db, TestApp};

const LONG: Duration = Duration::from_secs(60);

/// Mean of every RGB sample of a JPEG, and its size.
fn jpeg_brightness(jpeg: &[u8]) -> (f64, u32, u32) {
    let img = image::ImageReader::new(Cursor::new(jpeg))
        .with_guessed_format()
        .unwrap()
        .decode()
        .expect("a decodable JPEG")
        .to_rgb8();
    let raw = img.as_raw();
    let mean = raw.iter().map(|&b| f64::from(b)).sum::<f64>() / raw.len() as f64;
    (mean, img.width(), img.height())
}

async fn frame(app: &TestApp, url: &str) -> reqwest::Response {
    reqwest::get(app.url(url)).await.unwrap()
}

/// A VOD stream of `seconds` at `width`x`height` on a loopback origin, the stand-in model,
/// and the service on `db` with `env` (beside the model's settings).
async fn rig(
    seconds: f64,
    (width, height): (u32, u32),
    db: Db,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, Origin, ModelServer, TestApp) {
    let dir = tempfile::tempdir().unwrap();
    make_hls(
        dir.path(),
        "vod",
        seconds,
        width,
        height,
        Container::Ts,
        2.0,
    );
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let owned = model.env();
    let mut all = pairs(&owned);
    all.extend_from_slice(env);
    let app = TestApp::spawn_with(db, &all).await;
    (dir, origin, model, app)
}

async fn vod_job(app: &TestApp, origin: &Origin, extra: Value) -> String {
    let mut body = json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let id = app.start_job(body).await;
    let done = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(done["status"], "completed", "{done}");
    id
}

/// Each result's frame is the picture its answer is about: the stand-in model answers with
/// the brightness of the JPEG it got, and the kept frame shows the same brightness.
async fn assert_frames_match_answers(app: &TestApp, results: &[Value]) {
    for r in results {
        let url = r["frame_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no frame_url: {r}"));
        let resp = frame(app, url).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "image/jpeg");
        let (mean, w, h) = jpeg_brightness(&resp.bytes().await.unwrap());
        assert_eq!(
            (w, h),
            (640, 360),
            "EVIDENCE_MAX_SIDE bounds the longest side"
        );
        let answer: Value = serde_json::from_str(r["output"].as_str().unwrap()).unwrap();
        let seen = answer["brightness"].as_f64().unwrap();
        assert!(
            (mean - seen).abs() < 2.0,
            "result {} kept a frame of brightness {mean:.1}; the model saw {seen:.1}",
            r["seq"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_result_keeps_the_frame_the_model_saw_in_the_database() {
    let (_dir, origin, _model, app) = rig(4.0, (1280, 720), Db::Sqlite, &[]).await;
    let id = vod_job(&app, &origin, json!({})).await;
    let results = app.all_results(&id).await;
    assert_eq!(results.len(), 8);
    // The ramp brightens by 30 luma a second: frames half a second apart differ clearly,
    // so a frame kept for the wrong result would fail this.
    assert_frames_match_answers(&app, &results).await;

    // Caching: the frame never changes; a conditional request gets 304.
    let url = results[3]["frame_url"].as_str().unwrap();
    assert_eq!(url, format!("/api/v1/inference/results/{id}/3/frame"));
    let first = frame(&app, url).await;
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert!(first.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    let again = reqwest::Client::new()
        .get(app.url(url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    // Missing frames: a JSON 404 each.
    for path in [
        format!("/api/v1/inference/results/{id}/8/frame"),
        format!("/api/v1/inference/results/{id}/-1/frame"),
        "/api/v1/inference/results/no-such-job/0/frame".to_owned(),
        "/api/v1/inference/results/bad%20id/0/frame".to_owned(),
    ] {
        assert_error(&app.get(&path).await, StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_off_keeps_no_frame() {
    let env = [("EVIDENCE", "off")];
    let (_dir, origin, _model, app) = rig(2.0, (320, 180), Db::Sqlite, &env).await;
    let id = vod_job(&app, &origin, json!({})).await;
    let results = app.all_results(&id).await;
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(|r| r.get("frame_url").is_none()));
    let reply = app
        .get(&format!("/api/v1/inference/results/{id}/0/frame"))
        .await;
    assert_error(&reply, StatusCode::NOT_FOUND, "not_found");
}

/// Polls `done` every 200 ms for up to `within`.
async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = std::time::Instant::now() + within;
    while !done().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_a_directory_and_retention_per_job_on_postgres() {
    let frames = tempfile::tempdir().unwrap();
    let frames_dir = frames.path().to_owned();
    let frames_dir_s = frames_dir.display().to_string();
    let env = [
        ("EVIDENCE", "directory"),
        ("EVIDENCE_DIR", frames_dir_s.as_str()),
        ("RETENTION_SWEEP_SECS", "1"),
        ("RETENTION_SWEEP_BATCH", "3"),
        ("RESULTS_RETENTION", "4s"),
        ("EVIDENCE_RETENTION", "1h"),
    ];
    let (_dir, origin, _model, app) = rig(4.0, (1280, 720), Db::Postgres, &env).await;
    // Frames go after 1 s, results after the global 4 s; the other job keeps both.
    let short = vod_job(&app, &origin, json!({"retention": {"evidence": "1s"}})).await;
    let kept = vod_job(
        &app,
        &origin,
        json!({"retention": {"results": "off", "evidence": "off"}}),
    )
    .await;
    let results = app.all_results(&kept).await;
    assert_eq!(results.len(), 8);
    assert_frames_match_answers(&app, &results).await;
    let files = std::fs::read_dir(frames_dir.join(&kept)).unwrap().count();
    assert_eq!(files, 8, "one file per result");

    until(
        Duration::from_secs(20),
        "the short job's frames expire",
        || async {
            app.all_results(&short)
                .await
                .iter()
                .all(|r| r.get("frame_url").is_none())
        },
    )
    .await;
    let gone = app
        .get(&format!("/api/v1/inference/results/{short}/0/frame"))
        .await;
    assert_error(&gone, StatusCode::NOT_FOUND, "not_found");
    assert!(
        !frames_dir.join(&short).exists()
            || std::fs::read_dir(frames_dir.join(&short)).unwrap().count() == 0,
        "its files are deleted"
    );
    until(
        Duration::from_secs(20),
        "the short job's results expire",
        || async { app.all_results(&short).await.is_empty() },
    )
    .await;
    // Paging past deleted results still works, and the count says what was stored.
    let page = app
        .get(&format!("/api/v1/inference/results/{short}?after=2"))
        .await
        .body;
    assert_eq!(page["results"], json!([]));
    assert_eq!(page["total_results"], 8);

    // The job that keeps its own still has everything.
    let results = app.all_results(&kept).await;
    assert_eq!(results.len(), 8);
    assert_frames_match_answers(&app, &results).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_deleted_after_job_retention() {
    let env = [("RETENTION_SWEEP_SECS", "1"), ("JOB_RETENTION", "2s")];
    let (_dir, origin, _model, app) = rig(2.0, (320, 180), Db::Sqlite, &env).await;
    let id = vod_job(&app, &origin, json!({"prompt": "own prompt"})).await;
    until(
        Duration::from_secs(20),
        "the finished job is deleted",
        || async {
            app.get(&format!("/api/v1/inference/status/{id}"))
                .await
                .status
                == StatusCode::NOT_FOUND
        },
    )
    .await;
    for path in [
        format!("/api/v1/inference/results/{id}"),
        format!("/api/v1/inference/results/{id}/0/frame"),
    ] {
        assert_error(&app.get(&path).await, StatusCode::NOT_FOUND, "not_found");
    }
    let history = app
        .get(&format!("/api/v1/prompt/history?job_id={id}"))
        .await;
    assert!(
        history.status == StatusCode::NOT_FOUND || history.body["versions"] == json!([]),
        "its prompt versions are gone: {}",
        history.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_values_are_checked() {
    let app = TestApp::spawn(Db::Sqlite).await;
    for bad in [
        json!({"results": "soon"}),
        json!({"evidence": "0s"}),
        json!({"other": "1d"}),
    ] {
        let reply = app
            .post(
                "/api/v1/inference/start",
                json!({"stream_ref": "https://example.com/a.m3u8", "retention": bad}),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            reply.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_asks_the_stored_frames_again_with_a_new_prompt() {
    let env = [("MAX_REPLAY_FRAMES", "5")];
    let (_dir, origin, model, app) = rig(4.0, (1280, 720), Db::Sqlite, &env).await;
    let id = vod_job(&app, &origin, json!({"prompt": "first prompt"})).await;
    let originals = app.all_results(&id).await;
    let asked_before = model.asked().len();

    let reply = app
        .post(
            "/api/v1/inference/replay",
            json!({"job_id": id, "from_seq": 2, "to_seq": 5, "prompt": "second prompt"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let replay = reply.body["job_id"].as_str().unwrap().to_owned();
    let done = app
        .wait_status(&replay, &["completed", "failed"], LONG)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["source_type"], "replay");
    assert_eq!(done["frames_processed"], 4, "{done}");
    let results = app.all_results(&replay).await;
    assert_eq!(results.len(), 4);
    assert_eq!(
        model.asked().len() - asked_before,
        4,
        "one model call per frame"
    );
    for (r, seq) in results.iter().zip(2..) {
        let original = &originals[seq as usize];
        assert_eq!(r["replay_of"], json!({"job_id": id, "seq": seq}), "{r}");
        assert_eq!(r["pts_ms"], original["pts_ms"]);
        let answer: Value = serde_json::from_str(r["output"].as_str().unwrap()).unwrap();
        let before: Value = serde_json::from_str(original["output"].as_str().unwrap()).unwrap();
        assert_eq!(answer["prompt"], "second prompt");
        assert_eq!(before["prompt"], "first prompt");
        // The same picture: the stored frame (640 wide) against the one first sent (768).
        let (now, was) = (
            answer["brightness"].as_f64().unwrap(),
            before["brightness"].as_f64().unwrap(),
        );
        assert!((now - was).abs() < 2.0, "seq {seq}: {now:.1} vs {was:.1}");
    }
    assert_frames_match_answers(&app, &results).await;

    // Bad replays: over the limit (saying it), past the results, reversed, unknown job.
    let over = app
        .post(
            "/api/v1/inference/replay",
            json!({"job_id": id, "from_seq": 0, "to_seq": 5, "prompt": "p"}),
        )
        .await;
    assert_error(&over, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert!(over.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 5 frames (MAX_REPLAY_FRAMES)"));
    for (from, to) in [(6, 8), (3, 2), (-1, 0)] {
        let r = app
            .post(
                "/api/v1/inference/replay",
                json!({"job_id": id, "from_seq": from, "to_seq": to, "prompt": "p"}),
            )
            .await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    }
    let unknown = app
        .post(
            "/api/v1/inference/replay",
            json!({"job_id": "nope", "from_seq": 0, "to_seq": 0, "prompt": "p"}),
        )
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found");
}

/// moto's S3-compatible server (tests/s3_server.py, PyPI) on 127.0.0.1, with one bucket.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl S3Server {
    async fn start(bucket: &str) -> Self {
        use std::process::{Command, Stdio};
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3_server.py");
        let mut child = Command::new(crate::helpers::tools_python())
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the tools venv runs moto (scripts/setup-system.sh --services installs it)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line.trim().parse().expect("the server prints its port");
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let made = reqwest::Client::new()
            .put(format!("{}/{bucket}", server.endpoint))
            .send()
            .await
            .unwrap();
        assert!(made.status().is_success(), "bucket created: {made:?}");
        server
    }

    /// The keys under `prefix` in `bucket`.
    async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let xml = reqwest::get(format!(
            "{}/{bucket}?list-type=2&prefix={prefix}",
            self.endpoint
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        xml.split("<Key>")
            .skip(1)
            .map(|k| k.split("</Key>").next().unwrap().to_string())
            .collect()
    }
}

impl S3Server {
    /// The service's settings for frames in this server's bucket `url` (s3://...), with
    /// static keys, and `more`.
    fn env(&self, url: &str, more: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("EVIDENCE", "s3".to_string()),
            ("EVIDENCE_S3_URL", url.to_string()),
            ("EVIDENCE_S3_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test-key".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test-secret".to_string()),
            ("RETENTION_SWEEP_SECS", "1".to_string()),
        ];
        env.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
        env
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_an_s3_bucket_expire_and_a_failing_bucket_loses_no_result() {
    let mut s3 = S3Server::start("frames").await;
    let env = s3.env(
        "s3://frames/evidence/v1",
        &[("AWS_REGION", "eu-west-1"), ("RETENTION_SWEEP_BATCH", "3")],
    );
    let (_dir, origin, _model, app) = rig(4.0, (1280, 720), Db::Sqlite, &pairs(&env)).await;
    let short = vod_job(&app, &origin, json!({"retention": {"evidence": "2s"}})).await;
    let kept = vod_job(&app, &origin, json!({"retention": {"evidence": "off"}})).await;

    // One object per result, where the prefix says, each the picture its answer is about.
    let results = app.all_results(&kept).await;
    assert_eq!(results.len(), 8);
    assert_frames_match_answers(&app, &results).await;
    let mut keys = s3.keys("frames", &format!("evidence/v1/{kept}/")).await;
    keys.sort_by_key(|k| k.len());
    let expected: Vec<String> = (0..8)
        .map(|seq| format!("evidence/v1/{kept}/{seq}.jpg"))
        .collect();
    assert_eq!(keys, expected);

    // The short job's frames expire: gone from the bucket, 404, no frame_url.
    until(
        Duration::from_secs(20),
        "the short job's objects are deleted",
        || async {
            s3.keys("frames", &format!("evidence/v1/{short}/"))
                .await
                .is_empty()
        },
    )
    .await;
    let gone = app
        .get(&format!("/api/v1/inference/results/{short}/0/frame"))
        .await;
    assert_error(&gone, StatusCode::NOT_FOUND, "not_found");
    assert!(app
        .all_results(&short)
        .await
        .iter()
        .all(|r| r.get("frame_url").is_none()));
    assert_eq!(
        s3.keys("frames", &format!("evidence/v1/{kept}/"))
            .await
            .len(),
        8
    );

    // The bucket goes away: results are still stored, without frames, and the service goes on.
    let _ = s3.child.kill();
    let _ = s3.child.wait();
    let blind = vod_job(&app, &origin, json!({})).await;
    let results = app.all_results(&blind).await;
    assert_eq!(results.len(), 8, "every answer is stored");
    assert!(
        results
            .iter()
            .all(|r| r.get("frame_url").is_none() && r["error"].is_null()),
        "{results:?}"
    );
    let unread = app
        .get(&format!("/api/v1/inference/results/{kept}/0/frame"))
        .await;
    assert_error(&unread, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_job_takes_its_objects_with_it() {
    let s3 = S3Server::start("frames").await;
    let env = s3.env("s3://frames", &[("JOB_RETENTION", "3s")]);
    let (_dir, origin, _model, app) = rig(2.0, (320, 180), Db::Postgres, &pairs(&env)).await;
    let id = vod_job(&app, &origin, json!({})).await;
    // Read at once: the job is deleted 3 s after it finished.
    let listed = s3.keys("frames", &format!("{id}/")).await;
    assert_eq!(listed.len(), 4, "{listed:?}");
    until(
        Duration::from_secs(20),
        "the finished job and its objects are deleted",
        || async {
            s3.keys("frames", &format!("{id}/")).await.is_empty()
                && app
                    .get(&format!("/api/v1/inference/status/{id}"))
                    .await
                    .status
                    == StatusCode::NOT_FOUND
        },
    )
    .await;
}
