//! The state of one window: an exact log of recent grants for rolling
//! windows, a counter with its reset instant for daily ones.

use std::collections::VecDeque;

use crate::limits::{Reset, Unit, Window};

/// Most time slices a rolling log keeps. Request windows up to this limit are
/// exact (one entry per grant). Larger ones, and token windows, count grants
/// per slice of `span / LOG_CAPACITY`: a grant joins the newest entry when it
/// falls within that entry's slice, and the entry counts until one span after
/// its *latest* grant — longer than its earlier grants happened, never
/// shorter, so the window errs on the safe side by at most one slice
/// (`period / 1024`: 59 ms of a minute, 84 s of a day). About 16 KiB per window.
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
    /// Slice width (ns); 0: one entry per grant (exact).
    slice: u64,
    /// When the newest entry's slice began.
    newest_since: u64,
}

impl Log {
    /// An exact log of at most `cap` entries (`cap` ≤ [`LOG_CAPACITY`]), or,
    /// for larger limits, a log of slices of `span / LOG_CAPACITY`.
    fn new(limit: u64, span: u64, exact: bool) -> Self {
        let (cap, slice) = match usize::try_from(limit) {
            Ok(n) if exact && n <= LOG_CAPACITY => (n.max(1), 0),
            // Slices start at least `slice` apart and live `span`: at most
            // LOG_CAPACITY + 2 of them are alive at once.
            _ => (LOG_CAPACITY + 2, (span / LOG_CAPACITY as u64).max(1)),
        };
        Self { entries: VecDeque::with_capacity(cap), cap, sum: 0, slice, newest_since: 0 }
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
    /// creation for every entry that can be alive at once.
    fn add(&mut self, now: u64, amount: u64) {
        if amount == 0 {
            return;
        }
        self.sum = self.sum.saturating_add(amount);
        let same_slice = self.slice > 0 && now.saturating_sub(self.newest_since) < self.slice;
        // A full exact log cannot happen (it admits only below its limit); a
        // full sliced one neither (see `new`): merge rather than grow if it did.
        let merge = same_slice || self.entries.len() >= self.cap;
        match self.entries.back_mut() {
            Some(last) if merge => {
                last.at = last.at.max(now);
                last.amount = last.amount.saturating_add(amount);
            }
            _ => {
                self.entries.push_back(Entry { at: now, amount });
                self.newest_since = now;
            }
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
                Counter::Rolling(Log::new(window.limit, window.span, window.unit == Unit::Requests))
            }
            Reset::Daily(daily) => Counter::Fixed { used: 0, resets_at: daily.next_after(now) },
        };
        Self { window, counter, learned: None }
    }

    /// A window for `window` that keeps what `old` counted: exactly when both
    /// count the same way (a reload that changed only the limit), on the safe
    /// side when only the reset changed.
    pub(crate) fn carried(window: Window, old: &WindowState, now: u64) -> Self {
        let mut new = Self::new(window, now);
        let same_kind = old.window.unit == new.window.unit
            && old.window.period == new.window.period
            && old.window.reset == new.window.reset;
        let same_count = old.window.unit == new.window.unit && old.window.period == new.window.period;
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
        } else if same_count {
            // The reset changed (rolling <-> a time of day, or the zone): what
            // was counted still counts, conservatively — a day counter starts
            // from the log's sum; a log from the counter's use, as of now.
            let used = old.used();
            match &mut new.counter {
                Counter::Fixed { used: new_used, .. } => *new_used = used,
                Counter::Rolling(log) => log.add(now, used),
            }
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
    /// With `divisor` above 1 only ⌊limit / divisor⌋ is available (a
    /// replica's share of a window it shares with others).
    pub(crate) fn wait_for_room(&self, now: u64, reserved: u64, divisor: u64) -> Option<u64> {
        let limit = self.limit() / divisor.max(1);
        if limit == 0 {
            // No share of this window at all: it never has room; look again
            // after a span (the share may change).
            return Some(self.window.span.max(1));
        }
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
    fn a_sliced_log_merges_within_a_slice_and_counts_it_longer() {
        // span 1024 ns: slices of 1 ns would be too fine; use 10 240 → 10 ns.
        let mut log = Log::new(5_000, 10_240, true);
        assert_eq!(log.slice, 10);
        log.add(100, 1);
        log.add(105, 1); // same slice: merged, counted from 105
        log.add(110, 5); // a new slice
        assert_eq!(log.sum, 7);
        assert_eq!(
            log.entries().collect::<Vec<_>>(),
            [Entry { at: 105, amount: 2 }, Entry { at: 110, amount: 5 }]
        );
        log.expire(100 + 10_240, 10_240);
        assert_eq!(log.sum, 7, "the grant made at 100 still counts: safe side");
        log.expire(105 + 10_240, 10_240);
        assert_eq!(log.sum, 5);
        assert_eq!(log.wait_until_at_most(105 + 10_240, 10_240, 0), 5);
    }

    #[test]
    fn a_full_day_of_steady_grants_never_stalls_the_window() {
        // 14 400 a day, one request every 6 s (exactly the limit): the window is
        // never more than one slice (84 s) behind, so it loses at most about
        // 84 s / 6 s = 14 grants a day (a log that merged into its newest entry
        // once full stalled for most of a day here: 33 223 of 57 600).
        let day = 86_400_000_000_000u64;
        let mut log = Log::new(14_400, day, true);
        let mut t = 0u64;
        let mut granted = 0u64;
        for _ in 0..(4 * 14_400) {
            t += 6_000_000_000;
            log.expire(t, day);
            if log.sum < 14_400 {
                log.add(t, 1);
                granted += 1;
            }
            assert!(log.entries.len() <= LOG_CAPACITY + 2);
        }
        assert!(granted >= 4 * 14_400 - 3 * 15, "granted {granted} of {}", 4 * 14_400);
    }

    #[test]
    fn small_request_logs_are_exact() {
        let mut log = Log::new(3, 1_000, true);
        assert_eq!(log.slice, 0);
        for t in [1, 2, 3] {
            log.add(t, 1);
        }
        assert_eq!(log.entries().count(), 3);
    }
}
