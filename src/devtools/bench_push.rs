//! `free-roam dev bench-push`: how fast a stored result reaches a user who is pushed to.
//!
//! The release binary runs as a child process (SQLite, the stand-in model server and the HLS
//! origin of `bench-service`, in this process), with WEBHOOK_URL pointing at a receiver in
//! this process. A live 720p30 stream is sampled at 2 fps; SSE clients in this process
//! follow the job's result stream. For every result, the time from its `created_at` (stamped
//! by the service as it stores it) to its arrival at each SSE client and at the webhook
//! receiver is taken, on the same clock, for results stored after every client had
//! connected (what a client reads while catching up at connection is read, not pushed).
//! Two runs: one SSE client, then `--clients` (1,000) on the same job. Each run also checks
//! that every client and the receiver got every result once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use serde_json::Value;

use super::bench_service::{epoch, percentile, Rig, Service};

pub struct Options {
    /// SSE clients on one job in the second run.
    pub clients: usize,
    /// Seconds each run follows the live job.
    pub seconds: u64,
}

/// Per seq: (the result's created_at, its latency to each arrival).
type Arrivals = Arc<Mutex<HashMap<i64, Vec<(f64, f64)>>>>;

/// The webhook receiver: records (seq → arrival) for `result` messages.
async fn hook(State(got): State<Arrivals>, body: Bytes) -> axum::http::StatusCode {
    let at = epoch();
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        if let (Some(seq), Some(created)) =
            (v["data"]["seq"].as_i64(), v["data"]["created_at"].as_f64())
        {
            got.lock()
                .unwrap()
                .entry(seq)
                .or_default()
                .push((created, at - created));
        }
    }
    axum::http::StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
struct Stamp {
    seq: i64,
    created_at: f64,
}

/// One SSE client: records (seq → latency) for `result` events until `stop`; counts itself
/// in `connected` once its stream is open.
async fn follow(
    http: reqwest::Client,
    url: String,
    got: Arrivals,
    stop: Instant,
    connected: Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<()> {
    let resp = http.get(&url).send().await?;
    if !resp.status().is_success() {
        bail!("{url}: {}", resp.status());
    }
    connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while Instant::now() < stop {
        let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(1), body.next()).await
        else {
            continue;
        };
        let at = epoch();
        text.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if !block.contains("event: result") {
                continue;
            }
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("");
            // Only the two fields read: the clients share the service's two cores, and
            // their own work should not be what is measured.
            if let Ok(e) = serde_json::from_str::<Stamp>(data) {
                got.lock()
                    .unwrap()
                    .entry(e.seq)
                    .or_default()
                    .push((e.created_at, at - e.created_at));
            }
        }
    }
    Ok(())
}

struct Run {
    clients: usize,
    results: usize,
    sse_complete: bool,
    sse: (f64, f64),
    hook_complete: bool,
    hook: (f64, f64),
    cpu_cores: f64,
    /// This process's CPU (clients, receiver, origin, model stand-in) over the same time.
    own_cores: f64,
}

async fn run(rig: &Rig, clients: usize, seconds: u64, stream: u64) -> anyhow::Result<Run> {
    let hooks: Arrivals = Arc::default();
    let receiver = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(hooks.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    };
    let env = [
        ("WEBHOOK_URL", format!("http://{receiver}/hook")),
        (
            "WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
        ),
        ("WEBHOOK_EVENTS", "result".to_owned()),
        ("MAX_SSE_STREAMS", (clients + 10).to_string()),
    ];
    let svc = Service::start_with(&rig.dir, rig.model_addr, 4, &env).await?;
    let job = svc
        .start_job(&format!(
            "http://{}/live/{stream}/index.m3u8",
            rig.origin_addr
        ))
        .await?;
    let url = format!("{}/api/v1/inference/results/{job}/stream", svc.base);
    let sse: Arrivals = Arc::default();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(clients);
    // One client: over HTTP/1.1 each open stream is a connection of its own.
    let http = reqwest::Client::new();
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..clients {
        tasks.push(tokio::spawn(follow(
            http.clone(),
            url.clone(),
            sse.clone(),
            stop,
            connected.clone(),
        )));
    }
    // Latency counts results stored once every client is connected: events a client reads
    // while catching up on its first connection are not pushed, they are read.
    let deadline = Instant::now() + Duration::from_secs(20);
    while connected.load(std::sync::atomic::Ordering::Relaxed) < clients
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready_at = epoch();
    let cpu0 = svc.cpu()?;
    let own0 = super::cpu(libc::RUSAGE_SELF);
    let wall = Instant::now();
    for t in tasks {
        t.await??;
    }
    let cpu_cores = (svc.cpu()? - cpu0).as_secs_f64() / wall.elapsed().as_secs_f64();
    let own_cores =
        (super::cpu(libc::RUSAGE_SELF) - own0).as_secs_f64() / wall.elapsed().as_secs_f64();
    // The results stored by now; the last second's may still be on their way: left out.
    let stored: Vec<i64> = {
        let page: Value = svc
            .http
            .get(format!(
                "{}/api/v1/inference/results/{job}?limit=1000",
                svc.base
            ))
            .send()
            .await?
            .json()
            .await?;
        page["results"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["seq"].as_i64()).collect())
            .unwrap_or_default()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled: Vec<i64> = stored
        .iter()
        .copied()
        .filter(|s| *s + 4 < stored.len() as i64)
        .collect();
    let collect = |got: &Arrivals, per: usize| -> (bool, Vec<f64>) {
        let got = got.lock().unwrap();
        let complete = settled
            .iter()
            .all(|s| got.get(s).is_some_and(|v| v.len() == per));
        let lat: Vec<f64> = got
            .values()
            .flatten()
            .filter(|(created, _)| *created >= ready_at)
            .map(|(_, l)| l * 1000.0)
            .collect();
        (complete, lat)
    };
    let (sse_complete, mut sse_lat) = collect(&sse, clients);
    let (hook_complete, mut hook_lat) = collect(&hooks, 1);
    Ok(Run {
        clients,
        results: stored.len(),
        sse_complete,
        sse: (
            percentile(&mut sse_lat, 0.5),
            percentile(&mut sse_lat, 0.99),
        ),
        hook_complete,
        hook: (
            percentile(&mut hook_lat, 0.5),
            percentile(&mut hook_lat, 0.99),
        ),
        cpu_cores,
        own_cores,
    })
}

pub async fn bench_push(dir: &std::path::Path, opts: Options) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let rig = Rig::start(&dir).await?;
    let mut rows = Vec::new();
    for (i, clients) in [1, opts.clients].into_iter().enumerate() {
        eprintln!(
            "{clients} SSE client(s) and a webhook receiver for {} s ...",
            opts.seconds
        );
        rows.push(run(&rig, clients, opts.seconds, 100 + i as u64).await?);
    }
    let mut out = String::from(
        "Release binary (SQLite), stand-in model server and HLS origin in the benchmark's process; one live 720p30 stream sampled at 2 fps; WEBHOOK_URL on a receiver in the benchmark's process; latency = arrival − the result's created_at, same clock.\n\n\
         | SSE clients on the job | results | every client got every result once | result stored → SSE event p50 / p99 | webhook got every result once | result stored → webhook received p50 / p99 | service CPU (cores) | benchmark's own CPU (cores) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in &rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} ms / {:.1} ms | {} | {:.1} ms / {:.1} ms | {:.2} | {:.2} |\n",
            r.clients,
            r.results,
            if r.sse_complete { "yes" } else { "no" },
            r.sse.0,
            r.sse.1,
            if r.hook_complete { "yes" } else { "no" },
            r.hook.0,
            r.hook.1,
            r.cpu_cores,
            r.own_cores,
        ));
    }
    Ok(out)
}
