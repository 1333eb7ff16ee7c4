//! ext4's checksums: CRC32C without the final inversion, seeded per object.

/// The kernel's `crc32c(seed, data)`: the raw register, not the finished CRC.
pub(crate) fn crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Seed of one inode's checksums (inode, extent blocks, directory blocks).
pub(crate) fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    let s = crc32c(fs_seed, &ino.to_le_bytes());
    crc32c(s, &generation.to_le_bytes())
}
