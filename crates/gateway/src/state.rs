//! What the gateway keeps across restarts: every budget's windows, blocks and
//! reservations (from the quota engine) and each key's cooldown or disabled
//! state. Keys are named by a fingerprint of their secret, never by the secret.
//! Where the state is stored is the embedder's choice (the server keeps it in
//! SQLite); [`SavedState`] is plain data.

use std::time::Duration;

use proxypal_keypool::{CooldownReason, KeyStatus};
use proxypal_limiter::{QuotaClock, SavedBudget};

use crate::Gateway;

/// A key's stable, one-way name: `sha256:` and the first 128 bits of the
/// SHA-256 of its secret, in hex. Safe to store and show; it cannot be turned
/// back into the key.
pub fn fingerprint(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = String::with_capacity(7 + 32);
    out.push_str("sha256:");
    for byte in digest.as_ref().iter().take(16) {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// One key's cooldown or disabled state, saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedKey {
    /// The key's [`fingerprint`].
    pub id: String,
    /// Disabled (the upstream rejected it).
    pub disabled: bool,
    /// Cooling down until (Unix nanoseconds), and why.
    pub cooling: Option<(u64, CooldownReason)>,
}

/// Everything the gateway saves, at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedState {
    /// When it was taken (Unix nanoseconds, the quota engine's clock).
    pub saved_at: u64,
    /// Every budget: `key:<fingerprint>`, `account:<name>` or `client:<name>`.
    pub budgets: Vec<SavedBudget>,
    /// Keys that were cooling down or disabled.
    pub keys: Vec<SavedKey>,
}

/// # Saving and restoring state
impl Gateway {
    /// The state worth keeping across a restart, now: every provider's.
    /// Cheap enough to call every second; never blocks a request for long
    /// (each budget's lock is held only while its windows are copied).
    pub fn save_state(&self) -> SavedState {
        let mut state = SavedState { saved_at: self.quotas().clock().now(), ..SavedState::default() };
        for provider in self.providers() {
            // The engine and the fingerprints of one generation (a reload may swap them).
            let (quotas, ids) = generation(&provider);
            let saved_at = state.saved_at;
            state.budgets.extend(quotas.save(|i| ids.get(i).cloned().unwrap_or_default()));
            state.keys.extend(provider.keys().snapshot().into_iter().filter_map(|k| {
                let id = ids.get(k.index)?.clone();
                match k.status {
                    KeyStatus::Ready => None,
                    KeyStatus::Disabled => Some(SavedKey { id, disabled: true, cooling: None }),
                    KeyStatus::CoolingDown { remaining, reason } => {
                        let until =
                            saved_at.saturating_add(u64::try_from(remaining.as_nanos()).unwrap_or(u64::MAX));
                        Some(SavedKey { id, disabled: false, cooling: Some((until, reason)) })
                    }
                }
            }));
        }
        let (quotas, ids) = self.client_generation();
        state.budgets.extend(quotas.save(|i| ids.get(i).cloned().unwrap_or_default()));
        state
    }

    /// Puts a saved state back: windows, blocks, cooldowns and disabled keys
    /// of the keys (matched by fingerprint) and accounts (by name) that are
    /// still configured, in every provider. `crashed_at`: the state was not
    /// saved at a clean shutdown; the latest moment the process may have
    /// granted what it lacks. The engine errs on the safe side for that (see
    /// [`QuotaEngine::restore`](proxypal_limiter::QuotaEngine::restore)).
    pub fn restore_state(&self, state: &SavedState, crashed_at: Option<u64>) {
        for provider in self.providers() {
            let (quotas, ids) = generation(&provider);
            quotas.restore(&state.budgets, |i| ids.get(i).cloned().unwrap_or_default(), crashed_at);
            let now = quotas.clock().now();
            for (index, id) in ids.iter().enumerate() {
                let Some(saved) = state.keys.iter().find(|k| &k.id == id) else { continue };
                let status = match saved.cooling {
                    _ if saved.disabled => KeyStatus::Disabled,
                    Some((until, reason)) if until > now => {
                        KeyStatus::CoolingDown { remaining: Duration::from_nanos(until - now), reason }
                    }
                    _ => continue,
                };
                provider.keys().restore(index, status);
            }
        }
        let (quotas, ids) = self.client_generation();
        quotas.restore(&state.budgets, |i| ids.get(i).cloned().unwrap_or_default(), crashed_at);
    }
}

impl Gateway {
    /// The named clients' quota engine and each client's id (`client:<name>`,
    /// saved as `key:client:<name>`), from one generation.
    fn client_generation(&self) -> (std::sync::Arc<crate::Engine>, Vec<String>) {
        let settings = self.settings();
        let ids = settings.tokens.all().iter().map(|n| format!("client:{}", n.name)).collect();
        (std::sync::Arc::clone(settings.tokens.quotas()), ids)
    }
}

/// A provider's current quota engine and each key's fingerprint, in key-set
/// order, from one generation.
fn generation(provider: &crate::Provider) -> (std::sync::Arc<crate::Engine>, Vec<String>) {
    provider.keys().with_current(|keys, resources| {
        (
            std::sync::Arc::clone(&resources.quotas),
            keys.iter().map(|k| fingerprint(k.secret().expose())).collect(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_stable_and_reveals_nothing() {
        let key = "nvapi-fingerprint-test-0000000000000001";
        let f = fingerprint(key);
        assert_eq!(f, fingerprint(key));
        assert_eq!(f.len(), 7 + 32);
        assert!(f.starts_with("sha256:"));
        assert!(!f.contains("nvapi") && !f.contains("0001"));
        assert_ne!(f, fingerprint("nvapi-fingerprint-test-0000000000000002"));
        // SHA-256("abc") starts ba7816bf8f01cfea414140de5dae2223.
        assert_eq!(fingerprint("abc"), "sha256:ba7816bf8f01cfea414140de5dae2223");
    }
}
