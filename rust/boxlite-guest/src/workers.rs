//! Threads for sessions, kept around when idle: creating a thread costs about a millisecond
//! under a software CPU, a noticeable share of a short exec's round trip.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sys;

type Task = Box<dyn FnOnce() + Send>;

/// How long an idle thread waits for more work before it ends.
const IDLE: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Workers {
    idle: Mutex<Vec<mpsc::Sender<Task>>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("idle", &sys::lock(&self.idle).len())
            .finish()
    }
}

impl Workers {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Runs `task` on an idle thread, or a new one.
    pub fn run(
        self: &Arc<Self>,
        name: &str,
        task: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let mut task: Task = Box::new(task);
        loop {
            let Some(tx) = sys::lock(&self.idle).pop() else {
                break;
            };
            match tx.send(task) {
                Ok(()) => return Ok(()),
                // That thread timed out meanwhile; try the next one.
                Err(mpsc::SendError(t)) => task = t,
            }
        }
        let (tx, rx) = mpsc::channel::<Task>();
        let pool = self.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut next = Some(task);
                while let Some(task) = next.take() {
                    task();
                    sys::lock(&pool.idle).push(tx.clone());
                    match rx.recv_timeout(IDLE) {
                        Ok(t) => next = Some(t),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reuses_idle_threads() {
        let w = Workers::new();
        let (tx, rx) = mpsc::channel();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let tx = tx.clone();
            w.run("t", move || tx.send(std::thread::current().id()).unwrap())
                .unwrap();
            ids.push(rx.recv().unwrap());
            // Let the thread go idle before the next task.
            for _ in 0..1000 {
                if sys::lock(&w.idle).len() == 1 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert!(ids.iter().all(|&id| id == ids[0]));
        assert_eq!(sys::lock(&w.idle).len(), 1);
    }
}
