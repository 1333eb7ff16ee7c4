//! The image manager of a runtime: pull (with progress), list, get, remove, gc.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::drain::future_into_py;
use boxlite::images::{
    ImageInfo, ImageManager, ImageRegistry, ProgressFn, PullProgress, Transport,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::IntoPyResult;

/// `(host, transport, skip_verify, search, username, password, bearer_token)`, as the Python
/// `ImageRegistry` dataclass passes it.
pub type RegistryTuple = (
    String,
    String,
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Converts and validates the registries given to the runtime constructor.
pub fn registries(tuples: Vec<RegistryTuple>) -> PyResult<Vec<ImageRegistry>> {
    tuples
        .into_iter()
        .map(
            |(host, transport, skip_verify, search, username, password, bearer_token)| {
                let registry = ImageRegistry {
                    host,
                    transport: Transport::parse(&transport).py()?,
                    skip_verify,
                    search,
                    username,
                    password,
                    bearer_token,
                };
                registry.validate().py()?;
                Ok(registry)
            },
        )
        .collect()
}

/// The images of one runtime home.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct NativeImages(pub ImageManager);

fn info_dict<'py>(py: Python<'py>, info: &ImageInfo) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("reference", &info.reference)?;
    dict.set_item("repository", &info.repository)?;
    dict.set_item("tag", &info.tag)?;
    dict.set_item("digest", info.digest.to_string())?;
    dict.set_item(
        "index_digest",
        info.index_digest.as_ref().map(ToString::to_string),
    )?;
    dict.set_item("config_digest", info.config_digest.to_string())?;
    dict.set_item("size", info.size)?;
    dict.set_item("layers", info.layers)?;
    dict.set_item("architecture", &info.architecture)?;
    dict.set_item("os", &info.os)?;
    dict.set_item("created", &info.created)?;
    dict.set_item(
        "pulled_at",
        info.pulled_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64()),
    )?;
    let config = &info.config;
    dict.set_item("env", config.env.clone())?;
    dict.set_item("entrypoint", config.entrypoint.clone())?;
    dict.set_item("cmd", config.cmd.clone())?;
    dict.set_item("working_dir", &config.working_dir)?;
    dict.set_item("user", &config.user)?;
    dict.set_item("exposed_ports", config.exposed_ports.clone())?;
    dict.set_item("labels", config.labels.clone())?;
    Ok(dict)
}

#[pymethods]
impl NativeImages {
    /// Pulls `reference`; `progress(layer, index, layers, done, total)` is called from a
    /// runtime thread as bytes arrive (the Python layer moves it onto the event loop).
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
                    let args = (p.layer.to_string(), p.index, p.layers, p.done, p.total);
                    if let Err(e) = callable.call1(py, args) {
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
            Python::with_gil(|py| Ok(info_dict(py, &info)?.unbind()))
        })
    }

    /// Every image in the local store.
    fn list<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let manager = self.0.clone();
        let infos = py.allow_threads(|| manager.list()).py()?;
        infos.iter().map(|info| info_dict(py, info)).collect()
    }

    /// The local image `reference` names; `ImageNotFoundError` if it is not pulled.
    fn get<'py>(&self, py: Python<'py>, reference: &str) -> PyResult<Bound<'py, PyDict>> {
        let manager = self.0.clone();
        let info = py.allow_threads(|| manager.get(reference)).py()?;
        info_dict(py, &info)
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
            Python::with_gil(|py| {
                let dict = PyDict::new(py);
                dict.set_item("blobs_removed", report.blobs_removed)?;
                dict.set_item("disks_removed", report.disks_removed)?;
                dict.set_item("bytes_freed", report.bytes_freed)?;
                Ok(dict.unbind())
            })
        })
    }
}
