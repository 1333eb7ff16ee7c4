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
            Ok(ExecResult {
                exit_code: result.exit_code,
                signal: result.signal,
                stdout: result.stdout,
                stderr: result.stderr,
                error_message: None,
                guest_trace: result.guest_trace,
            })
        })
    }

    #[pyo3(signature = (signal=9))]
    fn kill(&self, signal: i32) -> PyResult<()> {
        self.0.kill(signal).py()
    }

    fn resize_tty(&self, rows: i64, cols: i64) -> PyResult<()> {
        let size = boxlite::BoxCommand::tty_size(rows, cols).py()?;
        self.0.resize_tty(size.rows, size.cols).py()
    }
}

/// Raises `InvalidArgumentError` unless `signal` is one `kill` can send (for backends that
/// send it by other means: the REST client).
#[pyfunction]
pub fn _check_signal(signal: i32) -> PyResult<()> {
    boxlite::Execution::check_signal(signal).py()
}

/// Raises `InvalidArgumentError` unless `(rows, cols)` is a terminal size (as `resize_tty`).
#[pyfunction]
pub fn _check_tty_size(rows: i64, cols: i64) -> PyResult<()> {
    boxlite::BoxCommand::tty_size(rows, cols).py().map(|_| ())
}

/// How a command ended: `exit_code` (`128 + signal` if a signal killed it), and the output
/// not already read through the streams, as text (`stdout`, `stderr`, decoded as UTF-8 with
/// replacement) and as bytes (`stdout_bytes`, `stderr_bytes`).
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite")]
pub struct ExecResult {
    exit_code: i32,
    signal: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    error_message: Option<String>,
    guest_trace: Option<boxlite::ExecTrace>,
}

#[pymethods]
impl ExecResult {
    #[new]
    #[pyo3(signature = (exit_code, stdout=String::new(), stderr=String::new(), error_message=None, *, signal=None, stdout_bytes=None, stderr_bytes=None))]
    fn new(
        exit_code: i32,
        stdout: String,
        stderr: String,
        error_message: Option<String>,
        signal: Option<i32>,
        stdout_bytes: Option<Vec<u8>>,
        stderr_bytes: Option<Vec<u8>>,
    ) -> Self {
        Self {
            exit_code,
            signal,
            stdout: stdout_bytes.unwrap_or_else(|| stdout.into_bytes()),
            stderr: stderr_bytes.unwrap_or_else(|| stderr.into_bytes()),
            error_message,
            guest_trace: None,
        }
    }

    #[getter]
    fn exit_code(&self) -> i32 {
        self.exit_code
    }
    #[getter]
    fn signal(&self) -> Option<i32> {
        self.signal
    }
    #[getter]
    fn error_message(&self) -> Option<&str> {
        self.error_message.as_deref()
    }
    #[getter]
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    #[getter]
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    #[getter]
    fn stdout_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.stdout)
    }
    #[getter]
    fn stderr_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.stderr)
    }
    #[getter]
    fn success(&self) -> bool {
        self.exit_code == 0
    }
    /// Where the guest agent's time went, in microseconds after it decoded the request
    /// (`child_started_us`, `execve_called_us`, `started_us`, `first_output_us` or None,
    /// `exit_seen_us`, `reported_us`); None when the agent did not report it.
    #[getter]
    fn guest_trace(&self) -> Option<std::collections::BTreeMap<&'static str, Option<u64>>> {
        self.guest_trace.map(|t| {
            std::collections::BTreeMap::from([
                ("child_started_us", Some(t.child_started_us)),
                ("execve_called_us", Some(t.execve_called_us)),
                ("started_us", Some(t.started_us)),
                ("first_output_us", t.first_output_us),
                ("exit_seen_us", Some(t.exit_seen_us)),
                ("reported_us", Some(t.reported_us)),
            ])
        })
    }

    fn __eq__(&self, other: &Self) -> bool {
        (self.exit_code, &self.stdout, &self.stderr, self.signal)
            == (other.exit_code, &other.stdout, &other.stderr, other.signal)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let short = |b: &[u8]| -> PyResult<String> {
            let text = String::from_utf8_lossy(b);
            let shown = if text.chars().count() <= 60 {
                text.into_owned()
            } else {
                text.chars().take(57).collect::<String>() + "..."
            };
            Ok(pyo3::types::PyString::new(py, &shown).repr()?.to_string())
        };
        let signal = self
            .signal
            .map(|s| format!(", signal={s}"))
            .unwrap_or_default();
        Ok(format!(
            "ExecResult(exit_code={}, stdout={}, stderr={}{signal})",
            self.exit_code,
            short(&self.stdout)?,
            short(&self.stderr)?
        ))
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
