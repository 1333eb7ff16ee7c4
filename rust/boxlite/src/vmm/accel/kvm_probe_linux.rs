//! One vCPU, 64 KiB of memory, real mode: `mov ecx, N; l: dec ecx; jnz l; hlt`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_CREATE_VM: u64 = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xAE04;
const KVM_CREATE_VCPU: u64 = 0xAE41;
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_AE46;
const KVM_RUN: u64 = 0xAE80;
const KVM_GET_REGS: u64 = 0x8090_AE81;
const KVM_SET_REGS: u64 = 0x4090_AE82;
const KVM_GET_SREGS: u64 = 0x8138_AE83;
const KVM_SET_SREGS: u64 = 0x4138_AE84;
const KVM_EXIT_HLT: u32 = 5;

const MEM_SIZE: usize = 0x10000;
const CODE_AT: usize = 0x1000;

#[repr(C)]
struct UserMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// `struct kvm_regs`: rax..r15, rip, rflags.
#[repr(C)]
#[derive(Default)]
struct Regs {
    gpr: [u64; 16],
    rip: u64,
    rflags: u64,
}

/// `struct kvm_sregs`, only the code segment is touched; the rest is carried opaquely.
#[repr(C)]
struct Sregs {
    cs_base: u64,
    cs_limit: u32,
    cs_selector: u16,
    cs_rest: [u8; 10],
    rest: [u8; 312 - 24],
}

fn ioctl(fd: &impl AsRawFd, request: u64, arg: usize) -> Result<i32, String> {
    // SAFETY: each call passes a request with the argument type the kernel expects.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if ret < 0 {
        Err(format!(
            "ioctl {request:#x}: {}",
            std::io::Error::last_os_error()
        ))
    } else {
        Ok(ret)
    }
}

fn owned(fd: i32) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful ioctl that creates a descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

struct Mapping(*mut libc::c_void, usize);
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by mmap with this length and is unmapped once.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn map(len: usize, fd: Option<&OwnedFd>) -> Result<Mapping, String> {
    let (flags, raw_fd) = match fd {
        Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping; no existing memory is aliased.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            raw_fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(Mapping(ptr, len))
}

pub fn time_loop(steps: u32) -> Result<Duration, String> {
    let kvm = File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("open /dev/kvm: {e}"))?;
    if ioctl(&kvm, KVM_GET_API_VERSION, 0)? != 12 {
        return Err("unexpected KVM API version".into());
    }
    let vm = owned(ioctl(&kvm, KVM_CREATE_VM, 0)?);

    let memory = map(MEM_SIZE, None)?;
    let mut code = vec![0x66, 0xB9];
    code.extend_from_slice(&steps.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xFC, 0xF4]);
    // SAFETY: the mapping is MEM_SIZE bytes and the code fits well inside it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            (memory.0 as *mut u8).add(CODE_AT),
            code.len(),
        )
    };
    let region = UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: memory.0 as u64,
    };
    ioctl(
        &vm,
        KVM_SET_USER_MEMORY_REGION,
        &region as *const _ as usize,
    )?;

    let vcpu = owned(ioctl(&vm, KVM_CREATE_VCPU, 0)?);
    let run_size = ioctl(&kvm, KVM_GET_VCPU_MMAP_SIZE, 0)? as usize;
    let run = map(run_size, Some(&vcpu))?;

    let mut sregs = Sregs {
        cs_base: 0,
        cs_limit: 0,
        cs_selector: 0,
        cs_rest: [0; 10],
        rest: [0; 288],
    };
    ioctl(&vcpu, KVM_GET_SREGS, &mut sregs as *mut _ as usize)?;
    sregs.cs_base = 0;
    sregs.cs_selector = 0;
    ioctl(&vcpu, KVM_SET_SREGS, &sregs as *const _ as usize)?;
    let mut regs = Regs::default();
    ioctl(&vcpu, KVM_GET_REGS, &mut regs as *mut _ as usize)?;
    regs.rip = CODE_AT as u64;
    regs.rflags = 0x2;
    ioctl(&vcpu, KVM_SET_REGS, &regs as *const _ as usize)?;

    let start = Instant::now();
    ioctl(&vcpu, KVM_RUN, 0)?;
    let elapsed = start.elapsed();
    // SAFETY: `struct kvm_run` starts with two u8 and 6 padding bytes, then `exit_reason`.
    let exit_reason = unsafe { std::ptr::read_volatile((run.0 as *const u8).add(8) as *const u32) };
    if exit_reason != KVM_EXIT_HLT {
        return Err(format!(
            "probe guest exited with reason {exit_reason}, not HLT"
        ));
    }
    Ok(elapsed)
}
