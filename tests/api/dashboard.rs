//! The dashboard at `/`: served from the binary with its security headers, and used in
//! Debian's headless Chromium by tests/browser/dashboard.py (selenium + chromedriver) the way
//! a user would: sign in with a key, start a job, watch results with their frames, edit the
//! prompt, cancel; no console errors; screenshots in target/test-artefacts/dashboard.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{live_origin, ModelServer};
use crate::helpers::{pairs, tools_python, Db, TestApp};

const KEY: &str = "dashboard-test-key";

#[tokio::test]
async fn the_dashboard_and_its_assets_are_served_offline_with_a_strict_policy() {
    let app = TestApp::spawn_with(Db::Sqlite, &[("API_KEYS", KEY)]).await;
    let page = reqwest::get(app.url("/")).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK, "the page needs no key");
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    // Everything the page loads comes from this service.
    for (asset, content_type) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        assert!(
            html.contains(&format!("\"{asset}\"")),
            "the page loads {asset}"
        );
        let r = reqwest::get(app.url(asset)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
        assert_eq!(r.headers()["content-type"], content_type, "{asset}");
        let etag = r.headers()["etag"].clone();
        let again = app
            .client
            .get(app.url(asset))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{asset}");
    }
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no other origin: {html}"
    );
    let script = reqwest::get(app.url("/ui/app.js"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !script.contains("innerHTML"),
        "the script builds no markup from strings"
    );
    let config: Value = reqwest::get(app.url("/ui/config.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["auth_required"], true);
    // The API behind it still wants the key.
    let jobs = reqwest::get(app.url("/api/v1/inference/jobs"))
        .await
        .unwrap();
    assert_eq!(jobs.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_drives_the_dashboard_in_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    // A live stream (one 1 s segment a second for 150 s) whose brightness rises with time.
    let origin = live_origin(dir.path(), 150.0, 3, Duration::from_secs(1), None, true).await;
    let model = ModelServer::start().await;
    let owned = model.env();
    let mut env = pairs(&owned);
    // The default rate limits, as a user gets them: the page must live within them.
    env.extend([("API_KEYS", KEY), ("RATE_LIMIT_ENABLED", "true")]);
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    let http = reqwest::Client::new();
    // A global alert rule: the page shows the job's alert events.
    let rule = http
        .post(app.url("/api/v1/alerts/update"))
        .bearer_auth(KEY)
        .json(&json!({"alerts": [{"name": "bright", "question": "Is the picture bright?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(rule.status(), StatusCode::OK);

    let artefacts = root.join("target/test-artefacts/dashboard");
    let _ = std::fs::remove_dir_all(&artefacts);
    let run = tokio::process::Command::new(tools_python())
        .arg(root.join("tests/browser/dashboard.py"))
        .args(["--base", &app.base, "--key", KEY])
        .args(["--stream", &origin.url("live/live.m3u8")])
        .arg("--artefacts")
        .arg(&artefacts)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser scenario ends within 4 minutes")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser scenario failed:\n{stdout}\n{stderr}"
    );
    assert!(
        std::fs::read_dir(&artefacts).unwrap().count() >= 6,
        "screenshots are written"
    );

    // What the page did, seen through the API.
    let job_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("job_id="))
        .expect("the scenario names its job")
        .to_owned();
    let read = |path: String| {
        let request = http.get(app.url(&path)).bearer_auth(KEY);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let status = read(format!("/api/v1/inference/status/{job_id}")).await;
    assert_eq!(status["status"], "cancelled", "{status}");
    assert_eq!(status["prompt_version"], 2, "{status}");
    let replay_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("replay_id="))
        .expect("the scenario names its replay");
    let replayed = read(format!("/api/v1/inference/results/{replay_id}")).await;
    let originals: Vec<(Value, Value)> = replayed["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["replay_of"]["job_id"].clone(),
                r["replay_of"]["seq"].clone(),
            )
        })
        .collect();
    assert_eq!(
        originals,
        (0..3)
            .map(|i| (json!(job_id), json!(i)))
            .collect::<Vec<_>>(),
        "the replay asked about results 0 to 2 of the job"
    );
    let asked: Vec<String> = model.asked().into_iter().map(|a| a.prompt).collect();
    assert!(
        asked.iter().any(|p| p.starts_with("Describe <b>bold</b>")),
        "the model got the page's first prompt as typed"
    );
    assert!(
        asked.iter().any(|p| p == "count the cars in the picture"),
        "the model got the prompt edited on the page"
    );
}
