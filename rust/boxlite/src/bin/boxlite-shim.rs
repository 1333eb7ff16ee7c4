//! The per-box supervisor process; see `boxlite::shim`.

fn main() -> std::process::ExitCode {
    boxlite::shim::main()
}
