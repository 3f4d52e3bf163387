//! The buffer between the request path and the database, and the one
//! writer that empties it.
//!
//! [`Shared`] is what both sides see: a bounded FIFO under a short
//! `std::sync::Mutex` (held for a push or for taking one batch out, never
//! across an `.await`) and atomic counters. [`Writer`] is generic over a
//! [`Store`], so SQLite and PostgreSQL (each on a dedicated thread with its
//! own current-thread runtime, owning the connection) share the batching,
//! backoff, outage logging, flush and shutdown logic.
//!
//! A batch taken from the buffer stays in [`Writer::inflight`] until a
//! store reports it committed, so a connection lost mid-write loses nothing;
//! the PostgreSQL store makes the retry idempotent (see `postgres.rs`).

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout_at};
use tracing::{debug, error, info, warn};

use crate::error::LedgerError;
use crate::query::{UsageQuery, UsageRow};
use crate::{LedgerStats, Record};

/// First retry after a failure; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between retries while the database is down.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long shutdown keeps trying to write what is buffered.
pub(crate) const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// Retention pass period.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// After a failed retention pass (the database is down), try again this soon.
const PRUNE_RETRY: Duration = Duration::from_secs(60);
/// Pages (batches, up to 2048 records each) one retention transaction
/// deletes, so none holds locks for long; a pass that fills a chunk runs
/// the next one right after the pending writes.
pub(crate) const PRUNE_CHUNK: u32 = 64;
/// Shortest interval between two "buffer full" warnings.
const DROP_WARN_EVERY_MS: u64 = 10_000;
/// "Never warned yet" for [`Shared::last_drop_warn_ms`].
const NEVER: u64 = u64::MAX;

/// The request side's view: the buffer and the counters.
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    /// At most this many records accepted and not yet written (buffer plus
    /// the batch being written): the memory bound.
    capacity: u64,
    batch: usize,
    /// Wakes the writer when a full batch is waiting.
    wake: Notify,
    /// Records accepted by `record` (the sequence `flush` waits for).
    accepted: AtomicU64,
    /// Accepted records that left the pipeline: written, rejected or lost.
    done: AtomicU64,
    written: AtomicU64,
    batches: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    write_failures: AtomicU64,
    up: AtomicBool,
    last_drop_warn_ms: AtomicU64,
    epoch: std::time::Instant,
    pub(crate) backend: &'static str,
}

struct Queue {
    items: VecDeque<Record>,
    /// Set by shutdown: later records are refused (and counted).
    closed: bool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("backend", &self.backend).field("stats", &self.stats()).finish()
    }
}

impl Shared {
    pub(crate) fn new(backend: &'static str, capacity: usize, batch: usize) -> Self {
        Self {
            queue: Mutex::new(Queue { items: VecDeque::new(), closed: false }),
            capacity: capacity as u64,
            batch,
            wake: Notify::new(),
            accepted: AtomicU64::new(0),
            done: AtomicU64::new(0),
            written: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            up: AtomicBool::new(true),
            last_drop_warn_ms: AtomicU64::new(NEVER),
            epoch: std::time::Instant::now(),
            backend,
        }
    }

    /// The queue; a panic elsewhere while it was held cannot leave a
    /// `VecDeque` half-pushed, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    fn pending(&self) -> u64 {
        // `done` first: it only grows, so this never underflows by racing.
        let done = self.done.load(Relaxed);
        self.accepted.load(Relaxed).saturating_sub(done)
    }

    /// The request path: O(1), no await, never waits for the writer.
    pub(crate) fn push(&self, record: Record) {
        let refused = {
            let mut queue = self.lock();
            if queue.closed {
                Some("the ledger is shut down")
            } else if self.pending() >= self.capacity {
                Some("buffer full")
            } else {
                queue.items.push_back(record);
                self.accepted.fetch_add(1, Relaxed);
                if queue.items.len() == self.batch {
                    self.wake.notify_one();
                }
                None
            }
        };
        if let Some(reason) = refused {
            let dropped = self.dropped.fetch_add(1, Relaxed) + 1;
            self.warn_dropped(reason, dropped);
        }
    }

    /// At most one warning per [`DROP_WARN_EVERY_MS`], with the running total.
    fn warn_dropped(&self, reason: &str, dropped: u64) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let last = self.last_drop_warn_ms.load(Relaxed);
        if last != NEVER && now.saturating_sub(last) < DROP_WARN_EVERY_MS {
            return;
        }
        if self.last_drop_warn_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            warn!(
                backend = self.backend,
                dropped,
                buffer = self.capacity,
                "ledger: record dropped: {reason} ({} records not yet written); {dropped} dropped so far",
                self.pending()
            );
        }
    }

    /// Up to `max` records from the front; with `full_only`, only if `max` are there.
    fn take(&self, max: usize, full_only: bool) -> Option<Vec<Record>> {
        let mut queue = self.lock();
        let len = queue.items.len();
        if len == 0 || (full_only && len < max) {
            return None;
        }
        Some(queue.items.drain(..len.min(max)).collect())
    }

    /// At least one full batch is queued.
    fn full_batch_waiting(&self) -> bool {
        self.lock().items.len() >= self.batch
    }

    fn close(&self) {
        self.lock().closed = true;
    }

    pub(crate) fn stats(&self) -> LedgerStats {
        LedgerStats {
            backend: self.backend,
            pending: self.pending(),
            written: self.written.load(Relaxed),
            batches: self.batches.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            write_failures: self.write_failures.load(Relaxed),
            up: self.up.load(Relaxed),
        }
    }
}

/// One transaction's worth of records, with an id that stays the same
/// across retries (the PostgreSQL store writes it once).
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) id: String,
    pub(crate) records: Vec<Record>,
}

/// What one [`Store::prune`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pruned {
    /// Records deleted.
    pub(crate) records: u64,
    /// Whole pages deleted: as many as asked for means more may be left.
    pub(crate) pages: u32,
}

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Connection lost, database down or busy: keep the batch, retry with backoff.
    Transient,
    /// The database refused the data itself (a data or constraint error):
    /// retrying the same batch would fail forever.
    Rejected,
}

#[derive(Debug)]
pub(crate) struct StoreError {
    pub(crate) failure: Failure,
    pub(crate) error: LedgerError,
}

impl StoreError {
    pub(crate) fn transient(error: LedgerError) -> Self {
        Self { failure: Failure::Transient, error }
    }
}

/// A database the writer writes to. Methods may block (SQLite runs on its
/// own thread) or await (PostgreSQL).
pub(crate) trait Store {
    /// `sqlite` or `postgres`.
    const BACKEND: &'static str;
    /// Its name in log lines, e.g. "PostgreSQL".
    const DISPLAY: &'static str;

    /// False when a connection is known to be gone (checked while idle, so
    /// `up` tells the truth even when nothing is written).
    fn is_connected(&self) -> bool;
    /// (Re)connects if needed, applying migrations on a new connection.
    async fn connect(&mut self) -> Result<(), StoreError>;
    /// Writes `batch` in one transaction.
    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// Deletes records older than `cutoff_ms`: up to `limit` whole pages
    /// (see `pages.rs`), then, unless that many went, the old records of
    /// the pages that straddle the cutoff.
    async fn prune(&mut self, cutoff_ms: i64, limit: u32) -> Result<Pruned, LedgerError>;
    /// Runs the aggregation.
    async fn usage(&mut self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError>;
    /// Closes the connection, done when it is closed (the writer's runtime
    /// ends right after: a connection task left behind would never run).
    async fn close(self)
    where
        Self: Sized,
    {
        drop(self);
    }
}

/// What the handles ask of the writer.
#[derive(Debug)]
pub(crate) enum Command {
    Flush { target: u64, reply: oneshot::Sender<Result<(), LedgerError>> },
    Usage { query: UsageQuery, reply: oneshot::Sender<Result<Vec<UsageRow>, LedgerError>> },
    Prune { reply: oneshot::Sender<Result<u64, LedgerError>> },
    Shutdown { reply: oneshot::Sender<Result<(), LedgerError>> },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) batch: usize,
    pub(crate) flush_every: Duration,
    pub(crate) retention: Duration,
}

/// Which records a drain writes.
#[derive(Debug, Clone, Copy)]
enum Drain {
    /// Only full batches (woken because one filled up).
    FullBatches,
    /// Everything accepted so far, partial last batch included.
    All,
    /// Until the records accepted before this sequence number are written.
    UpTo(u64),
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    backoff: Duration,
    next_retry: Instant,
    /// The last failure, for callers told to wait.
    cause: String,
}

pub(crate) struct Writer<S> {
    store: S,
    shared: Arc<Shared>,
    settings: Settings,
    /// The batch being written: kept until committed.
    inflight: Option<Batch>,
    outage: Option<Outage>,
    /// Since the outage ended: (when it began, records written since).
    recovering: Option<(Instant, u64)>,
    next_tick: Instant,
    next_prune: Instant,
    /// Makes batch ids unique across replicas and restarts.
    writer_id: String,
    batch_seq: u64,
}

impl<S: Store> Writer<S> {
    pub(crate) fn new(store: S, shared: Arc<Shared>, settings: Settings) -> Self {
        let now = Instant::now();
        Self {
            store,
            shared,
            settings,
            inflight: None,
            outage: None,
            recovering: None,
            next_tick: now + settings.flush_every,
            next_prune: now, // a retention pass at start
            writer_id: writer_id(),
            batch_seq: 0,
        }
    }

    /// Serves until shutdown (or until every handle is gone), then writes
    /// what it can within [`SHUTDOWN_WAIT`] and drops the store.
    pub(crate) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let shared = Arc::clone(&self.shared);
        let reply = loop {
            let wake_at = self.outage.as_ref().map_or(self.next_tick, |outage| outage.next_retry);
            let healthy = self.outage.is_none();
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Command::Flush { target, reply }) => {
                        let result = match self.backing_off() {
                            Some(e) => Err(e),
                            None => self.drain(Drain::UpTo(target)).await,
                        };
                        let _ = reply.send(result);
                    }
                    Some(Command::Usage { query, reply }) => {
                        let result = match self.backing_off() {
                            Some(e) => Err(e),
                            None => self.usage(&query).await,
                        };
                        let _ = reply.send(result);
                    }
                    Some(Command::Prune { reply }) => {
                        let result = match self.backing_off() {
                            Some(e) => Err(e),
                            None => self.prune_all().await,
                        };
                        let _ = reply.send(result);
                    }
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    None => break None,
                },
                () = shared.wake.notified(), if healthy => {
                    let _ = self.drain(Drain::FullBatches).await;
                    // `push` wakes the writer only as the queue reaches one
                    // batch. Records that came while this drain was writing
                    // (after its snapshot) may already make a full batch, or
                    // several: come back for them, after any command.
                    if self.outage.is_none() && shared.full_batch_waiting() {
                        shared.wake.notify_one();
                    }
                }
                () = sleep_until(wake_at) => {
                    self.next_tick = Instant::now() + self.settings.flush_every;
                    let _ = self.drain(Drain::All).await;
                }
                () = sleep_until(self.next_prune), if healthy => self.prune_step().await,
            }
        };
        let result = self.finish().await;
        self.store.close().await; // before the caller hears back
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    /// While the database is down and the next retry is not due: the error
    /// to answer with at once. Callers (a polled `/usage`) do not get to
    /// defeat the backoff; the retry schedule is the writer's.
    fn backing_off(&self) -> Option<LedgerError> {
        let outage = self.outage.as_ref()?;
        let retry_in = outage.next_retry.checked_duration_since(Instant::now())?;
        Some(LedgerError::Unavailable {
            backend: S::BACKEND,
            cause: outage.cause.clone(),
            pending: self.shared.pending(),
            retry_in,
        })
    }

    /// Writes batches per `mode`; stops at the first failure (the batch is
    /// kept for the retry) and returns its error.
    async fn drain(&mut self, mode: Drain) -> Result<(), LedgerError> {
        let target = match mode {
            Drain::UpTo(target) => target,
            // A snapshot: records arriving meanwhile wait for the next round.
            Drain::FullBatches | Drain::All => self.shared.accepted(),
        };
        loop {
            if self.inflight.is_none() {
                if self.shared.done.load(Relaxed) >= target {
                    break;
                }
                let full_only = matches!(mode, Drain::FullBatches);
                let Some(records) = self.shared.take(self.settings.batch, full_only) else { break };
                self.batch_seq += 1;
                let id = format!("{}-{}", self.writer_id, self.batch_seq);
                self.inflight = Some(Batch { id, records });
            }
            let Some(batch) = self.inflight.as_ref() else { break };
            let result = match self.store.connect().await {
                Ok(()) => self.store.write(batch).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => self.committed(),
                Err(e) => return Err(self.failed(e)),
            }
        }
        if self.inflight.is_none() && !self.store.is_connected() {
            // Idle with a dead connection: find out now, not at the next record.
            if let Err(e) = self.store.connect().await {
                return Err(self.failed(e));
            }
            self.up();
        }
        if let Some((since, written)) = self.recovering.take() {
            info!(
                backend = S::BACKEND,
                written,
                "ledger: {} reachable again after {:.1?}; wrote {written} buffered records",
                S::DISPLAY,
                since.elapsed()
            );
        }
        Ok(())
    }

    fn committed(&mut self) {
        let Some(batch) = self.inflight.take() else { return };
        let n = batch.records.len() as u64;
        let shared = &self.shared;
        shared.written.fetch_add(n, Relaxed);
        shared.batches.fetch_add(1, Relaxed);
        shared.done.fetch_add(n, Relaxed);
        self.up();
        if let Some((_, written)) = self.recovering.as_mut() {
            *written += n;
        }
    }

    /// The store works again: leave the outage (its end is logged once the
    /// backlog is written).
    fn up(&mut self) {
        self.shared.up.store(true, Relaxed);
        if let Some(outage) = self.outage.take() {
            self.recovering = Some((outage.since, 0));
        }
    }

    fn failed(&mut self, e: StoreError) -> LedgerError {
        let shared = &self.shared;
        shared.write_failures.fetch_add(1, Relaxed);
        if e.failure == Failure::Rejected {
            // The database is up and refuses this data: drop the batch rather
            // than block the ledger forever. Nothing we write should get here
            // (text is sanitised, integers clamped); if it does, it is loud.
            if let Some(batch) = self.inflight.take() {
                let n = batch.records.len() as u64;
                shared.rejected.fetch_add(n, Relaxed);
                shared.done.fetch_add(n, Relaxed);
                error!(backend = S::BACKEND, records = n, error = %e.error, "ledger: the database rejected a batch; its records are discarded");
            }
            return e.error;
        }
        shared.up.store(false, Relaxed);
        let now = Instant::now();
        match self.outage.as_mut() {
            None => {
                let pending = shared.pending();
                warn!(
                    backend = S::BACKEND,
                    pending,
                    "ledger: {} unreachable ({}); {pending} records buffered, retrying with backoff",
                    S::DISPLAY,
                    e.error,
                );
                self.recovering = None;
                self.outage = Some(Outage {
                    since: now,
                    backoff: BACKOFF_MIN,
                    next_retry: now + BACKOFF_MIN,
                    cause: e.error.to_string(),
                });
            }
            Some(outage) => {
                outage.backoff = (outage.backoff * 2).min(BACKOFF_MAX);
                outage.next_retry = now + outage.backoff;
                outage.cause = e.error.to_string();
                debug!(backend = S::BACKEND, error = %e.error, retry_in = ?outage.backoff, "ledger: still unreachable");
            }
        }
        e.error
    }

    async fn usage(&mut self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        if let Err(e) = self.store.connect().await {
            return Err(self.failed(e));
        }
        self.store.usage(query).await
    }

    fn cutoff_ms(&self) -> i64 {
        let retention = i64::try_from(self.settings.retention.as_millis()).unwrap_or(i64::MAX);
        jiff::Timestamp::now().as_millisecond().saturating_sub(retention)
    }

    /// One chunk of the retention pass; the next chunk (if this one was
    /// full) or the next pass is scheduled.
    async fn prune_step(&mut self) {
        let cutoff = self.cutoff_ms();
        let result = match self.store.connect().await {
            Ok(()) => self.store.prune(cutoff, PRUNE_CHUNK).await,
            Err(e) => Err(self.failed(e)),
        };
        self.next_prune = Instant::now()
            + match result {
                Ok(n) if n.pages >= PRUNE_CHUNK => Duration::ZERO,
                Ok(n) => {
                    debug!(
                        backend = S::BACKEND,
                        deleted = n.records,
                        cutoff_ms = cutoff,
                        "ledger: retention pass done"
                    );
                    PRUNE_EVERY
                }
                Err(e) => {
                    warn!(backend = S::BACKEND, error = %e, "ledger: retention pass failed; retrying in a minute");
                    PRUNE_RETRY
                }
            };
    }

    /// A whole retention pass now (for [`crate::Ledger::prune_now`]).
    async fn prune_all(&mut self) -> Result<u64, LedgerError> {
        let cutoff = self.cutoff_ms();
        if let Err(e) = self.store.connect().await {
            return Err(self.failed(e));
        }
        let mut total = 0;
        loop {
            let n = self.store.prune(cutoff, PRUNE_CHUNK).await?;
            total += n.records;
            if n.pages < PRUNE_CHUNK {
                self.next_prune = Instant::now() + PRUNE_EVERY;
                return Ok(total);
            }
        }
    }

    /// Refuses new records, then writes what is buffered, retrying until
    /// [`SHUTDOWN_WAIT`] runs out; what is left is counted as dropped.
    async fn finish(&mut self) -> Result<(), LedgerError> {
        self.shared.close();
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        let target = self.shared.accepted(); // final: the queue is closed
        loop {
            match timeout_at(deadline, self.drain(Drain::UpTo(target))).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(_)) => {
                    let retry = self.outage.as_ref().map_or(deadline, |outage| outage.next_retry);
                    if retry >= deadline {
                        break;
                    }
                    sleep_until(retry).await;
                }
                Err(_elapsed) => break,
            }
        }
        let lost = self.shared.pending();
        let shared = &self.shared;
        shared.dropped.fetch_add(lost, Relaxed);
        shared.done.fetch_add(lost, Relaxed);
        warn!(
            backend = S::BACKEND,
            lost,
            "ledger: shutting down with {lost} records not written ({} unreachable); they are lost",
            S::DISPLAY
        );
        Err(LedgerError::Lost { backend: S::BACKEND, records: lost })
    }
}

/// Random enough to tell writers apart: process id, start time, and the
/// OS-seeded keys of std's `RandomState`.
fn writer_id() -> String {
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let nanos = jiff::Timestamp::now().as_nanosecond();
    format!("{:x}-{:x}-{random:016x}", std::process::id(), nanos)
}
