//! The image manager of a runtime: pull (with progress), list, get, remove, gc.

use std::sync::Arc;

use crate::drain::future_into_py;
use boxlite::images::{ImageManager, ProgressFn, PullProgress};
use pyo3::prelude::*;

use crate::info::{GcReport, ImageInfo};

use crate::errors::IntoPyResult;

/// The images of one runtime home.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct NativeImages(pub ImageManager);

#[pymethods]
impl NativeImages {
    /// Pulls `reference`; `progress(PullProgress)` is called from a runtime thread as bytes
    /// arrive (the Python layer moves it onto the event loop).
    #[pyo3(signature = (reference, progress=None))]
    fn pull<'py>(
        &self,
        py: Python<'py>,
        reference: String,
        progress: Option<PyObject>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let callback: Option<ProgressFn> = progress.map(|callable| {
            Arc::new(move |p: &PullProgress| {
                Python::with_gil(|py| {
                    if let Err(e) = callable.call1(py, (crate::info::PullProgress::from(p),)) {
                        e.write_unraisable(py, None);
                    }
                })
            }) as ProgressFn
        });
        let manager = self.0.clone();
        future_into_py(py, async move {
            let info = manager
                .pull_with_progress(&reference, callback)
                .await
                .py()?;
            Ok(ImageInfo::from(info))
        })
    }

    /// Every image in the local store.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<ImageInfo>> {
        let manager = self.0.clone();
        let infos = py.allow_threads(|| manager.list()).py()?;
        Ok(infos.into_iter().map(ImageInfo::from).collect())
    }

    /// The local image `reference` names; `ImageNotFoundError` if it is not pulled.
    fn get(&self, py: Python<'_>, reference: &str) -> PyResult<ImageInfo> {
        let manager = self.0.clone();
        let info = py.allow_threads(|| manager.get(reference)).py()?;
        Ok(ImageInfo::from(info))
    }

    fn remove<'py>(&self, py: Python<'py>, reference: String) -> PyResult<Bound<'py, PyAny>> {
        let manager = self.0.clone();
        future_into_py(py, async move { manager.remove(&reference).await.py() })
    }

    /// Collects unreferenced blobs and base disks; returns what was removed.
    fn gc<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let manager = self.0.clone();
        future_into_py(py, async move {
            let report = manager.gc().await.py()?;
            Ok(GcReport {
                blobs_removed: report.blobs_removed,
                disks_removed: report.disks_removed,
                templates_removed: report.templates_removed,
                bytes_freed: report.bytes_freed,
            })
        })
    }
}
