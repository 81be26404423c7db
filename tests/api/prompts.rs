//! Prompt versions: global and per job, immutable, rising by one, newest in force.

use reqwest::StatusCode;
use serde_json::json;

use crate::db_tests;
use crate::helpers::{Db, TestApp};

db_tests!(
    global_prompt_versions_and_history,
    job_prompts_override_the_global_one
);

async fn global_prompt_versions_and_history(db: Db) {
    let app = TestApp::spawn_with(db, &[("DEFAULT_PROMPT", "What do you see?")]).await;
    let cur = app.get("/api/v1/prompt/current").await;
    assert_eq!(cur.status, StatusCode::OK);
    assert_eq!(cur.body["prompt"], "What do you see?");
    assert_eq!(cur.body["version"], 1);
    assert_eq!(cur.body["scope"], "global");
    assert!(cur.body["job_id"].is_null());
    for key in ["timestamp", "created_at", "updated_at"] {
        assert!(cur.body[key].is_number(), "{key}");
    }

    let up = app
        .post(
            "/api/v1/prompt/update",
            json!({"prompt": "Detect only vehicles", "preserve_previous": true}),
        )
        .await;
    assert_eq!(up.status, StatusCode::OK, "{}", up.body);
    assert_eq!(up.body["version"], 2);
    assert_eq!(up.body["prompt"], "Detect only vehicles");
    assert_eq!(
        up.body["created_at"], cur.body["created_at"],
        "created_at is the scope's first version"
    );
    assert!(up.body["updated_at"].as_f64() >= cur.body["updated_at"].as_f64());
    for i in 3..=12 {
        let r = app
            .post(
                "/api/v1/prompt/update",
                json!({"prompt": format!("prompt {i}")}),
            )
            .await;
        assert_eq!(r.body["version"], i);
    }
    let h = app.get("/api/v1/prompt/history").await;
    assert_eq!(h.body["total"], 12);
    let versions: Vec<i64> = h.body["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        (3..=12).rev().collect::<Vec<_>>(),
        "default limit 10, newest first"
    );
    let h = app.get("/api/v1/prompt/history?limit=100").await;
    let last = h.body["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["version"], 1);
    assert_eq!(
        last["prompt"], "What do you see?",
        "old versions are never rewritten"
    );

    // A job started without a prompt follows the global one, version by version.
    let id = app.start_job(json!({})).await;
    let s = app.get(&format!("/api/v1/inference/status/{id}")).await;
    assert_eq!(s.body["prompt"], "prompt 12");
    assert_eq!(s.body["prompt_version"], 12);
    app.post("/api/v1/prompt/update", json!({"prompt": "prompt 13"}))
        .await;
    let s = app.get(&format!("/api/v1/inference/status/{id}")).await;
    assert_eq!(s.body["prompt_version"], 13);
}

async fn job_prompts_override_the_global_one(db: Db) {
    let app = TestApp::spawn(db).await;
    let own = app
        .start_job(json!({"prompt": "Count people", "job_id": "own"}))
        .await;
    let follows = app.start_job(json!({"job_id": "follows"})).await;

    let r = app
        .post(
            "/api/v1/prompt/update",
            json!({"prompt": "Count dogs", "job_id": own}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["scope"], "job");
    assert_eq!(r.body["job_id"], "own");

    let c = app.get("/api/v1/prompt/current?job_id=own").await;
    assert_eq!(c.body["prompt"], "Count dogs");
    assert_eq!(c.body["scope"], "job");
    let h = app.get("/api/v1/prompt/history?job_id=own").await;
    assert_eq!(h.body["total"], 2);
    assert_eq!(h.body["history"][1]["prompt"], "Count people");

    // The global prompt and other jobs are untouched.
    let g = app.get("/api/v1/prompt/current").await;
    assert_eq!(g.body["version"], 1);
    let c = app
        .get(&format!("/api/v1/prompt/current?job_id={follows}"))
        .await;
    assert_eq!(
        c.body["scope"], "global",
        "a job without its own prompt uses the global one"
    );
    assert_eq!(c.body["job_id"], "follows");

    // A job-scoped update to a job that had no prompt starts its own scope at 1.
    let r = app
        .post(
            "/api/v1/prompt/update",
            json!({"prompt": "Only cats", "job_id": follows}),
        )
        .await;
    assert_eq!(r.body["version"], 1);
    let s = app.get("/api/v1/inference/status/follows").await;
    assert_eq!(s.body["prompt"], "Only cats");
    assert_eq!(s.body["prompt_scope"], "job");
}
