//! The state of one window: an exact log of recent grants for rolling
//! windows, a counter with its reset instant for daily ones.

use std::collections::VecDeque;

use crate::limits::{Reset, Unit, Window};

/// Most entries a rolling log keeps. Request windows up to this limit are
/// exact (one entry per grant). Larger ones, and token windows, merge a new
/// grant into the newest entry when the log is full, which moves that entry's
/// time forward: its grants then count *longer* than they happened, never
/// shorter, so the window errs on the safe side by at most the gap between two
/// expiries (about `period / LOG_CAPACITY` in steady use). 16 KiB per window.
pub(crate) const LOG_CAPACITY: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// When (Unix nanos); the latest grant merged into it.
    pub(crate) at: u64,
    pub(crate) amount: u64,
}

/// Recent grants, oldest first, with their running sum.
#[derive(Debug, Clone)]
pub(crate) struct Log {
    entries: VecDeque<Entry>,
    cap: usize,
    sum: u64,
}

impl Log {
    fn new(cap: usize) -> Self {
        let cap = cap.clamp(1, LOG_CAPACITY);
        Self { entries: VecDeque::with_capacity(cap), cap, sum: 0 }
    }

    /// Forgets grants made `span` or more before `now`.
    fn expire(&mut self, now: u64, span: u64) {
        while let Some(e) = self.entries.front() {
            if e.at.saturating_add(span) > now {
                break;
            }
            self.sum = self.sum.saturating_sub(e.amount);
            self.entries.pop_front();
        }
    }

    /// Records `amount` at `now`. Never allocates: the deque was sized at
    /// creation and a full log merges instead of growing.
    fn add(&mut self, now: u64, amount: u64) {
        if amount == 0 {
            return;
        }
        self.sum = self.sum.saturating_add(amount);
        if self.entries.len() < self.cap {
            self.entries.push_back(Entry { at: now, amount });
        } else if let Some(last) = self.entries.back_mut() {
            last.at = last.at.max(now);
            last.amount = last.amount.saturating_add(amount);
        }
    }

    /// Nanoseconds from `now` until the sum is at most `target`.
    fn wait_until_at_most(&self, now: u64, span: u64, target: u64) -> u64 {
        if self.sum <= target {
            return 0;
        }
        let mut left = self.sum;
        for e in &self.entries {
            left = left.saturating_sub(e.amount);
            if left <= target {
                return e.at.saturating_add(span).saturating_sub(now);
            }
        }
        0
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.entries.iter().copied()
    }
}

#[derive(Debug, Clone)]
enum Counter {
    Rolling(Log),
    Fixed { used: u64, resets_at: u64 },
}

/// Where a window's limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The configuration.
    Configured,
    /// An upstream's rate-limit headers announced a lower one.
    Learned,
}

impl Source {
    /// `"configured"` or `"learned"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Configured => "configured",
            Source::Learned => "learned",
        }
    }
}

/// One window's spec and state.
#[derive(Debug, Clone)]
pub(crate) struct WindowState {
    pub(crate) window: Window,
    counter: Counter,
    /// A lower limit the upstream announced.
    learned: Option<u64>,
}

impl WindowState {
    pub(crate) fn new(window: Window, now: u64) -> Self {
        let counter = match &window.reset {
            Reset::Rolling => {
                let cap = if window.unit == Unit::Requests {
                    usize::try_from(window.limit).unwrap_or(LOG_CAPACITY)
                } else {
                    LOG_CAPACITY
                };
                Counter::Rolling(Log::new(cap))
            }
            Reset::Daily(daily) => Counter::Fixed { used: 0, resets_at: daily.next_after(now) },
        };
        Self { window, counter, learned: None }
    }

    /// A window for `window` that keeps what `old` counted, when both count
    /// the same thing the same way (a reload that changed only the limit).
    pub(crate) fn carried(window: Window, old: &WindowState, now: u64) -> Self {
        let mut new = Self::new(window, now);
        let same_kind = old.window.unit == new.window.unit
            && old.window.period == new.window.period
            && old.window.reset == new.window.reset;
        if same_kind {
            match (&mut new.counter, &old.counter) {
                (Counter::Rolling(log), Counter::Rolling(old_log)) => {
                    for e in old_log.entries() {
                        log.add(e.at, e.amount);
                    }
                }
                (new_counter @ Counter::Fixed { .. }, old_counter @ Counter::Fixed { .. }) => {
                    *new_counter = old_counter.clone();
                }
                _ => {}
            }
            new.learned = old.learned;
        }
        new
    }

    pub(crate) fn limit(&self) -> u64 {
        self.learned.map_or(self.window.limit, |l| l.min(self.window.limit))
    }

    pub(crate) fn source(&self) -> Source {
        match self.learned {
            Some(l) if l < self.window.limit => Source::Learned,
            _ => Source::Configured,
        }
    }

    pub(crate) fn learn_limit(&mut self, announced: u64) {
        self.learned = Some(announced);
    }

    pub(crate) fn forget_learned(&mut self) {
        self.learned = None;
    }

    /// Brings the window up to `now`: forgets expired grants, resets a day.
    pub(crate) fn refresh(&mut self, now: u64) {
        match &mut self.counter {
            Counter::Rolling(log) => log.expire(now, self.window.span),
            Counter::Fixed { used, resets_at } => {
                if now >= *resets_at {
                    *used = 0;
                    if let Reset::Daily(daily) = &self.window.reset {
                        *resets_at = daily.next_after(now);
                    }
                }
            }
        }
    }

    /// What it counted (after [`refresh`](Self::refresh)).
    pub(crate) fn used(&self) -> u64 {
        match &self.counter {
            Counter::Rolling(log) => log.sum,
            Counter::Fixed { used, .. } => *used,
        }
    }

    /// Nanoseconds until this window admits one more request (0 = now), given
    /// `reserved` tokens outstanding; `None` when only finishing requests can
    /// make room (reservations alone fill a token window).
    pub(crate) fn wait_for_room(&self, now: u64, reserved: u64) -> Option<u64> {
        let limit = self.limit();
        // Requests: used + 1 ≤ limit. Tokens: used + reserved < limit.
        let room_at = match self.window.unit {
            Unit::Requests => limit - 1,
            Unit::Tokens => (limit - 1).checked_sub(reserved)?,
        };
        match &self.counter {
            Counter::Rolling(log) => Some(log.wait_until_at_most(now, self.window.span, room_at)),
            Counter::Fixed { used, resets_at } => {
                Some(if *used <= room_at { 0 } else { resets_at.saturating_sub(now) })
            }
        }
    }

    /// Counts `amount` at `now`.
    pub(crate) fn record(&mut self, now: u64, amount: u64) {
        match &mut self.counter {
            Counter::Rolling(log) => log.add(now, amount),
            Counter::Fixed { used, .. } => *used = used.saturating_add(amount),
        }
    }

    /// Nanoseconds until the window next gives something back: the oldest
    /// grant's expiry (rolling) or the reset (daily); 0 when it holds nothing.
    pub(crate) fn resets_in(&self, now: u64) -> u64 {
        match &self.counter {
            Counter::Rolling(log) => {
                log.entries.front().map_or(0, |e| e.at.saturating_add(self.window.span).saturating_sub(now))
            }
            Counter::Fixed { resets_at, .. } => resets_at.saturating_sub(now),
        }
    }

    /// Nanoseconds until the window holds nothing: the newest grant's expiry
    /// (rolling) or the reset (daily); 0 when it holds nothing.
    pub(crate) fn empty_in(&self, now: u64) -> u64 {
        match &self.counter {
            Counter::Rolling(log) => {
                log.entries.back().map_or(0, |e| e.at.saturating_add(self.window.span).saturating_sub(now))
            }
            Counter::Fixed { used: 0, .. } => 0,
            Counter::Fixed { resets_at, .. } => resets_at.saturating_sub(now),
        }
    }

    /// The saved form of the counter: `(entries, fixed reset instant)`.
    pub(crate) fn saved(&self) -> (Vec<Entry>, Option<u64>) {
        match &self.counter {
            Counter::Rolling(log) => (log.entries().collect(), None),
            Counter::Fixed { used, resets_at } => {
                (vec![Entry { at: *resets_at, amount: *used }], Some(*resets_at))
            }
        }
    }

    /// Restores a saved counter (see [`saved`](Self::saved)); entries from a
    /// log are replayed, a day count is kept only if its day has not reset.
    pub(crate) fn restore(&mut self, entries: &[Entry], fixed: bool, now: u64) {
        match &mut self.counter {
            Counter::Rolling(log) if !fixed => {
                for e in entries {
                    log.add(e.at.min(now), e.amount);
                }
                log.expire(now, self.window.span);
            }
            Counter::Fixed { used, resets_at } if fixed => {
                for e in entries.iter().filter(|e| e.at == *resets_at) {
                    *used = used.saturating_add(e.amount);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_log_merges_into_the_newest_entry_and_counts_it_longer() {
        let mut log = Log::new(2);
        log.add(10, 1);
        log.add(20, 1);
        log.add(30, 5); // full: merged into the entry at 20, now at 30
        assert_eq!(log.sum, 7);
        assert_eq!(
            log.entries().collect::<Vec<_>>(),
            [Entry { at: 10, amount: 1 }, Entry { at: 30, amount: 6 }]
        );
        log.expire(110, 100);
        assert_eq!(log.sum, 6, "the first grant expired at 110");
        log.expire(129, 100);
        assert_eq!(log.sum, 6, "the merged grant made at 20 still counts: safe side");
        assert_eq!(log.wait_until_at_most(129, 100, 0), 1);
        log.expire(130, 100);
        assert_eq!(log.sum, 0);
    }
}
