//! The core's copy rules for the REST client: the checks a copy makes of its path in the box,
//! and the reader of an untrusted tar, so an archive from a server is checked by the same code
//! as one from a local box.

use std::io::Read;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyIterator;

use crate::errors::IntoPyResult;

/// Raises `InvalidArgumentError` (naming `field`) unless `path` is a path a copy can reach in
/// the box: absolute, without NUL, outside the box's /proc, /sys and /dev.
#[pyfunction]
pub fn _check_box_path(field: &str, path: &str) -> PyResult<()> {
    boxlite::check_box_path(field, path).py()
}

/// Extracts the tar arriving as `chunks` (an iterable of `bytes`) below the fresh directory
/// `root`, by the rules of a local `copy_out`: only `expected/...`, plain names, files,
/// directories and links, at most `max_bytes` of file content. An exception raised by the
/// iterable (a cancelled or broken download) is raised as it is.
#[pyfunction]
pub fn _extract_untrusted(
    py: Python<'_>,
    chunks: &Bound<'_, PyAny>,
    root: PathBuf,
    expected: &str,
    recursive: bool,
    max_bytes: u64,
) -> PyResult<()> {
    let mut input = PyChunks::new(chunks)?;
    let limits = boxlite::ExtractLimits {
        recursive,
        max_bytes,
    };
    let extracted =
        py.allow_threads(|| boxlite::extract_untrusted(&mut input, &root, expected, limits));
    input.result(extracted)
}

/// What the first entry of the tar arriving as `chunks` is: `"directory"`, `"file"`,
/// `"symlink"` or `"other"`; reads only as far as that header.
#[pyfunction]
pub fn _first_entry_kind(py: Python<'_>, chunks: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    let mut input = PyChunks::new(chunks)?;
    let kind = py.allow_threads(|| boxlite::first_entry_kind(&mut input));
    input.result(kind)
}

/// `Read` over a Python iterator of byte chunks; the iterator's exception is kept for the
/// caller (the reader sees an I/O error).
struct PyChunks {
    chunks: Py<PyIterator>,
    chunk: Vec<u8>,
    at: usize,
    error: Option<PyErr>,
}

impl PyChunks {
    fn new(chunks: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Self {
            chunks: chunks.try_iter()?.unbind(),
            chunk: Vec::new(),
            at: 0,
            error: None,
        })
    }

    /// The iterator's own exception if it raised one, else `result`.
    fn result<T>(self, result: boxlite::BoxliteResult<T>) -> PyResult<T> {
        match self.error {
            Some(error) => Err(error),
            None => result.py(),
        }
    }
}

impl Read for PyChunks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.error.is_some() {
                return Err(std::io::Error::other("the download failed"));
            }
            let next = Python::with_gil(|py| -> PyResult<Option<Vec<u8>>> {
                match self.chunks.bind(py).clone().next() {
                    None => Ok(None),
                    Some(item) => Ok(Some(item?.extract::<PyBackedBytes>()?.to_vec())),
                }
            });
            match next {
                Ok(None) => return Ok(0),
                Ok(Some(chunk)) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Err(error) => self.error = Some(error),
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
