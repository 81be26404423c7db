//! Spending the model only where something happens: change gating (a scene that does not
//! move except in known windows, under flickering light, sensor noise and heavy compression)
//! and clips (several consecutive samples in one request, results tiling the stream), with a
//! gated job killed and resumed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{
    brightness_to_ms, make_hls, make_hls_filtered, pts_of, segments_of, Container, Live,
    ModelServer, Origin, Route,
};
use crate::helpers::{assert_error, pairs, Db, TestApp};
use crate::replicas::{all_results, start_then_kill, wait_all, Replica};

const LONG: Duration = Duration::from_secs(90);

/// A 640x360 scene that does not move: a texture under a light flickering by ±3% every 4 s,
/// with temporal sensor noise, encoded by x264 at CRF 32 (visibly blocky). In each `figure`
/// window (seconds, inclusive) a dark figure stands in it (80x200, 7% of the picture).
fn scene(dir: &Path, name: &str, seconds: f64, figure: &[(f64, f64)]) -> PathBuf {
    let enable: Vec<String> = figure
        .iter()
        .map(|(from, to)| format!("between(t,{from},{to})"))
        .collect();
    let figure = if enable.is_empty() {
        String::new()
    } else {
        format!(
            ",drawbox=x=280:y=90:w=80:h=200:color=0x303030:t=fill:enable='{}'",
            enable.join("+")
        )
    };
    let filter = format!(
        "color=c=gray:s=640x360:r=30:d={seconds},\
         geq=lum='128+50*sin(X/23)*cos(Y/17)':cb=128:cr=128{figure},\
         eq=brightness='0.03*sin(2*PI*t/4)':eval=frame,noise=alls=10:allf=t,format=yuv420p"
    );
    make_hls_filtered(
        dir,
        name,
        &filter,
        "yuv420p",
        Container::Ts,
        2.0,
        &["-crf", "32"],
    )
}

async fn app_with(model: &ModelServer, env: &[(&str, &str)]) -> TestApp {
    let owned = model.env();
    let mut all = pairs(&owned);
    all.extend_from_slice(env);
    TestApp::spawn_with(Db::Sqlite, &all).await
}

/// Runs a job to its end and returns its status and results.
async fn run(app: &TestApp, body: Value) -> (Value, Vec<Value>) {
    let id = app.start_job(body).await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    (status, app.all_results(&id).await)
}

/// The `pts_ms` of the results the model answered (not repeats).
fn answered(results: &[Value]) -> Vec<i64> {
    results
        .iter()
        .filter(|r| r.get("repeats_seq").is_none())
        .map(|r| r["pts_ms"].as_i64().unwrap())
        .collect()
}

/// Each result's (`pts_ms`, `pts_end_ms`): what a clip's result covers.
fn ranges_of(results: &[Value]) -> Vec<(i64, i64)> {
    results
        .iter()
        .map(|r| {
            let at = |f: &str| r[f].as_i64().unwrap_or_else(|| panic!("{f} in {r}"));
            (at("pts_ms"), at("pts_end_ms"))
        })
        .collect()
}

/// Every repeat names an earlier answer the model gave and carries that answer.
fn assert_repeats_point_back(results: &[Value]) {
    for r in results {
        let Some(of) = r.get("repeats_seq") else {
            continue;
        };
        let of = of.as_i64().unwrap();
        assert!(of < r["seq"].as_i64().unwrap(), "{r}");
        let answer = &results[of as usize];
        assert!(answer.get("repeats_seq").is_none(), "{answer}");
        assert_eq!(answer["output"], r["output"], "{r}");
        assert_eq!(r["batch_size"], 0, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_job_asks_about_each_event_and_repeats_the_still_scene() {
    let dir = tempfile::tempdir().unwrap();
    scene(dir.path(), "scene", 40.0, &[(10.0, 13.0), (30.0, 33.0)]);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = app_with(&model, &[]).await;
    let url = origin.url("scene/index.m3u8");

    let (status, results) = run(
        &app,
        json!({"stream_ref": url, "fps": 2, "gate": {"mode": "change"}}),
    )
    .await;
    assert_eq!(
        status["gate"],
        json!({"threshold": 0.003, "max_interval_s": 30.0})
    );
    // Every sample has its result, in order: a timeline stays dense.
    let pts = pts_of(&results);
    assert_eq!(pts, (0..80).map(|i| i * 500).collect::<Vec<_>>());
    // The figure's arrival and departure are each asked about at the first sample that
    // shows them; the flicker, noise and blocks in between are not.
    assert_eq!(answered(&results), [0, 10_000, 13_500, 30_000, 33_500]);
    assert_eq!(model.asked().len(), 5);
    assert_repeats_point_back(&results);
    // Inside a window the repeated answer is the one about the figure.
    let in_window = &results[22]; // 11 s
    assert_eq!(in_window["repeats_seq"], 20, "{in_window}");
    assert_eq!(status["stats"]["frames_gated"], 75, "{status}");
    assert_eq!(status["stats"]["model_calls_saved"], 75, "{status}");
    let id = status["job_id"].as_str().unwrap();
    let metrics = app.get("/metrics").await.body;
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains(&format!(
            "free_roam_model_calls_saved_total{{job_id=\"{id}\"}} 75"
        )),
        "{}",
        text.lines()
            .filter(|l| l.contains("saved"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Gating and clips together: a clip goes to the model when any of its pictures changed.
    let (_, clips) = run(
        &app,
        json!({"stream_ref": url, "fps": 2, "gate": {"mode": "change"}, "clip": {"frames": 4}}),
    )
    .await;
    assert_eq!(clips.len(), 20);
    assert_eq!(answered(&clips), [0, 10_000, 12_000, 30_000, 32_000]);
    assert_repeats_point_back(&clips);
    for c in &clips {
        assert_eq!(
            c["pts_end_ms"].as_i64(),
            Some(c["pts_ms"].as_i64().unwrap() + 1500),
            "{c}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_still_noisy_scene_is_asked_about_only_every_max_interval() {
    let dir = tempfile::tempdir().unwrap();
    scene(dir.path(), "still", 12.0, &[]);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = app_with(&model, &[]).await;
    let (status, results) = run(
        &app,
        json!({
            "stream_ref": origin.url("still/index.m3u8"), "fps": 2,
            "gate": {"mode": "change", "max_interval_s": 4}
        }),
    )
    .await;
    assert_eq!(results.len(), 24);
    assert_eq!(answered(&results), [0, 4000, 8000]);
    assert_repeats_point_back(&results);
    assert_eq!(status["stats"]["frames_gated"], 21, "{status}");

    // A bad gate or clip is refused by field, and the service goes on.
    let url = origin.url("still/index.m3u8");
    for (body, field) in [
        (json!({"gate": {"mode": "motion"}}), "gate.mode"),
        (
            json!({"gate": {"mode": "change", "threshold": 0}}),
            "gate.threshold",
        ),
        (
            json!({"gate": {"mode": "change", "max_interval_s": 0.5}}),
            "gate.max_interval_s",
        ),
        (json!({"clip": {"frames": 1}}), "clip.frames"),
        (
            json!({"clip": {"frames": 4, "stride_s": 1}, "fps": 2}),
            "clip.stride_s",
        ),
        (json!({"clip": {"frames": 9}}), "clip.frames"),
    ] {
        let mut body = body;
        body["stream_ref"] = json!(url);
        let r = app.post("/api/v1/inference/start", body.clone()).await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        assert!(r.body.to_string().contains(field), "{body}: {}", r.body);
    }
    let r = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "frames", "clip": {"frames": 2}}),
        )
        .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert!(r.body.to_string().contains("video sources"), "{}", r.body);
    // OPENAI_MAX_IMAGES (8 by default) is named when a clip asks for more.
    let r = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": url, "clip": {"frames": 9}}),
        )
        .await;
    assert!(
        r.body.to_string().contains("at most 8 images"),
        "{}",
        r.body
    );
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
    // Both are in the OpenAPI document, and so are a result's fields for them.
    let doc = app.get("/openapi.json").await.body;
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("StartRequest", "gate"),
        ("StartRequest", "clip"),
        ("GateRequest", "threshold"),
        ("ClipRequest", "stride_s"),
        ("ResultView", "repeats_seq"),
        ("ResultView", "pts_end_ms"),
    ] {
        assert!(
            schemas[schema]["properties"][field].is_object(),
            "{schema}.{field} missing from the OpenAPI document"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_job_sends_its_samples_together_and_its_results_tile_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "ramp", 6.0, 320, 180, Container::Ts, 2.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = app_with(&model, &[]).await;
    let url = origin.url("ramp/index.m3u8");

    let (_, results) = run(
        &app,
        json!({"stream_ref": url, "fps": 2, "clip": {"frames": 3}, "prompt": "what happens?"}),
    )
    .await;
    let asked = model.asked();
    assert_eq!(asked.len(), 4, "one request per 3 samples");
    for a in &asked {
        assert_eq!(a.brightness.len(), 3);
        assert_eq!(
            a.labels,
            [
                "Frame 1 of 3 at +0.0 s:",
                "Frame 2 of 3 at +0.5 s:",
                "Frame 3 of 3 at +1.0 s:"
            ]
        );
    }
    // Results cover [pts_ms, pts_end_ms]: back to back, no overlap, no gap.
    let ranges = ranges_of(&results);
    assert_eq!(
        ranges,
        [(0, 1000), (1500, 2500), (3000, 4000), (4500, 5500)]
    );
    // Each result's images are the frames at its samples, in time order.
    for r in &results {
        let answer: Value = serde_json::from_str(r["output"].as_str().unwrap()).unwrap();
        let seen: Vec<f64> = answer["clip"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| brightness_to_ms(b.as_f64().unwrap()))
            .collect();
        let start = r["pts_ms"].as_f64().unwrap();
        for (i, ms) in seen.iter().enumerate() {
            let want = start + 500.0 * i as f64;
            assert!(
                (ms - want).abs() <= 80.0,
                "image {i} of {r} shows {ms:.0} ms"
            );
        }
    }

    // A stride leaves samples out between clips.
    let (_, strided) = run(
        &app,
        json!({"stream_ref": url, "fps": 2, "clip": {"frames": 2, "stride_s": 2}}),
    )
    .await;
    let ranges = ranges_of(&strided);
    assert_eq!(ranges, [(0, 500), (2000, 2500), (4000, 4500)]);

    // A server that takes two images per request cannot serve three.
    let narrow = app_with(&model, &[("OPENAI_MAX_IMAGES", "2")]).await;
    let r = narrow
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": url, "clip": {"frames": 3}}),
        )
        .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert!(
        r.body.to_string().contains("at most 2 images per request"),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_job_killed_midway_compares_against_the_same_picture_after_resuming() {
    let dir = tempfile::tempdir().unwrap();
    let rendition = scene(dir.path(), "still", 16.0, &[]);
    let (header, segments) = segments_of(&rendition.join("index.m3u8"));
    let origin = Origin::start(dir.path()).await;
    // A live stream that grows by one 2 s segment every 700 ms, then ends.
    origin.route(
        "still/live.m3u8",
        Route::Live(Live {
            header,
            segments,
            initial: 1,
            every: Duration::from_millis(700),
            stall_at: None,
            end: true,
            started: std::time::Instant::now(),
        }),
    );
    let model = ModelServer::start().await;
    let db = format!("sqlite://{}/free-roam.db?mode=rwc", dir.path().display());
    let mut first = Replica::start_env("one", &db, &model, 1, dir.path(), &[]).await;
    let body = json!({
        "stream_ref": origin.url("still/live.m3u8"), "fps": 2, "from_beginning": true,
        "gate": {"mode": "change", "max_interval_s": 60}
    });
    let id = start_then_kill(&mut first, &body, 6).await;
    let again = Replica::start_env("one-again", &db, &model, 1, dir.path(), &[]).await;
    let st = wait_all(&again.base, std::slice::from_ref(&id), LONG).await;
    assert_eq!(st[0]["status"], "completed", "{}", st[0]);
    let results = all_results(&again.base, &id).await;
    let pts = pts_of(&results);
    assert_eq!(
        pts,
        (0..32).map(|i| i * 500).collect::<Vec<_>>(),
        "each sample once"
    );
    // The resumed gate compared the next pictures with the one the model saw before the
    // kill: no second call for an unchanged scene, and every repeat names that answer.
    assert_eq!(answered(&results), [0]);
    assert_eq!(model.asked().len(), 1);
    assert_repeats_point_back(&results);
}

/// A 160x90 JPEG of a fixed texture; with `figure` a dark block stands in it.
fn textured_jpeg(figure: bool) -> Vec<u8> {
    let img = image::RgbImage::from_fn(160, 90, |x, y| {
        let v = if figure && (60..90).contains(&x) && (20..80).contains(&y) {
            30
        } else {
            (128.0 + 60.0 * ((x as f64 / 7.0).sin() * (y as f64 / 5.0).cos())) as u8
        };
        image::Rgb([v, v, v])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode(img.as_raw(), 160, 90, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_redis_job_asks_about_changed_entries_and_acknowledges_every_one() {
    use redis::AsyncCommands;
    let mut c = crate::fixtures::local_redis().await;
    let key = format!("test:gated:{}", uuid::Uuid::new_v4().simple());
    // 0-2.5 s still, 3-4.5 s a figure stands in it, 5-6.5 s still again.
    for i in 0..14i64 {
        let ts = i * 500;
        let frame = textured_jpeg((3000..5000).contains(&ts));
        let _: String = c
            .xadd(
                &key,
                "*",
                &[("frame", frame), ("ts_ms", ts.to_string().into_bytes())],
            )
            .await
            .unwrap();
    }
    let model = ModelServer::start().await;
    let app = app_with(&model, &[]).await;
    let id = app
        .start_job(json!({
            "stream_ref": key, "fps": 2, "from_beginning": true, "gate": {"mode": "change"}
        }))
        .await;
    let deadline = std::time::Instant::now() + LONG;
    let results = loop {
        let results = app.all_results(&id).await;
        if results.len() >= 14 {
            break results;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} results",
            results.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answered(&results), [0, 3000, 5000]);
    assert_repeats_point_back(&results);
    // Every entry is acknowledged once its result (a repeat or an answer) is stored.
    let group = format!("free-roam:{id}");
    let pending = crate::fixtures::pending_after_wait(&mut c, &key, &group).await;
    assert_eq!(pending, 0, "no entry left pending");
    let status = app
        .get(&format!("/api/v1/inference/status/{id}"))
        .await
        .body;
    assert_eq!(status["stats"]["frames_gated"], 11, "{status}");
}
