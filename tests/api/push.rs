//! Results pushed to the client: the SSE stream, read by a real HTTP client that disconnects
//! and resumes with Last-Event-ID, across a restart of the service.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{make_hls, Container, ModelServer, Origin};
use crate::helpers::{pairs, Db, TestApp};

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub(crate) struct Sse {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Reads events from `url` (with `Last-Event-ID` when given) until `stop` says so or the
/// stream ends; returns them.
pub(crate) async fn read_events(
    url: &str,
    last_event_id: Option<&str>,
    mut stop: impl FnMut(&[Sse]) -> bool,
) -> Vec<Sse> {
    let mut req = reqwest::Client::new().get(url);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(20), body.next()).await;
        let Ok(Some(Ok(bytes))) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut ev = Sse {
                event: "message".into(),
                id: None,
                data: String::new(),
            };
            let mut any = false;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.trim().to_owned();
                    any = true;
                } else if let Some(v) = line.strip_prefix("id:") {
                    ev.id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    ev.data.push_str(v.trim_start());
                    any = true;
                }
            }
            if any {
                events.push(ev);
                if stop(&events) {
                    return events;
                }
            }
        }
    }
    events
}

pub(crate) fn seqs(events: &[Sse]) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e.event == "result")
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(
                e.id.as_deref(),
                Some(v["seq"].to_string().as_str()),
                "id is the seq"
            );
            v["seq"].as_i64().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_across_a_restart_gets_every_result_once() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 8.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    model.set_delay(Duration::from_millis(150));
    let env = model.env();
    let app = TestApp::spawn_with(Db::Postgres, &pairs(&env)).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2}))
        .await;
    let url = app.url(&format!("/api/v1/inference/results/{id}/stream"));

    // A few results, then the client goes away.
    let first = read_events(&url, None, |e| seqs(e).len() >= 3).await;
    assert_eq!(first[0].event, "status", "the job's status comes first");
    let got = seqs(&first);
    assert_eq!(got, vec![0, 1, 2]);

    // The service restarts meanwhile (same database).
    let db_url = app.database_url.clone();
    let (stopped, _kept) = app.stop().await;
    stopped.unwrap();
    let mut env2 = pairs(&env);
    env2.push(("DATABASE_URL", &db_url));
    let app = TestApp::spawn_with(Db::Postgres, &env2).await;
    let url = app.url(&format!("/api/v1/inference/results/{id}/stream"));

    // Resumed after the last seq received, to the end of the job.
    let rest = read_events(&url, Some("2"), |e| e.iter().any(|e| e.event == "end")).await;
    let end = rest
        .iter()
        .find(|e| e.event == "end")
        .expect("an end event");
    let end: Value = serde_json::from_str(&end.data).unwrap();
    assert_eq!(end["status"], "completed");
    let mut all = got;
    all.extend(seqs(&rest));
    assert_eq!(
        all,
        (0..16).collect::<Vec<_>>(),
        "every result once, in order"
    );
    assert!(
        rest.iter()
            .any(|e| e.event == "status" && e.data.contains("completed")),
        "the status change is pushed"
    );

    // `?after=` works the same, and a finished job's stream ends after its last result.
    let url = app.url(&format!("/api/v1/inference/results/{id}/stream?after=13"));
    let tail = read_events(&url, None, |_| false).await;
    assert_eq!(seqs(&tail), vec![14, 15]);
    assert_eq!(tail.last().unwrap().event, "end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stream_requests_get_clear_errors() {
    let app = TestApp::spawn_with(Db::Sqlite, &[("MAX_SSE_STREAMS", "1")]).await;
    let r = app.get("/api/v1/inference/results/nope/stream").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let id = app.start_job(json!({})).await;
    let r = app
        .send(
            app.client
                .get(app.url(&format!("/api/v1/inference/results/{id}/stream")))
                .header("Last-Event-ID", "soon"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let r = app
        .get(&format!("/api/v1/inference/results/{id}/stream?after=-4"))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // One stream open: a second is refused until it closes.
    let open = app
        .client
        .get(app.url(&format!("/api/v1/inference/results/{id}/stream")))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), StatusCode::OK);
    let r = app
        .get(&format!("/api/v1/inference/results/{id}/stream"))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "too_many_streams");
    assert!(r.headers.get("retry-after").is_some());
    drop(open);
    let mut reopened = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = app
            .client
            .get(app.url(&format!("/api/v1/inference/results/{id}/stream")))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            reopened = true;
            break;
        }
    }
    assert!(reopened, "a closed stream frees its slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_published_to_the_redis_results_stream() {
    use redis::AsyncCommands;
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 3.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let key = format!("test:results:{}", uuid::Uuid::new_v4().simple());
    let stream = format!("redis://127.0.0.1:6379/{key}");
    let model_env = model.env();
    let mut env = pairs(&model_env);
    env.push(("RESULTS_STREAM", &stream));
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2}))
        .await;
    let status = app
        .wait_status(&id, &["completed", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["stats"]["results_stream_failures"], 0);
    let mut c = crate::fixtures::local_redis().await;
    let entries: redis::streams::StreamRangeReply = c.xrange_all(&key).await.unwrap();
    let field = |e: &redis::streams::StreamId, k: &str| -> String {
        e.get::<String>(k)
            .unwrap_or_else(|| panic!("field {k} in {e:?}"))
    };
    let seqs: Vec<String> = entries.ids.iter().map(|e| field(e, "seq")).collect();
    assert_eq!(seqs, (0..6).map(|i| i.to_string()).collect::<Vec<_>>());
    let stored = app.all_results(&id).await;
    for (e, r) in entries.ids.iter().zip(&stored) {
        assert_eq!(field(e, "job_id"), id);
        assert_eq!(field(e, "pts_ms"), r["pts_ms"].to_string());
        assert_eq!(field(e, "prompt_version"), r["prompt_version"].to_string());
        assert_eq!(field(e, "output"), r["output"].as_str().unwrap());
        assert_eq!(field(e, "error"), "");
        assert_eq!(field(e, "frame_url"), r["frame_url"].as_str().unwrap());
        assert_eq!(field(e, "replay_of"), "");
    }
    let _: () = c.del(&key).await.unwrap();

    // Not a Redis stream: start-up stops, naming the variable.
    let bad = free_roam::config::Settings::from_sources(
        None,
        None,
        [(
            "RESULTS_STREAM".to_owned(),
            "https://example.com/x".to_owned(),
        )]
        .into(),
    );
    assert!(bad.unwrap_err().to_string().contains("RESULTS_STREAM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_events_stream_every_status_change_filterable_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 2.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = TestApp::spawn_with(Db::Sqlite, &pairs(&model.env())).await;
    let a = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2}))
        .await;
    app.wait_status(&a, &["completed"], Duration::from_secs(60))
        .await;
    let b = app.start_job(json!({})).await;
    assert_eq!(
        app.delete(&format!("/api/v1/inference/cancel/{b}"))
            .await
            .status,
        StatusCode::OK
    );

    let of = |events: &[Sse], job: &str| -> Vec<String> {
        events
            .iter()
            .map(|e| serde_json::from_str::<Value>(&e.data).unwrap())
            .filter(|d| d["job_id"] == job)
            .map(|d| d["status"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = read_events(&app.url("/api/v1/events"), None, |e| {
        of(e, &b).last().map(String::as_str) == Some("cancelled")
    })
    .await;
    assert!(all.iter().all(|e| e.event == "status"));
    assert_eq!(of(&all, &a), ["pending", "running", "completed"]);
    assert_eq!(of(&all, &b).first().map(String::as_str), Some("pending"));
    assert_eq!(of(&all, &b).last().map(String::as_str), Some("cancelled"));
    let ids: Vec<i64> = all
        .iter()
        .map(|e| e.id.as_ref().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let completed: Value = serde_json::from_str(
        &all.iter()
            .find(|e| e.data.contains("completed"))
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(completed["results_count"], 4);
    assert!(completed["at"].as_f64().unwrap() > 0.0);

    // One job's events, resumed after its `running` event: only what came after.
    let running = all
        .iter()
        .find(|e| e.data.contains(&a) && e.data.contains("running"))
        .unwrap();
    let rest = read_events(
        &app.url(&format!("/api/v1/events?job_id={a}")),
        running.id.as_deref(),
        |e| !e.is_empty(),
    )
    .await;
    assert_eq!(of(&rest, &a), ["completed"]);

    let r = app.get("/api/v1/events?job_id=nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get("/api/v1/events?after=-1").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_on_one_job_share_its_feed_and_each_get_every_result_once() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 4.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    model.set_delay(Duration::from_millis(100));
    let app = TestApp::spawn_with(Db::Sqlite, &pairs(&model.env())).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2}))
        .await;
    let url = app.url(&format!("/api/v1/inference/results/{id}/stream"));
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                // Some join late, mid-job: they catch up from the store, then follow.
                tokio::time::sleep(Duration::from_millis(50 * i)).await;
                read_events(&url, None, |e| e.iter().any(|e| e.event == "end")).await
            })
        })
        .collect();
    for c in clients {
        let events = c.await.unwrap();
        assert_eq!(seqs(&events), (0..8).collect::<Vec<_>>());
        assert_eq!(events.last().unwrap().event, "end");
    }
}
