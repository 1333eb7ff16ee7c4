//! The runtime and box classes.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::drain::future_into_py;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::IntoPyResult;
use crate::exec::NativeExecution;
use crate::metrics::{BoxMetrics, RuntimeMetrics};

fn seconds(field: &str, value: Option<f64>) -> PyResult<Option<boxlite::Seconds>> {
    value
        .map(|v| {
            boxlite::Seconds::try_from_secs_f64(v)
                .filter(|s| s.as_millis() > 0)
                .ok_or_else(|| {
                    boxlite::BoxliteError::invalid(
                        field,
                        format!("{v} is not a positive number of seconds"),
                    )
                })
                .py()
        })
        .transpose()
}

/// A boxlite runtime rooted at one home directory.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct Runtime(boxlite::BoxliteRuntime);

#[pymethods]
impl Runtime {
    #[new]
    #[pyo3(signature = (home_dir=None, guest_dir=None, shim_path=None, boot_timeout_secs=None, stop_timeout_secs=None, image_registries=Vec::new()))]
    fn new(
        py: Python<'_>,
        home_dir: Option<PathBuf>,
        guest_dir: Option<PathBuf>,
        shim_path: Option<PathBuf>,
        boot_timeout_secs: Option<f64>,
        stop_timeout_secs: Option<f64>,
        image_registries: Vec<crate::images::RegistryTuple>,
    ) -> PyResult<Self> {
        let mut options = boxlite::BoxliteOptions::default();
        if let Some(home) = home_dir {
            options.home_dir = home;
        }
        options.guest_dir = guest_dir;
        options.shim_path = shim_path;
        options.image_registries = crate::images::registries(image_registries)?;
        if let Some(t) = seconds("boot_timeout", boot_timeout_secs)? {
            options.boot_timeout = t;
        }
        if let Some(t) = seconds("stop_timeout", stop_timeout_secs)? {
            options.stop_timeout = t;
        }
        // Opening the home may wait on another process's database lock.
        Ok(Self(
            py.allow_threads(|| boxlite::BoxliteRuntime::new(options))
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
    fn guest_dir(&self) -> PyResult<PathBuf> {
        Ok(self.0.guest_bundle().py()?.dir)
    }

    #[pyo3(signature = (*, rootfs_path=None, image=None, name=None, cpus=1, memory_mib=512, working_dir=None, env=Vec::new(), user=None, disk_size_gb=None, auto_remove=false, detach=false))]
    #[allow(clippy::too_many_arguments)]
    fn create<'py>(
        &self,
        py: Python<'py>,
        rootfs_path: Option<PathBuf>,
        image: Option<String>,
        name: Option<String>,
        cpus: u32,
        memory_mib: u64,
        working_dir: Option<String>,
        env: Vec<(String, String)>,
        user: Option<String>,
        disk_size_gb: Option<f64>,
        auto_remove: bool,
        detach: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let disk_size = disk_size_gb
            .map(|gb| {
                if gb.is_finite() && gb > 0.0 {
                    Ok(boxlite::Bytes::from_mib((gb * 1024.0).round() as u64))
                } else {
                    Err(boxlite::BoxliteError::invalid(
                        "disk_size_gb",
                        format!("{gb} is not a positive size"),
                    ))
                }
            })
            .transpose()
            .py()?;
        let options = boxlite::BoxOptions {
            rootfs_path,
            image,
            name,
            cpus,
            memory: boxlite::Bytes::from_mib(memory_mib),
            working_dir,
            env,
            user,
            disk_size,
            auto_remove,
            detach,
        };
        let runtime = self.0.clone();
        future_into_py(py, async move {
            Ok(NativeBox(runtime.create(options).await.py()?))
        })
    }

    fn get(&self, py: Python<'_>, id_or_name: &str) -> PyResult<NativeBox> {
        Ok(NativeBox(py.allow_threads(|| self.0.get(id_or_name)).py()?))
    }

    fn list_info<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let infos = py.allow_threads(|| self.0.list_info()).py()?;
        infos.into_iter().map(|info| info_dict(py, info)).collect()
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

    fn boxes(&self) -> Vec<NativeBox> {
        self.0.boxes().into_iter().map(NativeBox).collect()
    }
}

/// One box.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite._native")]
pub struct NativeBox(boxlite::LiteBox);

fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn info_dict(py: Python<'_>, info: boxlite::BoxInfo) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("id", info.id.to_string())?;
    dict.set_item("name", info.name)?;
    dict.set_item("status", info.status.as_str())?;
    dict.set_item("image", info.image)?;
    dict.set_item("cpus", info.cpus)?;
    dict.set_item("memory_mib", info.memory_mib)?;
    dict.set_item("created_at", epoch_seconds(info.created_at))?;
    dict.set_item("started_at", info.started_at.map(epoch_seconds))?;
    dict.set_item("pid", info.pid)?;
    dict.set_item("shim_pid", info.shim_pid)?;
    dict.set_item("detach", info.detach)?;
    dict.set_item("auto_remove", info.auto_remove)?;
    dict.set_item("accelerator", info.accel.to_string())?;
    dict.set_item("hardware_isolated", info.hardware_isolated)?;
    Ok(dict)
}

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

    /// The box's description as a dict (the Python layer wraps it).
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = info_dict(py, py.allow_threads(|| self.0.info()))?;
        dict.set_item("dir", self.0.dir().to_path_buf())?;
        let image = self.0.image_config();
        let config = PyDict::new(py);
        config.set_item("entrypoint", &image.entrypoint)?;
        config.set_item("cmd", &image.cmd)?;
        config.set_item("env", &image.env)?;
        config.set_item("working_dir", &image.working_dir)?;
        config.set_item("user", &image.user)?;
        dict.set_item("image_config", config)?;
        Ok(dict)
    }

    #[pyo3(signature = (program, args=Vec::new(), *, env=Vec::new(), cwd=None, user=None, tty=None, timeout_secs=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        user: Option<String>,
        tty: Option<(u16, u16)>,
        timeout_secs: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let command = boxlite::BoxCommand {
            program,
            args,
            env,
            cwd,
            user,
            tty: tty.map(|(rows, cols)| boxlite::TtySize { rows, cols }),
            timeout: seconds("timeout", timeout_secs)?,
        };
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(NativeExecution::new(litebox.exec(command).await.py()?))
        })
    }

    fn copy_in<'py>(
        &self,
        py: Python<'py>,
        host_path: PathBuf,
        box_path: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move {
            litebox.copy_in(&host_path, &box_path).await.py()
        })
    }

    fn copy_out<'py>(
        &self,
        py: Python<'py>,
        box_path: String,
        host_path: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move {
            litebox.copy_out(&box_path, &host_path).await.py()
        })
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
}
