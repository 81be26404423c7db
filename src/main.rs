//! The `free-roam` command: serve (default), migrate, or print `.env.example`.

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: request handling allocates small buffers from several
/// threads at once, where glibc's arenas contended and consolidated (about a seventh of the
/// CPU of result polling).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use free_roam::config::Settings;
use free_roam::startup::Application;

#[derive(Parser)]
#[command(
    name = "free-roam",
    version,
    about = "Watches video streams with vision-language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Developer tools.
    Dev {
        #[command(subcommand)]
        tool: DevTool,
    },
}

#[derive(Subcommand)]
enum DevTool {
    /// Print `.env.example` from the settings table.
    EnvExample,
    /// Print `deploy/settings.env` (the Kubernetes ConfigMap's settings) from the table.
    K8sSettings,
    /// Measure ingest CPU against the ffmpeg CLI and concurrent 720p streams (Markdown out).
    /// Write a tiny random PaliGemma (config.json, tokenizer.json, model.safetensors) to DIR.
    #[cfg(feature = "candle")]
    MakeTinyModel {
        dir: std::path::PathBuf,
        /// Vision input size in pixels (a multiple of 14).
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// The weights are a function of this seed alone.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Measure the in-process model's frames per second at batch sizes 1, 2, 4, 8 (Markdown out).
    #[cfg(feature = "candle")]
    BenchModel {
        /// Model directory (make one with make-tiny-model).
        dir: std::path::PathBuf,
    },
    /// Measure replicas on one PostgreSQL (this release binary as N child processes): leasing
    /// load at rest, with idle jobs and with jobs storing results; takeover after kill -9 and
    /// after SIGTERM (Markdown out).
    BenchReplicas {
        /// PostgreSQL to use (a fresh schema is made and dropped).
        #[arg(
            long,
            default_value = "postgres://postgres:postgres@127.0.0.1:5432/test"
        )]
        database_url: String,
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        #[arg(long, default_value_t = 10)]
        replicas: usize,
        #[arg(long, default_value_t = 100)]
        jobs: usize,
        /// Seconds each load figure is measured over.
        #[arg(long, default_value_t = 20)]
        window_seconds: u64,
    },
    /// Measure the whole service (this release binary, end to end) against the ffmpeg CLI:
    /// CPU per stream, live streams held, memory, latency, polling (Markdown out).
    BenchService {
        /// Where the benchmark stream is made (and reused), with the service's log and database.
        #[arg(default_value = "target/bench-media")]
        dir: std::path::PathBuf,
        /// Live stream count tried first; the run goes up by 8 while they hold, down when not.
        #[arg(long, default_value_t = 32)]
        streams: usize,
        /// Seconds each live run is measured for.
        #[arg(long, default_value_t = 60)]
        live_seconds: u64,
        /// Only the VOD and polling figures (skips the minutes-long live runs).
        #[arg(long)]
        no_live: bool,
        /// Only the memory run with a model that falls behind (about 40 s).
        #[arg(long)]
        memory_only: bool,
        /// Only the live runs: `--streams` streams, then up or down by 8 as they hold.
        #[arg(long)]
        live_only: bool,
    },
    /// Push latency: result stored → SSE event and → webhook received, with 1 and many SSE
    /// clients on one live job (the release binary as a child process; Markdown out).
    BenchPush {
        /// Where the benchmark stream is made (and reused), with the service's log and database.
        #[arg(default_value = "target/bench-media")]
        dir: std::path::PathBuf,
        /// SSE clients on the job in the second run.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Seconds each run follows the live job.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Compare JPEG encoders on one 720p picture (a part's figure; Markdown out).
    BenchJpeg,
    /// Change gating: the scores of still and eventful clips (where the default threshold
    /// comes from), the gate's CPU per sample, and model calls per minute with and without a
    /// gate through the whole service (this release binary as a child process; Markdown out).
    BenchGate {
        /// Where the clips are made (and reused), with the service's log and database.
        #[arg(default_value = "target/bench-media")]
        dir: std::path::PathBuf,
    },
    /// Measure the CPU time of HLS ingest alone (a part) against the ffmpeg CLI, and streams at once.
    BenchIngest {
        /// Where the benchmark stream is made (and reused).
        #[arg(default_value = "target/bench-media")]
        dir: std::path::PathBuf,
        /// Only the single-stream CPU comparison (skips the minutes-long concurrency run).
        #[arg(long)]
        single: bool,
    },
}

fn main() {
    tune_allocators();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
        .block_on(run());
}

/// Memory held per live stream, measured with `free-roam dev bench-service --memory-only`
/// (16 live 720p streams behind a slow model): 28.2 MiB per stream with both allocators'
/// defaults, 23.2 MiB with these two. glibc's malloc still serves libavcodec and SQLite, and
/// by default gives each of the many decode threads its own arena, where freed frame
/// buffers stay resident: two arenas suffice for allocations that are large and rare.
/// mimalloc purges freed pages after a 10 ms delay by default; at once keeps the decode
/// threads' freed segment buffers from staying resident. Either stays settable by its
/// environment variable (`MALLOC_ARENA_MAX`, `MIMALLOC_PURGE_DELAY`).
fn tune_allocators() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called before any other thread exists; mallopt only sets a parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // `mi_option_purge_delay` (15 in mimalloc 2 and 3; libmimalloc-sys names no constant).
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: mi_option_set may be called at any time and only stores the value.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

async fn run() {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Dev {
            tool: DevTool::EnvExample,
        }) => {
            print!("{}", free_roam::config::env_example());
            return;
        }
        Some(Command::Dev {
            tool: DevTool::K8sSettings,
        }) => {
            print!("{}", free_roam::config::k8s_settings());
            return;
        }
        Some(Command::Dev {
            tool: DevTool::BenchIngest { dir, single },
        }) => {
            match free_roam::devtools::bench_ingest(dir, !single) {
                Ok(md) => print!("{md}"),
                Err(e) => {
                    eprintln!("bench-ingest: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        #[cfg(feature = "candle")]
        Some(Command::Dev {
            tool:
                DevTool::MakeTinyModel {
                    dir,
                    image_size,
                    seed,
                },
        }) => {
            if let Err(e) = free_roam::vlm::candle::tiny::make_tiny_model(dir, *image_size, *seed) {
                eprintln!("make-tiny-model: {e:#}");
                std::process::exit(1);
            }
            println!("tiny PaliGemma written to {}", dir.display());
            return;
        }
        Some(Command::Dev {
            tool: DevTool::BenchGate { dir },
        }) => {
            match free_roam::devtools::bench_gate::bench_gate(dir).await {
                Ok(md) => println!("{md}"),
                Err(e) => {
                    eprintln!("bench-gate: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        Some(Command::Dev {
            tool: DevTool::BenchJpeg,
        }) => {
            match free_roam::devtools::bench_jpeg::bench_jpeg() {
                Ok(md) => print!("{md}"),
                Err(e) => {
                    eprintln!("bench-jpeg: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        Some(Command::Dev {
            tool:
                DevTool::BenchService {
                    dir,
                    streams,
                    live_seconds,
                    no_live,
                    memory_only,
                    live_only,
                },
        }) => {
            let opts = free_roam::devtools::bench_service::Options {
                start_streams: *streams,
                live_seconds: *live_seconds,
                no_live: *no_live,
                memory_only: *memory_only,
                live_only: *live_only,
            };
            match free_roam::devtools::bench_service::bench_service(dir, opts).await {
                Ok(md) => print!("{md}"),
                Err(e) => {
                    eprintln!("bench-service: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        Some(Command::Dev {
            tool:
                DevTool::BenchPush {
                    dir,
                    clients,
                    seconds,
                },
        }) => {
            let opts = free_roam::devtools::bench_push::Options {
                clients: *clients,
                seconds: *seconds,
            };
            match free_roam::devtools::bench_push::bench_push(dir, opts).await {
                Ok(md) => print!("{md}"),
                Err(e) => {
                    eprintln!("bench-push: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        Some(Command::Dev {
            tool:
                DevTool::BenchReplicas {
                    database_url,
                    redis_url,
                    replicas,
                    jobs,
                    window_seconds,
                },
        }) => {
            let opts = free_roam::devtools::bench_replicas::Options {
                database_url: database_url.clone(),
                redis_url: redis_url.clone(),
                replicas: *replicas,
                jobs: *jobs,
                window_s: *window_seconds,
            };
            match free_roam::devtools::bench_replicas::bench_replicas(opts).await {
                Ok(md) => print!("{md}"),
                Err(e) => {
                    eprintln!("bench-replicas: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        #[cfg(feature = "candle")]
        Some(Command::Dev {
            tool: DevTool::BenchModel { dir },
        }) => {
            match free_roam::devtools::bench_model(dir).await {
                Ok(md) => print!("{md}"),
                Err(e) => {
                    eprintln!("bench-model: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        _ => {}
    }
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("free-roam: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    free_roam::telemetry::init_logging(&settings);
    let outcome = match cli.command {
        Some(Command::Migrate) => migrate(&settings).await,
        _ => serve(settings).await,
    };
    if let Err(e) = outcome {
        tracing::error!(error = format!("{e:#}"), "free-roam stopped with an error");
        eprintln!("free-roam: {e:#}");
        std::process::exit(1);
    }
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = free_roam::store::Store::connect(&settings.database_url, 1).await?;
    store.migrate().await?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    let stop = app.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    app.run_until_stopped().await
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
