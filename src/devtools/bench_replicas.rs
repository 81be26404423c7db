//! `free-roam dev bench-replicas`: what running several replicas costs and how fast they
//! cover for each other, measured on the release binary as users run it.
//!
//! It starts N replicas of this binary (`serve`) on one PostgreSQL (a fresh schema of the
//! database given), with a stand-in OpenAI-compatible model server in this process, and jobs
//! reading Redis streams (cheap to run by the hundred, so the figures are the coordination's,
//! not video decoding's). It reports, in one run:
//!
//! - leasing statements per second (the replicas' `free_roam_lease_queries_total`) and all
//!   database transactions per second (`pg_stat_database.xact_commit`), with no jobs, with the
//!   jobs claimed and idle, and with every job storing results — leasing grows with replicas
//!   and jobs, not with results;
//! - takeover time after `kill -9` of a replica (its jobs wait for their leases to run out)
//!   and after SIGTERM (it releases them), per job moved: from the signal to another replica
//!   owning the job.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::routing::{get, post};
use axum::Router;
use redis::AsyncCommands;
use serde_json::{json, Value};
use sqlx::Connection;

/// What to run.
pub struct Options {
    /// A PostgreSQL URL; the run works in a fresh schema and drops it at the end.
    pub database_url: String,
    pub replicas: usize,
    pub jobs: usize,
    /// Seconds each load figure is measured over.
    pub window_s: u64,
    pub redis_url: String,
}

struct Replica {
    name: String,
    child: Child,
    base: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_replica(
    name: &str,
    database_url: &str,
    model: &str,
    capacity: usize,
) -> anyhow::Result<Replica> {
    let port = free_port()?;
    let child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("DATABASE_URL", database_url)
        .env("REPLICA_ID", name)
        .env("MAX_CONCURRENT_STREAMS", capacity.to_string())
        .env("MAX_ACTIVE_JOBS", "100000")
        .env("MODEL_TYPE", "openai")
        .env("OPENAI_BASE_URL", format!("http://{model}/v1"))
        .env("OPENAI_MODEL", "stand-in")
        .env("ALLOW_PRIVATE_NETWORKS", "true")
        .env("RATE_LIMIT_ENABLED", "false")
        .env("LOG_LEVEL", "ERROR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a replica")?;
    let replica = Replica {
        name: name.to_owned(),
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http
            .get(format!("{}/health/ready", replica.base))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(replica);
            }
        }
        if Instant::now() > deadline {
            bail!("replica {name} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of every replica's leasing statements so far.
async fn lease_queries(http: &reqwest::Client, replicas: &[Replica]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for r in replicas {
        let text = http
            .get(format!("{}/metrics", r.base))
            .send()
            .await?
            .text()
            .await?;
        total += text
            .lines()
            .filter(|l| l.starts_with("free_roam_lease_queries_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

async fn transactions(db: &mut sqlx::PgConnection) -> anyhow::Result<f64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::BIGINT FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(db)
    .await?;
    Ok(n as f64)
}

/// Leasing statements/s and database transactions/s over `window`, while `during` runs.
async fn rates(
    http: &reqwest::Client,
    replicas: &[Replica],
    db: &mut sqlx::PgConnection,
    window: Duration,
) -> anyhow::Result<(f64, f64)> {
    let (q0, t0) = (
        lease_queries(http, replicas).await?,
        transactions(db).await?,
    );
    let started = Instant::now();
    tokio::time::sleep(window).await;
    // pg_stat_database is updated when a backend reports (about every second): let it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let secs = started.elapsed().as_secs_f64();
    let (q1, t1) = (
        lease_queries(http, replicas).await?,
        transactions(db).await?,
    );
    Ok(((q1 - q0) / secs, (t1 - t0) / secs))
}

async fn status(http: &reqwest::Client, base: &str, job: &str) -> anyhow::Result<Value> {
    Ok(http
        .get(format!("{base}/api/v1/inference/status/{job}"))
        .send()
        .await?
        .json()
        .await?)
}

/// Seconds from now until every job in `jobs` is owned by a replica other than `gone`.
async fn takeover(
    http: &reqwest::Client,
    base: &str,
    jobs: &[String],
    gone: &str,
) -> anyhow::Result<Vec<f64>> {
    let started = Instant::now();
    let mut times = vec![None; jobs.len()];
    while times.iter().any(Option::is_none) {
        for (i, job) in jobs.iter().enumerate() {
            if times[i].is_none() {
                let s = status(http, base, job).await?;
                if s["owner"].as_str().is_some_and(|o| o != gone) {
                    times[i] = Some(started.elapsed().as_secs_f64());
                }
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("jobs of {gone} not taken over within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(times.into_iter().flatten().collect())
}

fn summary(times: &mut [f64]) -> String {
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let max = times[times.len() - 1];
    format!("{} jobs, median {median:.1} s, max {max:.1} s", times.len())
}

pub async fn bench_replicas(opts: Options) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    // A fresh schema, dropped at the end.
    let schema = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = sqlx::PgConnection::connect(&opts.database_url)
        .await
        .context("connecting to --database-url")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut admin)
        .await?;
    let sep = if opts.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{sep}options[search_path]={schema}", opts.database_url);
    let result = run(&opts, &url, &http, &mut admin).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(
    opts: &Options,
    url: &str,
    http: &reqwest::Client,
    db: &mut sqlx::PgConnection,
) -> anyhow::Result<String> {
    let answered = Arc::new(AtomicU64::new(0));
    let counter = answered.clone();
    let model = Router::new()
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "stand-in"}]})) }),
        )
        .route(
            "/v1/chat/completions",
            post(move || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    axum::Json(
                        json!({"choices": [{"message": {"role": "assistant", "content": "ok"}}]}),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let model_addr = listener.local_addr()?.to_string();
    tokio::spawn(async move { axum::serve(listener, model).await });

    // Room for every job on the replicas left after two are stopped.
    let capacity = opts.jobs.div_ceil(opts.replicas.saturating_sub(2).max(1));
    let mut replicas = Vec::new();
    for i in 0..opts.replicas {
        replicas.push(start_replica(&format!("r{i}"), url, &model_addr, capacity).await?);
    }
    let window = Duration::from_secs(opts.window_s);
    let mut md = format!(
        "{} replicas (release binary), one PostgreSQL, jobs on Redis streams, LEASE_TTL_SECS=15, {} s windows.\n\n\
         | state | leasing statements/s | database transactions/s | results/s |\n| --- | --- | --- | --- |\n",
        opts.replicas, opts.window_s
    );
    let (q, t) = rates(http, &replicas, db, window).await?;
    md.push_str(&format!("| no jobs | {q:.1} | {t:.1} | 0 |\n"));

    let mut redis = redis::Client::open(opts.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("Redis")?;
    let prefix = format!("bench:replicas:{}", uuid::Uuid::new_v4().simple());
    let mut jobs = Vec::new();
    for i in 0..opts.jobs {
        let r: Value = http
            .post(format!(
                "{}/api/v1/inference/start",
                replicas[i % replicas.len()].base
            ))
            .json(&json!({"stream_ref": format!("{}/{prefix}:{i}", opts.redis_url), "fps": 2}))
            .send()
            .await?
            .json()
            .await?;
        jobs.push(
            r["job_id"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("start refused: {r}"))?,
        );
    }
    // All claimed and running.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut running = 0;
        for j in &jobs {
            if status(http, &replicas[0].base, j).await?["status"] == "running" {
                running += 1;
            }
        }
        if running == jobs.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {running} of {} jobs running after 60 s", jobs.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (q, t) = rates(http, &replicas, db, window).await?;
    md.push_str(&format!(
        "| {} jobs claimed, idle | {q:.1} | {t:.1} | 0 |\n",
        opts.jobs
    ));

    // Every stream gets 2 entries a second: every job stores 2 results a second.
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(64, 48, image::Rgb([90, 120, 150])).write_to(
        &mut std::io::Cursor::new(&mut jpeg),
        image::ImageFormat::Jpeg,
    )?;
    let feed_stop = tokio_util::sync::CancellationToken::new();
    let feeder = {
        let stop = feed_stop.clone();
        let mut conn = redis.clone();
        let prefix = prefix.clone();
        let n = opts.jobs;
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let ts = started.elapsed().as_millis().to_string();
                for i in 0..n {
                    let _: Result<String, _> = conn
                        .xadd(
                            format!("{prefix}:{i}"),
                            "*",
                            &[("frame", jpeg.as_slice()), ("ts_ms", ts.as_bytes())],
                        )
                        .await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = answered.load(Ordering::Relaxed);
    let started = Instant::now();
    let (q, t) = rates(http, &replicas, db, window).await?;
    let results =
        (answered.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    md.push_str(&format!(
        "| {} jobs storing results | {q:.1} | {t:.1} | {results:.0} |\n",
        opts.jobs
    ));
    feed_stop.cancel();
    let _ = feeder.await;

    let first_base = replicas[0].base.clone();
    let owned_by = |name: String| {
        let jobs = jobs.clone();
        let base = first_base.clone();
        let http = http.clone();
        async move {
            let mut mine = Vec::new();
            for j in &jobs {
                if status(&http, &base, j).await?["owner"] == name.as_str() {
                    mine.push(j.clone());
                }
            }
            anyhow::Ok(mine)
        }
    };
    // kill -9: the jobs wait for their leases to run out. SIGTERM: the replica releases them
    // as it stops.
    for (signal, what) in [
        ("-KILL", "\nTakeover after `kill -9` of a replica"),
        ("-TERM", "Takeover after SIGTERM of a replica"),
    ] {
        let victim = replicas.len() - 1;
        let name = replicas[victim].name.clone();
        let mine = owned_by(name.clone()).await?;
        Command::new("kill")
            .args([signal, &replicas[victim].child.id().to_string()])
            .status()?;
        let mut times = takeover(http, &replicas[0].base, &mine, &name).await?;
        md.push_str(&format!(
            "{what}: {} (from the signal to another replica owning the job).\n",
            summary(&mut times)
        ));
        drop(replicas.remove(victim));
    }
    for i in 0..opts.jobs {
        let _: Result<(), _> = redis.del(format!("{prefix}:{i}")).await;
    }
    Ok(md)
}
