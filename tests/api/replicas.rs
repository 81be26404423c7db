//! Several replicas on one PostgreSQL, as real service processes: jobs spread over them,
//! survive kill -9, SIGSTOP past the lease and rolling restarts, and every sampled frame has
//! exactly one result with `seq` contiguous from 0.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fixtures::{make_hls, pts_of, Container, ModelServer, Origin};
use crate::helpers::fresh_postgres_schema;

const BIN: &str = env!("CARGO_BIN_EXE_free-roam");
/// The shortest lease the settings allow, so takeovers happen within a test's patience.
const TTL_SECS: u64 = 3;
const LONG: Duration = Duration::from_secs(90);

pub(crate) struct Replica {
    name: String,
    pub(crate) base: String,
    child: Child,
}

impl Replica {
    async fn start(
        name: &str,
        database_url: &str,
        model: &ModelServer,
        per_replica: usize,
    ) -> Self {
        Self::start_in(
            name,
            database_url,
            model,
            per_replica,
            &std::env::temp_dir(),
        )
        .await
    }

    /// A replica whose working directory is `dir`.
    async fn start_in(
        name: &str,
        database_url: &str,
        model: &ModelServer,
        per_replica: usize,
        dir: &std::path::Path,
    ) -> Self {
        Self::start_env(name, database_url, model, per_replica, dir, &[]).await
    }

    /// [`Replica::start_in`] with more settings.
    pub(crate) async fn start_env(
        name: &str,
        database_url: &str,
        model: &ModelServer,
        per_replica: usize,
        dir: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Self {
        let port = crate::helpers::free_port();
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .current_dir(dir)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(["serve"])
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("DATABASE_URL", database_url)
            .env("REPLICA_ID", name)
            .env("LEASE_TTL_SECS", TTL_SECS.to_string())
            .env("MAX_CONCURRENT_STREAMS", per_replica.to_string())
            .env("MAX_ACTIVE_JOBS", "1000")
            .env("RATE_LIMIT_ENABLED", "false")
            .env("LOG_LEVEL", "warn")
            .env("LOG_FORMAT", "text")
            .env("MAX_BATCH_WAIT_MS", "5")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in model.env() {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let replica = Self {
            name: name.to_owned(),
            base: format!("http://127.0.0.1:{port}"),
            child: cmd.spawn().unwrap(),
        };
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client
                .get(format!("{}/health/live", replica.base))
                .send()
                .await
            {
                if r.status() == StatusCode::OK {
                    return replica;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("replica {name} never answered /health/live");
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.name);
    }

    /// Waits for the process to end; its exit status.
    pub(crate) async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "{} still running", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn get(base: &str, path: &str) -> Value {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "GET {path}");
    r.json().await.unwrap()
}

async fn start_job(base: &str, stream_ref: &str) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/inference/start"))
        .json(&json!({"stream_ref": stream_ref, "fps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Starts a job on `replica` with `body` and kills the process with SIGKILL once `results`
/// of its results are stored; the job's id.
pub(crate) async fn start_then_kill(replica: &mut Replica, body: &Value, results: usize) -> String {
    let started: Value = reqwest::Client::new()
        .post(format!("{}/api/v1/inference/start", replica.base))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["job_id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while all_results(&replica.base, &id).await.len() < results {
        assert!(std::time::Instant::now() < deadline, "no results");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    replica.signal("-KILL");
    replica.exited(Duration::from_secs(5)).await;
    id
}

pub(crate) async fn all_results(base: &str, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/api/v1/inference/results/{id}?limit=100&after={a}"),
            None => format!("/api/v1/inference/results/{id}?limit=100"),
        };
        let page = get(base, &path).await;
        let results = page["results"].as_array().unwrap().clone();
        if results.is_empty() {
            return out;
        }
        after = page["next_after"].as_i64();
        out.extend(results);
    }
}

pub(crate) async fn wait_all(base: &str, ids: &[String], within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let mut statuses = Vec::new();
        for id in ids {
            statuses.push(get(base, &format!("/api/v1/inference/status/{id}")).await);
        }
        if statuses
            .iter()
            .all(|s| s["status"] != "pending" && s["status"] != "running")
        {
            return statuses;
        }
        assert!(Instant::now() < deadline, "jobs still active: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every sampled frame of a `seconds`-long VOD at 2 fps answered exactly once, in order.
async fn assert_exactly_once(base: &str, id: &str, seconds: i64) {
    let results = all_results(base, id).await;
    let seqs: Vec<i64> = results.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        seqs,
        (0..seconds * 2).collect::<Vec<_>>(),
        "{id}: seq contiguous from 0"
    );
    assert_eq!(
        pts_of(&results),
        (0..seconds * 2).map(|i| i * 500).collect::<Vec<_>>(),
        "{id}: each frame once"
    );
    assert!(
        results.iter().all(|r| r["error"].is_null()),
        "{id}: {results:?}"
    );
}

/// Waits until some job has results and an owner among `owners`; its id and owner.
async fn a_job_running_on(base: &str, ids: &[String], owners: &[&str]) -> (String, String) {
    let deadline = Instant::now() + LONG;
    loop {
        for id in ids {
            let s = get(base, &format!("/api/v1/inference/status/{id}")).await;
            let owner = s["owner"].as_str().unwrap_or_default();
            if s["status"] == "running"
                && s["results_count"].as_i64() > Some(0)
                && owners.contains(&owner)
            {
                return (id.clone(), owner.to_owned());
            }
        }
        assert!(Instant::now() < deadline, "no job running on {owners:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    origin: Origin,
    model: ModelServer,
    db: String,
}

async fn setup(seconds: f64, model_delay: Duration) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", seconds, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    model.set_delay(model_delay);
    Setup {
        _dir: dir,
        origin,
        model,
        db: fresh_postgres_schema().await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_nine_jobs_each_frame_answered_once() {
    let s = setup(4.0, Duration::from_millis(100)).await;
    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        replicas.push(Replica::start(name, &s.db, &s.model, 3).await);
    }
    let stream = s.origin.url("vod/index.m3u8");
    let mut ids = Vec::new();
    for i in 0..9 {
        // Any replica admits; whichever has room runs.
        ids.push(start_job(&replicas[i % 3].base, &stream).await);
    }
    let statuses = wait_all(&replicas[0].base, &ids, LONG).await;
    let mut owners: Vec<&str> = Vec::new();
    for (id, status) in ids.iter().zip(&statuses) {
        assert_eq!(status["status"], "completed", "{status}");
        owners.push(status["owner"].as_str().unwrap());
        // Every replica answers for every job.
        for r in &replicas {
            assert_exactly_once(&r.base, id, 4).await;
        }
    }
    owners.sort_unstable();
    owners.dedup();
    assert!(
        owners.len() >= 2,
        "the jobs spread over the replicas: {owners:?}"
    );
    assert_eq!(
        s.model.asked().len(),
        9 * 8,
        "no frame went to the model twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_jobs_finish_elsewhere_exactly_once() {
    let s = setup(8.0, Duration::from_millis(150)).await;
    let mut a = Replica::start("a", &s.db, &s.model, 2).await;
    let b = Replica::start("b", &s.db, &s.model, 2).await;
    let stream = s.origin.url("vod/index.m3u8");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(start_job(&b.base, &stream).await);
    }
    let (job, _) = a_job_running_on(&b.base, &ids, &["a"]).await;
    a.signal("-KILL");
    a.exited(Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    // Its job moves to b once the lease runs out.
    loop {
        let st = get(&b.base, &format!("/api/v1/inference/status/{job}")).await;
        if st["owner"] == "b" {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(TTL_SECS + 5),
            "not taken over within the TTL and a few seconds: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let statuses = wait_all(&b.base, &ids, LONG).await;
    for (id, st) in ids.iter().zip(&statuses) {
        assert_eq!(st["status"], "completed", "{st}");
        assert_exactly_once(&b.base, id, 8).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_writes_nothing_after_takeover() {
    let s = setup(8.0, Duration::from_millis(150)).await;
    let a = Replica::start("a", &s.db, &s.model, 1).await;
    let stream = s.origin.url("vod/index.m3u8");
    let job = start_job(&a.base, &stream).await;
    a_job_running_on(&a.base, std::slice::from_ref(&job), &["a"]).await;
    a.signal("-STOP");
    let b = Replica::start("b", &s.db, &s.model, 1).await;
    let deadline = Instant::now() + Duration::from_secs(TTL_SECS + 10);
    loop {
        let st = get(&b.base, &format!("/api/v1/inference/status/{job}")).await;
        if st["status"] == "completed" {
            assert_eq!(st["owner"], "b", "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "b never finished the job: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = all_results(&b.base, &job).await;
    let status_before = get(&b.base, &format!("/api/v1/inference/status/{job}")).await;
    // a wakes up believing it still runs the job, with frames in flight.
    a.signal("-CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(all_results(&b.base, &job).await, before, "a stored nothing");
    let status_after = get(&b.base, &format!("/api/v1/inference/status/{job}")).await;
    for field in [
        "status",
        "owner",
        "results_count",
        "frames_processed",
        "completed_at",
    ] {
        assert_eq!(
            status_after[field], status_before[field],
            "{field} untouched by a"
        );
    }
    assert_exactly_once(&b.base, &job, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_hands_jobs_over_at_once() {
    let s = setup(10.0, Duration::from_millis(150)).await;
    let mut a = Replica::start("a", &s.db, &s.model, 2).await;
    let stream = s.origin.url("vod/index.m3u8");
    let ids = vec![
        start_job(&a.base, &stream).await,
        start_job(&a.base, &stream).await,
    ];
    a_job_running_on(&a.base, &ids, &["a"]).await;
    // The new pod starts before the old one stops.
    let b = Replica::start("b", &s.db, &s.model, 2).await;
    a.signal("-TERM");
    let stopped = Instant::now();
    assert!(
        a.exited(Duration::from_secs(30)).await.success(),
        "a exits 0"
    );
    for id in &ids {
        loop {
            let st = get(&b.base, &format!("/api/v1/inference/status/{id}")).await;
            if st["owner"] == "b" || st["status"] == "completed" {
                break;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(2) + a_exit_allowance(),
                "not handed over within 2 s of a's exit: {st}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let statuses = wait_all(&b.base, &ids, LONG).await;
    for (id, st) in ids.iter().zip(&statuses) {
        assert_eq!(st["status"], "completed", "{st}");
        assert_exactly_once(&b.base, id, 10).await;
    }
}

/// a's own shutdown time counts from SIGTERM too; it stops at a checkpoint within a second.
fn a_exit_allowance() -> Duration {
    Duration::from_secs(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_on_sqlite_killed_and_restarted_answers_each_frame_once() {
    let s = setup(8.0, Duration::from_millis(150)).await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/free-roam.db?mode=rwc", dir.path().display());
    let mut first = Replica::start_in("one", &db, &s.model, 2, dir.path()).await;
    let stream = s.origin.url("vod/index.m3u8");
    let job = start_job(&first.base, &stream).await;
    a_job_running_on(&first.base, std::slice::from_ref(&job), &["one"]).await;
    first.signal("-KILL");
    first.exited(Duration::from_secs(5)).await;
    // Restarted at once (a new random id would do too: on SQLite every active job is its own).
    let again = Replica::start_in("one-again", &db, &s.model, 2, dir.path()).await;
    let st = wait_all(&again.base, std::slice::from_ref(&job), LONG).await;
    assert_eq!(st[0]["status"], "completed", "{}", st[0]);
    assert_eq!(st[0]["owner"], "one-again");
    assert_exactly_once(&again.base, &job, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_job_moves_with_its_pending_entries_answered_once() {
    use redis::AsyncCommands;
    let s = setup(1.0, Duration::from_millis(100)).await;
    let mut c = crate::fixtures::local_redis().await;
    let key = format!("test:replicas:{}", uuid::Uuid::new_v4().simple());
    const N: i64 = 30;
    for i in 0..N {
        let _: String = c
            .xadd(
                &key,
                "*",
                &[
                    ("frame", crate::fixtures::jpeg_at(i * 500, 64, 48)),
                    ("ts_ms", (i * 500).to_string().into_bytes()),
                ],
            )
            .await
            .unwrap();
    }
    let mut a = Replica::start("a", &s.db, &s.model, 1).await;
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/inference/start", a.base))
        .json(&json!({"stream_ref": format!("redis://127.0.0.1:6379/{key}"), "fps": 2, "from_beginning": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let job = r.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    a_job_running_on(&a.base, std::slice::from_ref(&job), &["a"]).await;
    a.signal("-KILL");
    a.exited(Duration::from_secs(5)).await;
    let b = Replica::start("b", &s.db, &s.model, 1).await;
    let deadline = Instant::now() + LONG;
    loop {
        let st = get(&b.base, &format!("/api/v1/inference/status/{job}")).await;
        if st["results_count"].as_i64() == Some(N) {
            assert_eq!(st["owner"], "b", "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "not every entry answered: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let results = all_results(&b.base, &job).await;
    assert_eq!(
        pts_of(&results),
        (0..N).map(|i| i * 500).collect::<Vec<_>>(),
        "each entry answered once, in order"
    );
    // Acknowledged after storing: nothing left pending once the last result is in.
    let group = format!("free-roam:{job}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p: redis::streams::StreamPendingReply = c.xpending(&key, &group).await.unwrap();
        if p.count() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} entries still pending",
            p.count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = c.del(&key).await.unwrap();
}

/// A PostgreSQL of the test's own (initdb in a temporary directory), to stop and restart.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn as_postgres(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        // PostgreSQL refuses to run as root; CI runs as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start_new() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries (scripts/setup-system.sh --services)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().unwrap();
        Command::new("chmod")
            .arg("777")
            .arg(dir.path())
            .status()
            .unwrap();
        let port = crate::helpers::free_port();
        let pg = Self { dir, bin, port };
        let out = pg
            .as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(pg.dir.path().join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start();
        pg
    }

    fn start(&self) {
        let out = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                self.dir.path().display()
            ))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&self) {
        let out = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_loses_and_repeats_nothing() {
    let s = setup(10.0, Duration::from_millis(100)).await;
    let pg = PrivatePostgres::start_new();
    let a = Replica::start("a", &pg.url(), &s.model, 2).await;
    let stream = s.origin.url("vod/index.m3u8");
    let job = start_job(&a.base, &stream).await;
    a_job_running_on(&a.base, std::slice::from_ref(&job), &["a"]).await;
    pg.stop();
    // Meanwhile: not ready, saying why; alive; for longer than the lease.
    let http = reqwest::Client::new();
    let mut said = String::new();
    for _ in 0..100 {
        let r = http
            .get(format!("{}/health/ready", a.base))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            said = r.text().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        said.contains("database does not answer"),
        "readiness: {said}"
    );
    let live = http
        .get(format!("{}/health/live", a.base))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK, "liveness stays 200");
    tokio::time::sleep(Duration::from_secs(TTL_SECS + 2)).await;
    pg.start();
    let st = wait_all(&a.base, std::slice::from_ref(&job), LONG).await;
    assert_eq!(st[0]["status"], "completed", "{}", st[0]);
    assert_exactly_once(&a.base, &job, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_updates_and_cancel_reach_the_owner_from_any_replica() {
    let s = setup(30.0, Duration::from_millis(150)).await;
    let a = Replica::start("a", &s.db, &s.model, 1).await;
    let stream = s.origin.url("vod/index.m3u8");
    let job = start_job(&a.base, &stream).await;
    a_job_running_on(&a.base, std::slice::from_ref(&job), &["a"]).await;
    // b runs nothing (a holds the only job) but answers for it.
    let b = Replica::start("b", &s.db, &s.model, 1).await;
    let http = reqwest::Client::new();
    let up = http
        .post(format!("{}/api/v1/prompt/update", b.base))
        .json(&json!({"prompt": "count the cars", "job_id": job}))
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), StatusCode::OK);
    let version: i64 = up.json::<Value>().await.unwrap()["version"]
        .as_i64()
        .unwrap();
    // The owner uses it from its next batch.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let results = all_results(&b.base, &job).await;
        if results
            .iter()
            .any(|r| r["prompt_version"].as_i64() == Some(version))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the owner never used the new prompt"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked_before = s.model.asked().len();
    let c = http
        .delete(format!("{}/api/v1/inference/cancel/{job}", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(c.status(), StatusCode::OK);
    // The owner stops within a second: after that nothing more reaches the model or the store.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopped_at = s.model.asked().len();
    let count =
        get(&a.base, &format!("/api/v1/inference/status/{job}")).await["results_count"].clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.model.asked().len(),
        stopped_at,
        "the owner asked the model after the cancel"
    );
    let st = get(&a.base, &format!("/api/v1/inference/status/{job}")).await;
    assert_eq!(st["status"], "cancelled");
    assert_eq!(
        st["results_count"], count,
        "the owner stored results after the cancel"
    );
    assert!(
        stopped_at < asked_before + 20,
        "a 30 s job was stopped early"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_stream_on_one_replica_follows_a_job_on_another() {
    let s = setup(6.0, Duration::from_millis(100)).await;
    let a = Replica::start("a", &s.db, &s.model, 1).await;
    let b = Replica::start("b", &s.db, &s.model, 1).await;
    let job = start_job(&a.base, &s.origin.url("vod/index.m3u8")).await;
    a_job_running_on(&a.base, std::slice::from_ref(&job), &["a"]).await;
    let url = format!("{}/api/v1/inference/results/{job}/stream", b.base);
    let events = crate::push::read_events(&url, None, |e| e.iter().any(|e| e.event == "end")).await;
    assert_eq!(crate::push::seqs(&events), (0..12).collect::<Vec<_>>());
}
