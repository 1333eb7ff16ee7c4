//! One line per notable event on the kernel console (stderr of PID 1 is /dev/console).

/// Writes one `boxlite-guest: ...` line to stderr with a single `write(2)`, ignoring errors
/// (there is nowhere else to report them).
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut s = format!("boxlite-guest: {args}");
    s.push('\n');
    let _ = crate::sys::write(2, s.as_bytes());
}

macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}
pub(crate) use log;
