//! A hostile stand-in for the boxlite guest agent, for `tests/test_hardening.py`.
//!
//! It runs as PID 1 of a box VM like the real agent (same kernel, same modules, same port) and
//! speaks the protocol wrongly on purpose, so that the real supervisor and host library can be
//! tested against a guest whose root is hostile. What it does is its *mode*:
//!
//! - from `/etc/boxlite/hostile` in the initramfs, if present: the modes that misbehave before
//!   the host has said anything (see [`Mode::before_configure`]);
//! - else from the hostname the host sends in `Configure` (the box's name; its part before the
//!   first `.`), so one guest bundle serves every mode that misbehaves later. Those modes answer
//!   `Configure`, `Ping` and `Metrics` correctly and misbehave on an exec of the program
//!   `misbehave` (or on the request they are named after).
//!
//! Every mode runs other execs politely: `echo ARGS` prints ARGS and exits 0, `hang` starts and
//! never ends (a pending call to see fail), anything else exits 0 at once; `Shutdown` powers
//! off.

mod mode;
mod port;

use std::fs::File;
use std::io::Write;
use std::time::Duration;

use boxlite_proto::{
    Body, ExitStatus, Frame, GuestMetrics, Message, StreamId, GUEST_PORT_NAME, PROTOCOL_VERSION,
};

use crate::mode::Mode;

/// Where a bundle built for a pre-`Configure` mode names it.
const MODE_FILE: &str = "/etc/boxlite/hostile";

fn log(line: &str) {
    let _ = std::io::stderr().write_all(format!("boxlite-hostile: {line}\n").as_bytes());
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("boxlite-hostile is a stand-in guest agent: it runs only as PID 1 of a test VM");
        std::process::exit(2);
    }
    port::early_mounts();
    let loaded = port::load_modules(
        std::path::Path::new("/etc/boxlite/modules"),
        std::path::Path::new("/lib/modules"),
    );
    let fixed = std::fs::read_to_string(MODE_FILE)
        .ok()
        .and_then(|m| Mode::parse(m.trim()));
    log(&format!("{loaded} modules loaded, mode {fixed:?}"));
    let port = match port::open(GUEST_PORT_NAME, Duration::from_secs(10)) {
        Ok(p) => p,
        Err(e) => {
            log(&format!("no port: {e}"));
            port::idle()
        }
    };
    port::wait_for_host(&port);
    serve(port, fixed)
}

fn send(port: &mut File, frame: Frame) {
    let _ = port.write_all(&frame.encode());
}

fn ready(version: u32) -> Frame {
    Frame::control(
        0,
        Message::Ready {
            version,
            agent_version: "hostile".into(),
            uptime_ms: 1,
            root_error: None,
        },
    )
}

fn serve(mut port: File, fixed: Option<Mode>) -> ! {
    match fixed {
        Some(Mode::NeverReady) => port::idle(),
        Some(Mode::GarbageAtBoot) => {
            let _ = port.write_all(&port::garbage(4096));
            port::idle()
        }
        Some(Mode::WrongVersion) => send(&mut port, ready(PROTOCOL_VERSION + 1000)),
        Some(Mode::ReadyTwice) => {
            send(&mut port, ready(PROTOCOL_VERSION));
            send(&mut port, ready(PROTOCOL_VERSION));
        }
        Some(Mode::ExitAfterReady) => {
            send(&mut port, ready(PROTOCOL_VERSION));
            std::thread::sleep(Duration::from_millis(200));
            // PID 1 exiting panics the kernel; with panic=-1 and -no-reboot the VM ends.
            std::process::exit(0);
        }
        Some(Mode::SilentAfterReady) => {
            send(&mut port, ready(PROTOCOL_VERSION));
            port::idle()
        }
        _ => send(&mut port, ready(PROTOCOL_VERSION)),
    }
    let mut mode = fixed.unwrap_or(Mode::Polite);
    let mut reader = std::io::BufReader::new(match port.try_clone() {
        Ok(r) => r,
        Err(_) => port::idle(),
    });
    loop {
        let frame = match Frame::read_from(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                // The host went away; a real agent would wait for it to come back.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                log(&format!("reading: {e}"));
                port::idle()
            }
        };
        let ch = frame.channel;
        let Body::Control(message) = frame.body else {
            continue;
        };
        match message {
            Message::Configure(setup) => {
                if fixed.is_none() {
                    mode = Mode::from_hostname(&setup.hostname);
                    log(&format!("hostname {:?}: mode {mode:?}", setup.hostname));
                }
                send(&mut port, Frame::control(ch, Message::Done));
            }
            Message::Ping => send(&mut port, Frame::control(ch, Message::Pong)),
            Message::Metrics if mode == Mode::MetricsSilent => {}
            Message::Metrics => send(
                &mut port,
                Frame::control(
                    ch,
                    Message::MetricsReport(GuestMetrics {
                        cpu_percent: 1.0,
                        memory_total_bytes: 1 << 28,
                        memory_used_bytes: 1 << 20,
                        disk_total_bytes: 1 << 30,
                        disk_used_bytes: 1 << 20,
                        uptime_ms: 1,
                    }),
                ),
            ),
            Message::CopyIn { .. } | Message::CopyOut { .. } if mode == Mode::CopySilent => {}
            Message::CopyIn { .. } | Message::CopyOut { .. } => send(
                &mut port,
                Frame::control(
                    ch,
                    Message::Error {
                        kind: boxlite_proto::ErrorKind::Unsupported,
                        message: "the hostile agent copies nothing".into(),
                    },
                ),
            ),
            Message::Shutdown => {
                send(&mut port, Frame::control(ch, Message::Done));
                port::power_off()
            }
            // `hang` starts and never ends (a pending call); `misbehave` gets the mode's
            // misbehaviour; anything else is run politely.
            Message::Exec(request) if request.program == "hang" => send(
                &mut port,
                Frame::control(ch, Message::Started { pid: 1000 + ch }),
            ),
            Message::Exec(request) if request.program == "misbehave" => {
                misbehave(&mut port, ch, mode, &request)
            }
            Message::Exec(request) => misbehave(&mut port, ch, Mode::Polite, &request),
            _ => {}
        }
    }
}

/// What an exec gets in `mode`.
fn misbehave(port: &mut File, ch: u32, mode: Mode, request: &boxlite_proto::ExecRequest) {
    let started = Frame::control(ch, Message::Started { pid: 1000 + ch });
    match mode {
        Mode::Polite | Mode::MetricsSilent | Mode::CopySilent => {
            send(port, started);
            if request.program == "echo" {
                let mut line = request.args.join(" ").into_bytes();
                line.push(b'\n');
                send(port, Frame::data(ch, StreamId::Stdout, line));
            }
            send(port, Frame::eof(ch, StreamId::Stdout));
            send(port, Frame::eof(ch, StreamId::Stderr));
            let exit = ExitStatus {
                code: Some(0),
                signal: None,
                timed_out: false,
                trace: None,
            };
            send(port, Frame::control(ch, Message::Exited(exit)));
        }
        Mode::Garbage => {
            send(port, started);
            let _ = port.write_all(&port::garbage(4096));
        }
        Mode::OversizedHeader => {
            let mut head = [0u8; boxlite_proto::HEADER_LEN];
            head[..4].copy_from_slice(&u32::MAX.to_be_bytes());
            head[4..8].copy_from_slice(&ch.to_be_bytes());
            let _ = port.write_all(&head);
            let _ = port.write_all(&port::garbage(4096));
        }
        Mode::ForgedId => {
            // The reply of a request that was never made.
            let exit = ExitStatus {
                code: Some(0),
                signal: None,
                timed_out: false,
                trace: None,
            };
            send(port, Frame::control(ch + 1000, Message::Exited(exit)));
        }
        Mode::Flood => {
            send(port, started);
            // Four windows of output without waiting for credit.
            let chunk = vec![b'x'; boxlite_proto::MAX_DATA_CHUNK];
            for _ in 0..(4 * boxlite_proto::STREAM_WINDOW as usize / chunk.len()) {
                send(port, Frame::data(ch, StreamId::Stdout, chunk.clone()));
            }
        }
        Mode::ControlFlood => {
            send(port, started);
            for _ in 0..10_000 {
                send(port, Frame::control(ch, Message::Started { pid: 1 }));
            }
        }
        Mode::BadCredit => {
            send(port, started);
            send(port, Frame::credit(ch, StreamId::Stdin, u32::MAX));
        }
        Mode::ReadyAgain => send(port, ready(PROTOCOL_VERSION)),
        Mode::Freeze => {
            log("freezing");
            port::idle()
        }
        // Keeps answering pings, never answers this exec.
        Mode::ExecNoStart => {}
        // Starts it and never reports its end, its timeout ignored.
        Mode::ExecNoExit => send(port, started),
        // Never here: these misbehave before the first request.
        Mode::NeverReady
        | Mode::GarbageAtBoot
        | Mode::WrongVersion
        | Mode::ReadyTwice
        | Mode::ExitAfterReady
        | Mode::SilentAfterReady => {}
    }
}
