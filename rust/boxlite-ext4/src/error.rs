use std::io;

/// Why an image could not be built. `layer` is the 0-based index of the layer in the order given.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ext4Error {
    /// The caller's layer reader failed (for example its digest check at the end of the stream).
    #[error("reading layer {layer}: {source}")]
    Read {
        layer: usize,
        #[source]
        source: io::Error,
    },
    /// The layer is not a well-formed tar stream.
    #[error("layer {layer}: malformed tar at byte {offset}: {reason}")]
    Tar {
        layer: usize,
        offset: u64,
        reason: String,
    },
    /// The layer ends inside an entry (its header, extensions or data).
    #[error("layer {layer}: the tar stream ends inside entry {entry:?}")]
    Truncated { layer: usize, entry: String },
    /// An entry OCI semantics refuse: a name with `..` or an absolute name, a hard link to
    /// nothing or to a directory, a path through a regular file, a bad uid or xattr...
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Entry {
        layer: usize,
        entry: String,
        reason: String,
    },
    /// Valid tar this writer does not handle (PAX-format sparse files).
    #[error("layer {layer}: entry {entry:?}: unsupported: {what}")]
    Unsupported {
        layer: usize,
        entry: String,
        what: String,
    },
    /// The content does not fit into the requested image size.
    #[error("the image needs more than the {size} bytes requested (at least {needed})")]
    NoSpace { size: u64, needed: u64 },
    /// Beyond what this writer produces (a filesystem over 1 TiB, a file over 16 TiB...).
    #[error("too large: {0}")]
    TooLarge(String),
    /// Bad [`crate::BuildOptions`].
    #[error("invalid build options: {0}")]
    Options(String),
    /// Writing the output image failed.
    #[error("writing the image: {0}")]
    Write(#[source] io::Error),
}
