//! The handle ([`Webhooks`]) and the background tasks behind it.
//!
//! ```text
//! emit() ──try_send──▶ [events queue] ──▶ dispatcher ──try_send──▶ [queue per endpoint] ──▶ endpoint worker
//!   (dedup under a short lock)             (serializes once,        (a slow endpoint never      (≤ max_in_flight deliveries,
//!                                           signs nothing)           delays another)             each retrying on its own)
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{InvalidEndpoint, WebhookConfig};
use crate::dedup::{Dedup, Verdict};
use crate::delivery::{HttpClient, Message, Policy, Target, build_client, deliver};
use crate::event::{Event, now_ms};
use crate::metrics::Metrics;

/// Why [`Webhooks::try_start`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// An endpoint that cannot be delivered to.
    #[error("webhooks.endpoints[{index}]: {source}")]
    Endpoint {
        /// Its position in [`WebhookConfig::endpoints`].
        index: usize,
        /// What is wrong with it.
        source: InvalidEndpoint,
    },
    /// The TLS client configuration could not be built.
    #[error("webhooks: TLS setup failed: {0}")]
    Tls(String),
    /// Not called from within a tokio runtime.
    #[error("webhooks must be started from within a tokio runtime")]
    NoRuntime,
}

/// The handle through which the server reports events. Cheap to clone; `Send + Sync`.
///
/// Dropping every clone lets the background task finish what is queued and stop; call
/// [`Webhooks::shutdown`] to wait for that, bounded.
#[derive(Clone)]
pub struct Webhooks {
    /// `None` for [`Webhooks::disabled`].
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Command>,
    /// Held only for a dedup decision and a `try_send`: never across an `.await`.
    dedup: Mutex<Dedup>,
    /// Kinds some endpoint receives.
    subscribed: u8,
    /// Kinds the dedup must see: the subscribed ones and their partners (a `key.recovered`
    /// ends a state even when only `key.disabled` is sent).
    tracked: u8,
    metrics: Arc<Metrics>,
    /// Set while the queue refuses events, so a burst logs one warning, not thousands.
    overflowing: AtomicBool,
    queue: usize,
    endpoints: usize,
    dispatcher: Mutex<Option<JoinHandle<()>>>,
}

enum Command {
    Event(Event),
    /// Stop taking events; deliver what is queued, then end.
    Close,
}

impl Webhooks {
    /// Starts the background task on the current tokio runtime and registers the metrics
    /// (`webhook_deliveries`, `webhook_dropped`, `webhook_deduplicated`) into `registry`.
    ///
    /// With no endpoints, or if starting fails (see [`Webhooks::try_start`], the error is
    /// logged), the handle is [disabled](Webhooks::disabled). Prefer `try_start` where a
    /// failure should stop the program.
    pub fn start(config: WebhookConfig, registry: &mut Registry) -> Webhooks {
        Webhooks::try_start(config, registry).unwrap_or_else(|error| {
            tracing::error!(%error, "webhooks disabled");
            Webhooks::disabled()
        })
    }

    /// Like [`Webhooks::start`], with the reasons it could not start.
    ///
    /// # Errors
    /// An endpoint whose URL is not absolute `http`/`https` with a host, a TLS setup
    /// failure, or no current tokio runtime.
    pub fn try_start(config: WebhookConfig, registry: &mut Registry) -> Result<Webhooks, StartError> {
        let runtime = Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        for (index, ep) in config.endpoints.iter().enumerate() {
            crate::config::Endpoint::check_url(&ep.url)
                .map_err(|source| StartError::Endpoint { index, source })?;
        }
        let metrics = Arc::new(Metrics::register(registry));
        if config.endpoints.is_empty() {
            return Ok(Webhooks::disabled());
        }
        let client = build_client(config.timeout).map_err(|e| StartError::Tls(e.to_string()))?;
        let policy = Policy {
            max_attempts: config.max_attempts,
            first_backoff: config.first_backoff,
            timeout: config.timeout,
        };
        let queue = config.queue.max(1);
        let max_in_flight = config.max_in_flight_per_endpoint.max(1);

        let mut workers = JoinSet::new();
        let mut routes = Vec::with_capacity(config.endpoints.len());
        let mut subscribed = 0u8;
        for ep in &config.endpoints {
            let (tx, rx) = mpsc::channel(queue);
            let target =
                Arc::new(Target { url: ep.url.clone(), secret: ep.secret.clone(), label: ep.host_label() });
            let mask = ep.mask();
            subscribed |= mask;
            routes.push(Route { mask, label: target.label.clone(), tx, overflowing: false });
            workers.spawn_on(
                endpoint_worker(rx, target, client.clone(), policy, Arc::clone(&metrics), max_in_flight),
                &runtime,
            );
        }
        let (tx, rx) = mpsc::channel(queue);
        let dispatcher = runtime.spawn(dispatch(rx, routes, workers, Arc::clone(&metrics)));
        Ok(Webhooks {
            inner: Some(Arc::new(Inner {
                tx,
                dedup: Mutex::new(Dedup::new(config.dedup_capacity)),
                subscribed,
                tracked: with_partners(subscribed),
                metrics,
                overflowing: AtomicBool::new(false),
                queue,
                endpoints: config.endpoints.len(),
                dispatcher: Mutex::new(Some(dispatcher)),
            })),
        })
    }

    /// A handle that sends nothing: [`emit`](Webhooks::emit) returns at once, without
    /// locking or allocating. For when no webhook is configured.
    pub fn disabled() -> Webhooks {
        Webhooks { inner: None }
    }

    /// Whether events can go anywhere (false for [`Webhooks::disabled`]).
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Reports `event`: never blocks, never awaits. It is queued for the background task
    /// unless it is a repeat (counted in `webhook_deduplicated`) or the queue is full
    /// (counted in `webhook_dropped`, with a warning per burst), and it goes to every
    /// endpoint that subscribes to its kind.
    ///
    /// # Deduplication
    /// Events describe states that last, so an event is sent only when it is news:
    ///
    /// - **`key.disabled` / `key.recovered`**, paired by (`provider`, `key`): a key's
    ///   `key.disabled` is sent once, and repeats are suppressed until a `key.recovered` for
    ///   the same pair is sent, after which the next `key.disabled` is news again. A
    ///   `key.recovered` with no `key.disabled` before it is suppressed.
    /// - **`pool.exhausted` / `pool.recovered`**, paired by `provider` alone (figures such
    ///   as `data["pool"]` play no part), with the same rules.
    /// - **`quota.warning` and `client.quota_exhausted`** are sent once per (kind,
    ///   `provider`, `key`, `client`, `data["window"]`, `data["resets_at"]`): once per
    ///   window, provided the caller puts the window's identity in those two figures (a new
    ///   window has a new `resets_at`). Other figures (`remaining`, …) do not matter.
    ///
    /// The memory is bounded by [`WebhookConfig::dedup_capacity`]. Windows whose
    /// `resets_at` has passed are forgotten first (`resets_at` read as Unix seconds, Unix
    /// milliseconds, or an RFC 3339 string), then the oldest; a forgotten window could be
    /// announced twice. If more lasting states are open than fit, the excess are sent
    /// without being remembered, and from then on an unmatched recovery is sent rather than
    /// suppressed: over-notifying beats missing a recovery.
    ///
    /// An event that cannot be queued is forgotten by the dedup too, so its next
    /// occurrence is still news. An event given up after its last attempt stays
    /// remembered (the state was announced, unsuccessfully).
    pub fn emit(&self, event: Event) {
        let Some(inner) = &self.inner else { return };
        let kind = event.kind;
        if inner.tracked & kind.bit() == 0 {
            return;
        }
        // Poisoning: the dedup sets stay consistent across a panic (every update is one
        // insert or remove), so the guard is used as is.
        let mut dedup = inner.dedup.lock().unwrap_or_else(PoisonError::into_inner);
        let undo = match dedup.admit(&event, now_ms()) {
            Verdict::Send(undo) => undo,
            Verdict::Suppress => {
                drop(dedup);
                inner.metrics.deduplicated.inc();
                return;
            }
        };
        if inner.subscribed & kind.bit() == 0 {
            return; // tracked for its partner's sake; nobody receives it
        }
        match inner.tx.try_send(Command::Event(event)) {
            Ok(()) => {
                drop(dedup);
                if inner.overflowing.load(Ordering::Relaxed) {
                    inner.overflowing.store(false, Ordering::Relaxed);
                }
            }
            Err(error) => {
                dedup.undo(undo);
                drop(dedup);
                inner.metrics.dropped.inc();
                match error {
                    TrySendError::Full(_) => {
                        if !inner.overflowing.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                event = kind.as_str(),
                                capacity = inner.queue,
                                "webhook queue full; dropping events (counted in webhook_dropped)"
                            );
                        }
                    }
                    TrySendError::Closed(_) => {
                        tracing::debug!(event = kind.as_str(), "webhooks shut down; event dropped");
                    }
                }
            }
        }
    }

    /// Stops taking events and delivers what is queued, retries included, for at most
    /// `within`; whatever is still pending then is abandoned (and logged). Events emitted
    /// afterwards are dropped and counted.
    ///
    /// Only the first call waits; later calls (from any clone) return at once.
    pub async fn shutdown(&self, within: Duration) {
        let Some(inner) = &self.inner else { return };
        let handle = inner.dispatcher.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut handle) = handle else { return };
        let drained = tokio::time::timeout(within, async {
            // The queue may be full: waiting for room is part of the bounded drain. An
            // error means the dispatcher has already ended.
            let _ = inner.tx.send(Command::Close).await;
            let _ = (&mut handle).await;
        })
        .await;
        if drained.is_err() {
            // Aborting the dispatcher drops its workers' join sets, which abort the
            // deliveries still running.
            handle.abort();
            tracing::warn!(?within, "webhook shutdown: deliveries still pending were abandoned");
        }
    }
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Webhooks(disabled)"),
            Some(inner) => f
                .debug_struct("Webhooks")
                .field("endpoints", &inner.endpoints)
                .field("queue", &inner.queue)
                .finish_non_exhaustive(),
        }
    }
}

/// `mask` plus the partner of each paired kind in it.
fn with_partners(mask: u8) -> u8 {
    use crate::event::EventKind;
    let pairs = [
        (EventKind::KeyDisabled, EventKind::KeyRecovered),
        (EventKind::PoolExhausted, EventKind::PoolRecovered),
    ];
    pairs.into_iter().fold(
        mask,
        |m, (a, b)| {
            if m & (a.bit() | b.bit()) != 0 { m | a.bit() | b.bit() } else { m }
        },
    )
}

/// The dispatcher's view of one endpoint.
struct Route {
    mask: u8,
    label: String,
    tx: mpsc::Sender<Arc<Message>>,
    overflowing: bool,
}

/// Turns events into messages and hands each to the endpoints that want it, without ever
/// waiting on one; ends when the queue is closed and empty, after its workers.
async fn dispatch(
    mut rx: mpsc::Receiver<Command>,
    mut routes: Vec<Route>,
    mut workers: JoinSet<()>,
    metrics: Arc<Metrics>,
) {
    while let Some(command) = rx.recv().await {
        let event = match command {
            Command::Event(event) => event,
            Command::Close => {
                rx.close();
                continue;
            }
        };
        let kind = event.kind;
        let msg = match Message::from_event(event) {
            Ok(msg) => Arc::new(msg),
            Err(error) => {
                tracing::error!(event = kind.as_str(), %error, "webhook payload could not be serialized");
                continue;
            }
        };
        for route in routes.iter_mut().filter(|r| r.mask & kind.bit() != 0) {
            match route.tx.try_send(Arc::clone(&msg)) {
                Ok(()) => route.overflowing = false,
                Err(_) => {
                    metrics.dropped.inc();
                    if !std::mem::replace(&mut route.overflowing, true) {
                        tracing::warn!(
                            endpoint = %route.label,
                            event = kind.as_str(),
                            "webhook endpoint queue full; dropping messages (counted in webhook_dropped)"
                        );
                    }
                }
            }
        }
    }
    drop(routes); // closes the endpoint queues: workers finish what they hold, then end
    while workers.join_next().await.is_some() {}
}

/// Delivers one endpoint's messages, at most `max_in_flight` at a time (a retrying
/// delivery holds its place while it waits).
async fn endpoint_worker(
    mut rx: mpsc::Receiver<Arc<Message>>,
    target: Arc<Target>,
    client: HttpClient,
    policy: Policy,
    metrics: Arc<Metrics>,
    max_in_flight: usize,
) {
    let mut in_flight = JoinSet::new();
    loop {
        if in_flight.len() >= max_in_flight {
            reap(in_flight.join_next().await);
            continue;
        }
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let (client, target, metrics) = (client.clone(), Arc::clone(&target), Arc::clone(&metrics));
                in_flight.spawn(async move { deliver(&client, &target, &msg, policy, &metrics).await });
            }
            done = in_flight.join_next(), if !in_flight.is_empty() => reap(done),
        }
    }
    while let Some(done) = in_flight.join_next().await {
        reap(Some(done));
    }
}

fn reap(done: Option<Result<(), tokio::task::JoinError>>) {
    if let Some(Err(error)) = done {
        if error.is_panic() {
            tracing::error!(%error, "webhook delivery task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    #[test]
    fn the_handle_is_send_sync_and_clone() {
        fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync_clone::<Webhooks>();
    }

    #[test]
    fn partners_are_tracked_with_their_kinds() {
        let key_only = EventKind::KeyDisabled.bit();
        assert_eq!(with_partners(key_only), key_only | EventKind::KeyRecovered.bit());
        let quota = EventKind::QuotaWarning.bit();
        assert_eq!(with_partners(quota), quota);
    }

    #[test]
    fn disabled_emits_nothing_and_needs_no_runtime() {
        let hooks = Webhooks::disabled();
        assert!(!hooks.is_enabled());
        hooks.emit(Event::new(EventKind::KeyDisabled).key("k"));
        assert_eq!(format!("{hooks:?}"), "Webhooks(disabled)");
    }

    #[test]
    fn try_start_outside_a_runtime_says_so() {
        let mut registry = Registry::default();
        let err = Webhooks::try_start(WebhookConfig::default(), &mut registry).unwrap_err();
        assert!(matches!(err, StartError::NoRuntime), "{err}");
    }
}
