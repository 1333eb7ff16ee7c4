//! The runtime and box classes. Waiting calls return awaitables driven by the tokio runtime;
//! blocking calls release the GIL.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::drain::future_into_py;
use crate::errors::IntoPyResult;
use crate::exec::NativeExecution;
use crate::info::BoxInfo;
use crate::metrics::{BoxMetrics, RuntimeMetrics};
use crate::options::{BoxOptions, CopyOptions, Options};

/// A boxlite runtime rooted at one home directory.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct Runtime(boxlite::BoxliteRuntime);

#[pymethods]
impl Runtime {
    #[new]
    #[pyo3(signature = (options, guest_dir=None, shim_path=None))]
    fn new(
        py: Python<'_>,
        options: &Options,
        guest_dir: Option<PathBuf>,
        shim_path: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut core = boxlite::BoxliteOptions::default();
        if let Some(home) = &options.home_dir {
            core.home_dir = home.clone();
        }
        core.guest_dir = guest_dir;
        core.shim_path = shim_path;
        core.image_registries = options.image_registries.clone();
        if let Some(t) = options.boot_timeout {
            core.boot_timeout = t;
        }
        if let Some(t) = options.stop_timeout {
            core.stop_timeout = t;
        }
        if let Some(templates) = options.templates {
            core.templates = templates;
        }
        // Opening the home may wait on another process's database lock.
        Ok(Self(
            py.allow_threads(|| boxlite::BoxliteRuntime::new(core))
                .py()?,
        ))
    }

    #[getter]
    fn home_dir(&self) -> PathBuf {
        self.0.home().to_path_buf()
    }

    fn metrics(&self) -> RuntimeMetrics {
        RuntimeMetrics(self.0.metrics())
    }

    /// The image store of this home.
    fn images(&self) -> crate::images::NativeImages {
        crate::images::NativeImages(self.0.images())
    }

    /// The guest bundle directory boxes boot from.
    fn guest_dir(&self, py: Python<'_>) -> PyResult<PathBuf> {
        Ok(py.allow_threads(|| self.0.guest_bundle()).py()?.dir)
    }

    /// Creates a box (validated by the core) and boots it.
    #[pyo3(signature = (options, name=None))]
    fn create<'py>(
        &self,
        py: Python<'py>,
        options: &BoxOptions,
        name: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let options = options.named(py, name)?;
        let runtime = self.0.clone();
        future_into_py(py, async move {
            Ok(NativeBox(runtime.create(options).await.py()?))
        })
    }

    /// The box with this id or name, or None.
    fn get(&self, py: Python<'_>, id_or_name: &str) -> PyResult<Option<NativeBox>> {
        Ok(py
            .allow_threads(|| self.0.get(id_or_name))
            .py()?
            .map(NativeBox))
    }

    fn get_info(&self, py: Python<'_>, id_or_name: &str) -> PyResult<Option<BoxInfo>> {
        py.allow_threads(|| self.0.get_info(id_or_name))
            .py()?
            .map(|info| BoxInfo::new(py, info))
            .transpose()
    }

    fn list_info(&self, py: Python<'_>) -> PyResult<Vec<BoxInfo>> {
        let infos = py.allow_threads(|| self.0.list_info()).py()?;
        infos
            .into_iter()
            .map(|info| BoxInfo::new(py, info))
            .collect()
    }

    #[pyo3(signature = (id_or_name, force=false))]
    fn remove<'py>(
        &self,
        py: Python<'py>,
        id_or_name: String,
        force: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let runtime = self.0.clone();
        future_into_py(
            py,
            async move { runtime.remove(&id_or_name, force).await.py() },
        )
    }

    /// Makes a stopped box from a `.boxlite` archive (checked before use).
    #[pyo3(signature = (archive_path, name=None, *, untrusted=false))]
    fn import_box<'py>(
        &self,
        py: Python<'py>,
        archive_path: PathBuf,
        name: Option<String>,
        untrusted: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let runtime = self.0.clone();
        future_into_py(py, async move {
            Ok(NativeBox(
                runtime
                    .import_box(&archive_path, name, untrusted)
                    .await
                    .py()?,
            ))
        })
    }

    /// Boxes this runtime started or handles.
    fn boxes(&self, py: Python<'_>) -> Vec<NativeBox> {
        py.allow_threads(|| self.0.boxes())
            .into_iter()
            .map(NativeBox)
            .collect()
    }

    /// Like `close`, waiting here (for callers without an event loop), GIL released.
    fn close_blocking(&self, py: Python<'_>) -> PyResult<()> {
        let runtime = self.0.clone();
        py.allow_threads(|| pyo3_async_runtimes::tokio::get_runtime().block_on(runtime.close()))
            .py()
    }

    /// Stops every box this runtime started or handles.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let runtime = self.0.clone();
        future_into_py(py, async move { runtime.close().await.py() })
    }
}

/// One box.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct NativeBox(boxlite::LiteBox);

#[pymethods]
impl NativeBox {
    #[getter]
    fn id(&self) -> String {
        self.0.id().to_string()
    }

    #[getter]
    fn name(&self) -> Option<String> {
        self.0.name().map(str::to_owned)
    }

    #[getter]
    fn dir(&self) -> PathBuf {
        self.0.dir().to_path_buf()
    }

    /// What `exec()` without a command runs.
    #[getter]
    fn default_command(&self) -> Vec<String> {
        self.0.default_command()
    }

    fn info(&self, py: Python<'_>) -> PyResult<BoxInfo> {
        let info = py.allow_threads(|| self.0.try_info()).py()?;
        BoxInfo::new(py, info)
    }

    /// Starts `program args...`, or the box's default command plus `args` when `program` is
    /// None. A box that is not running is started first.
    #[pyo3(signature = (program=None, args=Vec::new(), *, env=None, cwd=None, user=None, tty=None, timeout_secs=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        program: Option<String>,
        args: Vec<String>,
        env: Option<&Bound<'py, PyAny>>,
        cwd: Option<String>,
        user: Option<String>,
        tty: Option<(i64, i64)>,
        timeout_secs: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let tty = tty
            .map(|(rows, cols)| boxlite::BoxCommand::tty_size(rows, cols))
            .transpose()
            .py()?;
        let mut command = match program {
            Some(program) => {
                let mut command = boxlite::BoxCommand::new(program).args(args);
                command.tty = tty;
                command
            }
            None => self.0.default_exec(args, tty).py()?,
        };
        command.env = crate::options::env_pairs("env", env)?;
        command.cwd = cwd;
        command.user = user;
        command.timeout = timeout_secs
            .map(|t| boxlite::Seconds::positive("timeout", t))
            .transpose()
            .py()?;
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(NativeExecution::new(litebox.exec(command).await.py()?))
        })
    }

    #[pyo3(signature = (host_path, box_path, options=None))]
    fn copy_in<'py>(
        &self,
        py: Python<'py>,
        host_path: PathBuf,
        box_path: String,
        options: Option<CopyOptions>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        let options = options.map(|o| o.0).unwrap_or_default();
        future_into_py(py, async move {
            litebox.copy_in(&host_path, &box_path, options).await.py()
        })
    }

    #[pyo3(signature = (box_path, host_path, options=None, max_bytes=None))]
    fn copy_out<'py>(
        &self,
        py: Python<'py>,
        box_path: String,
        host_path: PathBuf,
        options: Option<CopyOptions>,
        max_bytes: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        let options = options.map(|o| o.0).unwrap_or_default();
        let max_bytes = byte_limit(max_bytes)?;
        future_into_py(py, async move {
            litebox
                .copy_out(&box_path, &host_path, options, max_bytes)
                .await
                .py()
        })
    }

    #[pyo3(signature = (path, max_bytes=None))]
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        path: String,
        max_bytes: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        let max_bytes = byte_limit(max_bytes)?;
        future_into_py(py, async move {
            let data = litebox.read_file(&path, max_bytes).await.py()?;
            Ok(crate::exec::PyBytesOut(data))
        })
    }

    #[pyo3(signature = (path, data, mode=0o644))]
    fn write_file<'py>(
        &self,
        py: Python<'py>,
        path: String,
        data: &Bound<'py, PyBytes>,
        mode: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        let data = data.as_bytes().to_vec();
        future_into_py(py, async move {
            litebox.write_file(&path, &data, mode).await.py()
        })
    }

    fn list_dir<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move { litebox.list_dir(&path).await.py() })
    }

    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move { litebox.start().await.py() })
    }

    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move { litebox.stop().await.py() })
    }

    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(BoxMetrics::from(litebox.metrics().await.py()?))
        })
    }

    fn pause<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move { litebox.pause().await.py() })
    }

    fn resume<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move { litebox.resume().await.py() })
    }

    /// The box's snapshots.
    #[getter]
    fn snapshot(&self) -> crate::snapshots::SnapshotHandle {
        crate::snapshots::SnapshotHandle(self.0.clone())
    }

    /// A new stopped box sharing this stopped box's disk blocks.
    #[pyo3(signature = (*, options=None, name=None))]
    fn clone_box<'py>(
        &self,
        py: Python<'py>,
        options: Option<PyRef<'py, crate::snapshots::CloneOptions>>,
        name: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = options;
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(NativeBox(litebox.clone_box(name).await.py()?))
        })
    }

    /// Writes the stopped box to one archive; returns its path.
    #[pyo3(signature = (*, options=None, dest))]
    fn export<'py>(
        &self,
        py: Python<'py>,
        options: Option<PyRef<'py, crate::snapshots::ExportOptions>>,
        dest: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = options;
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(litebox.export(&dest).await.py()?.display().to_string())
        })
    }

    #[pyo3(signature = (name=None))]
    fn fork<'py>(&self, py: Python<'py>, name: Option<String>) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(
            py,
            async move { Ok(NativeBox(litebox.fork(name).await.py()?)) },
        )
    }
}

/// A `max_bytes` argument: `None` (the core's default) or a size of zero or more bytes.
fn byte_limit(max_bytes: Option<i64>) -> PyResult<Option<u64>> {
    max_bytes
        .map(|n| {
            u64::try_from(n).map_err(|_| {
                boxlite::BoxliteError::invalid("max_bytes", format!("{n} is not a size in bytes"))
            })
        })
        .transpose()
        .py()
}
