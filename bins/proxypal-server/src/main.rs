//! `proxypal-server`: reads the config, validates it before binding anything
//! (a bad config exits 64 naming the field), then serves until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use proxypal_server::config::Config;

/// An OpenAI-compatible proxy that spreads requests over many API keys.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The YAML config file. Every field can also be set as PROXYPAL_<FIELD>
    /// (nesting with __), keys as PROXYPAL_KEYS=k1,k2.
    #[arg(long, env = "PROXYPAL_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config, print a summary (keys masked) and exit.
    #[arg(long)]
    check: bool,
    /// Run in front of a built-in simulated NVIDIA upstream with generated
    /// keys, on 127.0.0.1:8080 unless the config says otherwise.
    #[arg(long)]
    dev: bool,
}

/// EX_USAGE: the config is wrong.
const EXIT_CONFIG: u8 = 64;
/// EX_SOFTWARE-ish: could not start.
const EXIT_START: u8 = 70;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded =
        if cli.dev { Config::load_dev(cli.config.as_deref()) } else { Config::load(cli.config.as_deref()) };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxypal-server: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check {
        print!("{}", config.summary());
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    proxypal_server::logging::init(&config.log);
    // The main thread's runtime only watches signals and files, samples the
    // dashboard history (and runs the simulator in --dev); requests are served
    // by `workers` threads with runtimes of their own (see `StartOptions`).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxypal-server: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(run(cli, config))
}

async fn run(cli: Cli, mut config: Config) -> ExitCode {
    let _sim = if cli.dev {
        match proxypal_server::dev::start_simulated_upstream(&mut config) {
            Ok(sim) => {
                tracing::warn!(upstream = %sim.base_url(), "DEV MODE: serving a simulated NVIDIA upstream with generated keys");
                Some(sim)
            }
            Err(e) => {
                eprintln!("proxypal-server: cannot start the simulated upstream: {e}");
                return ExitCode::from(EXIT_START);
            }
        }
    } else {
        None
    };
    let options = proxypal_server::StartOptions {
        workers: std::num::NonZeroUsize::new(config.worker_count()),
        ..proxypal_server::StartOptions::from_env()
    };
    let mut server = match proxypal_server::start_with(&config, cli.dev, options).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("proxypal-server: {e}");
            return ExitCode::from(if matches!(e, proxypal_server::StartError::Build(_)) {
                EXIT_CONFIG
            } else {
                EXIT_START
            });
        }
    };
    tracing::info!(
        keys = config.keys.len(),
        upstream = %config.upstream.base_url,
        workers = config.worker_count(),
        "listening on {}",
        server.addr()
    );
    if cli.dev {
        println!("{}", proxypal_server::dev::banner(&config, server.addr(), &config.upstream.base_url));
    }
    let app = std::sync::Arc::clone(server.app());
    let cli_config = cli.config.clone();
    let reload = move || {
        if cli.dev {
            tracing::info!("reload requested; dev mode keeps its generated keys");
            return;
        }
        match Config::load(cli.config.as_deref()) {
            Ok(new) => match app.reload(&new) {
                Ok(r) => tracing::info!(
                    added = r.added,
                    kept = r.kept,
                    removed = r.removed,
                    "configuration reloaded"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "reload refused; the previous configuration keeps serving")
                }
            },
            Err(e) => tracing::error!(error = %e, "reload refused; the previous configuration keeps serving"),
        }
    };
    // Reload when the config file or a keys/tokens file changes (polling their
    // modification times: no platform watcher, works on every filesystem and
    // with editors that replace files).
    let watched: Vec<PathBuf> =
        [cli_config.clone(), config.keys_file.clone(), config.auth.tokens_file.clone()]
            .into_iter()
            .flatten()
            .collect();
    let (changed_tx, mut changed_rx) = tokio::sync::mpsc::channel::<()>(1);
    if !cli.dev && !watched.is_empty() {
        tokio::spawn(watch_files(watched, changed_tx));
    }
    wait_for_signals(reload, &mut changed_rx).await;
    server.begin_shutdown();
    tokio::select! {
        () = server.wait() => {}
        () = second_signal() => tracing::warn!("second signal: exiting now"),
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// How often watched files are checked for changes.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

async fn watch_files(paths: Vec<PathBuf>, changed: tokio::sync::mpsc::Sender<()>) {
    let stamp = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last: Vec<_> = paths.iter().map(stamp).collect();
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now: Vec<_> = paths.iter().map(stamp).collect();
        if now != last {
            last = now;
            tracing::info!("a configuration file changed; reloading");
            if changed.send(()).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(unix)]
async fn wait_for_signals(reload: impl Fn(), changed: &mut tokio::sync::mpsc::Receiver<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(),
            Some(()) = changed.recv() => reload(),
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_reload: impl Fn(), _changed: &mut tokio::sync::mpsc::Receiver<()>) {
    let _ = tokio::signal::ctrl_c().await;
}

async fn second_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
