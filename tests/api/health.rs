//! Probes, metrics and the OpenAPI documents.

use reqwest::StatusCode;
use serde_json::json;

use crate::db_tests;
use crate::helpers::{Db, TestApp};

db_tests!(probes_report_each_component, metrics_use_route_templates);

async fn probes_report_each_component(db: Db) {
    let app = TestApp::spawn_with(db, &[("MODEL_TYPE", "auto")]).await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status, StatusCode::OK);

    // No model is configured: not ready, and the reason says what to set.
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.body["status"], "not_ready");
    let reasons = ready.body["reasons"].to_string();
    assert!(
        reasons.contains("MODEL_TYPE=openai") && reasons.contains("MODEL_PATH"),
        "{reasons}"
    );
    assert!(
        !reasons.contains("database"),
        "the database is fine: {reasons}"
    );

    let health = app.get("/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.body["components"]["database"]["status"], "ok");
    assert_eq!(
        health.body["components"]["model"]["status"],
        "not_configured"
    );

    // Once the model backend is ready, so is the service.
    app.state
        .models
        .set_readiness(free_roam::vlm::Readiness::Ready("test backend".into()));
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["status"], "ready");
    assert_eq!(app.get("/health").await.status, StatusCode::OK);

    // Probes bypass auth and rate limits.
    let guarded = TestApp::spawn_with(
        db,
        &[
            ("API_KEYS", "secret"),
            ("RATE_LIMIT_ENABLED", "true"),
            ("RATE_LIMIT_READ_BURST", "1"),
            ("RATE_LIMIT_READ_PER_MINUTE", "1"),
        ],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(guarded.get("/health/live").await.status, StatusCode::OK);
        assert_ne!(
            guarded.get("/health").await.status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(guarded.get("/metrics").await.status, StatusCode::OK);
    }

    // Losing the database turns health and readiness to 503 while liveness stays 200.
    app.state.store.close().await;
    assert_eq!(
        app.get("/health/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let h = app.get("/health").await;
    assert_eq!(h.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.body["components"]["database"]["status"], "error");
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
    let r = app.get("/api/v1/inference/jobs").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.body["error"]["code"], "internal_error");
    assert!(
        !r.body.to_string().to_lowercase().contains("pool"),
        "no internal error text: {}",
        r.body
    );
}

async fn metrics_use_route_templates(db: Db) {
    let app = TestApp::spawn(db).await;
    let id = app.start_job(json!({"job_id": "metric-job"})).await;
    app.get(&format!("/api/v1/inference/status/{id}")).await;
    let text = app.send(app.client.get(app.url("/metrics"))).await.body;
    let text = text.as_str().expect("metrics are text");
    assert!(text.contains("free_roam_http_requests_total"), "{text}");
    assert!(
        text.contains("route=\"/api/v1/inference/status/{job_id}\""),
        "{text}"
    );
    assert!(!text.contains("metric-job"), "job ids are never labels");
    assert!(text.contains("free_roam_http_request_duration_seconds_bucket"));
    assert!(
        text.contains("free_roam_jobs{status=\"pending\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn openapi_covers_every_route_and_docs_are_served() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let doc = app.get("/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with('3'));
    let paths = doc.body["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/inference/start", "post"),
        ("/api/v1/inference/status/{job_id}", "get"),
        ("/api/v1/inference/results/{job_id}", "get"),
        ("/api/v1/inference/cancel/{job_id}", "delete"),
        ("/api/v1/inference/jobs", "get"),
        ("/api/v1/prompt/update", "post"),
        ("/api/v1/prompt/current", "get"),
        ("/api/v1/prompt/history", "get"),
        ("/health", "get"),
        ("/health/ready", "get"),
        ("/health/live", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    let start = &paths["/api/v1/inference/start"]["post"]["responses"];
    for code in ["202", "400", "409", "413", "422", "429"] {
        assert!(start[code].is_object(), "start documents {code}");
    }
    assert!(doc.body["components"]["schemas"]["ErrorBody"].is_object());
    // Every /api operation lists what the layers in front of it can answer.
    for (path, item) in paths.iter().filter(|(p, _)| p.starts_with("/api/")) {
        for (method, op) in item.as_object().unwrap() {
            let mut want = vec!["400", "401", "429", "503"];
            if method == "post" {
                want.extend(["413", "415", "422"]);
            }
            for code in want {
                let r = &op["responses"][code];
                assert!(r.is_object(), "{method} {path} documents {code}");
                assert!(
                    r["content"]["application/json"]["schema"]["$ref"]
                        .as_str()
                        .is_some_and(|s| s.ends_with("ErrorBody")),
                    "{method} {path} {code} has the error schema"
                );
            }
        }
    }
    assert!(paths["/api/v1/inference/results/{job_id}/stream"]["get"].is_object());
    // The answers are real: malformed JSON, another content type.
    let bad = app
        .send(
            app.client
                .post(app.url("/api/v1/prompt/update"))
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    let text = app
        .send(
            app.client
                .post(app.url("/api/v1/prompt/update"))
                .header("content-type", "text/plain")
                .body("hello"),
        )
        .await;
    assert_eq!(
        text.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        text.body
    );
    for page in ["/docs/", "/redoc"] {
        let r = app.send(app.client.get(app.url(page))).await;
        assert_eq!(r.status, StatusCode::OK, "{page}");
        let html = r.body.as_str().unwrap().to_lowercase();
        assert!(html.contains("<html"), "{page} is a page");
        // Works offline: every script and stylesheet comes from this service.
        for tag in ["<script", "<link"] {
            for piece in html.split(tag).skip(1) {
                let head = &piece[..piece.find('>').unwrap_or(piece.len())];
                assert!(
                    !head.contains("http://")
                        && !head.contains("https://")
                        && !head.contains("src=\"//"),
                    "{page} loads {tag}{head}> from elsewhere"
                );
            }
        }
    }
    let script = reqwest::get(app.url("/redoc/redoc.standalone.js"))
        .await
        .unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let script = script.text().await.unwrap();
    assert!(script.contains("Redoc"));
    assert!(
        !script.contains("https://cdn.") && !script.contains("http://cdn."),
        "the script loads nothing from a CDN"
    );
}
