//! Keeping interpreter shutdown clear of the tokio threads.
//!
//! Every awaitable we hand to Python is completed by a tokio thread that takes the GIL to set
//! its result. If the interpreter starts finalizing while such a thread waits for the GIL
//! (the main thread was woken by that very result and ran to the end of the script), CPython
//! ends the waiting thread from under Rust, which crashes the process at exit. So every
//! future is counted while it runs, and an `atexit` hook lets the last ones finish, with the
//! GIL released, before finalization begins.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// How long exit waits for futures still running (abandoned ones never finish).
const MAX_WAIT: Duration = Duration::from_millis(500);
/// Time for a finished future's thread to take the GIL and set its result.
const SETTLE: Duration = Duration::from_millis(25);

struct InFlight;

impl InFlight {
    fn new() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `pyo3_async_runtimes::tokio::future_into_py`, counted for the exit hook.
pub fn future_into_py<F, T>(py: Python<'_>, fut: F) -> PyResult<Bound<'_, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    let guard = InFlight::new();
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let _guard = guard;
        fut.await
    })
}

/// Registered with `atexit`: waits (GIL released) for running futures, then lets their
/// threads deliver the results.
#[pyfunction]
pub fn _drain_at_exit(py: Python<'_>) {
    py.allow_threads(|| {
        let deadline = Instant::now() + MAX_WAIT;
        while IN_FLIGHT.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(SETTLE);
    });
}
