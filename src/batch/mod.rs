//! The dynamic batcher: one per model, shared by every job on that model.
//!
//! Each job has a lane (a bounded queue with a priority weight and a policy for when it is
//! full: drop the oldest for live video, block for VOD and Redis). A batch is cut when
//! `max` items wait or the oldest has waited `max_wait`; lanes are served weighted
//! round-robin (high 4, normal 2, low 1 items per round) with the starting lane rotating
//! from batch to batch, so no job starves. Pure logic over tokio primitives; tested with
//! paused time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// What a full lane does with a new item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the oldest waiting item (live video: stay at the live edge).
    DropOldest,
    /// Wait for space (VOD, Redis: lose nothing).
    Block,
}

/// An item with the time it was queued.
#[derive(Debug)]
pub struct Queued<T> {
    pub item: T,
    pub enqueued: Instant,
}

struct Lane<T> {
    id: u64,
    weight: u32,
    capacity: usize,
    when_full: WhenFull,
    items: VecDeque<Queued<T>>,
}

struct State<T> {
    lanes: Vec<Lane<T>>,
    cursor: usize,
}

pub struct Batcher<T> {
    state: Mutex<State<T>>,
    item_ready: Notify,
    space: Notify,
    next_id: AtomicU64,
}

impl<T> Default for Batcher<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                lanes: Vec::new(),
                cursor: 0,
            }),
            item_ready: Notify::new(),
            space: Notify::new(),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<T> Batcher<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a lane for one job; dropping the handle discards what it still holds.
    pub fn lane(
        self: &Arc<Self>,
        weight: u32,
        capacity: usize,
        when_full: WhenFull,
    ) -> LaneHandle<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().lanes.push(Lane {
            id,
            weight: weight.max(1),
            capacity: capacity.max(1),
            when_full,
            items: VecDeque::new(),
        });
        LaneHandle {
            batcher: self.clone(),
            id,
        }
    }

    /// Items waiting in all lanes.
    pub fn waiting(&self) -> usize {
        self.lock().lanes.iter().map(|l| l.items.len()).sum()
    }

    /// Waits for the next batch: `max` items, or fewer once the oldest has waited `max_wait`.
    pub async fn next_batch(&self, max: usize, max_wait: Duration) -> Vec<Queued<T>> {
        let max = max.max(1);
        loop {
            let notified = self.item_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut st = self.lock();
                let total: usize = st.lanes.iter().map(|l| l.items.len()).sum();
                let oldest = st
                    .lanes
                    .iter()
                    .filter_map(|l| l.items.front().map(|q| q.enqueued))
                    .min();
                match oldest {
                    Some(t) if total >= max || Instant::now() >= t + max_wait => {
                        let batch = take(&mut st, max);
                        drop(st);
                        self.space.notify_waiters();
                        return batch;
                    }
                    Some(t) => Some(t + max_wait),
                    None => None,
                }
            };
            match deadline {
                Some(d) => {
                    let _ = tokio::time::timeout_at(d, notified).await;
                }
                None => notified.await,
            }
        }
    }
}

/// Weighted round-robin over lanes, starting one lane further each batch.
fn take<T>(st: &mut State<T>, max: usize) -> Vec<Queued<T>> {
    let n = st.lanes.len();
    let mut batch = Vec::with_capacity(max);
    if n == 0 {
        return batch;
    }
    let start = st.cursor % n;
    while batch.len() < max && st.lanes.iter().any(|l| !l.items.is_empty()) {
        for k in 0..n {
            let lane = &mut st.lanes[(start + k) % n];
            for _ in 0..lane.weight {
                if batch.len() >= max {
                    break;
                }
                match lane.items.pop_front() {
                    Some(q) => batch.push(q),
                    None => break,
                }
            }
        }
    }
    st.cursor = (start + 1) % n;
    batch
}

/// One job's lane in a [`Batcher`].
pub struct LaneHandle<T> {
    batcher: Arc<Batcher<T>>,
    id: u64,
}

impl<T> LaneHandle<T> {
    /// Queues `item`. A full `Block` lane waits for space; a full `DropOldest` lane drops
    /// its oldest item and returns it.
    pub async fn push(&self, item: T) -> Option<T> {
        loop {
            let space = self.batcher.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut st = self.batcher.lock();
                let Some(lane) = st.lanes.iter_mut().find(|l| l.id == self.id) else {
                    return Some(item);
                };
                let full = lane.items.len() >= lane.capacity;
                if !full || lane.when_full == WhenFull::DropOldest {
                    let dropped = if full {
                        lane.items.pop_front().map(|q| q.item)
                    } else {
                        None
                    };
                    lane.items.push_back(Queued {
                        item,
                        enqueued: Instant::now(),
                    });
                    drop(st);
                    self.batcher.item_ready.notify_one();
                    return dropped;
                }
            }
            space.await;
        }
    }

    /// Changes what a full lane does (a live stream is known to be live once its playlist is read).
    pub fn set_when_full(&self, when_full: WhenFull) {
        if let Some(lane) = self
            .batcher
            .lock()
            .lanes
            .iter_mut()
            .find(|l| l.id == self.id)
        {
            lane.when_full = when_full;
        }
        self.batcher.space.notify_waiters();
    }

    /// Items waiting in this lane.
    pub fn len(&self) -> usize {
        self.batcher
            .lock()
            .lanes
            .iter()
            .find(|l| l.id == self.id)
            .map_or(0, |l| l.items.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Drop for LaneHandle<T> {
    fn drop(&mut self) {
        let mut st = self.batcher.lock();
        st.lanes.retain(|l| l.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test(start_paused = true)]
    async fn flushes_when_full_or_after_the_wait() {
        let b = Batcher::new();
        let lane = b.lane(2, 100, WhenFull::Block);
        for i in 0..3 {
            lane.push(i).await;
        }
        let t0 = Instant::now();
        let batch = b.next_batch(3, WAIT).await;
        assert_eq!(batch.len(), 3);
        assert_eq!(t0.elapsed(), Duration::ZERO, "a full batch goes at once");

        lane.push(9).await;
        let t0 = Instant::now();
        let batch = b.next_batch(8, WAIT).await;
        assert_eq!(batch.iter().map(|q| q.item).collect::<Vec<_>>(), vec![9]);
        assert_eq!(t0.elapsed(), WAIT, "a partial batch waits exactly max_wait");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_first_item() {
        let b = Batcher::new();
        let lane = b.lane(2, 10, WhenFull::Block);
        let consumer = {
            let b = b.clone();
            tokio::spawn(async move { b.next_batch(4, WAIT).await.len() })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        lane.push(1).await;
        assert_eq!(consumer.await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_and_no_lane_starves() {
        let b = Batcher::new();
        let high = b.lane(4, 100, WhenFull::Block);
        let low = b.lane(1, 100, WhenFull::Block);
        for i in 0..40 {
            high.push(("high", i)).await;
        }
        for i in 0..10 {
            low.push(("low", i)).await;
        }
        let mut firsts = Vec::new();
        for _ in 0..4 {
            let batch = b.next_batch(5, WAIT).await;
            let lows = batch.iter().filter(|q| q.item.0 == "low").count();
            assert!(
                lows >= 1,
                "the low-priority lane gets a slot in every batch"
            );
            assert!(
                batch.len() - lows >= 4 - 1,
                "high gets about four times the share"
            );
            firsts.push(batch[0].item.0);
        }
        assert!(
            firsts.contains(&"low") && firsts.contains(&"high"),
            "the starting lane rotates"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drop_oldest_when_live_lane_is_full() {
        let b = Batcher::new();
        let lane = b.lane(2, 3, WhenFull::DropOldest);
        for i in 0..3 {
            assert_eq!(lane.push(i).await, None);
        }
        assert_eq!(lane.push(3).await, Some(0));
        assert_eq!(lane.push(4).await, Some(1));
        let batch = b.next_batch(10, WAIT).await;
        assert_eq!(
            batch.iter().map(|q| q.item).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn block_lane_applies_back_pressure() {
        let b = Batcher::new();
        let lane = Arc::new(b.lane(2, 2, WhenFull::Block));
        lane.push(0).await;
        lane.push(1).await;
        let pusher = {
            let lane = lane.clone();
            tokio::spawn(async move { lane.push(2).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!pusher.is_finished(), "blocked while the lane is full");
        assert_eq!(b.next_batch(1, WAIT).await.len(), 1);
        assert_eq!(pusher.await.unwrap(), None, "nothing dropped");
        assert_eq!(lane.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_time_is_recorded() {
        let b = Batcher::new();
        let lane = b.lane(2, 10, WhenFull::Block);
        lane.push(1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let batch = b.next_batch(4, WAIT).await;
        assert_eq!(batch[0].enqueued.elapsed(), WAIT);
    }
}
