//! `proxypal-server`: reads the config, validates it before binding anything
//! (a bad config exits 64 naming the field), then serves until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use proxypal_server::config::Config;
use proxypal_server::reload;

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
    reload::log_warnings(&config);
    let _sim = if cli.dev {
        match start_dev(&mut config) {
            Ok(sim) => sim,
            Err(code) => return code,
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
            // A bad config or state file is the operator's to fix: 64, like any config error.
            let config_error =
                matches!(e, proxypal_server::StartError::Build(_) | proxypal_server::StartError::State(_));
            return ExitCode::from(if config_error { EXIT_CONFIG } else { EXIT_START });
        }
    };
    let keys = server.app().gateway().key_reports().len();
    let providers = server.app().gateway().providers().len();
    tracing::info!(keys, providers, workers = config.worker_count(), "listening on {}", server.addr());
    #[cfg(feature = "dev")]
    if cli.dev {
        if let Some(simulated) = &_sim {
            println!("{}", proxypal_server::dev::banner(&config, server.addr(), simulated));
        }
    }
    let app = std::sync::Arc::clone(server.app());
    let path = cli.config.clone();
    let on_reload = move || {
        if cli.dev {
            tracing::info!("reload requested; dev mode keeps its generated keys");
        } else {
            reload::reload(&app, path.as_deref());
        }
    };
    let watched = reload::watched_files(cli.config.as_deref(), &config);
    let (changed_tx, mut changed_rx) = tokio::sync::mpsc::channel::<()>(1);
    if !cli.dev && !watched.is_empty() {
        tokio::spawn(reload::watch_files(watched, changed_tx));
    }
    reload::until_stop_signal(on_reload, &mut changed_rx).await;
    server.begin_shutdown();
    tokio::select! {
        () = server.wait() => {}
        () = reload::second_signal() => tracing::warn!("second signal: exiting now"),
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Starts the simulated upstreams for `--dev` and points `config` at them.
#[cfg(feature = "dev")]
fn start_dev(config: &mut Config) -> Result<Option<proxypal_server::dev::Simulated>, ExitCode> {
    match proxypal_server::dev::start_simulated_upstreams(config) {
        Ok(simulated) => {
            for (provider, sim) in &simulated.sims {
                tracing::warn!(provider, upstream = %sim.base_url(), "DEV MODE: a simulated upstream with generated keys");
            }
            Ok(Some(simulated))
        }
        Err(e) => {
            eprintln!("proxypal-server: cannot start the simulated upstream: {e}");
            Err(ExitCode::from(EXIT_START))
        }
    }
}

/// This build has no simulator: `--dev` is a usage error.
#[cfg(not(feature = "dev"))]
fn start_dev(_config: &mut Config) -> Result<Option<()>, ExitCode> {
    eprintln!(
        "proxypal-server: --dev needs the simulated upstream, and this build was made without the `dev` feature"
    );
    Err(ExitCode::from(EXIT_CONFIG))
}
