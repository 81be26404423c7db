//! Bad input gets a specific status and the JSON error shape; the service keeps serving.

use reqwest::StatusCode;
use serde_json::json;

use crate::db_tests;
use crate::helpers::{assert_error, Db, TestApp};

db_tests!(bad_bodies_get_specific_errors, oversized_bodies_and_prompts);

async fn bad_bodies_get_specific_errors(db: Db) {
    let app = TestApp::spawn(db).await;
    let start = "/api/v1/inference/start";

    let malformed = app
        .send(
            app.client
                .post(app.url(start))
                .header("content-type", "application/json")
                .body("{\"stream_ref\": "),
        )
        .await;
    assert_error(&malformed, StatusCode::BAD_REQUEST, "bad_request");

    let no_type = app
        .send(
            app.client
                .post(app.url(start))
                .body("{\"stream_ref\": \"x\"}"),
        )
        .await;
    assert_error(
        &no_type,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    for (body, param) in [
        (json!({}), None),
        (json!({"stream_ref": 5}), None),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "fps": "fast"}),
            None,
        ),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "colour": "red"}),
            None,
        ),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "priority": "urgent"}),
            None,
        ),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "fps": 0}),
            Some("fps"),
        ),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "fps": 60.5}),
            Some("fps"),
        ),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "prompt": "   "}),
            Some("prompt"),
        ),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "prompt": "p".repeat(8193)}),
            Some("prompt"),
        ),
        (
            json!({"stream_ref": format!("https://e.com/{}", "a".repeat(2040))}),
            Some("stream_ref"),
        ),
        (
            json!({"stream_ref": "ftp://e.com/a.m3u8"}),
            Some("stream_ref"),
        ),
        (
            json!({"stream_ref": "https://e.com/a.m3u8", "model": ""}),
            Some("model"),
        ),
    ] {
        let reply = app.post(start, body.clone()).await;
        assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        if let Some(param) = param {
            assert_eq!(reply.body["error"]["param"], param, "for {body}");
        }
    }
    // An 8 KiB prompt is allowed.
    app.start_job(json!({"prompt": "p".repeat(8192)})).await;

    let p = app
        .post("/api/v1/prompt/update", json!({"prompt": ""}))
        .await;
    assert_error(&p, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    let p = app
        .post("/api/v1/prompt/update", json!({"prompt": "x", "extra": 1}))
        .await;
    assert_error(&p, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    let m = app.send(app.client.put(app.url(start))).await;
    assert_error(&m, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");

    // Nothing was stored by the refused requests, and the service still serves.
    let jobs = app.get("/api/v1/inference/jobs").await;
    assert_eq!(jobs.body["total"], 1);
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
}

async fn oversized_bodies_and_prompts(db: Db) {
    let app = TestApp::spawn(db).await;
    // 1 MB prompt: the body fits in 1 MiB but the prompt is over 8 KiB.
    let one_mb = "x".repeat(1_000_000);
    let r = app
        .post("/api/v1/prompt/update", json!({"prompt": one_mb}))
        .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(r.body["error"]["param"], "prompt");
    // 2 MiB body: over MAX_BODY_BYTES.
    let big = "x".repeat(2 << 20);
    let r = app
        .post("/api/v1/prompt/update", json!({"prompt": big}))
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let r = app
        .post("/api/v1/inference/start", json!({"stream_ref": big}))
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let current = app.get("/api/v1/prompt/current").await;
    assert_eq!(current.body["version"], 1, "no refused prompt was stored");
}
