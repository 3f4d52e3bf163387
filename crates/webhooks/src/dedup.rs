//! Which events are news: states that last are announced once, windows once each.
//! The rules are documented on [`Webhooks::emit`](crate::Webhooks::emit).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::event::{Event, EventKind};
use crate::time::parse_rfc3339_ms;

/// Which lasting state an event opens or closes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum StateKey {
    /// A key disabled, by (provider, key).
    Key { provider: Option<String>, key: Option<String> },
    /// A pool exhausted, by provider.
    Pool { provider: Option<String> },
}

/// One window of one quota event: seen once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct WindowKey {
    kind: EventKind,
    provider: Option<String>,
    key: Option<String>,
    client: Option<String>,
    /// `data["window"]` and `data["resets_at"]` as JSON text (a `Value` has no `Hash`).
    window: Option<String>,
    resets_at: Option<String>,
}

#[derive(Debug)]
struct WindowEntry {
    /// Insertion order, to forget the oldest first.
    seq: u64,
    /// When the window ends (Unix ms), if `resets_at` said so in a form we read.
    expires_ms: Option<i64>,
}

/// Undoes what [`Dedup::admit`] recorded, for an event that could not be queued: a dropped
/// `key.disabled` must not keep the next one from being sent.
#[derive(Debug)]
pub(crate) enum Undo {
    Nothing,
    RemoveState(StateKey),
    RestoreState(StateKey),
    RemoveWindow(WindowKey),
}

/// What to do with an event.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// News: send it (and undo the bookkeeping if that fails).
    Send(Undo),
    /// Already announced (or a recovery of something never announced).
    Suppress,
}

/// The dedup memory, bounded by `capacity` for states and for windows each.
#[derive(Debug)]
pub(crate) struct Dedup {
    states: HashSet<StateKey>,
    /// Set once a state could not be remembered for lack of room: from then on a recovery
    /// that matches nothing is sent rather than suppressed (better twice than never).
    states_overflowed: bool,
    windows: HashMap<WindowKey, WindowEntry>,
    seq: u64,
    capacity: usize,
}

impl Dedup {
    pub(crate) fn new(capacity: usize) -> Self {
        Dedup {
            states: HashSet::new(),
            states_overflowed: false,
            windows: HashMap::new(),
            seq: 0,
            capacity: capacity.max(1),
        }
    }

    /// Decides on `event` and records it; `now_ms` is the wall clock, for expiring windows.
    pub(crate) fn admit(&mut self, event: &Event, now_ms: i64) -> Verdict {
        match event.kind {
            EventKind::KeyDisabled => {
                self.open(StateKey::Key { provider: event.provider.clone(), key: event.key.clone() })
            }
            EventKind::KeyRecovered => {
                self.close(StateKey::Key { provider: event.provider.clone(), key: event.key.clone() })
            }
            EventKind::PoolExhausted => self.open(StateKey::Pool { provider: event.provider.clone() }),
            EventKind::PoolRecovered => self.close(StateKey::Pool { provider: event.provider.clone() }),
            EventKind::QuotaWarning | EventKind::ClientQuotaExhausted => self.once_per_window(event, now_ms),
        }
    }

    pub(crate) fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Nothing => {}
            Undo::RemoveState(k) => {
                self.states.remove(&k);
            }
            Undo::RestoreState(k) => {
                self.states.insert(k);
            }
            Undo::RemoveWindow(k) => {
                self.windows.remove(&k);
            }
        }
    }

    fn open(&mut self, key: StateKey) -> Verdict {
        if self.states.contains(&key) {
            return Verdict::Suppress;
        }
        if self.states.len() >= self.capacity {
            if !self.states_overflowed {
                tracing::warn!(
                    capacity = self.capacity,
                    "webhook dedup: too many lasting states to remember; repeats may be sent"
                );
            }
            self.states_overflowed = true;
            return Verdict::Send(Undo::Nothing);
        }
        self.states.insert(key.clone());
        Verdict::Send(Undo::RemoveState(key))
    }

    fn close(&mut self, key: StateKey) -> Verdict {
        if self.states.remove(&key) {
            Verdict::Send(Undo::RestoreState(key))
        } else if self.states_overflowed {
            Verdict::Send(Undo::Nothing)
        } else {
            Verdict::Suppress
        }
    }

    fn once_per_window(&mut self, event: &Event, now_ms: i64) -> Verdict {
        let resets_at = event.data.get("resets_at");
        let key = WindowKey {
            kind: event.kind,
            provider: event.provider.clone(),
            key: event.key.clone(),
            client: event.client.clone(),
            window: event.data.get("window").map(Value::to_string),
            resets_at: resets_at.map(Value::to_string),
        };
        if self.windows.contains_key(&key) {
            return Verdict::Suppress;
        }
        if self.windows.len() >= self.capacity {
            self.forget_windows(now_ms);
        }
        self.seq += 1;
        let entry = WindowEntry { seq: self.seq, expires_ms: resets_at.and_then(expiry_ms) };
        self.windows.insert(key.clone(), entry);
        Verdict::Send(Undo::RemoveWindow(key))
    }

    /// Forgets windows that have ended, then the oldest until half the room is free, so the
    /// O(n) pass runs at most once per `capacity / 2` insertions.
    fn forget_windows(&mut self, now_ms: i64) {
        self.windows.retain(|_, e| e.expires_ms.is_none_or(|t| t > now_ms));
        let keep = self.capacity / 2;
        if self.windows.len() > keep {
            let mut seqs: Vec<u64> = self.windows.values().map(|e| e.seq).collect();
            let last = seqs.len() - 1;
            let drop_n = seqs.len() - keep;
            let (_, threshold, _) = seqs.select_nth_unstable(drop_n.min(last));
            let threshold = if keep == 0 { u64::MAX } else { *threshold };
            self.windows.retain(|_, e| e.seq >= threshold);
        }
    }

    #[cfg(test)]
    fn windows_len(&self) -> usize {
        self.windows.len()
    }
}

/// When a window ends, from its `resets_at` figure: Unix seconds or milliseconds (a number
/// below 10^11 is seconds — that is the year 5138 in seconds, 1973 in milliseconds), or an
/// RFC 3339 string.
fn expiry_ms(resets_at: &Value) -> Option<i64> {
    match resets_at {
        Value::Number(n) => {
            let v = n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?;
            Some(if v.abs() < 100_000_000_000 { v.saturating_mul(1000) } else { v })
        }
        Value::String(s) => parse_rfc3339_ms(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sent(v: Verdict) -> bool {
        matches!(v, Verdict::Send(_))
    }

    #[test]
    fn a_lasting_state_is_announced_once_until_it_ends() {
        let mut d = Dedup::new(16);
        let disabled = Event::new(EventKind::KeyDisabled).provider("p").key("k1");
        let recovered = Event::new(EventKind::KeyRecovered).provider("p").key("k1");
        let other = Event::new(EventKind::KeyDisabled).provider("p").key("k2");
        let seq: Vec<bool> =
            [&recovered, &disabled, &disabled, &other, &disabled, &recovered, &recovered, &disabled]
                .into_iter()
                .map(|e| sent(d.admit(e, 0)))
                .collect();
        assert_eq!(seq, [false, true, false, true, false, true, false, true]);
    }

    #[test]
    fn pools_pair_by_provider() {
        let mut d = Dedup::new(16);
        let ex = |p: &str| Event::new(EventKind::PoolExhausted).provider(p);
        let rec = |p: &str| Event::new(EventKind::PoolRecovered).provider(p);
        assert!(sent(d.admit(&ex("a"), 0)));
        assert!(!sent(d.admit(&ex("a"), 0)));
        assert!(sent(d.admit(&ex("b"), 0)));
        assert!(!sent(d.admit(&rec("c"), 0)));
        assert!(sent(d.admit(&rec("a"), 0)));
        assert!(sent(d.admit(&ex("a"), 0)));
    }

    #[test]
    fn undo_lets_a_dropped_event_be_sent_again() {
        let mut d = Dedup::new(16);
        let disabled = Event::new(EventKind::KeyDisabled).key("k");
        let Verdict::Send(undo) = d.admit(&disabled, 0) else { panic!("first is news") };
        d.undo(undo);
        assert!(sent(d.admit(&disabled, 0)));
        let recovered = Event::new(EventKind::KeyRecovered).key("k");
        let Verdict::Send(undo) = d.admit(&recovered, 0) else { panic!("pairs") };
        d.undo(undo);
        assert!(sent(d.admit(&recovered, 0)), "the state was restored, so recovery is still news");
    }

    #[test]
    fn quota_events_are_once_per_window() {
        let mut d = Dedup::new(16);
        let warn = |resets: i64| {
            Event::new(EventKind::QuotaWarning)
                .provider("p")
                .key("k")
                .figure("window", "day")
                .figure("resets_at", resets)
                .figure("remaining", json!(10))
        };
        assert!(sent(d.admit(&warn(1000), 0)));
        assert!(
            !sent(d.admit(&warn(1000).figure("remaining", 5), 0)),
            "figures other than the window's identity do not matter"
        );
        assert!(sent(d.admit(&warn(2000), 0)));
        let exhausted = Event::new(EventKind::ClientQuotaExhausted).client("c").figure("resets_at", 1000);
        assert!(sent(d.admit(&exhausted, 0)));
        assert!(!sent(d.admit(&exhausted, 0)));
        assert!(sent(d.admit(&exhausted.clone().client("d"), 0)));
    }

    #[test]
    fn windows_stay_bounded_forgetting_ended_then_oldest() {
        let mut d = Dedup::new(8);
        let w = |i: i64, resets_s: i64| {
            Event::new(EventKind::ClientQuotaExhausted).client(format!("c{i}")).figure("resets_at", resets_s)
        };
        for i in 0..8 {
            // Half have ended by t = 100 s, half end at t = 10^6 s.
            let resets = if i % 2 == 0 { 50 } else { 1_000_000 };
            assert!(sent(d.admit(&w(i, resets), 0)));
        }
        assert_eq!(d.windows_len(), 8);
        assert!(sent(d.admit(&w(100, 1_000_000), 100_000)));
        assert_eq!(d.windows_len(), 5, "the 4 ended windows were forgotten, then one added");
        assert!(!sent(d.admit(&w(1, 1_000_000), 100_000)), "live windows are still remembered");
        for i in 200..1000 {
            d.admit(&w(i, 1_000_000), 100_000);
            assert!(d.windows_len() <= 8);
        }
        assert!(!sent(d.admit(&w(999, 1_000_000), 100_000)), "the newest is kept");
    }

    #[test]
    fn states_beyond_capacity_fail_open() {
        let mut d = Dedup::new(1);
        assert!(sent(d.admit(&Event::new(EventKind::KeyDisabled).key("a"), 0)));
        assert!(sent(d.admit(&Event::new(EventKind::KeyDisabled).key("b"), 0)));
        assert!(sent(d.admit(&Event::new(EventKind::KeyRecovered).key("b"), 0)), "unremembered, so sent");
    }

    #[test]
    fn expiry_reads_seconds_milliseconds_and_rfc3339() {
        assert_eq!(expiry_ms(&json!(1_700_000_000)), Some(1_700_000_000_000));
        assert_eq!(expiry_ms(&json!(1_700_000_000_000_i64)), Some(1_700_000_000_000));
        assert_eq!(expiry_ms(&json!("2023-11-14T22:13:20Z")), Some(1_700_000_000_000));
        assert_eq!(expiry_ms(&json!("tomorrow")), None);
        assert_eq!(expiry_ms(&json!(null)), None);
    }
}
