//! Webhooks end to end: a real receiver (a Python HTTP server in a child process) verifies
//! every request with `standardwebhooks`, the Standard Webhooks specification's reference
//! library, and records it; the service runs real jobs against a real HLS origin.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{make_hls, Container, ModelServer, Origin};
use crate::helpers::{assert_error, pairs, Db, TestApp};

pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The receiver process.
pub(crate) struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Receiver {
    /// Starts a receiver answering `status` to every request that verifies (0: any port).
    pub(crate) fn start(log: &Path, port: u16, status: u16) -> Self {
        Self::start_with(log, port, status, None)
    }

    /// [`Receiver::start`], answering 503 to everything while `down_while` exists.
    fn start_with(log: &Path, port: u16, status: u16, down_while: Option<&Path>) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(crate::helpers::tools_python())
            .arg(root.join("tests/webhook_receiver.py"))
            .args(["--secret", SECRET, "--log"])
            .arg(log)
            .args(["--port", &port.to_string(), "--status", &status.to_string()])
            .args(
                down_while
                    .map(|p| ["--down-while".into(), p.as_os_str().to_owned()])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("the receiver starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the receiver prints its port");
        Self {
            child,
            port,
            log: log.to_owned(),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/free-roam", self.port)
    }

    /// Everything received so far, in arrival order.
    pub(crate) fn records(&self) -> Vec<Value> {
        records(&self.log)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn records(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the receiver accepted, as `type` (and seq or status) per message.
fn summary(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["accepted"] == true)
        .map(|r| {
            let p = &r["payload"];
            match p["type"].as_str().unwrap() {
                "result" => format!("result {}", p["data"]["seq"]),
                "status" => format!("status {}", p["data"]["status"].as_str().unwrap()),
                other => other.to_owned(),
            }
        })
        .collect()
}

pub(crate) async fn until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_30_s_gets_every_event_once_in_order_signed() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 16.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    // About 40 s of work: one frame at a time, 1.2 s each.
    model.set_delay(Duration::from_millis(1200));
    let mut env = model.env();
    env.extend([
        ("MAX_BATCH_SIZE", "1".to_owned()),
        ("OPENAI_MAX_CONCURRENCY", "1".to_owned()),
        ("WEBHOOK_MAX_BACKOFF_SECS", "2".to_owned()),
    ]);
    let app = TestApp::spawn_with(Db::Postgres, &pairs(&env)).await;
    let log = dir.path().join("received.jsonl");
    let down = dir.path().join("down");
    let receiver = Receiver::start_with(&log, 0, 204, Some(&down));
    let id = app
        .start_job(json!({
            "stream_ref": origin.url("vod/index.m3u8"), "fps": 2,
            "webhook": {"url": receiver.url(), "secret": SECRET},
        }))
        .await;

    // A few results arrive; then the receiver answers 503 for 30 s while the job goes on.
    until(Duration::from_secs(30), "three results", || {
        summary(&receiver.records())
            .iter()
            .filter(|s| s.starts_with("result"))
            .count()
            >= 3
    })
    .await;
    std::fs::write(&down, "").unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = app
        .get(&format!("/api/v1/inference/status/{id}"))
        .await
        .body;
    let hook = &during["webhooks"][0];
    assert_eq!(hook["endpoint"], "job", "{during}");
    assert!(hook["pending"].as_i64().unwrap() > 0, "{hook}");
    assert!(hook["failed_attempts"].as_i64().unwrap() > 0, "{hook}");
    assert!(
        hook["last_error"].as_str().unwrap().contains("503"),
        "{hook}"
    );
    assert!(
        !during.to_string().contains(&SECRET[6..]),
        "the secret is never shown"
    );
    let refused = receiver
        .records()
        .iter()
        .filter(|r| r["accepted"] == false)
        .count();
    assert!(refused >= 3, "retried while down: {refused} refusals");

    // Up again: everything queued meanwhile arrives.
    std::fs::remove_file(&down).unwrap();
    let done = app
        .wait_status(&id, &["completed", "failed"], Duration::from_secs(90))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let status = app
        .wait_for(&id, Duration::from_secs(30), |s| {
            s["webhooks"][0]["pending"] == 0
        })
        .await;
    let hook = &status["webhooks"][0];
    assert_eq!(hook["dead"], 0, "{hook}");
    let all = receiver.records();
    assert!(
        all.iter().all(|r| r["verified"] == true),
        "every request verifies with the reference library: {:?}",
        all.iter().find(|r| r["verified"] != true)
    );
    let got: Vec<Value> = all.into_iter().filter(|r| r["accepted"] == true).collect();
    let mut ids: Vec<&str> = got.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        got.len(),
        "each message accepted once, by webhook-id"
    );
    let n = done["results_count"].as_i64().unwrap();
    assert_eq!(n, 32);
    let mut expected = vec!["status pending".to_owned(), "status running".to_owned()];
    expected.extend((0..n).map(|s| format!("result {s}")));
    expected.push("status completed".to_owned());
    assert_eq!(summary(&got), expected, "every event once, in order");
    assert_eq!(hook["delivered"], expected.len());

    // A result's data is the result as /results shows it, with its job.
    let stored = app.all_results(&id).await;
    for (r, s) in got[2..].iter().zip(&stored) {
        let mut data = r["payload"]["data"].clone();
        assert_eq!(data["job_id"], id);
        data.as_object_mut().unwrap().remove("job_id");
        assert_eq!(&data, s);
    }
    // Deliveries are listed with their state.
    let list = app
        .get(&format!(
            "/api/v1/webhooks/deliveries?job_id={id}&state=delivered&limit=1000"
        ))
        .await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(
        list.body["deliveries"].as_array().unwrap().len(),
        expected.len()
    );
    assert!(!list.body.to_string().contains(&SECRET[6..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_answers_410_gets_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 3.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = TestApp::spawn_with(Db::Sqlite, &pairs(&model.env())).await;
    let log = dir.path().join("received.jsonl");
    let receiver = Receiver::start(&log, 0, 410);
    let id = app
        .start_job(json!({
            "stream_ref": origin.url("vod/index.m3u8"), "fps": 2,
            "webhook": {"url": receiver.url(), "secret": SECRET, "events": ["result", "status"]},
        }))
        .await;
    app.wait_status(&id, &["completed"], Duration::from_secs(60))
        .await;
    let status = app
        .wait_for(&id, Duration::from_secs(20), |s| {
            s["webhooks"][0]["gone"] == true && s["webhooks"][0]["pending"] == 0
        })
        .await;
    // A second job to the same endpoint queues nothing for it.
    let second = app
        .start_job(json!({
            "stream_ref": origin.url("vod/index.m3u8"), "fps": 2,
            "webhook": {"url": receiver.url(), "secret": SECRET},
        }))
        .await;
    app.wait_status(&second, &["completed"], Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.records().len(),
        1,
        "one request, answered 410, then none"
    );
    assert_eq!(receiver.records()[0]["verified"], true);
    let hook = &status["webhooks"][0];
    assert_eq!(hook["delivered"], 0);
    assert!(hook["cancelled"].as_i64().unwrap() >= 1, "{hook}");
    // Sending it again is refused: the endpoint said it is gone.
    let cancelled = app
        .get(&format!(
            "/api/v1/webhooks/deliveries?job_id={id}&state=cancelled"
        ))
        .await;
    let first = &cancelled.body["deliveries"].as_array().unwrap()[0];
    assert!(first["last_error"].as_str().unwrap().contains("410"));
    let r = app
        .post(
            &format!(
                "/api/v1/webhooks/deliveries/{}/resend",
                first["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_deliveries_are_listed_and_sent_again_to_the_global_webhook() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 2.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    // A port nobody listens on (yet).
    let port = crate::helpers::free_port();
    let url = format!("http://127.0.0.1:{port}/hooks/free-roam");
    let mut env = model.env();
    env.extend([
        ("WEBHOOK_URL", url.clone()),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
        ("WEBHOOK_EVENTS", "result".to_owned()),
        ("WEBHOOK_MAX_AGE_SECS", "2".to_owned()),
        ("WEBHOOK_MAX_BACKOFF_SECS", "1".to_owned()),
    ]);
    let app = TestApp::spawn_with(Db::Sqlite, &pairs(&env)).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2}))
        .await;
    app.wait_status(&id, &["completed"], Duration::from_secs(60))
        .await;
    let status = app
        .wait_for(&id, Duration::from_secs(30), |s| {
            s["webhooks"][0]["dead"] == 4 && s["webhooks"][0]["pending"] == 0
        })
        .await;
    assert_eq!(status["webhooks"][0]["endpoint"], "global");
    assert_eq!(status["webhooks"][0]["events"], json!(["result"]));
    let dead = app
        .get(&format!(
            "/api/v1/webhooks/deliveries?state=dead&job_id={id}"
        ))
        .await
        .body;
    let dead = dead["deliveries"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 4, "newest first, results only");
    assert!(dead.iter().all(|d| d["attempts"].as_i64().unwrap() >= 1
        && d["last_error"].as_str().unwrap().contains("connect")));

    // The receiver is up now: each dead one sent again arrives, signed.
    let log = dir.path().join("received.jsonl");
    let receiver = Receiver::start(&log, port, 204);
    for d in dead.iter().rev() {
        let r = app
            .post(
                &format!(
                    "/api/v1/webhooks/deliveries/{}/resend",
                    d["id"].as_str().unwrap()
                ),
                json!({}),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
        assert_eq!(r.body["state"], "pending");
    }
    until(Duration::from_secs(20), "four deliveries", || {
        receiver.records().len() >= 4
    })
    .await;
    let got = receiver.records();
    assert!(got.iter().all(|r| r["verified"] == true));
    assert_eq!(
        summary(&got),
        ["result 0", "result 1", "result 2", "result 3"]
    );
    let r = app
        .post(
            &format!(
                "/api/v1/webhooks/deliveries/{}/resend",
                dead[0]["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    let r = app
        .post("/api/v1/webhooks/deliveries/msg_nope/resend", json!({}))
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhooks_are_refused_naming_the_field() {
    let app = TestApp::spawn(Db::Sqlite).await;
    let cases = [
        (
            json!({"url": "ftp://example.com/x", "secret": SECRET}),
            "webhook.url",
        ),
        (json!({"url": "not a url", "secret": SECRET}), "webhook.url"),
        (
            json!({"url": "http://169.254.169.254/latest", "secret": SECRET}),
            "webhook.url",
        ),
        (
            json!({"url": "http://127.0.0.1:9/x", "secret": SECRET}),
            "webhook.url",
        ),
        (
            json!({"url": "https://example.com/x", "secret": "hunter2"}),
            "webhook.secret",
        ),
        (
            json!({"url": "https://example.com/x", "secret": "whsec_c2hvcnQ="}),
            "webhook.secret",
        ),
        (json!({"url": "https://example.com/x"}), "webhook.secret"),
        (
            json!({"url": "https://example.com/x", "secret": SECRET, "events": []}),
            "webhook.events",
        ),
    ];
    for (hook, param) in cases {
        let r = app
            .post(
                "/api/v1/inference/start",
                json!({"stream_ref": "https://example.com/a.m3u8", "webhook": hook}),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{hook}: {}",
            r.body
        );
        assert_eq!(r.body["error"]["param"], param, "{hook}: {}", r.body);
        assert!(!r.body.to_string().contains("hunter2"));
    }
    let r = app
        .post(
            "/api/v1/inference/start",
            json!({"stream_ref": "https://example.com/a.m3u8",
            "webhook": {"url": "https://example.com/x", "secret": SECRET, "events": ["alerts"]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let r = app.get("/api/v1/webhooks/deliveries?state=lost").await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_error");

    // A good one is shown by its URL and events only.
    let id = app
        .start_job(json!({"webhook": {"url": "https://user:pw@example.com/x", "secret": SECRET, "events": ["status"]}}))
        .await;
    let status = app
        .get(&format!("/api/v1/inference/status/{id}"))
        .await
        .body;
    assert_eq!(
        status["webhooks"][0]["url"],
        "https://user:***@example.com/x"
    );
    assert_eq!(status["webhooks"][0]["events"], json!(["status"]));
    let text = app.get("/api/v1/inference/jobs").await.body.to_string();
    assert!(!text.contains(&SECRET[6..]) && !text.contains(":pw@"));

    // WEBHOOK_URL without WEBHOOK_SECRET, or a bad secret: start-up stops, naming it and
    // never echoing the secret.
    for (vars, name) in [
        (
            vec![("WEBHOOK_URL", "https://example.com/h")],
            "WEBHOOK_SECRET",
        ),
        (
            vec![
                ("WEBHOOK_URL", "https://example.com/h"),
                ("WEBHOOK_SECRET", "whsec_hunter2"),
            ],
            "WEBHOOK_SECRET",
        ),
        (vec![("WEBHOOK_EVENTS", "results")], "WEBHOOK_EVENTS"),
    ] {
        let err = free_roam::config::Settings::from_sources(
            None,
            None,
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(name), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
