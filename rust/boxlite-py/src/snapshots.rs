//! Snapshots, clones and archives: `box.snapshot` (`SnapshotHandle`), `SnapshotInfo`, and the
//! published package's option placeholders (no fields yet).

use std::time::UNIX_EPOCH;

use pyo3::prelude::*;

use crate::drain::future_into_py;
use crate::errors::IntoPyResult;

/// One snapshot of a box's disk.
#[derive(Debug, Clone)]
#[pyclass(frozen, get_all, module = "boxlite")]
pub struct SnapshotInfo {
    pub id: String,
    pub box_id: String,
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    pub size_bytes: u64,
    pub container_disk_bytes: u64,
}

impl From<boxlite::SnapshotInfo> for SnapshotInfo {
    fn from(s: boxlite::SnapshotInfo) -> Self {
        Self {
            id: s.id,
            box_id: s.box_id.to_string(),
            name: s.name,
            created_at: s
                .created_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            size_bytes: s.size_bytes,
            container_disk_bytes: s.container_disk_bytes,
        }
    }
}

#[pymethods]
impl SnapshotInfo {
    fn __repr__(&self) -> String {
        format!(
            "SnapshotInfo(name={}, box_id={}, created_at={})",
            py_str(&self.name),
            py_str(&self.box_id),
            self.created_at
        )
    }
}

/// A Python string literal in single quotes, as `repr` shows one.
fn py_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

macro_rules! placeholder {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Default)]
        #[pyclass(frozen, module = "boxlite")]
        pub struct $name;

        #[pymethods]
        impl $name {
            #[new]
            fn new() -> Self {
                Self
            }
            fn __repr__(&self) -> String {
                concat!(stringify!($name), "()").to_owned()
            }
        }
    };
}

placeholder!(SnapshotOptions, "Options of `snapshot.create` (none yet).");
placeholder!(CloneOptions, "Options of `Box.clone_box` (none yet).");
placeholder!(ExportOptions, "Options of `Box.export` (none yet).");

/// A box's snapshots (`box.snapshot`). The box must be stopped to create or restore one.
#[derive(Debug)]
#[pyclass(frozen, module = "boxlite")]
pub struct SnapshotHandle(pub boxlite::LiteBox);

#[pymethods]
impl SnapshotHandle {
    #[pyo3(signature = (*, options=None, name))]
    fn create<'py>(
        &self,
        py: Python<'py>,
        options: Option<PyRef<'py, SnapshotOptions>>,
        name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = options;
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(SnapshotInfo::from(
                litebox.create_snapshot(&name).await.py()?,
            ))
        })
    }

    fn list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(litebox
                .list_snapshots()
                .py()?
                .into_iter()
                .map(SnapshotInfo::from)
                .collect::<Vec<_>>())
        })
    }

    fn get<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move {
            Ok(litebox.get_snapshot(&name).py()?.map(SnapshotInfo::from))
        })
    }

    fn remove<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(py, async move { litebox.remove_snapshot(&name).await.py() })
    }

    fn restore<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let litebox = self.0.clone();
        future_into_py(
            py,
            async move { litebox.restore_snapshot(&name).await.py() },
        )
    }

    fn __repr__(&self) -> String {
        format!("SnapshotHandle(box_id=\"{}\")", self.0.id())
    }
}
