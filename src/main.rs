//! The `free-roam` command: serve (default), migrate, or print `.env.example`.

use clap::{Parser, Subcommand};
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
    /// Measure ingest CPU against the ffmpeg CLI and concurrent 720p streams (Markdown out).
    BenchIngest {
        /// Where the benchmark stream is made (and reused).
        #[arg(default_value = "target/bench-media")]
        dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Some(Command::Dev {
        tool: DevTool::EnvExample,
    }) = cli.command
    {
        print!("{}", free_roam::config::env_example());
        return;
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
