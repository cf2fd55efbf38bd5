//! Caps on concurrent worker connections per client address and per token subject, so
//! that one machine or one leaked token cannot take over the hub. A [`Slot`] holds one
//! connection's place and gives it back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    Subject(String),
}

/// The limits and the connections they count. 0 means no limit.
#[derive(Debug)]
pub struct ConnectionLimits {
    per_address: u32,
    per_subject: u32,
    open: Mutex<HashMap<Key, u32>>,
}

/// A place taken by one connection; dropped when the connection ends.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    key: Key,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(per_address: u32, per_subject: u32) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            per_address,
            per_subject,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// No limits (in-process tools and tests of other things).
    pub fn unlimited() -> Arc<ConnectionLimits> {
        ConnectionLimits::new(0, 0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, u32>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(self: &Arc<Self>, key: Key, limit: u32) -> Result<Slot, u32> {
        let mut open = self.lock();
        let count = open.entry(key.clone()).or_insert(0);
        if limit > 0 && *count >= limit {
            if *count == 0 {
                open.remove(&key);
            }
            return Err(limit);
        }
        *count += 1;
        Ok(Slot {
            limits: self.clone(),
            key,
        })
    }

    /// A connection from `address`; `Err(limit)` when it already has `limit` of them.
    pub fn address(self: &Arc<Self>, address: IpAddr) -> Result<Slot, u32> {
        self.take(Key::Address(address), self.per_address)
    }

    /// A connection of token subject `subject`; `Err(limit)` when it has `limit`.
    pub fn subject(self: &Arc<Self>, subject: &str) -> Result<Slot, u32> {
        self.take(Key::Subject(subject.to_owned()), self.per_subject)
    }

    /// Connections open now, all keys together.
    pub fn open(&self) -> u32 {
        self.lock()
            .iter()
            .filter(|(k, _)| matches!(k, Key::Address(_)))
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_key_and_given_back() {
        let limits = ConnectionLimits::new(2, 1);
        let here: IpAddr = "10.0.0.1".parse().unwrap();
        let there: IpAddr = "10.0.0.2".parse().unwrap();
        let a = limits.address(here).unwrap();
        let _b = limits.address(here).unwrap();
        assert_eq!(limits.address(here).unwrap_err(), 2);
        let _c = limits.address(there).unwrap();
        assert_eq!(limits.open(), 3);
        drop(a);
        let _d = limits.address(here).unwrap();

        let s = limits.subject("ada").unwrap();
        assert_eq!(limits.subject("ada").unwrap_err(), 1);
        let _t = limits.subject("bob").unwrap();
        drop(s);
        let _u = limits.subject("ada").unwrap();

        let free = ConnectionLimits::unlimited();
        let slots: Vec<Slot> = (0..1000).map(|_| free.address(here).unwrap()).collect();
        assert_eq!(free.open(), 1000);
        drop(slots);
        assert_eq!(free.open(), 0);
        assert!(free.lock().is_empty());
    }
}
