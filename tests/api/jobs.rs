//! Starting, reading, listing and cancelling jobs; reading results page by page.

use reqwest::StatusCode;
use serde_json::json;

use crate::db_tests;
use crate::helpers::{assert_error, Db, TestApp};
use free_roam::answers::alerts::AlertTracker;
use free_roam::answers::Output;
use free_roam::store::{Appended, Lease, NewResult};

db_tests!(
    start_then_status_has_the_seed_fields,
    client_chosen_job_id_and_conflict,
    redis_stream_refs_are_detected,
    cancel_then_cancel_again_conflicts,
    unknown_jobs_are_404,
    active_jobs_are_capped,
    jobs_list_newest_first_with_cursor,
    results_poll_never_misses_or_repeats,
);

async fn start_then_status_has_the_seed_fields(db: Db) {
    let app = TestApp::spawn(db).await;
    let reply = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "https://example.com/live/stream.m3u8", "fps": 2.5}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.body["status"], "pending");
    assert!(reply.body["message"].is_string());
    let job_id = reply.body["job_id"].as_str().unwrap().to_owned();
    assert!(
        uuid::Uuid::parse_str(&job_id).is_ok(),
        "a generated job id is a UUID: {job_id}"
    );

    let s = app.get(&format!("/api/v1/inference/status/{job_id}")).await;
    assert_eq!(s.status, StatusCode::OK);
    let b = &s.body;
    assert_eq!(b["job_id"], job_id.as_str());
    assert_eq!(b["status"], "pending");
    assert_eq!(b["stream_ref"], "https://example.com/live/stream.m3u8");
    assert_eq!(b["fps"], 2.5);
    assert_eq!(b["source_type"], "hls");
    assert_eq!(b["frames_processed"], 0);
    assert_eq!(b["results_count"], 0);
    assert!(b["error"].is_null());
    assert!(b["started_at"].is_null(), "a pending job has not started");
    assert!(b["completed_at"].is_null());
    let created = b["created_at"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - created).abs() < 60.0,
        "created_at is epoch seconds: {created}"
    );
    assert_eq!(
        b["prompt"], "Describe what is happening in this frame.",
        "follows the global default prompt"
    );
    assert_eq!(b["prompt_version"], 1);
    assert_eq!(b["prompt_scope"], "global");
    assert_eq!(b["priority"], "normal");
    assert!(b["stats"].is_object());
    assert!(b["model"].is_string());

    // Defaults: fps from DEFAULT_FPS; the job's own prompt becomes version 1 of its scope.
    let id = app
        .start_job(json!({"prompt": "Count the cars", "priority": "high"}))
        .await;
    let s = app.get(&format!("/api/v1/inference/status/{id}")).await;
    assert_eq!(s.body["fps"], 2.0);
    assert_eq!(s.body["prompt"], "Count the cars");
    assert_eq!(s.body["prompt_scope"], "job");
    assert_eq!(s.body["prompt_version"], 1);
    assert_eq!(s.body["priority"], "high");
}

async fn client_chosen_job_id_and_conflict(db: Db) {
    let app = TestApp::spawn(db).await;
    let id = app.start_job(json!({"job_id": "cam-1.front_door"})).await;
    assert_eq!(id, "cam-1.front_door");
    let again = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "https://example.com/a.m3u8", "job_id": "cam-1.front_door"}),
        )
        .await;
    assert_error(&again, StatusCode::CONFLICT, "conflict");
    let bad = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "https://e.com/a.m3u8", "job_id": "../x"}),
        )
        .await;
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(bad.body["error"]["param"], "job_id");
}

async fn redis_stream_refs_are_detected(db: Db) {
    let app = TestApp::spawn(db).await;
    for r in ["video_frames", "redis://127.0.0.1:6379/0/cams:front"] {
        let id = app.start_job(json!({"stream_ref": r})).await;
        let s = app.get(&format!("/api/v1/inference/status/{id}")).await;
        assert_eq!(s.body["source_type"], "redis", "{r}");
        assert_eq!(s.body["stream_ref"], r);
    }
    let bad = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "ftp://camera/1"}),
        )
        .await;
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(bad.body["error"]["param"], "stream_ref");
    let msg = bad.body["detail"].as_str().unwrap();
    for form in [
        "http(s)://",
        "rtsp://",
        "file:///",
        "redis://",
        "bare Redis stream key",
    ] {
        assert!(
            msg.contains(form),
            "says which forms are accepted ({form}): {msg}"
        );
    }
}

async fn cancel_then_cancel_again_conflicts(db: Db) {
    let app = TestApp::spawn(db).await;
    let id = app.start_job(json!({})).await;
    let c = app.delete(&format!("/api/v1/inference/cancel/{id}")).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.body);
    assert_eq!(c.body["job_id"], id.as_str());
    assert_eq!(c.body["status"], "cancelled");
    assert!(c.body["message"].is_string());
    let s = app.get(&format!("/api/v1/inference/status/{id}")).await;
    assert_eq!(s.body["status"], "cancelled");
    assert!(s.body["completed_at"].as_f64().is_some());
    let again = app.delete(&format!("/api/v1/inference/cancel/{id}")).await;
    assert_error(&again, StatusCode::CONFLICT, "conflict");
}

async fn unknown_jobs_are_404(db: Db) {
    let app = TestApp::spawn(db).await;
    for path in [
        "/api/v1/inference/status/nope",
        "/api/v1/inference/results/nope",
        "/api/v1/prompt/current?job_id=nope",
        "/api/v1/prompt/history?job_id=nope",
    ] {
        assert_error(&app.get(path).await, StatusCode::NOT_FOUND, "not_found");
    }
    assert_error(
        &app.delete("/api/v1/inference/cancel/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let p = app
        .post(
            "/api/v1/prompt/update",
            json!({"prompt": "x", "job_id": "nope"}),
        )
        .await;
    assert_error(&p, StatusCode::NOT_FOUND, "not_found");
    assert_error(
        &app.get("/api/v1/nothing-here").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

async fn active_jobs_are_capped(db: Db) {
    let app = TestApp::spawn_with(db, &[("MAX_CONCURRENT_STREAMS", "2")]).await;
    let first = app.start_job(json!({})).await;
    app.start_job(json!({})).await;
    let third = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "https://example.com/x.m3u8"}),
        )
        .await;
    assert_error(
        &third,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_active_jobs",
    );
    assert!(third.headers.get("retry-after").is_some());
    // One replica: the cluster-wide cap defaults to what the replica runs.
    let detail = third.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("MAX_ACTIVE_JOBS=2") && detail.contains("MAX_CONCURRENT_STREAMS"),
        "{detail}"
    );
    // A finished job frees its slot.
    app.delete(&format!("/api/v1/inference/cancel/{first}"))
        .await;
    app.start_job(json!({})).await;
}

async fn jobs_list_newest_first_with_cursor(db: Db) {
    let app = TestApp::spawn(db).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.start_job(json!({"job_id": format!("job-{i}")})).await);
    }
    app.delete("/api/v1/inference/cancel/job-1").await;

    let mut seen = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/api/v1/inference/jobs?limit=2&after={a}"),
            None => "/api/v1/inference/jobs?limit=2".to_owned(),
        };
        let page = app.get(&path).await;
        assert_eq!(page.status, StatusCode::OK);
        assert_eq!(page.body["total"], 5);
        for j in page.body["jobs"].as_array().unwrap() {
            seen.push(j["job_id"].as_str().unwrap().to_owned());
            assert!(j["stream_ref"].is_string() && j["status"].is_string());
        }
        match page.body["next_after"].as_i64() {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first, "every job once, newest first");

    let cancelled = app.get("/api/v1/inference/jobs?status=cancelled").await;
    assert_eq!(cancelled.body["total"], 1);
    assert_eq!(cancelled.body["jobs"][0]["job_id"], "job-1");
    let pending = app.get("/api/v1/inference/jobs?status=pending").await;
    assert_eq!(pending.body["total"], 4);
    assert_error(
        &app.get("/api/v1/inference/jobs?status=sleeping").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_error",
    );
    assert_error(
        &app.get("/api/v1/inference/jobs?limit=0").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_error",
    );
    assert_error(
        &app.get("/api/v1/inference/jobs?limit=many").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
}

async fn results_poll_never_misses_or_repeats(db: Db) {
    let app = TestApp::spawn(db).await;
    let id = app.start_job(json!({})).await;
    let empty = app.get(&format!("/api/v1/inference/results/{id}")).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.body["results"], json!([]));
    assert_eq!(empty.body["total_results"], 0);
    assert!(empty.body["next_after"].is_null());
    assert_eq!(empty.body["status"], "pending");

    // The pipeline's writer (under the lease this replica's claim took), interleaved with a
    // polling client.
    let store = app.state.store.clone();
    let lease = loop {
        let job = store.get_job(&id).await.unwrap().unwrap();
        if let Some(owner) = job.owner {
            break Lease {
                owner: owner.into(),
                token: job.lease_token,
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut polled = Vec::new();
    let mut after: Option<i64> = None;
    for round in 0..4 {
        for k in 0..7 {
            let n = round * 7 + k;
            let result = NewResult {
                source_key: format!("pts:{}", n * 500),
                pts_ms: n * 500,
                pts_end_ms: None,
                repeats_seq: None,
                captured_at: None,
                prompt_scope: "global".into(),
                prompt_version: 1,
                model: "m".into(),
                output: if n % 5 == 4 {
                    Err("model refused".into())
                } else {
                    Ok(Output::Text(format!("answer {n}")))
                },
                batch_size: 7,
                latency: json!({"queue": 1.0, "inference": 2.0, "total": 3.0}),
                alerts: None,
                evidence: None,
                replay_of: None,
            };
            let mut alerts = AlertTracker::default();
            assert_eq!(
                store
                    .append_result(&id, &lease, &result, &mut alerts)
                    .await
                    .unwrap(),
                Appended::New {
                    seq: n,
                    frame: false
                },
                "seq is contiguous from 0"
            );
            assert_eq!(
                store
                    .append_result(&id, &lease, &result, &mut alerts)
                    .await
                    .unwrap(),
                Appended::Duplicate,
                "the same source position is stored once"
            );
        }
        loop {
            let path = match after {
                Some(a) => format!("/api/v1/inference/results/{id}?limit=3&after={a}"),
                None => format!("/api/v1/inference/results/{id}?limit=3"),
            };
            let page = app.get(&path).await;
            assert_eq!(page.status, StatusCode::OK);
            let results = page.body["results"].as_array().unwrap().clone();
            after = page.body["next_after"].as_i64().or(after);
            if results.is_empty() {
                break;
            }
            for r in results {
                polled.push(r["seq"].as_i64().unwrap());
                assert_eq!(
                    r["pts_ms"].as_i64().unwrap(),
                    r["seq"].as_i64().unwrap() * 500
                );
                assert!(r["latency_ms"]["total"].is_number());
                assert_eq!(r["batch_size"], 7);
                if r["seq"].as_i64().unwrap() % 5 == 4 {
                    assert!(r["output"].is_null());
                    assert_eq!(r["error"], "model refused");
                } else {
                    assert!(r["error"].is_null());
                }
            }
        }
    }
    assert_eq!(
        polled,
        (0..28).collect::<Vec<i64>>(),
        "each result exactly once, in order"
    );
    let s = app.get(&format!("/api/v1/inference/status/{id}")).await;
    assert_eq!(s.body["results_count"], 28);
    let all = app
        .get(&format!("/api/v1/inference/results/{id}?limit=1000"))
        .await;
    assert_eq!(all.body["total_results"], 28);
    assert_eq!(all.body["next_after"], 27);
    assert_error(
        &app.get(&format!("/api/v1/inference/results/{id}?limit=1001"))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_error",
    );
    assert_error(
        &app.get(&format!("/api/v1/inference/results/{id}?after=-5"))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_error",
    );
}
