//! Starts the real service on 127.0.0.1:0 against SQLite or PostgreSQL and talks HTTP to it.

use std::collections::HashMap;

use free_roam::config::Settings;
use free_roam::startup::Application;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Runs an `async fn name(db: Db)` test once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! db_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Db::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::helpers::Db::Postgres).await
                }
            }
        )*
    };
}

pub fn postgres_base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh schema in the test PostgreSQL database; fails loudly if PostgreSQL is unreachable.
pub async fn fresh_postgres_schema() -> String {
    use sqlx::Connection;
    let base = postgres_base_url();
    let mut conn = sqlx::postgres::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL tests need a server at TEST_DATABASE_URL={base} ({e}). \
             Run scripts/test, which starts one, or point TEST_DATABASE_URL at yours."
            )
        });
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    // The schema name is ours: "t_" and hex digits.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options[search_path]={schema}")
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: free_roam::api::AppState,
    pub database_url: String,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestApp {
    pub async fn spawn(db: Db) -> Self {
        Self::spawn_with(db, &[]).await
    }

    /// Starts the service with the test defaults overridden by `env`.
    pub async fn spawn_with(db: Db, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = match db {
            Db::Sqlite => format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("free-roam.db").display()
            ),
            Db::Postgres => fresh_postgres_schema().await,
        };
        let mut vars: HashMap<String, String> = [
            ("HOST", "127.0.0.1"),
            ("PORT", "0"),
            ("LOG_LEVEL", "warn"),
            ("LOG_FORMAT", "text"),
            ("RATE_LIMIT_ENABLED", "false"),
            // A model server that never answers: jobs wait for it, so they stay active.
            ("MODEL_TYPE", "openai"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
            ("OPENAI_MODEL", "test-model"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        vars.insert("DATABASE_URL".into(), database_url.clone());
        for (k, v) in env {
            vars.insert(k.to_string(), v.to_string());
        }
        let settings = Settings::from_sources(None, None, vars).expect("test settings are valid");
        free_roam::telemetry::init_logging(&settings);
        let app = Application::build(settings)
            .await
            .expect("application starts");
        let base = format!("http://{}", app.local_addr());
        let state = app.state().clone();
        let shutdown = app.shutdown_token();
        let server = tokio::spawn(app.run_until_stopped());
        Self {
            base,
            client: reqwest::Client::new(),
            state,
            database_url,
            shutdown,
            server,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("request reaches the service");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.client.post(self.url(path)).json(&body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.client.delete(self.url(path))).await
    }

    /// Starts a job on an HLS URL and returns its id.
    pub async fn start_job(&self, extra: Value) -> String {
        let mut body = serde_json::json!({"stream_ref": "https://example.com/live/stream.m3u8"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let reply = self.post("/api/v1/inference/start", body).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
        reply.body["job_id"].as_str().expect("job_id").to_owned()
    }

    /// Graceful shutdown; returns what `run_until_stopped` returned, and the folder holding
    /// the SQLite file so the caller can reopen it.
    pub async fn stop(self) -> (anyhow::Result<()>, tempfile::TempDir) {
        self.shutdown.cancel();
        (self.server.await.expect("server task"), self._dir)
    }
}

/// Asserts the error shape: `{"error": {"code", "message", "param"?}, "detail": message}`.
pub fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.body);
    assert_eq!(reply.body["error"]["code"], code, "body: {}", reply.body);
    let message = reply.body["error"]["message"]
        .as_str()
        .expect("error.message is a string");
    assert!(!message.is_empty());
    assert_eq!(reply.body["detail"], message, "detail repeats the message");
    assert!(reply
        .headers
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("application/json")));
}

impl TestApp {
    /// Polls the job's status until `done` holds, or panics after `within`.
    pub async fn wait_for(
        &self,
        job_id: &str,
        within: std::time::Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let s = self
                .get(&format!("/api/v1/inference/status/{job_id}"))
                .await
                .body;
            if done(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting; last status: {s}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits until the job is in one of `statuses`.
    pub async fn wait_status(
        &self,
        job_id: &str,
        statuses: &[&str],
        within: std::time::Duration,
    ) -> Value {
        self.wait_for(job_id, within, |s| {
            statuses.iter().any(|st| s["status"] == *st)
        })
        .await
    }

    /// Every result of a job, read page by page with `next_after`.
    pub async fn all_results(&self, job_id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<i64> = None;
        loop {
            let path = match after {
                Some(a) => format!("/api/v1/inference/results/{job_id}?limit=50&after={a}"),
                None => format!("/api/v1/inference/results/{job_id}?limit=50"),
            };
            let page = self.get(&path).await.body;
            let results = page["results"].as_array().cloned().unwrap_or_default();
            if results.is_empty() {
                return out;
            }
            after = page["next_after"].as_i64();
            out.extend(results);
        }
    }
}

/// Settings as the pairs `spawn_with` takes.
/// The Python of the test tools' venv (selenium, standardwebhooks...), which
/// scripts/setup-system.sh --services installs.
pub fn tools_python() -> std::path::PathBuf {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-system.sh --services (scripts/test does)",
        python.display()
    );
    python
}

/// A TCP port free on 127.0.0.1 now (for a server that must be told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn pairs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}
