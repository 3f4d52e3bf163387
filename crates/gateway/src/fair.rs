//! The queue's turnstile, fair between clients: one waiter at a time holds
//! the turn (and takes the next permit); when it lets go, the turn goes to
//! the next client with waiting requests in weighted round-robin order —
//! first come, first served within one client.
//!
//! A client that queued a hundred requests therefore delays another client's
//! single request by at most one turn per competing client (each turn ends
//! with one permit taken), not by its hundred.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// Who waits: the lane a request queues in, and its share.
#[derive(Debug, Clone)]
pub struct Waiter {
    /// The client's name (its lane); anonymous requests share one lane.
    pub lane: Arc<str>,
    /// Consecutive turns the lane gets before the next lane's (1..).
    pub weight: u32,
}

impl Waiter {
    /// The lane of requests that name no client (no tokens, or an operator token).
    pub fn anonymous() -> Self {
        Self { lane: Arc::from(""), weight: 1 }
    }
}

/// One client's waiting requests, oldest first.
#[derive(Debug)]
struct Lane {
    name: Arc<str>,
    weight: u32,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

#[derive(Debug, Default)]
struct State {
    /// A turn is held.
    busy: bool,
    /// Lanes with waiting requests, in round-robin order.
    lanes: VecDeque<Lane>,
    /// Turns the front lane has had in a row.
    streak: u32,
    /// Ticket numbers, to find one's own entry when leaving.
    next_ticket: u64,
}

/// The turnstile (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Fair {
    state: Mutex<State>,
}

/// The turn: held by the request at the head of the queue; dropping it hands
/// the turn on.
#[derive(Debug)]
pub(crate) struct Turn<'a> {
    fair: &'a Fair,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.fair.pass_on();
    }
}

impl Fair {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere cannot
        // leave it half-updated, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests waiting per lane now (lanes without waiters are absent).
    pub(crate) fn depths(&self, mut f: impl FnMut(&str, usize)) {
        let state = self.lock();
        for lane in &state.lanes {
            f(&lane.name, lane.waiting.len());
        }
    }

    /// Waits for the turn until `deadline` (`None`: the deadline passed first).
    pub(crate) async fn acquire(&self, who: &Waiter, deadline: tokio::time::Instant) -> Option<Turn<'_>> {
        let (ticket, rx) = {
            let mut state = self.lock();
            if !state.busy && state.lanes.is_empty() {
                state.busy = true;
                return Some(Turn { fair: self });
            }
            let (tx, rx) = oneshot::channel();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            match state.lanes.iter_mut().find(|l| *l.name == *who.lane) {
                Some(lane) => lane.waiting.push_back((ticket, tx)),
                None => state.lanes.push_back(Lane {
                    name: Arc::clone(&who.lane),
                    weight: who.weight.max(1),
                    waiting: VecDeque::from([(ticket, tx)]),
                }),
            }
            (ticket, rx)
        };
        let mut rx = rx;
        match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(Ok(())) => Some(Turn { fair: self }),
            // The sender is only dropped after a send or by `leave`: treat as a timeout.
            Ok(Err(_)) => None,
            Err(_) => {
                self.leave(ticket, &who.lane);
                // Handed the turn between the timeout and leaving: pass it on.
                if rx.try_recv().is_ok() {
                    drop(Turn { fair: self });
                }
                None
            }
        }
    }

    /// Removes a waiter that gave up (if it is still waiting).
    fn leave(&self, ticket: u64, lane: &str) {
        let mut state = self.lock();
        let Some(at) = state.lanes.iter().position(|l| *l.name == *lane) else { return };
        state.lanes[at].waiting.retain(|(t, _)| *t != ticket);
        if state.lanes[at].waiting.is_empty() {
            state.lanes.remove(at);
            if at == 0 {
                state.streak = 0;
            }
        }
    }

    /// Hands the turn to the next waiter: the front lane while it has turns
    /// left of its weight, then the next lane.
    fn pass_on(&self) {
        let mut state = self.lock();
        loop {
            let Some(front) = state.lanes.front() else {
                state.busy = false;
                state.streak = 0;
                return;
            };
            if state.streak >= front.weight {
                // Its share is used: to the back of the round.
                state.streak = 0;
                if let Some(lane) = state.lanes.pop_front() {
                    state.lanes.push_back(lane);
                }
                continue;
            }
            let Some(front) = state.lanes.front_mut() else { continue };
            let next = front.waiting.pop_front();
            let emptied = front.waiting.is_empty();
            if emptied {
                // The next lane starts its own streak.
                state.lanes.pop_front();
                state.streak = 0;
            }
            let Some((_, tx)) = next else { continue };
            if tx.send(()).is_ok() {
                // The turn stays busy, now held by the waiter just woken.
                if !emptied {
                    state.streak += 1;
                }
                return;
            }
            // That waiter is gone (its future dropped): try the next.
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn who(name: &str, weight: u32) -> Waiter {
        Waiter { lane: Arc::from(name), weight }
    }

    /// Queues `n` requests of each `(lane, weight)` behind a held turn, in
    /// the given order, and returns the order in which the turn reaches them.
    async fn order(arrivals: &[(&str, u32)]) -> Vec<String> {
        let fair = Arc::new(Fair::default());
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        let first = fair.acquire(&who("first", 1), far).await.unwrap();
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, (lane, weight)) in arrivals.iter().enumerate() {
            let (fair, served, w) = (Arc::clone(&fair), Arc::clone(&served), who(lane, *weight));
            let name = format!("{lane}{i}");
            tasks.push(tokio::spawn(async move {
                let turn = fair.acquire(&w, far).await.unwrap();
                served.lock().unwrap().push(name);
                tokio::task::yield_now().await;
                drop(turn);
            }));
            // Let it queue before the next arrives.
            tokio::task::yield_now().await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        served.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_single_request_is_not_stuck_behind_a_flood() {
        let mut arrivals = vec![("flood", 1); 10];
        arrivals.push(("single", 1));
        let got = order(&arrivals).await;
        let at = got.iter().position(|n| n == "single10").unwrap();
        assert!(at <= 1, "the single request goes within one turn of the flood's: {got:?}");
    }

    #[tokio::test]
    async fn lanes_alternate_by_weight_and_stay_in_order_within_a_lane() {
        let mut arrivals = vec![("a", 2); 4];
        arrivals.extend([("b", 1); 2]);
        let got = order(&arrivals).await;
        assert_eq!(got, ["a0", "a1", "b4", "a2", "a3", "b5"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_times_out_leaves_and_the_turn_moves_on() {
        let fair = Fair::default();
        let soon = tokio::time::Instant::now() + Duration::from_millis(10);
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        let held = fair.acquire(&who("a", 1), far).await.unwrap();
        assert!(fair.acquire(&who("b", 1), soon).await.is_none(), "timed out");
        let mut lanes = 0;
        fair.depths(|_, _| lanes += 1);
        assert_eq!(lanes, 0, "the timed-out waiter left its lane");
        drop(held);
        assert!(fair.acquire(&who("c", 1), soon).await.is_some(), "the turn is free again");
    }
}
