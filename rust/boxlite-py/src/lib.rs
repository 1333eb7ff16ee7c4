//! `boxlite._native`: the Rust core exposed to the `boxlite` Python package.
//!
//! Every blocking or waiting call returns an awaitable driven by the tokio runtime, so no
//! Python event loop is blocked and the GIL is not held while native work runs.

mod drain;
mod errors;
mod exec;
mod images;
mod metrics;
mod runtime;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Raises the example error of `kind` (tests use it to check the exception mapping).
#[pyfunction]
fn _raise_error(kind: &str) -> PyResult<()> {
    let error = errors::example(kind)
        .ok_or_else(|| PyValueError::new_err(format!("unknown error kind {kind:?}")))?;
    Err(errors::to_py_err(error))
}

/// The kinds `_raise_error` accepts: one per `BoxliteError` variant.
#[pyfunction]
fn _error_kinds() -> Vec<&'static str> {
    errors::KINDS.to_vec()
}

/// `(accelerator, reason)`: what boxes on this host would run on and why.
#[pyfunction]
fn accelerator() -> PyResult<(String, String)> {
    let choice = errors::IntoPyResult::py(boxlite::BoxliteRuntime::accelerator())?;
    Ok((choice.accel.to_string(), choice.reason))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", boxlite::VERSION)?;
    m.add_function(wrap_pyfunction!(accelerator, m)?)?;
    m.add_function(wrap_pyfunction!(_raise_error, m)?)?;
    m.add_function(wrap_pyfunction!(_error_kinds, m)?)?;
    let drain = wrap_pyfunction!(drain::_drain_at_exit, m)?;
    m.add_function(drain.clone())?;
    m.py()
        .import("atexit")?
        .call_method1("register", (drain,))?;
    m.add_class::<runtime::Runtime>()?;
    m.add_class::<runtime::NativeBox>()?;
    m.add_class::<exec::NativeExecution>()?;
    m.add_class::<exec::NativeExecResult>()?;
    m.add_class::<exec::OutputStream>()?;
    m.add_class::<exec::StdinWriter>()?;
    m.add_class::<metrics::RuntimeMetrics>()?;
    m.add_class::<metrics::BoxMetrics>()?;
    m.add_class::<images::NativeImages>()?;
    Ok(())
}
