//! The in-process candle engine, end to end, on tiny PaliGemmas the project writes itself
//! and loads through the same code path as real weights.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixtures::{make_hls, Container, Origin};
use crate::helpers::{Db, TestApp};
use free_roam::vlm::candle::tiny::make_tiny_model;

const LONG: Duration = Duration::from_secs(120);

fn tiny(dir: &Path, name: &str) -> String {
    let d = dir.join(name);
    make_tiny_model(&d, 28, 1).expect("tiny model");
    d.display().to_string()
}

async fn spawn(env: &[(&str, &str)]) -> TestApp {
    let mut all = vec![
        ("MODEL_TYPE", "auto"),
        ("OPENAI_BASE_URL", ""),
        ("ALLOW_PRIVATE_NETWORKS", "true"),
        ("MAX_NEW_TOKENS", "4"),
    ];
    all.extend_from_slice(env);
    TestApp::spawn_with(Db::Sqlite, &all).await
}

async fn wait_ready(app: &TestApp) -> Value {
    for _ in 0..600 {
        let r = app.get("/health/ready").await;
        if r.status == reqwest::StatusCode::OK {
            return r.body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never ready: {}", app.get("/health/ready").await.body);
}

async fn reasons(app: &TestApp, want: &str) -> String {
    for _ in 0..300 {
        let r = app.get("/health/ready").await;
        let text = r.body["reasons"].to_string();
        if text.contains(want) {
            assert_eq!(r.status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                app.get("/health/live").await.status,
                reqwest::StatusCode::OK,
                "liveness stays 200"
            );
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "readiness never said {want:?}: {}",
        app.get("/health/ready").await.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_paligemma_answers_an_hls_stream_after_warmup() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "tiny-a");
    let settings = free_roam::config::Settings::from_sources(
        None,
        None,
        [("MODEL_PATH".to_owned(), model.clone())]
            .into_iter()
            .collect(),
    )
    .unwrap();
    let before = free_roam::vlm::Models::from_settings(&settings).readiness();
    assert!(
        matches!(before, free_roam::vlm::Readiness::Loading(_)),
        "not ready before warmup: {before:?}"
    );

    make_hls(dir.path(), "vod", 2.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let app = spawn(&[("MODEL_PATH", &model)]).await;
    // A job accepted before the model is ready waits for it.
    let id = app
        .start_job(
            json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2, "prompt": "caption en"}),
        )
        .await;
    let ready = wait_ready(&app).await;
    assert_eq!(ready["status"], "ready");
    let s = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(s["status"], "completed", "{s}");
    let results = app.all_results(&id).await;
    assert_eq!(results.len(), 4);
    for r in &results {
        assert!(r["error"].is_null(), "{r}");
        // The tiny model's random weights never pick <eos>: answers run to MAX_NEW_TOKENS.
        assert!(
            !r["output"].as_str().unwrap().is_empty(),
            "decoded tokens come back as text: {r}"
        );
        assert_eq!(r["model"], "tiny-a");
        assert!(r["latency_ms"]["inference"].as_f64().unwrap() > 0.0);
    }
    assert!(
        results
            .iter()
            .any(|r| r["batch_size"].as_i64().unwrap() > 1),
        "frames are batched: {results:?}"
    );
    for phase in ["queue", "preprocess", "inference", "total"] {
        assert!(
            s["latency_ms"][phase]["p95"].is_number(),
            "status has p95 of {phase}: {}",
            s["latency_ms"]
        );
    }
    assert_eq!(s["models_loaded"][0]["name"], "tiny-a");
    let metrics = app.send(app.client.get(app.url("/metrics"))).await.body;
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("free_roam_stage_seconds_bucket{stage=\"inference\",model=\"tiny-a\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_on_two_models_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny(dir.path(), "tiny-a");
    let b = tiny(dir.path(), "tiny-b");
    make_hls(dir.path(), "vod", 2.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let extra = format!("tiny-b={b}");
    let app = spawn(&[("MODEL_PATH", &a), ("EXTRA_MODELS", &extra)]).await;
    wait_ready(&app).await;
    let j1 = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8")}))
        .await;
    let j2 = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "model": "tiny-b"}))
        .await;
    let j3 = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "model": "nope"}))
        .await;
    for (id, model) in [(&j1, "tiny-a"), (&j2, "tiny-b")] {
        assert_eq!(
            app.wait_status(id, &["completed", "failed"], LONG).await["status"],
            "completed"
        );
        let results = app.all_results(id).await;
        assert!(
            !results.is_empty()
                && results
                    .iter()
                    .all(|r| r["model"] == model && r["error"].is_null()),
            "{results:?}"
        );
    }
    // A model nobody configured fails the job at once, naming the known ones.
    let s3 = app.wait_status(&j3, &["completed", "failed"], LONG).await;
    assert_eq!(s3["status"], "failed", "{s3}");
    let why = s3["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("unknown model") && why.contains("tiny-b"),
        "{s3}"
    );
    assert!(app.all_results(&j3).await.is_empty());
    let s = app
        .get(&format!("/api/v1/inference/status/{j1}"))
        .await
        .body;
    let mut loaded: Vec<&str> = s["models_loaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    loaded.sort_unstable();
    assert_eq!(loaded, vec!["tiny-a", "tiny-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_mismatched_and_oversized_models_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = tiny(dir.path(), "missing");
    std::fs::remove_file(Path::new(&missing).join("tokenizer.json")).unwrap();
    let app = spawn(&[("MODEL_PATH", &missing)]).await;
    let why = reasons(&app, "tokenizer.json is missing").await;
    assert!(why.contains("MODEL_PATH"), "{why}");

    // Configs the reference would refuse (or fail to run) are refused at load, by field.
    type Edit = fn(&mut Value);
    let edits: [(&str, Edit, &str); 4] = [
        (
            "hidden",
            |c| c["text_config"]["hidden_size"] = json!(32),
            "must equal text_config.hidden_size (32)",
        ),
        (
            "projection",
            |c| {
                c.as_object_mut().unwrap().remove("projection_dim");
            },
            "projection_dim (2048",
        ),
        (
            "patches",
            |c| c["vision_config"]["image_size"] = json!(30),
            "vision_config.image_size (30) is not a multiple of vision_config.patch_size (14)",
        ),
        (
            "weights",
            |c| c["text_config"]["intermediate_size"] = json!(96),
            "config.json does not match the weights",
        ),
    ];
    for (name, edit, want) in edits {
        let model = tiny(dir.path(), name);
        let cfg_path = Path::new(&model).join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let app = spawn(&[("MODEL_PATH", &model)]).await;
        reasons(&app, want).await;
    }

    let ok = tiny(dir.path(), "ok");
    let app = spawn(&[("MODEL_PATH", &ok), ("MODEL_CACHE_BYTES", "1000")]).await;
    reasons(&app, "MODEL_CACHE_BYTES").await;

    let app = spawn(&[]).await;
    let r = app.get("/health/ready").await;
    assert!(
        r.body["reasons"].to_string().contains("MODEL_PATH"),
        "no model: says what to set"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_hub_says_how_to_supply_the_model() {
    // nextest runs each test in its own process, so this environment is this test's alone.
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let app = spawn(&[
        ("MODEL_ID", "google/paligemma-3b-mix-224"),
        ("MODEL_REVISION", "main"),
    ])
    .await;
    let why = reasons(&app, "cannot fetch MODEL_ID=google/paligemma-3b-mix-224").await;
    assert!(why.contains("MODEL_PATH"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_image_model_refuses_a_clip_job_naming_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "tiny");
    let app = spawn(&[("MODEL_PATH", &model)]).await;
    let r = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "https://example.com/live.m3u8", "clip": {"frames": 2}}),
        )
        .await;
    assert_eq!(
        r.status,
        reqwest::StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        r.body
    );
    let text = r.body.to_string();
    assert!(text.contains("at most 1 image per request"), "{text}");
    assert!(text.contains("clip.frames"), "{text}");
}
