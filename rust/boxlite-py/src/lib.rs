//! `boxlite._native`: the Rust core exposed to the `boxlite` Python package.
//!
//! Every waiting call returns an awaitable driven by the tokio runtime, so no Python event
//! loop is blocked; blocking calls release the GIL. Options and records are native classes:
//! the Python package re-exports them and adds idioms, never rules.

mod advanced;
mod archive;
mod drain;
mod errors;
mod exec;
mod images;
mod info;
mod metrics;
mod network;
mod options;
mod runtime;
mod snapshots;
mod volumes;
mod wire;

use pyo3::prelude::*;

/// `(accelerator, reason)`: what boxes on this host would run on and why.
#[pyfunction]
fn accelerator() -> PyResult<(String, String)> {
    let choice = errors::IntoPyResult::py(boxlite::BoxliteRuntime::accelerator())?;
    Ok((choice.accel.to_string(), choice.reason))
}

/// Test hooks: one example error of every kind, raised on demand, so the tests can check the
/// exception mapping. Release wheels are built without them.
#[cfg(feature = "test-hooks")]
mod hooks {
    use pyo3::exceptions::PyIndexError;
    use pyo3::prelude::*;

    /// `(kind, Python class name)` of every example error, in order.
    #[pyfunction]
    pub fn _error_examples() -> Vec<(&'static str, &'static str)> {
        super::errors::examples()
            .iter()
            .map(|e| (e.kind(), super::errors::class_name(e)))
            .collect()
    }

    /// Raises example error number `index`.
    #[pyfunction]
    pub fn _raise_example(index: usize) -> PyResult<()> {
        let error = super::errors::examples()
            .into_iter()
            .nth(index)
            .ok_or_else(|| PyIndexError::new_err(format!("no example error {index}")))?;
        Err(super::errors::to_py_err(error))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", boxlite::VERSION)?;
    m.add_function(wrap_pyfunction!(accelerator, m)?)?;
    m.add_function(wrap_pyfunction!(archive::_check_box_path, m)?)?;
    m.add_function(wrap_pyfunction!(archive::_extract_untrusted, m)?)?;
    m.add_function(wrap_pyfunction!(archive::_first_entry_kind, m)?)?;
    m.add_function(wrap_pyfunction!(exec::_check_signal, m)?)?;
    m.add_function(wrap_pyfunction!(exec::_check_tty_size, m)?)?;
    #[cfg(feature = "test-hooks")]
    {
        m.add_function(wrap_pyfunction!(hooks::_error_examples, m)?)?;
        m.add_function(wrap_pyfunction!(hooks::_raise_example, m)?)?;
    }
    let drain = wrap_pyfunction!(drain::_drain_at_exit, m)?;
    m.add_function(drain.clone())?;
    m.py()
        .import("atexit")?
        .call_method1("register", (drain,))?;
    m.add_class::<options::Options>()?;
    m.add_class::<options::ImageRegistry>()?;
    m.add_class::<options::BoxOptions>()?;
    m.add_class::<options::CopyOptions>()?;
    m.add_class::<network::NetworkSpec>()?;
    m.add_class::<advanced::AdvancedBoxOptions>()?;
    m.add_class::<advanced::SecurityOptions>()?;
    m.add_class::<advanced::ContainerCapabilities>()?;
    m.add_class::<advanced::HealthCheckOptions>()?;
    m.add_class::<network::OutboundNetworkSpec>()?;
    m.add_class::<network::InboundNetworkSpec>()?;
    m.add_class::<network::NetworkInfo>()?;
    m.add_class::<network::PublishedPort>()?;
    m.add_class::<info::BoxInfo>()?;
    m.add_class::<info::BoxState>()?;
    m.add_class::<info::ImageInfo>()?;
    m.add_class::<info::PullProgress>()?;
    m.add_class::<info::GcReport>()?;
    m.add_class::<info::Ready>()?;
    m.add_class::<runtime::Runtime>()?;
    m.add_class::<runtime::NativeBox>()?;
    m.add_class::<snapshots::SnapshotHandle>()?;
    m.add_class::<snapshots::SnapshotInfo>()?;
    m.add_class::<snapshots::SnapshotOptions>()?;
    m.add_class::<snapshots::CloneOptions>()?;
    m.add_class::<snapshots::ExportOptions>()?;
    m.add_class::<exec::NativeExecution>()?;
    m.add_class::<exec::ExecResult>()?;
    m.add_class::<exec::OutputStream>()?;
    m.add_class::<exec::StdinWriter>()?;
    m.add_class::<metrics::RuntimeMetrics>()?;
    m.add_class::<metrics::BoxMetrics>()?;
    m.add_class::<images::NativeImages>()?;
    Ok(())
}
