//! `allot serve`: the REST service on the local data dir (see the
//! `allot_server` crate). Settings come from flags, then `ALLOT_*`
//! environment variables, then the `--config` file, then defaults.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `allot serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT [default: 127.0.0.1:7070].
    #[arg(long, env = "ALLOT_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// TOML file with `listen`, `data_dir`, `store`, `token_file`, `max_body_bytes`
    /// and `[[pools]]` created at start if missing.
    #[arg(long, env = "ALLOT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// File holding the bearer token required on /v1 and /metrics
    /// (else env ALLOT_TOKEN holds the token itself).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Largest request body accepted, in bytes [default: 1048576].
    #[arg(long, env = "ALLOT_MAX_BODY_BYTES", value_name = "N")]
    pub max_body_bytes: Option<usize>,
}

pub(crate) const SERVE_EXAMPLES: &str = "\
Examples:
  allot serve                                   # http://127.0.0.1:7070, data in ./allot-data
  allot serve --listen 0.0.0.0:7070 --data-dir /var/lib/allot
  allot serve --store postgres://allot@db:5432/allot   # several servers may share one database
  allot serve --store etcd://10.0.0.1:2379,10.0.0.2:2379
  ALLOT_TOKEN=s3cret allot serve                # /v1 and /metrics need `Authorization: Bearer s3cret`
  allot serve --config /etc/allot/allot.toml    # pools declared in the file are created at start
  curl -s localhost:7070/openapi.json";

/// Runs the server until SIGTERM or SIGINT. `data_dir` and `store` are the
/// global `--data-dir` / `ALLOT_DATA_DIR` and `--store` / `ALLOT_STORE` when
/// given (they beat the config file).
pub fn run(args: ServeArgs, data_dir: Option<PathBuf>, store: Option<String>) -> Result<()> {
    let file = match &args.config {
        Some(path) => Some(allot_server::FileConfig::load(path)?),
        None => None,
    };
    let token = match std::env::var("ALLOT_TOKEN") {
        Ok(t) => Some(t),
        Err(std::env::VarError::NotPresent) => None,
        Err(e) => bail!("ALLOT_TOKEN: {e}"),
    };
    let config = allot_server::Config::resolve(
        allot_server::Overrides {
            listen: args.listen,
            data_dir,
            store,
            token_file: args.token_file,
            token,
            max_body_bytes: args.max_body_bytes,
        },
        file,
    )?;
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let shutdown = shutdown_signal()?;
        let authenticated = config.token.is_some();
        let server = allot_server::Server::bind(config).await?;
        println!(
            "allot serving on http://{} (store: {})",
            server.local_addr(),
            server.store_description()
        );
        if authenticated {
            tracing::info!("bearer token required on /v1 and /metrics");
        }
        server.run(shutdown).await?;
        Ok(())
    })
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Fails only if a subscriber is already set, which then keeps logging.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Installs the SIGTERM and SIGINT handlers now (so a signal that arrives
/// while the server starts is not lost, nor fatal) and returns a future
/// that completes on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}
