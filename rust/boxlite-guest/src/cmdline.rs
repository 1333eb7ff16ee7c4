//! The agent's settings on the kernel command line (`/proc/cmdline`).

/// What this boot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run a box: mount its disk with /proc, /sys, /dev inside and serve execs.
    Box,
    /// Prepare an image disk: mount it bare and apply layers.
    Unpack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Block device of the box disk (`boxlite.root=`).
    pub root: Option<String>,
    pub mode: Mode,
    /// The box has host folders (`boxlite.volumes=1`): they are mounted at `Configure`.
    pub volumes: bool,
    /// Values of unknown `boxlite.*` keys or bad values, to log.
    pub warnings: Vec<String>,
}

pub fn parse(cmdline: &str) -> BootConfig {
    let mut cfg = BootConfig {
        root: None,
        mode: Mode::Box,
        volumes: false,
        warnings: Vec::new(),
    };
    for word in cmdline.split_ascii_whitespace() {
        let Some(rest) = word.strip_prefix("boxlite.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        match key {
            "root" if !value.is_empty() => cfg.root = Some(value.to_string()),
            "volumes" => cfg.volumes = value == "1",
            "mode" => match value {
                "box" => cfg.mode = Mode::Box,
                "unpack" => cfg.mode = Mode::Unpack,
                other => cfg
                    .warnings
                    .push(format!("unknown boxlite.mode={other:?}, using box")),
            },
            _ => cfg
                .warnings
                .push(format!("ignored kernel parameter {word:?}")),
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_root_and_mode() {
        let c = parse("console=ttyS0 panic=-1 quiet boxlite.root=/dev/vda boxlite.mode=unpack\n");
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.mode, Mode::Unpack);
        assert!(c.warnings.is_empty());
        assert!(!c.volumes);
        assert!(parse("boxlite.volumes=1").volumes);
    }

    #[test]
    fn defaults_and_warnings() {
        let c = parse("quiet");
        assert_eq!(c.root, None);
        assert_eq!(c.mode, Mode::Box);
        let c = parse("boxlite.mode=weird boxlite.root= boxlite.other=1 boxlite.mode=box");
        assert_eq!(c.mode, Mode::Box);
        assert_eq!(c.root, None);
        assert_eq!(c.warnings.len(), 3);
    }
}
