//! API keys, rate limits, CORS and request ids.

use reqwest::StatusCode;
use serde_json::json;

use crate::db_tests;
use crate::helpers::{assert_error, Db, TestApp};

db_tests!(
    api_keys_guard_every_api_route,
    rate_limits_are_per_client_and_per_kind
);

async fn api_keys_guard_every_api_route(db: Db) {
    let app = TestApp::spawn_with(db, &[("API_KEYS", "key-one, key-two")]).await;
    let none = app.get("/api/v1/inference/jobs").await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(none.headers["www-authenticate"], "Bearer");
    let wrong = app
        .send(
            app.client
                .get(app.url("/api/v1/inference/jobs"))
                .bearer_auth("key-three"),
        )
        .await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    let post = app
        .send(
            app.client
                .post(app.url("/api/v1/inference/start"))
                .json(&json!({"stream_ref": "https://e.com/a.m3u8"})),
        )
        .await;
    assert_error(&post, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        app.get("/api/v1/inference/jobs?limit=1").await.status,
        StatusCode::UNAUTHORIZED
    );

    for key in ["key-one", "key-two"] {
        let ok = app
            .send(
                app.client
                    .post(app.url("/api/v1/inference/start"))
                    .bearer_auth(key)
                    .json(&json!({"stream_ref": "https://e.com/a.m3u8"})),
            )
            .await;
        assert_eq!(ok.status, StatusCode::ACCEPTED, "{key}");
    }
    let list = app
        .send(
            app.client
                .get(app.url("/api/v1/inference/jobs"))
                .bearer_auth("key-two"),
        )
        .await;
    assert_eq!(list.body["total"], 2);
}

async fn rate_limits_are_per_client_and_per_kind(db: Db) {
    let app = TestApp::spawn_with(
        db,
        &[
            ("RATE_LIMIT_ENABLED", "true"),
            ("RATE_LIMIT_WRITE_BURST", "2"),
            ("RATE_LIMIT_WRITE_PER_MINUTE", "1"),
            ("RATE_LIMIT_READ_BURST", "5"),
            ("RATE_LIMIT_READ_PER_MINUTE", "1"),
            ("API_KEYS", "alice,bob"),
        ],
    )
    .await;
    let start = |key: &'static str| {
        app.client
            .post(app.url("/api/v1/inference/start"))
            .bearer_auth(key)
            .json(&json!({"stream_ref": "https://e.com/a.m3u8"}))
    };
    let first = app.send(start("alice")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(first.headers["ratelimit-limit"], "2");
    assert_eq!(first.headers["ratelimit-remaining"], "1");
    assert_eq!(app.send(start("alice")).await.status, StatusCode::ACCEPTED);
    let limited = app.send(start("alice")).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(limited.headers["ratelimit-remaining"], "0");
    assert!(limited.headers.get("ratelimit-reset").is_some());

    // Reads have their own quota; another client has its own buckets.
    let read = app
        .send(
            app.client
                .get(app.url("/api/v1/inference/jobs"))
                .bearer_auth("alice"),
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.headers["ratelimit-limit"], "5");
    assert_eq!(app.send(start("bob")).await.status, StatusCode::ACCEPTED);
    let reads: Vec<StatusCode> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(
                app.send(
                    app.client
                        .get(app.url("/api/v1/inference/jobs"))
                        .bearer_auth("bob"),
                )
                .await
                .status,
            );
        }
        v
    };
    assert_eq!(reads[..5], [StatusCode::OK; 5]);
    assert_eq!(reads[5], StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let app = TestApp::spawn_with(Db::Sqlite, &[("CORS_ORIGINS", "https://app.example.com")]).await;
    let preflight = |origin: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/inference/start"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
    };
    let ok = app.send(preflight("https://app.example.com")).await;
    assert_eq!(
        ok.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = app.send(preflight("https://evil.example.com")).await;
    assert!(other.headers.get("access-control-allow-origin").is_none());
    let get = app
        .send(
            app.client
                .get(app.url("/api/v1/inference/jobs"))
                .header("origin", "https://app.example.com"),
        )
        .await;
    assert_eq!(
        get.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
}

#[tokio::test]
async fn request_ids_are_made_or_echoed() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let made = app.get("/api/v1/inference/jobs").await;
    let id = made.headers["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let echoed = app
        .send(
            app.client
                .get(app.url("/api/v1/nowhere"))
                .header("x-request-id", "trace-me-42"),
        )
        .await;
    assert_eq!(echoed.headers["x-request-id"], "trace-me-42");
    assert_eq!(echoed.status, StatusCode::NOT_FOUND);
}
