//! The one place that reaps children. As PID 1 the agent inherits every orphan in the VM;
//! a thread blocks in `waitpid(-1)` and routes the statuses of the processes the agent
//! spawned to whoever registered them. Nothing else may call `wait*`.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::log::log;
use crate::sys;

/// Told the raw `waitpid` status of a registered process.
pub trait ExitSink: Send + Sync {
    fn exited(&self, status: libc::c_int);
}

#[derive(Default)]
struct Table {
    sinks: HashMap<libc::pid_t, Arc<dyn ExitSink>>,
    /// Bumped on every registration, so the reaper notices children that appeared while it
    /// was finding out it had none.
    spawned: u64,
}

pub struct Reaper {
    table: Mutex<Table>,
    children: Condvar,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reaper")
    }
}

/// Held across `fork()`: the reaper cannot look up a pid before it is registered.
pub struct SpawnGuard<'a> {
    reaper: &'a Reaper,
    table: MutexGuard<'a, Table>,
}

impl SpawnGuard<'_> {
    pub fn register(&mut self, pid: libc::pid_t, sink: Arc<dyn ExitSink>) {
        self.table.sinks.insert(pid, sink);
        self.table.spawned += 1;
        self.reaper.children.notify_all();
    }
}

impl Reaper {
    pub fn start() -> Arc<Self> {
        let reaper = Arc::new(Self {
            table: Mutex::new(Table::default()),
            children: Condvar::new(),
        });
        let r = reaper.clone();
        let spawned = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run());
        if let Err(e) = spawned {
            log!("cannot start the reaper thread: {e}");
        }
        reaper
    }

    /// Take this before forking and register the child before dropping it.
    pub fn lock(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            reaper: self,
            table: sys::lock(&self.table),
        }
    }

    fn run(&self) {
        loop {
            let seen = sys::lock(&self.table).spawned;
            let mut status: libc::c_int = 0;
            // SAFETY: `status` is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                let sink = sys::lock(&self.table).sinks.remove(&pid);
                if let Some(sink) = sink {
                    sink.exited(status);
                }
                continue;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECHILD) => {
                    let table = sys::lock(&self.table);
                    if table.spawned == seen {
                        let _ = self.children.wait_timeout(table, Duration::from_secs(5));
                    }
                }
                _ => {
                    log!("waitpid: {err}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}
