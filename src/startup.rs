//! `Application`: the one place that wires settings, store, models, job manager and the HTTP
//! server together. Production (`main`) and the tests start the service through it.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::Settings;
use crate::jobs::JobManager;
use crate::store::Store;
use crate::vlm::Models;

pub struct Application {
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
}

impl Application {
    /// Connects and migrates the database, binds the port (0 picks one), builds the router.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let store = Store::connect(&settings.database_url, settings.db_max_connections)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database at DATABASE_URL={}",
                    crate::domain::redacted_url(&settings.database_url)
                )
            })?;
        let store = store.with_global_webhook(settings.webhooks.global.as_ref().map(|g| {
            crate::store::GlobalWebhook {
                url: g.url.clone(),
                events: g.events.clone(),
            }
        }));
        let store = store
            .with_evidence_store(settings.evidence.store.clone())
            .context("cannot use the evidence store (EVIDENCE)")?;
        store
            .migrate()
            .await
            .context("database migrations failed")?;
        store
            .ensure_global_prompt(&settings.default_prompt)
            .await
            .context("cannot write the default global prompt")?;
        let settings_sse = settings.max_sse_streams;
        let models = Models::from_settings(&settings);
        let jobs = JobManager::new(store.clone(), settings.clone(), models.clone())
            .context("cannot build the job manager")?;
        let listener = TcpListener::bind((settings.host.as_str(), settings.port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on HOST={} PORT={}",
                    settings.host, settings.port
                )
            })?;
        let state = AppState::new(api::Shared {
            rate_limits: api::middleware::RateLimits::new(&settings.rate_limit),
            settings,
            store,
            jobs,
            models,
            metrics: crate::telemetry::metrics_handle(),
            draining: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            sse_streams: Arc::new(tokio::sync::Semaphore::new(settings_sse)),
            feeds: Default::default(),
        });
        Ok(Self {
            listener,
            state,
            shutdown: CancellationToken::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Cancel this token to shut the service down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token is cancelled, then drains: readiness turns 503, the
    /// listener stops accepting, in-flight requests finish, pipelines stop.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            shutdown,
        } = self;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "free-roam listening");

        tokio::spawn(
            state
                .models
                .clone()
                .watch(Duration::from_secs(10), shutdown.clone()),
        );
        // Jobs left unfinished by an earlier run, then new ones, as this replica has room.
        state.jobs.start_claiming();
        tokio::spawn(crate::store::sweep_forever(
            state.store.clone(),
            state.settings.retention.clone(),
            shutdown.clone(),
        ));
        // Webhook messages in the outbox, from any replica, are sent from here too.
        let deliverer = crate::webhook::deliver::Deliverer::new(
            state.store.clone(),
            state.settings.webhooks.clone(),
            state.settings.pipeline.network_policy(),
            Arc::from(state.jobs.replica_id()),
        )?;
        deliverer.spawn(shutdown.clone());
        // Result streams here follow results other replicas store.
        state
            .store
            .follow_other_replicas(&state.settings.database_url, shutdown.clone());

        let limits = state.rate_limits.clone();
        let sweeper_stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = sweeper_stop.cancelled() => break,
                    _ = tick.tick() => limits.forget_idle(),
                }
            }
        });

        let draining = state.draining.clone();
        let jobs = state.jobs.clone();
        let store = state.store.clone();
        let grace = state.settings.shutdown_timeout;
        let router = api::router(state);
        let stop = shutdown.clone();
        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            draining.store(true, Ordering::Relaxed);
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
        });
        let served = server.into_future();
        tokio::pin!(served);
        // Serve; once shutdown starts, give in-flight requests at most `grace`.
        tokio::select! {
            r = &mut served => r?,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("in-flight requests did not finish within SHUTDOWN_TIMEOUT_SECS");
            }
        }
        if tokio::time::timeout(grace, jobs.shutdown()).await.is_err() {
            tracing::warn!("pipelines did not stop within SHUTDOWN_TIMEOUT_SECS");
        }
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}
