//! Other platforms: the crate compiles, every spawn is refused.

use std::convert::Infallible;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::{Capabilities, CgroupOutcome, JailError, JailSpec, JailStdio};

const PLATFORM: &str = std::env::consts::OS;

/// A jailed program; never constructed on this platform.
#[derive(Debug)]
pub struct JailedChild {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    never: Infallible,
}

impl JailedChild {
    pub fn pid(&self) -> u32 {
        match self.never {}
    }
    pub fn kill(&self) -> io::Result<()> {
        match self.never {}
    }
    pub fn signal(&self, _signal: i32) -> io::Result<()> {
        match self.never {}
    }
    pub fn wait(&self) -> io::Result<ExitStatus> {
        match self.never {}
    }
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        match self.never {}
    }
    pub fn cgroup(&self) -> &CgroupOutcome {
        match self.never {}
    }
    pub fn user_namespace(&self) -> bool {
        match self.never {}
    }
}

pub(crate) fn caller_is_root() -> bool {
    false
}

pub(crate) fn spawn(
    _spec: &JailSpec,
    _program: &Path,
    _args: &[OsString],
    _stdio: JailStdio,
) -> Result<JailedChild, JailError> {
    Err(JailError::Unsupported(PLATFORM))
}

fn unavailable<T>() -> Result<T, String> {
    Err(format!("not available on {PLATFORM}"))
}

pub(crate) fn probe() -> Capabilities {
    Capabilities {
        root: false,
        user_namespaces: unavailable(),
        seccomp: unavailable(),
        cgroup: unavailable(),
    }
}

pub(crate) fn program_binds(_binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    Err(JailError::Unsupported(PLATFORM))
}

pub(crate) fn qemu_binds(_qemu: &Path) -> Result<Vec<PathBuf>, JailError> {
    Err(JailError::Unsupported(PLATFORM))
}

/// No seccomp here.
pub(crate) type Filter = ();

pub(crate) fn no_setid_filter() -> Result<Filter, JailError> {
    Err(JailError::Unsupported(PLATFORM))
}

pub(crate) fn install_filter(_filter: &Filter) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
