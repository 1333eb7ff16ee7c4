//! The published shapes of `BoxOptions(volumes=...)`, converted to the core's `VolumeSpec`.
//! Only shapes are checked here; `boxlite::BoxOptions::validate` owns every rule.

use std::path::PathBuf;

use boxlite::VolumeSpec;
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyTuple};

const DICT_KEYS: [&str; 4] = ["managed_volume", "host_path", "guest_path", "read_only"];

/// One entry: `(host_path, guest_path[, read_only])` or a dict. `Ok(None)` is a managed
/// volume (a remote runtime's; the caller refuses it).
pub fn volume_spec(entry: &Bound<'_, PyAny>) -> PyResult<Option<VolumeSpec>> {
    if let Ok(dict) = entry.downcast::<PyDict>() {
        for key in dict.keys() {
            let key: String = key.extract()?;
            if !DICT_KEYS.contains(&key.as_str()) {
                return Err(PyRuntimeError::new_err(format!(
                    "unknown volume dict key \"{key}\"; expected one of {}",
                    DICT_KEYS.join(", ")
                )));
            }
        }
        let get = |key: &str| dict.get_item(key).ok().flatten().filter(|v| !v.is_none());
        let read_only = get("read_only").map(|v| read_only(&v)).transpose()?;
        let guest_path = get("guest_path")
            .ok_or_else(|| PyRuntimeError::new_err("a volume dict requires guest_path"))?
            .extract::<String>()?;
        return match (get("managed_volume"), get("host_path")) {
            (Some(_), Some(_)) => Err(PyRuntimeError::new_err(
                "a volume takes managed_volume or host_path, not both",
            )),
            (None, None) => Err(PyRuntimeError::new_err(
                "a volume requires managed_volume or host_path",
            )),
            (Some(_), None) => Ok(None),
            (None, Some(host)) => Ok(Some(VolumeSpec::new(
                host.extract::<PathBuf>()?,
                guest_path,
                read_only.unwrap_or(false),
            ))),
        };
    }
    if let Ok(tuple) = entry.downcast::<PyTuple>() {
        if !(2..=3).contains(&tuple.len()) {
            return Err(PyRuntimeError::new_err(
                "volumes tuples must be (host_path, guest_path[, read_only])",
            ));
        }
        let read_only = match tuple.get_item(2) {
            Ok(v) => read_only(&v)?,
            Err(_) => false,
        };
        return Ok(Some(VolumeSpec::new(
            tuple.get_item(0)?.extract::<PathBuf>()?,
            tuple.get_item(1)?.extract::<String>()?,
            read_only,
        )));
    }
    Err(PyRuntimeError::new_err(
        "volumes entries must be tuple or dict",
    ))
}

fn read_only(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    value
        .downcast::<PyBool>()
        .map(|b| b.is_true())
        .map_err(|_| PyTypeError::new_err(format!("read_only must be a bool, got {value}")))
}
