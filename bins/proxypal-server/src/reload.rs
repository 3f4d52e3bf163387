//! Reloading while serving: on SIGHUP, or when the config file or a keys or
//! tokens file changes, the config is loaded again and applied to the
//! running [`App`]. A config that does not load or apply is refused and the
//! previous one keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::app::App;
use crate::config::Config;

/// How often watched files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Loads the config from `path` (and the environment) and applies it to `app`,
/// logging what happened.
pub fn reload(app: &App, path: Option<&Path>) {
    match Config::load(path) {
        Ok(new) => {
            log_warnings(&new);
            match app.reload(&new) {
                Ok(r) => {
                    tracing::info!(
                        added = r.added,
                        kept = r.kept,
                        removed = r.removed,
                        "configuration reloaded"
                    )
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused; the previous configuration keeps serving")
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "reload refused; the previous configuration keeps serving"),
    }
}

/// Logs what loading the config noticed but did not refuse (unknown
/// `PROXYPAL_*` variables, …), one warning each.
pub fn log_warnings(config: &Config) {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

/// The files whose change triggers a reload: the config file, `keys_file`,
/// `auth.tokens_file`.
pub fn watched_files(path: Option<&Path>, config: &Config) -> Vec<PathBuf> {
    [path.map(Path::to_owned), config.keys_file.clone(), config.auth.tokens_file.clone()]
        .into_iter()
        .chain(config.providers.values().map(|p| p.keys_file.clone()))
        .flatten()
        .collect()
}

/// Sends on `changed` whenever the modification time of one of `paths`
/// changes (polling: no platform watcher, works on every filesystem and with
/// editors that replace files). Ends when the receiver is gone.
pub async fn watch_files(paths: Vec<PathBuf>, changed: tokio::sync::mpsc::Sender<()>) {
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

/// Runs `reload` on SIGHUP and on each message from `changed`; returns on
/// SIGTERM or SIGINT.
#[cfg(unix)]
pub async fn until_stop_signal(reload: impl Fn(), changed: &mut tokio::sync::mpsc::Receiver<()>) {
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

/// Returns on Ctrl-C (no SIGHUP here; file changes still reload).
#[cfg(not(unix))]
pub async fn until_stop_signal(reload: impl Fn(), changed: &mut tokio::sync::mpsc::Receiver<()>) {
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            Some(()) = changed.recv() => reload(),
        }
    }
}

/// Returns on a second SIGTERM or SIGINT (or Ctrl-C): stop waiting for the
/// graceful shutdown.
pub async fn second_signal() {
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
