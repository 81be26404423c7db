//! The real binary: start, serve, migrate, refuse bad settings, stop cleanly on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{fresh_postgres_schema, Db, TestApp};

const BIN: &str = env!("CARGO_BIN_EXE_free-roam");

/// A clean environment: only what the test sets, run in a fresh directory.
fn command(dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

#[tokio::test]
async fn binary_serves_on_defaults_and_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::helpers::free_port();
    let mut child = command(dir.path())
        .args(["serve"])
        .env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if let Ok(r) = client.get(format!("{base}/health/live")).send().await {
            up = r.status() == StatusCode::OK;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the service answers /health/live");
    let r = client
        .post(format!("{base}/api/v1/inference/start"))
        .json(&serde_json::json!({"stream_ref": "frames"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        dir.path().join("data/free-roam.db").exists(),
        "the embedded SQLite file is created under ./data"
    );

    // SQLite runs one replica: a second process on the same file is refused, saying why.
    let second = command(dir.path())
        .args(["serve"])
        .env("PORT", crate::helpers::free_port().to_string())
        .env("HOST", "127.0.0.1")
        .output()
        .unwrap();
    assert!(
        !second.status.success(),
        "a second process on the SQLite file exits"
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another free-roam process is using the SQLite database")
            && err.contains("PostgreSQL"),
        "{err}"
    );
    assert_eq!(
        client
            .get(format!("{base}/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK,
        "the first goes on"
    );

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("did not exit within 10 s of SIGTERM")
    });
    assert!(status.success(), "exit status {status}");
}

#[test]
fn bad_settings_stop_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path())
        .env("DEFAULT_FPS", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEFAULT_FPS"), "{err}");

    std::fs::write(dir.path().join(".env"), "MAX_BATCH_SIZE=0\n").unwrap();
    let out = command(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAX_BATCH_SIZE"));
}

#[tokio::test]
async fn migrate_runs_migrations_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path())
        .arg("migrate")
        .env("DATABASE_URL", "sqlite://db/x.db?mode=rwc")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store =
        free_roam::store::Store::connect(&format!("sqlite://{}/db/x.db", dir.path().display()), 1)
            .await
            .unwrap();
    assert!(store.migrations_applied().await.unwrap());

    // PostgreSQL too, in its own schema.
    let url = fresh_postgres_schema().await;
    let out = command(dir.path())
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = free_roam::store::Store::connect(&url, 1).await.unwrap();
    assert!(store.migrations_applied().await.unwrap());
}

#[tokio::test]
async fn graceful_stop_returns_ok_and_keeps_jobs() {
    for db in [Db::Sqlite, Db::Postgres] {
        let app = TestApp::spawn(db).await;
        let id = app.start_job(serde_json::json!({})).await;
        let url = app.database_url.clone();
        let (stopped, _dir) = app.stop().await;
        stopped.expect("run_until_stopped returns Ok");
        let store = free_roam::store::Store::connect(&url, 1).await.unwrap();
        let job = store
            .get_job(&id)
            .await
            .unwrap()
            .expect("the job survives a restart");
        assert_eq!(job.status, free_roam::domain::JobStatus::Pending);
    }
}
