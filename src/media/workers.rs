//! Where the process's media work runs: decoding a segment or a camera's group of pictures,
//! and shaping a still, each on a blocking thread, but no more of them at once than
//! [`MediaWorkers`] has slots (one per core by default). A file job's reader thread is not
//! counted: it may wait on HTTP with a piece half read.
//!
//! Left to the blocking pool, 32 live streams whose segments arrive together decode on 32
//! threads at once: the kernel time-slices them over the cores, every segment of the burst
//! finishes late (processor sharing), and each slice finds another decoder's reference
//! pictures in the caches. Taking slots in arrival order (tokio's semaphore is fair) decodes
//! each segment at full speed, one after another, so a burst delays only the segments queued
//! behind it, and by no more than the work ahead of them.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinError;

/// Slots for media work, shared by every job of the process.
#[derive(Clone, Debug)]
pub struct MediaWorkers {
    slots: Arc<Semaphore>,
}

impl MediaWorkers {
    /// `slots` pieces of work at once; 0: one per core.
    pub fn new(slots: usize) -> Self {
        let slots = match slots {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Self {
            slots: Arc::new(Semaphore::new(slots)),
        }
    }

    /// Runs `work` on a blocking thread once a slot is free, in the order callers asked.
    pub async fn run<R, F>(&self, work: F) -> Result<R, JoinError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        // The semaphore is never closed.
        let slot = self.slots.clone().acquire_owned().await.ok();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn no_more_work_runs_at_once_than_there_are_slots_and_it_starts_in_order() {
        let workers = MediaWorkers::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for k in 0..8 {
            let (w, running, most, started) = (
                workers.clone(),
                running.clone(),
                most.clone(),
                started.clone(),
            );
            tasks.push(tokio::spawn(async move {
                w.run(move || {
                    started.lock().unwrap().push(k);
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
                .unwrap()
            }));
            // Each asks for its slot before the next is spawned.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        let started = started.lock().unwrap().clone();
        // Two at a time, in the order they asked (the two of a pair race to the lock).
        let pairs: Vec<[usize; 2]> = started
            .chunks(2)
            .map(|p| [p[0].min(p[1]), p[0].max(p[1])])
            .collect();
        assert_eq!(pairs, [[0, 1], [2, 3], [4, 5], [6, 7]]);
        assert_eq!(workers.available(), 2);
    }

    #[test]
    fn zero_means_one_per_core() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(MediaWorkers::new(0).available(), cores);
    }
}
