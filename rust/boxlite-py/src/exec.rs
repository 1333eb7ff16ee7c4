//! Executions, their streams and results.

use std::sync::Arc;

use crate::drain::future_into_py;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::Mutex;

use crate::errors::IntoPyResult;

/// Bytes that become a Python `bytes` object (a `Vec<u8>` would become a list).
pub struct PyBytesOut(pub Vec<u8>);

impl<'py> IntoPyObject<'py> for PyBytesOut {
    type Target = PyBytes;
    type Output = Bound<'py, PyBytes>;
    type Error = std::convert::Infallible;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        Ok(PyBytes::new(py, &self.0))
    }
}

/// A command running in a box.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct NativeExecution(boxlite::Execution);

impl NativeExecution {
    pub fn new(execution: boxlite::Execution) -> Self {
        Self(execution)
    }
}

#[pymethods]
impl NativeExecution {
    #[getter]
    fn id(&self) -> String {
        self.0.id().to_owned()
    }

    #[getter]
    fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// The stdout stream, or None once taken.
    fn stdout(&self) -> Option<OutputStream> {
        self.0.stdout().map(OutputStream::new)
    }

    /// The stderr stream, or None once taken.
    fn stderr(&self) -> Option<OutputStream> {
        self.0.stderr().map(OutputStream::new)
    }

    /// The stdin writer, or None once taken.
    fn stdin(&self) -> Option<StdinWriter> {
        self.0.stdin().map(|w| StdinWriter(Arc::new(Mutex::new(w))))
    }

    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let execution = self.0.clone();
        future_into_py(py, async move {
            let result = execution.wait().await.py()?;
            Ok(NativeExecResult {
                exit_code: result.exit_code,
                signal: result.signal,
                stdout: result.stdout,
                stderr: result.stderr,
            })
        })
    }

    #[pyo3(signature = (signal=9))]
    fn kill(&self, signal: i32) -> PyResult<()> {
        self.0.kill(signal).py()
    }

    fn resize_tty(&self, rows: u16, cols: u16) -> PyResult<()> {
        self.0.resize_tty(rows, cols).py()
    }
}

/// How a command ended.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct NativeExecResult {
    #[pyo3(get)]
    exit_code: i32,
    #[pyo3(get)]
    signal: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

#[pymethods]
impl NativeExecResult {
    #[getter]
    fn stdout<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.stdout)
    }

    #[getter]
    fn stderr<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.stderr)
    }
}

/// An async iterator of output chunks (`bytes`).
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct OutputStream(Arc<Mutex<boxlite::OutputStream>>);

impl OutputStream {
    fn new(stream: boxlite::OutputStream) -> Self {
        Self(Arc::new(Mutex::new(stream)))
    }
}

#[pymethods]
impl OutputStream {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let stream = self.0.clone();
        future_into_py(py, async move {
            match stream.lock().await.next().await {
                Some(chunk) => Ok(PyBytesOut(chunk)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }
}

/// Writes to a command's stdin.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct StdinWriter(Arc<Mutex<boxlite::ExecStdin>>);

#[pymethods]
impl StdinWriter {
    fn write<'py>(&self, py: Python<'py>, data: Vec<u8>) -> PyResult<Bound<'py, PyAny>> {
        let writer = self.0.clone();
        future_into_py(
            py,
            async move { writer.lock().await.write(&data).await.py() },
        )
    }

    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let writer = self.0.clone();
        future_into_py(py, async move { writer.lock().await.close().py() })
    }
}
