//! Single flight: identical requests wait for the one already upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::CacheKey;

type Table = Arc<Mutex<HashMap<CacheKey, watch::Receiver<()>>>>;

/// Requests in flight by key, so that a miss that another request is
/// already answering waits for that answer instead of going upstream too.
///
/// The first to [`join`](Self::join) a key leads: it goes upstream and
/// stores what it gets. Those that join while it is in flight follow:
/// they [`wait`](Waiter::wait), a bounded time, then look the cache up
/// again (and go upstream on their own if the answer is not there: the
/// leader failed, was cancelled, or its answer was not cacheable).
///
/// The table is locked only to look a key up, insert or remove it, never
/// across an `.await`. Cloning gives another handle on the same table.
#[derive(Debug, Clone, Default)]
pub struct Flights {
    table: Table,
}

/// The role a request got from [`Flights::join`].
#[derive(Debug)]
#[must_use = "dropping a LeaderGuard at once releases the followers before there is anything to read"]
pub enum Flight {
    /// Nobody else is asking: go upstream, store the answer, then drop the
    /// guard.
    Leader(LeaderGuard),
    /// Another request is asking: wait for it.
    Follower(Waiter),
}

impl Flights {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Leads `key` if nobody does, else follows its leader.
    pub fn join(&self, key: &CacheKey) -> Flight {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(done) = table.get(key) {
            // A closed channel would be a leader gone without removing its
            // key (it cannot happen: its guard removes it); lead instead.
            if done.has_changed().is_ok() {
                return Flight::Follower(Waiter { key: *key, done: done.clone() });
            }
        }
        let (sender, receiver) = watch::channel(());
        table.insert(*key, receiver);
        Flight::Leader(LeaderGuard { table: Arc::clone(&self.table), key: *key, _done: sender })
    }

    /// Keys in flight now.
    pub fn in_flight(&self) -> usize {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Held by the request that went upstream for its key. Dropping it, after
/// the answer was stored, or on a failure, or when the request is cancelled
/// (its future dropped), releases every follower: nothing to call.
#[derive(Debug)]
pub struct LeaderGuard {
    table: Table,
    key: CacheKey,
    /// Dropped with the guard: closing the channel wakes the followers,
    /// including one that subscribes after it closed.
    _done: watch::Sender<()>,
}

impl LeaderGuard {
    /// The key it leads.
    pub fn key(&self) -> CacheKey {
        self.key
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        // The key is ours while the guard lives: nobody else removes it.
        self.table.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// A follower's side: waits for the leader.
#[derive(Debug)]
pub struct Waiter {
    key: CacheKey,
    done: watch::Receiver<()>,
}

impl Waiter {
    /// The key it waits for.
    pub fn key(&self) -> CacheKey {
        self.key
    }

    /// Waits until the leader is done (its guard dropped), at most `max`:
    /// true if it was done in time. Either way, look the cache up next; the
    /// leader being done does not mean its answer was stored.
    pub async fn wait(mut self, max: Duration) -> bool {
        // The leader never sends: `changed` ends with an error when its
        // sender is dropped (at once if it already was).
        tokio::time::timeout(max, self.done.changed()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endpoint, Owner};

    fn key(n: u32) -> CacheKey {
        let body = format!("{{\"n\":{n}}}");
        CacheKey::for_request(Endpoint::Completions, "m", Owner::Shared, body.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_joins_make_one_leader_and_nine_followers_released_on_drop() {
        let flights = Flights::new();
        let mut tasks = Vec::new();
        let (roles_tx, mut roles_rx) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        for _ in 0..10 {
            let (flights, roles_tx, release) = (flights.clone(), roles_tx.clone(), Arc::clone(&release));
            tasks.push(tokio::spawn(async move {
                match flights.join(&key(1)) {
                    Flight::Leader(guard) => {
                        let _ = roles_tx.send("leader");
                        release.notified().await;
                        drop(guard);
                        true
                    }
                    Flight::Follower(waiter) => {
                        let _ = roles_tx.send("follower");
                        waiter.wait(Duration::from_secs(30)).await
                    }
                }
            }));
        }
        let mut roles = Vec::new();
        for _ in 0..10 {
            roles.push(roles_rx.recv().await.unwrap_or("closed"));
        }
        roles.sort_unstable();
        assert_eq!(roles, [["follower"; 9].as_slice(), &["leader"]].concat());
        assert_eq!(flights.in_flight(), 1);
        release.notify_one();
        for task in tasks {
            assert_eq!(task.await.ok(), Some(true), "released in time");
        }
        assert_eq!(flights.in_flight(), 0);
        assert!(matches!(flights.join(&key(1)), Flight::Leader(_)), "the next request leads again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_releases_its_followers() {
        let flights = Flights::new();
        let Flight::Leader(guard) = flights.join(&key(1)) else { panic!("first is the leader") };
        let leader = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        let Flight::Follower(waiter) = flights.join(&key(1)) else { panic!("second follows") };
        let follower = tokio::spawn(waiter.wait(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        assert_eq!(follower.await.ok(), Some(true));
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_waits_no_longer_than_its_bound() {
        let flights = Flights::new();
        let Flight::Leader(_guard) = flights.join(&key(1)) else { panic!("leader") };
        let Flight::Follower(waiter) = flights.join(&key(1)) else { panic!("follower") };
        let started = tokio::time::Instant::now();
        assert!(!waiter.wait(Duration::from_millis(250)).await, "the leader is still out");
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        // Other keys are not affected.
        assert!(matches!(flights.join(&key(2)), Flight::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_that_waits_after_the_leader_finished_returns_at_once() {
        let flights = Flights::new();
        let Flight::Leader(guard) = flights.join(&key(1)) else { panic!("leader") };
        let Flight::Follower(waiter) = flights.join(&key(1)) else { panic!("follower") };
        assert_eq!(waiter.key(), guard.key());
        drop(guard);
        let started = tokio::time::Instant::now();
        assert!(waiter.wait(Duration::from_secs(60)).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
