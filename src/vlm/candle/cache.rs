//! The model cache (seed 001): loaded models in an LRU bounded by their weight bytes.
//!
//! Loading a model that does not fit evicts the least recently used models that have no
//! batch in flight; a model bigger than the whole budget is refused. Pure bookkeeping,
//! generic over what is cached, so its rules are tested without loading anything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A cached value with its size and a count of batches using it.
pub struct Slot<T> {
    pub name: String,
    pub bytes: u64,
    pub value: Arc<T>,
    in_flight: Arc<AtomicUsize>,
    last_used: u64,
}

/// Marks a model busy while a batch runs on it; eviction skips busy models.
pub struct InUse<T> {
    pub value: Arc<T>,
    in_flight: Arc<AtomicUsize>,
}

impl<T> Drop for InUse<T> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("model {name} needs {bytes} bytes of weights, more than MODEL_CACHE_BYTES={capacity}")]
    NeverFits {
        name: String,
        bytes: u64,
        capacity: u64,
    },
    #[error("model {name} does not fit next to the models now running batches (MODEL_CACHE_BYTES={capacity}); retry later")]
    Busy { name: String, capacity: u64 },
}

pub struct Lru<T> {
    capacity: u64,
    slots: Vec<Slot<T>>,
    clock: u64,
}

impl<T> Lru<T> {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            slots: Vec::new(),
            clock: 0,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The cached model, marked in use and most recently used.
    pub fn get(&mut self, name: &str) -> Option<InUse<T>> {
        self.clock += 1;
        let clock = self.clock;
        let slot = self.slots.iter_mut().find(|s| s.name == name)?;
        slot.last_used = clock;
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InUse {
            value: slot.value.clone(),
            in_flight: slot.in_flight.clone(),
        })
    }

    /// Makes room for `bytes`, evicting idle models, least recently used first; returns the
    /// names evicted. Fails without evicting anything if room cannot be made.
    pub fn make_room(&mut self, name: &str, bytes: u64) -> Result<Vec<String>, CacheError> {
        if bytes > self.capacity {
            return Err(CacheError::NeverFits {
                name: name.to_owned(),
                bytes,
                capacity: self.capacity,
            });
        }
        let used: u64 = self.slots.iter().map(|s| s.bytes).sum();
        let mut idle: Vec<&Slot<T>> = self
            .slots
            .iter()
            .filter(|s| s.in_flight.load(Ordering::Acquire) == 0)
            .collect();
        idle.sort_by_key(|s| s.last_used);
        let mut free = self.capacity - used.min(self.capacity);
        let mut evict = Vec::new();
        for s in idle {
            if free >= bytes {
                break;
            }
            free += s.bytes;
            evict.push(s.name.clone());
        }
        if free < bytes {
            return Err(CacheError::Busy {
                name: name.to_owned(),
                capacity: self.capacity,
            });
        }
        self.slots.retain(|s| !evict.contains(&s.name));
        Ok(evict)
    }

    /// Adds a loaded model (after `make_room`), in use by the caller.
    pub fn insert(&mut self, name: &str, bytes: u64, value: Arc<T>) -> InUse<T> {
        self.clock += 1;
        let in_flight = Arc::new(AtomicUsize::new(1));
        self.slots.retain(|s| s.name != name);
        self.slots.push(Slot {
            name: name.to_owned(),
            bytes,
            value: value.clone(),
            in_flight: in_flight.clone(),
            last_used: self.clock,
        });
        InUse { value, in_flight }
    }

    /// Names and sizes of the loaded models, most recently used first.
    pub fn loaded(&self) -> Vec<(String, u64)> {
        let mut v: Vec<&Slot<T>> = self.slots.iter().collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.last_used));
        v.into_iter().map(|s| (s.name.clone(), s.bytes)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(lru: &mut Lru<()>, name: &str, bytes: u64) -> Vec<String> {
        let evicted = lru.make_room(name, bytes).unwrap();
        drop(lru.insert(name, bytes, Arc::new(())));
        evicted
    }

    #[test]
    fn evicts_least_recently_used_idle_models() {
        let mut lru = Lru::new(100);
        add(&mut lru, "a", 40);
        add(&mut lru, "b", 40);
        drop(lru.get("a"));
        assert_eq!(
            add(&mut lru, "c", 40),
            vec!["b"],
            "b was used least recently"
        );
        assert_eq!(
            lru.loaded()
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            vec!["c", "a"]
        );
        assert_eq!(add(&mut lru, "d", 100), vec!["a", "c"]);
    }

    #[test]
    fn busy_models_are_not_evicted_and_oversized_models_never_fit() {
        let mut lru = Lru::new(100);
        add(&mut lru, "a", 60);
        let busy = lru.get("a").unwrap();
        assert!(matches!(
            lru.make_room("b", 60),
            Err(CacheError::Busy { .. })
        ));
        assert_eq!(lru.loaded().len(), 1, "nothing evicted on failure");
        drop(busy);
        assert_eq!(lru.make_room("b", 60).unwrap(), vec!["a"]);
        assert!(matches!(
            lru.make_room("huge", 101),
            Err(CacheError::NeverFits { .. })
        ));
    }
}
