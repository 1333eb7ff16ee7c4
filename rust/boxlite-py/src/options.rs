//! Option classes: Python shapes in, core types out. The rules live in the core; this module
//! only converts (a mapping or pairs to an env list, GiB to bytes, ...).

use std::path::PathBuf;

use boxlite::images::{ImageRegistry as CoreRegistry, Transport};
use boxlite::{BoxliteError, Bytes, Seconds};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::IntoPyResult;

fn invalid(field: &str, reason: impl Into<String>) -> PyErr {
    crate::errors::to_py_err(BoxliteError::invalid(field, reason))
}

/// `(name, value)` pairs from a mapping or an iterable of pairs; `None` is empty.
pub fn env_pairs(field: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, String)>> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(Vec::new());
    };
    let items = if let Ok(dict) = value.downcast::<PyDict>() {
        dict.items().into_any()
    } else if value.hasattr("items")? && !value.is_instance_of::<PyString>() {
        value.call_method0("items")?
    } else {
        value.clone()
    };
    if items.is_instance_of::<PyString>() {
        return Err(invalid(
            field,
            "expected a mapping or (name, value) pairs, got a str",
        ));
    }
    let mut pairs = Vec::new();
    for item in items.try_iter()? {
        let item = item?;
        let pair = item
            .downcast::<PyTuple>()
            .ok()
            .filter(|t| t.len() == 2)
            .and_then(|t| t.extract::<(String, String)>().ok())
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("expected (name, value) pairs of str, got {item}"),
                )
            })?;
        pairs.push(pair);
    }
    Ok(pairs)
}

/// A list of strings (not one string).
fn argv(field: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<String>>> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    if value.is_instance_of::<PyString>() {
        return Err(invalid(field, "expected a list of strings, not one string"));
    }
    value
        .extract::<Vec<String>>()
        .map(Some)
        .map_err(|_| invalid(field, format!("expected a list of strings, got {value}")))
}

fn is_set(value: &Option<PyObject>, py: Python<'_>) -> bool {
    value.as_ref().is_some_and(|v| {
        let v = v.bind(py);
        !v.is_none() && v.len().map_or(true, |n| n > 0)
    })
}

/// How one registry host is reached. `host` is `host[:port]` without a scheme;
/// `transport="http"` allows plain HTTP; `skip_verify` accepts an unverified certificate;
/// `search=True` tries it for short names before Docker Hub; credentials are for this host
/// only.
#[derive(Debug, Clone)]
#[pyclass(frozen, module = "boxlite")]
pub struct ImageRegistry(pub CoreRegistry);

#[pymethods]
impl ImageRegistry {
    #[new]
    #[pyo3(signature = (host, transport="https", skip_verify=false, search=false, username=None, password=None, bearer_token=None))]
    fn new(
        host: String,
        transport: &str,
        skip_verify: bool,
        search: bool,
        username: Option<String>,
        password: Option<String>,
        bearer_token: Option<String>,
    ) -> PyResult<Self> {
        let registry = CoreRegistry {
            host,
            transport: Transport::parse(transport).py()?,
            skip_verify,
            search,
            username,
            password,
            bearer_token,
        };
        registry.validate().py()?;
        Ok(Self(registry))
    }

    #[getter]
    fn host(&self) -> &str {
        &self.0.host
    }
    #[getter]
    fn transport(&self) -> &'static str {
        self.0.transport.as_str()
    }
    #[getter]
    fn skip_verify(&self) -> bool {
        self.0.skip_verify
    }
    #[getter]
    fn search(&self) -> bool {
        self.0.search
    }
    #[getter]
    fn username(&self) -> Option<&str> {
        self.0.username.as_deref()
    }
    #[getter]
    fn password(&self) -> Option<&str> {
        self.0.password.as_deref()
    }
    #[getter]
    fn bearer_token(&self) -> Option<&str> {
        self.0.bearer_token.as_deref()
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.0 == other.0
    }

    fn __repr__(&self) -> String {
        format!(
            "ImageRegistry(host={:?}, transport={:?}, skip_verify={}, search={})",
            self.0.host,
            self.0.transport.as_str(),
            py_bool(self.0.skip_verify),
            py_bool(self.0.search)
        )
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// Registries as given: `ImageRegistry` objects, or a plain `str` for a searched HTTPS host.
fn registries(value: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<CoreRegistry>> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(Vec::new());
    };
    if value.is_instance_of::<PyString>() {
        return Err(invalid(
            "image_registries",
            "pass a list of registries, not one string",
        ));
    }
    let mut out = Vec::new();
    for entry in value.try_iter()? {
        let entry = entry?;
        if let Ok(registry) = entry.downcast::<ImageRegistry>() {
            out.push(registry.get().0.clone());
        } else if let Ok(host) = entry.extract::<String>() {
            let registry = CoreRegistry {
                search: true,
                ..CoreRegistry::new(host)
            };
            registry.validate().py()?;
            out.push(registry);
        } else {
            return Err(invalid(
                "image_registries",
                format!("expected ImageRegistry or str, got {entry}"),
            ));
        }
    }
    Ok(out)
}

/// How a runtime is set up: `home_dir` (default `$BOXLITE_HOME` or `~/.boxlite`), registries,
/// and the boot and stop timeouts in seconds.
#[derive(Debug)]
#[pyclass(module = "boxlite")]
pub struct Options {
    pub home_dir: Option<PathBuf>,
    pub image_registries: Vec<CoreRegistry>,
    pub boot_timeout: Option<Seconds>,
    pub stop_timeout: Option<Seconds>,
    /// `None`: the core's default (on unless `BOXLITE_TEMPLATES=0`).
    pub templates: Option<bool>,
}

#[pymethods]
impl Options {
    #[new]
    #[pyo3(signature = (home_dir=None, image_registries=None, boot_timeout=None, stop_timeout=None, templates=None))]
    fn new(
        home_dir: Option<PathBuf>,
        image_registries: Option<&Bound<'_, PyAny>>,
        boot_timeout: Option<f64>,
        stop_timeout: Option<f64>,
        templates: Option<bool>,
    ) -> PyResult<Self> {
        Ok(Self {
            templates,
            home_dir,
            image_registries: registries(image_registries)?,
            boot_timeout: boot_timeout
                .map(|t| Seconds::positive("boot_timeout", t))
                .transpose()
                .py()?,
            stop_timeout: stop_timeout
                .map(|t| Seconds::positive("stop_timeout", t))
                .transpose()
                .py()?,
        })
    }

    #[getter]
    fn home_dir(&self) -> Option<PathBuf> {
        self.home_dir.clone()
    }
    #[setter]
    fn set_home_dir(&mut self, home_dir: Option<PathBuf>) {
        self.home_dir = home_dir;
    }
    #[getter]
    fn image_registries(&self) -> Vec<ImageRegistry> {
        self.image_registries
            .iter()
            .cloned()
            .map(ImageRegistry)
            .collect()
    }
    #[setter]
    fn set_image_registries(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.image_registries = registries(value)?;
        Ok(())
    }
    #[getter]
    fn boot_timeout(&self) -> Option<f64> {
        self.boot_timeout.map(Seconds::as_secs_f64)
    }
    #[getter]
    fn stop_timeout(&self) -> Option<f64> {
        self.stop_timeout.map(Seconds::as_secs_f64)
    }
    /// Whether new boxes may start from memory templates (`None`: the default, on unless
    /// `BOXLITE_TEMPLATES=0`).
    #[getter]
    fn templates(&self) -> Option<bool> {
        self.templates
    }
    #[setter]
    fn set_templates(&mut self, value: Option<bool>) {
        self.templates = value;
    }

    fn __repr__(&self) -> String {
        format!(
            "Options(home_dir={}, image_registries=[{}])",
            self.home_dir
                .as_ref()
                .map_or("None".into(), |h| format!("{:?}", h.display().to_string())),
            self.image_registries
                .iter()
                .map(|r| format!("{:?}", r.host))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// What a box is made of, in the published package's shape (all fields keyword-able, in its
/// order). Checked by the core when the box is created (`validate()` checks earlier);
/// attributes can be changed until then. `env` takes a mapping or `(name, value)` pairs;
/// `auto_delete` (seconds, `0` = keep) is the published successor of `auto_remove`.
#[derive(Debug)]
#[pyclass(module = "boxlite")]
pub struct BoxOptions {
    pub inner: boxlite::BoxOptions,
    auto_delete: Option<u64>,
    auto_resume: Option<bool>,
    volumes: Option<PyObject>,
    /// A managed volume was given: only remote runtimes have them.
    managed_volume: bool,
    network: Option<PyObject>,
    ports: Option<PyObject>,
    auto_stop: Option<PyObject>,
    advanced: Option<Py<crate::advanced::AdvancedBoxOptions>>,
    secrets: Option<PyObject>,
}

#[pymethods]
impl BoxOptions {
    #[new]
    #[pyo3(signature = (image=None, rootfs_path=None, cpus=None, memory_mib=None, disk_size_gb=None, working_dir=None, env=None, volumes=None, network=None, ports=None, auto_remove=None, auto_stop=None, auto_delete=None, auto_resume=None, detach=None, entrypoint=None, cmd=None, user=None, tty=None, advanced=None, secrets=None, *, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        image: Option<String>,
        rootfs_path: Option<PathBuf>,
        cpus: Option<u32>,
        memory_mib: Option<u64>,
        disk_size_gb: Option<f64>,
        working_dir: Option<String>,
        env: Option<&Bound<'_, PyAny>>,
        volumes: Option<PyObject>,
        network: Option<PyObject>,
        ports: Option<PyObject>,
        auto_remove: Option<bool>,
        auto_stop: Option<PyObject>,
        auto_delete: Option<u64>,
        auto_resume: Option<bool>,
        detach: Option<bool>,
        entrypoint: Option<&Bound<'_, PyAny>>,
        cmd: Option<&Bound<'_, PyAny>>,
        user: Option<String>,
        tty: Option<bool>,
        advanced: Option<Py<crate::advanced::AdvancedBoxOptions>>,
        secrets: Option<PyObject>,
        name: Option<String>,
    ) -> PyResult<Self> {
        let defaults = boxlite::BoxOptions::default();
        let mut host_volumes = Vec::new();
        let mut managed_volume = false;
        if let Some(list) = volumes.as_ref() {
            Python::with_gil(|py| -> PyResult<()> {
                for entry in list.bind(py).try_iter()? {
                    match crate::volumes::volume_spec(&entry?)? {
                        Some(spec) => host_volumes.push(spec),
                        None => managed_volume = true,
                    }
                }
                Ok(())
            })?;
        }
        let inner = boxlite::BoxOptions {
            rootfs_path,
            image,
            name,
            cpus: cpus.unwrap_or(defaults.cpus),
            memory: memory_mib.map_or(defaults.memory, Bytes::from_mib),
            working_dir,
            env: env_pairs("env", env)?,
            user,
            disk_size: disk_size_gb
                .map(|gb| Bytes::from_gib_f64("disk_size_gb", gb))
                .transpose()
                .py()?,
            entrypoint: argv("entrypoint", entrypoint)?,
            cmd: argv("cmd", cmd)?,
            tty: tty.unwrap_or(defaults.tty),
            // Converted from their Python forms when the options are used (`to_core`).
            network: defaults.network.clone(),
            ports: Vec::new(),
            volumes: host_volumes,
            sandbox: defaults.sandbox.clone(),
            // The published rule: `auto_delete` wins over `auto_remove`; 0 keeps the box.
            auto_remove: match (auto_delete, auto_remove) {
                (Some(seconds), _) => seconds > 0,
                (None, Some(remove)) => remove,
                (None, None) => defaults.auto_remove,
            },
            detach: detach.unwrap_or(defaults.detach),
        };
        Ok(Self {
            inner,
            auto_delete,
            auto_resume,
            volumes,
            managed_volume,
            network,
            ports,
            auto_stop,
            advanced,
            secrets,
        })
    }

    /// Checks the options now, as `create()` will (`InvalidArgumentError` naming the field,
    /// `UnsupportedError` for what this version lacks).
    fn validate(&self, py: Python<'_>) -> PyResult<()> {
        self.to_core(py).map(|_| ())
    }

    #[getter]
    fn image(&self) -> Option<&str> {
        self.inner.image.as_deref()
    }
    #[setter]
    fn set_image(&mut self, value: Option<String>) {
        self.inner.image = value;
    }
    #[getter]
    fn rootfs_path(&self) -> Option<PathBuf> {
        self.inner.rootfs_path.clone()
    }
    #[setter]
    fn set_rootfs_path(&mut self, value: Option<PathBuf>) {
        self.inner.rootfs_path = value;
    }
    #[getter]
    fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }
    #[setter]
    fn set_name(&mut self, value: Option<String>) {
        self.inner.name = value;
    }
    #[getter]
    fn cpus(&self) -> u32 {
        self.inner.cpus
    }
    #[setter]
    fn set_cpus(&mut self, value: Option<u32>) {
        self.inner.cpus = value.unwrap_or(boxlite::BoxOptions::default().cpus);
    }
    #[getter]
    fn memory_mib(&self) -> u64 {
        self.inner.memory.as_mib()
    }
    #[setter]
    fn set_memory_mib(&mut self, value: Option<u64>) {
        self.inner.memory = value.map_or(boxlite::BoxOptions::default().memory, Bytes::from_mib);
    }
    #[getter]
    fn disk_size_gb(&self) -> Option<f64> {
        self.inner
            .disk_size
            .map(|b| b.as_u64() as f64 / (1u64 << 30) as f64)
    }
    #[setter]
    fn set_disk_size_gb(&mut self, value: Option<f64>) -> PyResult<()> {
        self.inner.disk_size = value
            .map(|gb| Bytes::from_gib_f64("disk_size_gb", gb))
            .transpose()
            .py()?;
        Ok(())
    }
    #[getter]
    fn working_dir(&self) -> Option<&str> {
        self.inner.working_dir.as_deref()
    }
    #[setter]
    fn set_working_dir(&mut self, value: Option<String>) {
        self.inner.working_dir = value;
    }
    #[getter]
    fn env(&self) -> Vec<(String, String)> {
        self.inner.env.clone()
    }
    #[setter]
    fn set_env(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.inner.env = env_pairs("env", value)?;
        Ok(())
    }
    #[getter]
    fn user(&self) -> Option<&str> {
        self.inner.user.as_deref()
    }
    #[setter]
    fn set_user(&mut self, value: Option<String>) {
        self.inner.user = value;
    }
    #[getter]
    fn entrypoint(&self) -> Option<Vec<String>> {
        self.inner.entrypoint.clone()
    }
    #[setter]
    fn set_entrypoint(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.inner.entrypoint = argv("entrypoint", value)?;
        Ok(())
    }
    #[getter]
    fn cmd(&self) -> Option<Vec<String>> {
        self.inner.cmd.clone()
    }
    #[setter]
    fn set_cmd(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.inner.cmd = argv("cmd", value)?;
        Ok(())
    }
    #[getter]
    fn tty(&self) -> bool {
        self.inner.tty
    }
    #[setter]
    fn set_tty(&mut self, value: Option<bool>) {
        self.inner.tty = value.unwrap_or(false);
    }
    #[getter]
    fn auto_remove(&self) -> bool {
        self.inner.auto_remove
    }
    #[setter]
    fn set_auto_remove(&mut self, value: Option<bool>) {
        self.auto_delete = None;
        self.inner.auto_remove = value.unwrap_or(boxlite::BoxOptions::default().auto_remove);
    }
    /// Seconds after stop before the box is deleted, as the published package reports it
    /// (`1` = deleted at stop, `0` = kept).
    #[getter]
    fn auto_delete(&self) -> u64 {
        self.auto_delete
            .unwrap_or(u64::from(self.inner.auto_remove))
    }
    #[setter]
    fn set_auto_delete(&mut self, value: Option<u64>) {
        self.auto_delete = value;
        if let Some(seconds) = value {
            self.inner.auto_remove = seconds > 0;
        }
    }
    #[getter]
    fn auto_resume(&self) -> bool {
        self.auto_resume.unwrap_or(true)
    }
    #[getter]
    fn detach(&self) -> bool {
        self.inner.detach
    }
    #[setter]
    fn set_detach(&mut self, value: Option<bool>) {
        self.inner.detach = value.unwrap_or(false);
    }
    #[getter]
    fn volumes(&self, py: Python<'_>) -> PyObject {
        list_or_empty(py, &self.volumes)
    }
    #[getter]
    fn ports(&self, py: Python<'_>) -> PyObject {
        list_or_empty(py, &self.ports)
    }
    #[getter]
    fn secrets(&self, py: Python<'_>) -> PyObject {
        list_or_empty(py, &self.secrets)
    }
    #[getter]
    fn network(&self, py: Python<'_>) -> Option<PyObject> {
        self.network.as_ref().map(|n| n.clone_ref(py))
    }
    #[getter]
    fn advanced(&self, py: Python<'_>) -> Option<Py<crate::advanced::AdvancedBoxOptions>> {
        self.advanced.as_ref().map(|a| a.clone_ref(py))
    }
    #[getter]
    fn auto_stop(&self, py: Python<'_>) -> Option<PyObject> {
        self.auto_stop.as_ref().map(|a| a.clone_ref(py))
    }

    fn __repr__(&self) -> String {
        let o = &self.inner;
        let mut shown = Vec::new();
        if let Some(image) = &o.image {
            shown.push(format!("image={image:?}"));
        }
        if let Some(path) = &o.rootfs_path {
            shown.push(format!("rootfs_path={:?}", path.display().to_string()));
        }
        if let Some(name) = &o.name {
            shown.push(format!("name={name:?}"));
        }
        shown.push(format!("cpus={}", o.cpus));
        shown.push(format!("memory_mib={}", o.memory.as_mib()));
        if !o.auto_remove {
            shown.push("auto_remove=False".into());
        }
        if o.detach {
            shown.push("detach=True".into());
        }
        format!("BoxOptions({})", shown.join(", "))
    }
}

fn list_or_empty(py: Python<'_>, value: &Option<PyObject>) -> PyObject {
    match value {
        Some(v) if !v.bind(py).is_none() => v.clone_ref(py),
        _ => PyList::empty(py).into_any().unbind(),
    }
}

impl BoxOptions {
    /// The core's options, refusing what this version does not have yet.
    pub fn to_core(&self, py: Python<'_>) -> PyResult<boxlite::BoxOptions> {
        if is_set(&self.secrets, py) {
            return Err(crate::errors::to_py_err(BoxliteError::Unsupported(
                "`secrets` options are not supported by this version of boxlite".into(),
            )));
        }
        if self.managed_volume {
            return Err(crate::errors::to_py_err(BoxliteError::Unsupported(
                "managed volumes are only supported by remote runtimes; use host_path".into(),
            )));
        }
        if self
            .auto_stop
            .as_ref()
            .is_some_and(|v| !v.bind(py).is_none())
        {
            return Err(crate::errors::to_py_err(BoxliteError::Unsupported(
                "auto_stop is only supported by remote runtimes".into(),
            )));
        }
        let mut core = self.inner.clone();
        if let Some(advanced) = &self.advanced {
            core.sandbox = advanced.borrow(py).sandbox()?;
        }
        if let Some(network) = self
            .network
            .as_ref()
            .map(|n| n.bind(py))
            .filter(|n| !n.is_none())
        {
            let spec = network
                .extract::<crate::network::NetworkSpec>()
                .map_err(|_| {
                    invalid("network", format!("expected a NetworkSpec, got {network}"))
                })?;
            core.network = spec.to_core()?;
        }
        if let Some(ports) = self
            .ports
            .as_ref()
            .map(|p| p.bind(py))
            .filter(|p| !p.is_none())
        {
            core.ports = ports
                .try_iter()?
                .map(|entry| crate::network::port_spec(&entry?))
                .collect::<PyResult<Vec<_>>>()?;
        }
        core.validate().py()?;
        Ok(core)
    }

    /// Options for a box created under `name` (given to `create` beside the options).
    pub fn named(&self, py: Python<'_>, name: Option<String>) -> PyResult<boxlite::BoxOptions> {
        let mut core = self.to_core(py)?;
        if let Some(name) = name {
            match &core.name {
                Some(existing) if *existing != name => {
                    return Err(invalid(
                        "name",
                        format!("{name:?} differs from the options' name {existing:?}; give one"),
                    ))
                }
                _ => core.name = Some(name),
            }
        }
        core.validate().py()?;
        Ok(core)
    }
}

/// How `copy_in`/`copy_out` treat directories, existing destinations and symlinks.
#[derive(Debug, Clone, Copy)]
#[pyclass(module = "boxlite")]
pub struct CopyOptions(pub boxlite::CopyOptions);

#[pymethods]
impl CopyOptions {
    #[new]
    #[pyo3(signature = (recursive=true, overwrite=true, follow_symlinks=false))]
    fn new(recursive: bool, overwrite: bool, follow_symlinks: bool) -> Self {
        Self(boxlite::CopyOptions {
            recursive,
            overwrite,
            follow_symlinks,
        })
    }
    #[getter]
    fn recursive(&self) -> bool {
        self.0.recursive
    }
    #[setter]
    fn set_recursive(&mut self, value: bool) {
        self.0.recursive = value;
    }
    #[getter]
    fn overwrite(&self) -> bool {
        self.0.overwrite
    }
    #[setter]
    fn set_overwrite(&mut self, value: bool) {
        self.0.overwrite = value;
    }
    #[getter]
    fn follow_symlinks(&self) -> bool {
        self.0.follow_symlinks
    }
    #[setter]
    fn set_follow_symlinks(&mut self, value: bool) {
        self.0.follow_symlinks = value;
    }
    fn __repr__(&self) -> String {
        format!(
            "CopyOptions(recursive={}, overwrite={}, follow_symlinks={})",
            py_bool(self.0.recursive),
            py_bool(self.0.overwrite),
            py_bool(self.0.follow_symlinks)
        )
    }
}
