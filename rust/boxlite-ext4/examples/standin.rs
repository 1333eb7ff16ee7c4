//! Builds an ext4 image from an OCI image layout's layers and times it against
//! `umoci unpack` of the same layout.
//!
//! `cargo run --release -p boxlite-ext4 --example standin [LAYOUT] [TAG]`; the default
//! layout is the python stand-in under `build/test-images` (made by
//! `python3 tests/images/build.py build/test-images`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

/// Reads what a decompressing thread sends: layers are inflated in parallel while the
/// builder consumes them in order, with a bounded amount in flight.
struct ChannelReader {
    rx: Receiver<std::io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(c)) => {
                    self.chunk = c;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn inflate(path: PathBuf, gzip: bool) -> ChannelReader {
    let (tx, rx) = sync_channel(16);
    std::thread::spawn(move || {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut r: Box<dyn Read> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(
                std::io::BufReader::with_capacity(1 << 20, file),
            ))
        } else {
            Box::new(file)
        };
        loop {
            let mut chunk = vec![0u8; 256 * 1024];
            match r.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.send(Ok(chunk)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    ChannelReader {
        rx,
        chunk: Vec::new(),
        at: 0,
    }
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The layers (blob path, gzip?) of `tag` in an OCI layout.
pub fn layers(layout: &Path, tag: &str) -> Vec<(PathBuf, bool)> {
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index = json(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let entry = manifests
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .or(manifests.first())
        .expect("no manifest");
    let manifest = json(&blob(entry["digest"].as_str().unwrap_or_default()));
    manifest["layers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| {
            let media = l["mediaType"].as_str().unwrap_or_default();
            (
                blob(l["digest"].as_str().unwrap_or_default()),
                media.ends_with("gzip"),
            )
        })
        .collect()
}

fn default_layout() -> Option<(PathBuf, &'static str)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/test-images");
    for entry in std::fs::read_dir(root).ok()? {
        let p = entry.ok()?.path().join("python");
        if p.join("index.json").is_file() {
            return Some((p, "slim"));
        }
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (layout, tag) = match args.first() {
        Some(l) => (
            PathBuf::from(l),
            args.get(1).cloned().unwrap_or_else(|| "latest".into()),
        ),
        None => {
            let (l, t) = default_layout()
                .expect("no layout given and no python stand-in in build/test-images");
            (l, t.to_string())
        }
    };
    let layers = layers(&layout, &tag);
    let runs = 5;
    let mut ours = Vec::new();
    let mut serial = Vec::new();
    let mut theirs = Vec::new();
    let mut report = None;
    for _ in 0..runs {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp.path().join("base.ext4"))
            .expect("image file");
        let started = Instant::now();
        let readers: Vec<ChannelReader> = layers
            .iter()
            .map(|(p, gz)| inflate(p.clone(), *gz))
            .collect();
        let r = boxlite_ext4::build(readers, &out, &boxlite_ext4::BuildOptions::default())
            .expect("build");
        out.sync_all().expect("sync");
        ours.push(started.elapsed().as_secs_f64() * 1000.0);
        report = Some(r);

        // The same with each layer inflated on the building thread, as one reader per layer
        // handed over in turn would do.
        let out2 = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp.path().join("serial.ext4"))
            .expect("image file");
        let started = Instant::now();
        let readers = layers.iter().map(|(p, gz)| -> Box<dyn Read> {
            let f = std::io::BufReader::with_capacity(1 << 20, File::open(p).expect("layer"));
            if *gz {
                Box::new(flate2::read::MultiGzDecoder::new(f))
            } else {
                Box::new(f)
            }
        });
        boxlite_ext4::build(readers, &out2, &boxlite_ext4::BuildOptions::default()).expect("build");
        out2.sync_all().expect("sync");
        serial.push(started.elapsed().as_secs_f64() * 1000.0);

        let bundle = tmp.path().join("bundle");
        let mut cmd = Command::new("umoci");
        cmd.arg("unpack");
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            cmd.arg("--rootless");
        }
        cmd.arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle);
        let started = Instant::now();
        let ok = cmd.output().map(|o| o.status.success()).unwrap_or(false);
        if ok {
            theirs.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    };
    let ours_ms = median(&mut ours).unwrap_or(0.0);
    println!("layout: {} ({} layers)", layout.display(), layers.len());
    println!("report: {report:?}");
    println!("boxlite-ext4 build, layers inflated in parallel threads: median {ours_ms:.0} ms over {runs} runs {ours:.0?}");
    let serial_ms = median(&mut serial).unwrap_or(0.0);
    println!("boxlite-ext4 build, layers inflated on the building thread: median {serial_ms:.0} ms {serial:.0?}");
    match median(&mut theirs) {
        Some(t) => println!(
            "umoci unpack: median {t:.0} ms {theirs:.0?}\nratio: {:.2}x parallel, {:.2}x serial (target <= 2x)",
            ours_ms / t,
            serial_ms / t
        ),
        None => println!("umoci unpack: not available"),
    }
}
