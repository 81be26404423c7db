//! Alert rules and structured answers end to end: a stream whose picture switches between
//! dark and bright on a known schedule, a stand-in model server that answers "is the picture
//! bright?" from the picture it gets, and the events read back from every channel (the alerts
//! endpoint, `/api/v1/events`, a signed webhook, the Redis result stream), also across a
//! kill -9; answers checked against a prompt's JSON Schema.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{make_hls_schedule, ModelServer, Origin};
use crate::helpers::{assert_error, pairs, Db, TestApp};
use crate::push::read_events;
use crate::replicas::{all_results, get, wait_all, Replica};
use crate::webhooks::{Receiver, SECRET};

const DARK: u8 = 40;
const BRIGHT: u8 = 200;

/// 20 s: bright from 3.8 s to 8.8 s and from 13.8 s to 16.8 s, and a single bright flash
/// around 11 s that only the sample at 11.0 s sees (frames are sampled every 500 ms).
fn schedule() -> Vec<(f64, u8)> {
    vec![
        (3.8, DARK),
        (8.8, BRIGHT),
        (10.8, DARK),
        (11.2, BRIGHT),
        (13.8, DARK),
        (16.8, BRIGHT),
        (20.0, DARK),
    ]
}

/// What the schedule must fire with min_consecutive 2: (type, from_pts, to_pts, started_pts).
fn expected() -> Vec<(String, i64, i64, Option<i64>)> {
    vec![
        ("alert.started".into(), 4000, 4500, None),
        ("alert.ended".into(), 9000, 9500, Some(4000)),
        ("alert.started".into(), 14000, 14500, None),
        ("alert.ended".into(), 17000, 17500, Some(14000)),
    ]
}

fn summary(events: &[Value]) -> Vec<(String, i64, i64, Option<i64>)> {
    events
        .iter()
        .map(|e| {
            let d = if e["data"].is_object() { &e["data"] } else { e };
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                d["from_pts_ms"].as_i64().unwrap(),
                d["to_pts_ms"].as_i64().unwrap(),
                d["started_pts_ms"].as_i64(),
            )
        })
        .collect()
}

fn bright_rule() -> Value {
    json!({"name": "bright", "question": "Is the picture bright?"})
}

async fn stream(dir: &std::path::Path) -> Origin {
    make_hls_schedule(dir, "vod", 20.0, &schedule());
    Origin::start(dir).await
}

async fn alert_events(base: &str, id: &str) -> Value {
    get(base, &format!("/api/v1/inference/alerts/{id}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_once_per_change_of_the_picture_on_every_channel() {
    use redis::AsyncCommands;
    let dir = tempfile::tempdir().unwrap();
    let origin = stream(dir.path()).await;
    let model = ModelServer::start().await;
    let key = format!("test:alerts:{}", uuid::Uuid::new_v4().simple());
    let results_stream = format!("redis://127.0.0.1:6379/{key}");
    let model_env = model.env();
    let mut env = pairs(&model_env);
    env.push(("RESULTS_STREAM", &results_stream));
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    let receiver = Receiver::start(&dir.path().join("received.jsonl"), 0, 204);
    let id = app
        .start_job(json!({
            "stream_ref": origin.url("vod/index.m3u8"), "fps": 2,
            "prompt": "What is the brightness?",
            "alerts": [bright_rule(), {"name": "odd", "question": "Is anything unusual?", "min_consecutive": 1}],
            "webhook": {"url": receiver.url(), "secret": SECRET, "events": ["alert"]},
        }))
        .await;
    let done = app
        .wait_status(&id, &["completed", "failed"], Duration::from_secs(90))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["results_count"], 40);

    // The alerts endpoint: exactly the schedule's changes, nothing for the single flash, and
    // nothing for a question the model never answers yes or no to.
    let alerts = alert_events(&app.base, &id).await;
    let events = alerts["events"].as_array().unwrap().clone();
    assert_eq!(summary(&events), expected(), "{alerts}");
    assert_eq!(alerts["active"], json!([]), "the last episode ended");
    assert_eq!(alerts["rules"]["version"], 1);
    assert_eq!(alerts["rules"]["scope"], "job");
    let results = app.all_results(&id).await;
    for e in &events {
        let d = &e["data"];
        assert_eq!(d["alert"], "bright");
        assert_eq!(d["alert_version"], 1);
        assert_eq!(d["job_id"], id.as_str());
        assert_eq!(d["question"], "Is the picture bright?");
        // The seqs behind it are the results at its pts range.
        let seqs: Vec<i64> = d["seqs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_i64().unwrap())
            .collect();
        assert_eq!(seqs.len(), 2, "{e}");
        let pts: Vec<i64> = seqs
            .iter()
            .map(|&s| results[s as usize]["pts_ms"].as_i64().unwrap())
            .collect();
        assert_eq!(
            pts,
            vec![
                d["from_pts_ms"].as_i64().unwrap(),
                d["to_pts_ms"].as_i64().unwrap()
            ]
        );
    }

    // Each result shows its answers: yes exactly where the picture is bright; the other
    // question's answer is unparseable, shown, and never taken as yes.
    for r in &results {
        let brightness: f64 = serde_json::from_str::<Value>(r["output"].as_str().unwrap()).unwrap()
            ["brightness"]
            .as_f64()
            .unwrap();
        let answers = r["alerts"].as_array().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(answers[0]["name"], "bright");
        assert_eq!(answers[0]["version"], 1);
        let want = if brightness > 128.0 { "yes" } else { "no" };
        assert_eq!(answers[0]["answer"], want, "{r}");
        assert_eq!(answers[1]["name"], "odd");
        assert_eq!(answers[1]["answer"], "unparseable");
        assert_eq!(answers[1]["raw"], "I cannot tell");
    }
    let status = app
        .get(&format!("/api/v1/inference/status/{id}"))
        .await
        .body;
    assert_eq!(status["stats"]["alert_calls"], 80, "{status}");
    assert_eq!(status["stats"]["alert_unparseable"], 40);
    let asked = model.asked();
    assert_eq!(asked.len(), 120, "a prompt and two questions per frame");
    assert_eq!(
        asked
            .iter()
            .filter(|a| a.prompt.starts_with("Is the picture bright?"))
            .count(),
        40
    );

    // The same events on the job event stream (SSE), in order.
    let sse = read_events(
        &app.url(&format!("/api/v1/events?job_id={id}")),
        None,
        |e| e.iter().any(|e| e.data.contains("\"completed\"")),
    )
    .await;
    let from_sse: Vec<Value> = sse
        .iter()
        .filter(|e| e.event.starts_with("alert."))
        .map(|e| {
            let mut v: Value = serde_json::from_str(&e.data).unwrap();
            v["type"] = e.event.clone().into();
            v
        })
        .collect();
    assert_eq!(summary(&from_sse), expected());

    // To the webhook, signed (the reference library verified each), once each, in order.
    crate::webhooks::until(Duration::from_secs(30), "four alert messages", || {
        receiver
            .records()
            .iter()
            .filter(|r| r["accepted"] == true)
            .count()
            >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<Value> = receiver
        .records()
        .into_iter()
        .filter(|r| r["accepted"] == true)
        .map(|r| r["payload"].clone())
        .collect();
    assert!(receiver.records().iter().all(|r| r["verified"] == true));
    assert_eq!(
        summary(&got),
        expected(),
        "only alert events were asked for"
    );
    for (hook, listed) in got.iter().zip(&events) {
        assert_eq!(hook["data"], listed["data"]);
    }

    // And to the Redis result stream, after the result that fired each.
    let mut c = crate::fixtures::local_redis().await;
    let entries: redis::streams::StreamRangeReply = c.xrange_all(&key).await.unwrap();
    let field = |e: &redis::streams::StreamId, k: &str| e.get::<String>(k).unwrap_or_default();
    let kinds: Vec<String> = entries.ids.iter().map(|e| field(e, "type")).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "result").count(), 40);
    let redis_events: Vec<Value> = entries
        .ids
        .iter()
        .filter(|e| field(e, "type").starts_with("alert."))
        .map(|e| {
            let mut v: Value = serde_json::from_str(&field(e, "data")).unwrap();
            v["type"] = field(e, "type").into();
            v
        })
        .collect();
    assert_eq!(summary(&redis_events), expected());
    let first = kinds.iter().position(|k| k == "alert.started").unwrap();
    assert_eq!(
        field(&entries.ids[first - 1], "seq"),
        "9",
        "published after result 9"
    );
    let _: () = c.del(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_events_are_the_same_after_a_kill_9_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let origin = stream(dir.path()).await;
    let model = ModelServer::start().await;
    model.set_delay(Duration::from_millis(120));
    let db = format!("sqlite://{}/free-roam.db?mode=rwc", dir.path().display());
    // One request at a time, so the process is killed mid-job between two events.
    let slow = [("MAX_BATCH_SIZE", "1"), ("OPENAI_MAX_CONCURRENCY", "1")];
    let mut first = Replica::start_env("one", &db, &model, 1, dir.path(), &slow).await;
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/inference/start", first.base))
        .json(&json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2, "alerts": [bright_rule()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = r.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Killed once the first alert has started and before it ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let a = alert_events(&first.base, &id).await;
        if !a["events"].as_array().unwrap().is_empty() {
            assert_eq!(a["active"], json!(["bright"]), "{a}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no alert event: {a}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    first.signal("-KILL");
    first.exited(Duration::from_secs(5)).await;
    let again = Replica::start_env("one-again", &db, &model, 1, dir.path(), &slow).await;
    let st = wait_all(
        &again.base,
        std::slice::from_ref(&id),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(st[0]["status"], "completed", "{}", st[0]);
    let alerts = alert_events(&again.base, &id).await;
    assert_eq!(
        summary(alerts["events"].as_array().unwrap()),
        expected(),
        "the same events, each once: {alerts}"
    );
    let results = all_results(&again.base, &id).await;
    assert_eq!(results.len(), 40, "each frame once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_updated_mid_job_names_its_version_in_events() {
    let dir = tempfile::tempdir().unwrap();
    let origin = stream(dir.path()).await;
    let model = ModelServer::start().await;
    model.set_delay(Duration::from_millis(100));
    let mut env = model.env();
    env.extend([
        ("MAX_BATCH_SIZE", "1".to_owned()),
        ("OPENAI_MAX_CONCURRENCY", "1".to_owned()),
    ]);
    let app = TestApp::spawn_with(Db::Postgres, &pairs(&env)).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2, "alerts": [bright_rule()]}))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while alert_events(&app.base, &id).await["events"] == json!([]) {
        assert!(std::time::Instant::now() < deadline, "no first event");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let updated = app
        .post(
            "/api/v1/alerts/update",
            json!({"job_id": id, "alerts": [{"name": "bright", "question": "Is the picture bright now?", "min_consecutive": 2}]}),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["version"], 2);
    assert_eq!(updated.body["scope"], "job");
    let done = app
        .wait_status(&id, &["completed", "failed"], Duration::from_secs(90))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let alerts = alert_events(&app.base, &id).await;
    let events = alerts["events"].as_array().unwrap();
    assert_eq!(summary(events), expected(), "{alerts}");
    let versions: Vec<i64> = events
        .iter()
        .map(|e| e["data"]["alert_version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        vec![1, 2, 2, 2],
        "each event names the version that fired it"
    );
    assert_eq!(events[1]["data"]["question"], "Is the picture bright now?");
    // The frames were asked the new question from the update on, and say which version.
    let results = app.all_results(&id).await;
    let answered: Vec<i64> = results
        .iter()
        .map(|r| r["alerts"][0]["version"].as_i64().unwrap())
        .collect();
    assert!(answered.windows(2).all(|w| w[0] <= w[1]), "{answered:?}");
    assert_eq!(answered.first(), Some(&1));
    assert_eq!(answered.last(), Some(&2));
    let history = app
        .get(&format!("/api/v1/alerts/history?job_id={id}"))
        .await
        .body;
    assert_eq!(history["total"], 2, "{history}");
    assert_eq!(
        history["history"][1]["alerts"][0]["question"],
        "Is the picture bright?"
    );
    let current = app
        .get(&format!("/api/v1/alerts/current?job_id={id}"))
        .await
        .body;
    assert_eq!(current["version"], 2);

    // Global rules apply to a job that has none of its own.
    let global = app
        .post("/api/v1/alerts/update", json!({"alerts": [bright_rule()]}))
        .await;
    assert_eq!(global.status, StatusCode::OK, "{}", global.body);
    assert_eq!(global.body["scope"], "global");
    let other = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2}))
        .await;
    let current = app
        .get(&format!("/api/v1/alerts/current?job_id={other}"))
        .await
        .body;
    assert_eq!(current["scope"], "global", "{current}");
    app.delete(&format!("/api/v1/inference/cancel/{other}"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_answers_are_checked_against_the_prompts_schema() {
    let dir = tempfile::tempdir().unwrap();
    let origin = stream(dir.path()).await;
    let model = ModelServer::start().await;
    let app = TestApp::spawn_with(Db::Postgres, &pairs(&model.env())).await;
    // The stand-in answers {"prompt": ..., "brightness": ...}: this schema holds.
    let fits = json!({
        "type": "object",
        "properties": {"brightness": {"type": "number", "minimum": 0, "maximum": 255}, "prompt": {"type": "string"}},
        "required": ["brightness", "prompt"]
    });
    let good = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 1,
            "prompt": "How bright is it?", "response_format": fits}))
        .await;
    // This one it never satisfies.
    let counts = json!({
        "type": "object",
        "properties": {"people": {"type": "integer"}},
        "required": ["people"]
    });
    let bad = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 1,
            "prompt": "How many people?", "response_format": counts}))
        .await;
    for id in [&good, &bad] {
        let done = app
            .wait_status(id, &["completed", "failed"], Duration::from_secs(90))
            .await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    let status = app
        .get(&format!("/api/v1/inference/status/{good}"))
        .await
        .body;
    assert_eq!(status["response_format"], fits, "{status}");

    let valid = app.all_results(&good).await;
    assert_eq!(valid.len(), 20);
    for r in &valid {
        assert!(r["error"].is_null(), "{r}");
        let out = &r["output"];
        assert!(out.is_object(), "stored as a JSON object: {r}");
        assert_eq!(out["prompt"], "How bright is it?");
        assert!(out["brightness"].is_number());
    }
    let invalid = app.all_results(&bad).await;
    assert_eq!(invalid.len(), 20);
    for r in &invalid {
        assert!(r["output"].is_null(), "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains("does not match response_format"), "{e}");
        assert!(e.contains("people"), "names what is missing: {e}");
        assert!(
            e.contains("raw answer: {\"brightness\""),
            "keeps the raw answer: {e}"
        );
    }
    // The model was told the schema, as OpenAI's structured outputs take it.
    let asked = model.asked();
    let told = asked
        .iter()
        .find(|a| a.prompt == "How bright is it?")
        .and_then(|a| a.response_format.clone())
        .expect("response_format sent");
    assert_eq!(told["type"], "json_schema");
    assert_eq!(told["json_schema"]["schema"], fits);
    assert!(asked
        .iter()
        .filter(|a| a.prompt == "What is the brightness?")
        .all(|a| a.response_format.is_none()));

    // Prompt versions carry it; a version without one takes free text again.
    let v2 = app
        .post(
            "/api/v1/prompt/update",
            json!({"job_id": good, "prompt": "Count people", "response_format": counts}),
        )
        .await;
    assert_eq!(v2.status, StatusCode::OK, "{}", v2.body);
    assert_eq!(v2.body["response_format"], counts);
    let v3 = app
        .post(
            "/api/v1/prompt/update",
            json!({"job_id": good, "prompt": "Describe"}),
        )
        .await;
    assert!(v3.body["response_format"].is_null());
    let history = app
        .get(&format!("/api/v1/prompt/history?job_id={good}"))
        .await
        .body;
    let formats: Vec<&Value> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["response_format"])
        .collect();
    assert_eq!(formats, vec![&Value::Null, &counts, &fits]);
}

#[tokio::test]
async fn bad_alerts_and_schemas_are_refused_naming_the_field() {
    let app = TestApp::spawn_with(
        Db::Sqlite,
        &[("MAX_ALERTS", "2"), ("MAX_SCHEMA_BYTES", "512")],
    )
    .await;
    let stream = "https://example.com/live/stream.m3u8";
    let rule = |name: &str| json!({"name": name, "question": "Is it raining?"});
    let cases = [
        (
            json!({"prompt": "p", "response_format": {"type": "nonsense"}}),
            "response_format",
            "not a valid JSON Schema",
        ),
        (
            json!({"prompt": "p", "response_format": "object"}),
            "response_format",
            "JSON Schema object",
        ),
        (
            json!({"response_format": {"type": "object"}}),
            "response_format",
            "give prompt too",
        ),
        (
            json!({"prompt": "p", "response_format": {"description": "x".repeat(600)}}),
            "response_format",
            "MAX_SCHEMA_BYTES=512",
        ),
        (
            json!({"alerts": [{"name": "a", "question": "  "}]}),
            "alerts",
            "alerts[0].question must not be empty",
        ),
        (
            json!({"alerts": [rule("a"), rule("b"), rule("c")]}),
            "alerts",
            "MAX_ALERTS=2",
        ),
        (
            json!({"alerts": [rule("a"), rule("a")]}),
            "alerts",
            "used twice",
        ),
        (json!({"alerts": [rule("a b")]}), "alerts", "alerts[0].name"),
        (
            json!({"alerts": [{"name": "a", "question": "q", "min_consecutive": 0}]}),
            "alerts",
            "min_consecutive",
        ),
        (json!({"alerts": [{"name": "a"}]}), "", "question"),
        (
            json!({"alerts": [{"name": "a", "question": "q", "colour": "red"}]}),
            "",
            "colour",
        ),
    ];
    for (extra, param, says) in cases {
        let mut body = json!({"stream_ref": stream});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let reply = app.post("/api/v1/inference/start", body.clone()).await;
        assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
        if !param.is_empty() {
            assert_eq!(reply.body["error"]["param"], param, "for {body}");
        }
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message} (for {body})");
    }
    let jobs = app.get("/api/v1/inference/jobs").await.body;
    assert_eq!(jobs["total"], 0, "nothing was created");

    let reply = app
        .post(
            "/api/v1/alerts/update",
            json!({"alerts": [{"name": "a", "question": ""}]}),
        )
        .await;
    assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(reply.body["error"]["param"], "alerts");
    let reply = app
        .post(
            "/api/v1/alerts/update",
            json!({"job_id": "nope", "alerts": []}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = app
        .post(
            "/api/v1/prompt/update",
            json!({"prompt": "p", "response_format": {"type": 12}}),
        )
        .await;
    assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");
    assert_eq!(reply.body["error"]["param"], "response_format");
    assert_eq!(
        app.get("/api/v1/alerts/current").await.status,
        StatusCode::NOT_FOUND
    );
    let reply = app.get("/api/v1/inference/alerts/nope").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // Still serving.
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
}
