"""User commands do not own the agent (issue 16, "Confinement", the guest): they run in the box's
own pid, mount and ipc namespaces under the box init, with Docker's default capabilities, a /dev
without the agent's port or disks, read-only /sys and /proc/sys, and a seccomp filter like
Docker's. Real VMs; one python box serves most of the module (see docs/architecture.md, "Exec")."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import run
from testkit.images import python_layout

# Docker's default capability set: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID,
# SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
DOCKER_CAPS = "00000000a80425fb"
NO_CAPS = "0000000000000000"


@pytest.fixture(scope="module")
def pybox(shared_runtime: boxlite.Boxlite) -> Iterator[boxlite.Box]:
    """A running box of the python stand-in (python3, getent, busybox)."""
    options = boxlite.BoxOptions(rootfs_path=python_layout(), cpus=1, memory_mib=256)
    box = asyncio.run(shared_runtime.create(options))
    yield box
    asyncio.run(box.stop())


# A ctypes prelude: libc with errno, and `call(fn, *args)` giving (result, errno name).
CTYPES = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    ctypes.set_errno(0)
    r = fn(*args)
    return r, errno.errorcode.get(ctypes.get_errno(), "0")
"""


async def sh(box: boxlite.Box, script: str, **kwargs: object) -> boxlite.ExecResult:
    return await run(box, "sh", "-c", script, **kwargs)


async def py(box: boxlite.Box, code: str, libc: bool = False, **kwargs: object) -> boxlite.ExecResult:
    """Runs python3 code in the box (after the ctypes prelude with ``libc``); it must succeed."""
    source = (CTYPES if libc else "") + textwrap.dedent(code)
    result = await run(box, "python3", "-B", "-c", source, **kwargs)
    assert result.exit_code == 0, result.stderr
    return result


def status_fields(text: str) -> dict[str, str]:
    """The fields of a /proc/<pid>/status."""
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


async def test_dev_has_no_agent_port_disks_or_memory(pybox: boxlite.Box) -> None:
    vport = await sh(pybox, "ls /dev/vport*")
    assert vport.exit_code != 0 and vport.stdout == ""
    names = set((await run(pybox, "ls", "-A", "/dev")).stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm"} <= names
    assert {"fd", "stdin", "stdout", "stderr"} <= names
    forbidden = {n for n in names if n.startswith(("vport", "vd", "hvc", "ttyS", "virtio", "loop", "sd"))}
    forbidden |= names & {"mem", "kmem", "port", "kmsg", "console", "disk", "block", "char", "cpu", "input"}
    assert not forbidden, sorted(names)
    # The whole tree, not just the top: the only character devices are the six above and ptys.
    chars = (await sh(pybox, "find /dev -type c")).stdout.split()
    assert all(
        c in {f"/dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty")} or c.startswith("/dev/pts/")
        for c in chars
    ), chars
    assert (await sh(pybox, "find /dev -type b")).stdout == ""
    # And they work.
    io = await sh(pybox, "head -c 4 /dev/zero | od -An -tx1; head -c 8 /dev/urandom | wc -c; echo x >/dev/null")
    assert io.exit_code == 0 and io.stdout.split() == ["00", "00", "00", "00", "8"]


async def test_device_nodes_made_in_the_box_cannot_be_opened(pybox: boxlite.Box) -> None:
    # CAP_MKNOD is in Docker's set, so mknod works; what Docker's devices cgroup refuses, nodev
    # mounts refuse here: the box disk (254:0 is its virtio disk) and a node made in /dev.
    made = await sh(
        pybox,
        "mknod /root/disk b 254 0 && mknod /dev/disk2 b 254 0 && mknod /root/mem c 1 1 && echo made;"
        "for f in /root/disk /dev/disk2 /root/mem; do head -c 1 $f >/dev/null 2>&1 && echo OPENED $f; done;"
        "rm -f /root/disk /dev/disk2 /root/mem",
    )
    assert made.stdout == "made\n", made


async def test_pid_1_is_the_box_init_and_the_agent_is_invisible(pybox: boxlite.Box) -> None:
    cmdline = await run(pybox, "cat", "/proc/1/cmdline")
    assert cmdline.stdout == "boxlite-init\0"
    result = await py(
        pybox,
        """
        import os
        for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                print(pid, f.read().replace(b"\\0", b" ").decode().strip())
        """,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "1 boxlite-init"
    assert any("python3" in line for line in lines[1:]), lines
    # No agent (the kernel runs it as /init), no tar helper, no kernel threads (no command line).
    assert not any(line.endswith(" /init") or "__boxlite_tar" in line for line in lines), lines
    assert all(len(line.split()) > 1 for line in lines), lines


async def test_ptrace_reaches_only_the_box(pybox: boxlite.Box) -> None:
    result = await py(
        pybox,
        libc=True,
        code="""
        PTRACE_ATTACH, PTRACE_DETACH = 16, 17
        print("init", *call(libc.ptrace, PTRACE_ATTACH, 1, 0, 0))
        for path in ("/proc/1/root/", "/proc/1/environ", "/proc/1/mem"):
            try:
                open(path, "rb").close() if not path.endswith("/") else os.listdir(path)
                print(path, "readable")
            except PermissionError:
                print(path, "EACCES")
        # A process of the box's own can be traced (debuggers work in a box).
        child = os.fork()
        if child == 0:
            import time
            time.sleep(10)
            os._exit(0)
        print("child", *call(libc.ptrace, PTRACE_ATTACH, child, 0, 0))
        os.kill(child, 9)
        os.waitpid(child, 0)
        """,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "init -1 EPERM"
    assert lines[1:4] == ["/proc/1/root/ EACCES", "/proc/1/environ EACCES", "/proc/1/mem EACCES"]
    assert lines[4] == "child 0 0"


async def test_root_has_dockers_default_capabilities_and_seccomp(pybox: boxlite.Box) -> None:
    status = status_fields((await run(pybox, "cat", "/proc/self/status")).stdout)
    assert status["CapEff"] == DOCKER_CAPS
    assert status["CapPrm"] == DOCKER_CAPS
    assert status["CapBnd"] == DOCKER_CAPS
    assert (status["CapInh"], status["CapAmb"]) == (NO_CAPS, NO_CAPS)
    # Seccomp filter mode, and no no_new_privs: setuid programs work as in Docker.
    assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "0")


async def test_advanced_options_change_capabilities_seccomp_and_limits(
    shared_runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    """The published `AdvancedBoxOptions`: capabilities added and dropped, seccomp off, and the
    `max_*` limits as resource limits of every command."""
    advanced = boxlite.AdvancedBoxOptions(
        security=boxlite.SecurityOptions(
            seccomp_enabled=False, max_open_files=64, max_processes=40, max_file_size=1 << 20
        ),
        capabilities=boxlite.ContainerCapabilities(add=["net_admin"], drop=["CAP_CHOWN", "kill"]),
    )
    box = await shared_runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, advanced=advanced))
    try:
        status = status_fields((await run(box, "cat", "/proc/self/status")).stdout)
        caps = int(status["CapBnd"], 16)
        chown, kill, net_admin = 1 << 0, 1 << 5, 1 << 12
        assert caps == (int(DOCKER_CAPS, 16) | net_admin) & ~chown & ~kill, status["CapBnd"]
        assert status["CapEff"] == status["CapBnd"]
        assert status["Seccomp"] == "0"
        limits = await sh(box, "ulimit -n; ulimit -u; ulimit -f")
        assert limits.stdout.split() == ["64", "40", "2048"]  # -f counts 512-byte blocks
        big = await sh(box, "dd if=/dev/zero of=/big bs=1M count=2 2>/dev/null; wc -c </big")
        assert big.stdout.split() == ["1048576"], big  # dd stopped at the file size limit
        assert (await sh(box, "touch /x && chown 1:1 /x")).exit_code != 0
    finally:
        await box.stop()


async def test_a_normal_user_is_confined_the_same_way(pybox: boxlite.Box) -> None:
    status = status_fields((await run(pybox, "cat", "/proc/self/status", user="1000")).stdout)
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == (NO_CAPS, NO_CAPS, DOCKER_CAPS)
    assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "0")
    probe = await sh(
        pybox,
        "id -u; ls /dev/vport* 2>&1 >/dev/null | wc -l; tr -d '\\0' </proc/1/cmdline; echo;"
        "mount -t tmpfs none /tmp 2>/dev/null && echo MOUNTED; ps -o args= | head -1",
        user="1000",
    )
    assert probe.stdout.split() == ["1000", "1", "boxlite-init", "boxlite-init"], probe


async def test_seccomp_refuses_the_kernel_interfaces(pybox: boxlite.Box) -> None:
    result = await py(
        pybox,
        libc=True,
        code="""
        nr = {"init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
              "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248, "userfaultfd": 323,
              "open_by_handle_at": 304, "iopl": 172, "acct": 163, "settimeofday": 164, "syslog": 103,
              "swapon": 167, "io_uring_setup": 425, "clone3": 435}
        for name, n in nr.items():
            print(name, call(libc.syscall, n, 0, 0, 0, 0, 0)[1])
        print("unshare-user", call(libc.unshare, 0x10000000)[1])
        print("unshare-ns", call(libc.unshare, 0x20000)[1])
        print("personality-query", call(libc.personality, 0xFFFFFFFF)[1])
        print("personality-exec", call(libc.personality, 0x0400000)[1])
        """,
    )
    got = dict(line.split() for line in result.stdout.splitlines())
    expected = {name: "EPERM" for name in got} | {"clone3": "ENOSYS", "personality-query": "0"}
    assert got == expected


async def test_mounts_are_refused(pybox: boxlite.Box) -> None:
    before = (await run(pybox, "cat", "/proc/self/mountinfo")).stdout
    result = await sh(pybox, "mkdir -p /mnt; mount -t tmpfs none /mnt; echo rc=$?")
    assert "rc=0" not in result.stdout
    assert (await run(pybox, "cat", "/proc/self/mountinfo")).stdout == before
    # The box's root is the box disk, its /dev and /dev/shm are nodev, /sys is read-only.
    mounts = {fields[4]: fields[5] for fields in (line.split() for line in before.splitlines())}
    assert "nodev" in mounts["/"].split(",") and "nodev" in mounts["/dev"].split(",")
    assert mounts["/sys"].split(",")[0] == "ro"
    assert mounts["/proc/sys"].split(",")[0] == "ro"


async def test_drivers_sysctls_and_sysrq_are_read_only(pybox: boxlite.Box) -> None:
    unbind = await sh(
        pybox,
        "n=0; for f in /sys/bus/*/drivers/*/unbind; do n=$((n+1)); echo x 2>/dev/null >$f && echo WROTE $f; done;"
        "echo files=$n",
    )
    assert "WROTE" not in unbind.stdout
    assert int(unbind.stdout.split("files=")[1]) > 5
    assert "virtio_console" in (await sh(pybox, "ls /sys/bus/virtio/drivers")).stdout
    writes = await sh(
        pybox,
        "echo '|/tmp/x' >/proc/sys/kernel/core_pattern && echo CORE;"
        "echo /tmp/x >/proc/sys/kernel/modprobe && echo MODPROBE;"
        "echo b >/proc/sysrq-trigger && echo SYSRQ;"
        "head -c 1 /proc/kcore | wc -c",
    )
    assert writes.stdout.split() == ["0"], writes


async def test_reboot_fails_and_the_box_keeps_running(pybox: boxlite.Box) -> None:
    forced = await sh(pybox, "reboot -f; echo rc=$?")
    assert "rc=0" not in forced.stdout
    await sh(pybox, "reboot; poweroff; halt; kill -9 1; kill -TERM 1; sleep 1")
    direct = await py(pybox, "print(*call(libc.reboot, 0x01234567))", libc=True)
    assert direct.stdout.split() == ["-1", "EPERM"]
    after = await run(pybox, "cat", "/proc/1/cmdline")
    assert (after.exit_code, after.stdout) == (0, "boxlite-init\0")


async def test_modules_cannot_be_loaded(pybox: boxlite.Box) -> None:
    result = await sh(
        pybox,
        "head -c 64 /dev/zero >/tmp/fake.ko; busybox insmod /tmp/fake.ko; echo insmod=$?;"
        "busybox modprobe dummy; echo modprobe=$?; busybox rmmod virtio_console; echo rmmod=$?",
    )
    assert "insmod=0" not in result.stdout and "modprobe=0" not in result.stdout
    assert "rmmod=0" not in result.stdout
    direct = await py(
        pybox,
        "fd = os.open('/tmp/fake.ko', os.O_RDONLY)\nprint(*call(libc.syscall, 313, fd, b'', 0))",
        libc=True,
    )
    assert direct.stdout.split() == ["-1", "EPERM"]


async def test_chroot_leads_nowhere_outside_the_box(pybox: boxlite.Box) -> None:
    # CAP_SYS_CHROOT is in Docker's set; the classic escape must end in the box's own root.
    result = await py(
        pybox,
        """
        import os
        before = sorted(os.listdir("/"))
        os.makedirs("/tmp/jail", exist_ok=True)
        os.chroot("/tmp/jail")
        for _ in range(20):
            os.chdir("..")
        os.chroot(".")
        after = sorted(os.listdir("/"))
        print(before == after, "rootfs" in after, "init" in after)
        """,
    )
    assert result.stdout.split() == ["True", "False", "False"]


async def test_processes_of_two_execs_see_and_signal_each_other(pybox: boxlite.Box) -> None:
    sleeper = await pybox.exec("sleep", ["300"])
    seen = await sh(pybox, "ps -o pid,args")
    pids = [line.split()[0] for line in seen.stdout.splitlines() if line.split()[1:] == ["sleep", "300"]]
    # The exec's pid is the one the box knows it by.
    assert pids == [str(sleeper.pid)], seen.stdout
    killed = await sh(pybox, f"kill -TERM {sleeper.pid}; echo rc=$?")
    assert killed.stdout == "rc=0\n"
    result = await sleeper.wait()
    assert result.signal == 15
    # The box's ipc and mount namespaces are shared too: one exec's /dev/shm is the next one's.
    await sh(pybox, "echo shared >/dev/shm/mark")
    assert (await run(pybox, "cat", "/dev/shm/mark")).stdout == "shared\n"


async def test_orphans_are_reaped_by_the_box_init(pybox: boxlite.Box) -> None:
    orphan = await sh(pybox, "sh -c 'sleep 100 >/dev/null 2>&1 & echo $!'")
    pid = orphan.stdout.strip()
    ppid = (await sh(pybox, f"ps -o pid,ppid | awk '$1 == {pid} {{print $2}}'")).stdout.strip()
    assert ppid == "1"
    await sh(pybox, f"kill {pid}")
    many = await sh(pybox, "for i in $(seq 50); do sh -c 'sleep 0.1 &'; done; sleep 2; ps -o stat,args")
    states = [line.split()[0] for line in many.stdout.splitlines()[1:]]
    assert states and not [s for s in states if s.startswith("Z")], many.stdout
    assert f" {pid} " not in (await sh(pybox, "ps -o pid,args")).stdout


async def test_timeouts_kills_and_ttys_still_work(pybox: boxlite.Box) -> None:
    ex = await pybox.exec("sh", ["-c", "sleep 200 & sleep 201"], timeout_secs=1)
    with pytest.raises(boxlite.ExecTimeoutError):
        await ex.wait()
    # The whole process group went, the background sleep included.
    assert "sleep 20" not in (await sh(pybox, "ps -o args")).stdout
    ex = await pybox.exec("sleep", ["30"])
    ex.kill()
    assert (await ex.wait()).signal == 9
    term = await pybox.exec("sh", ["-c", "tty; test -c $(tty) && echo char"], tty=True)
    out = (await term.wait()).stdout.replace("\r", "").split()
    assert out[0].startswith("/dev/pts/") and out[1] == "char"


async def test_setuid_programs_work_within_the_bounding_set(pybox: boxlite.Box) -> None:
    # No no_new_privs: a setuid-root program run by a user becomes root, but only with
    # Docker's set (the bounding set caps what the file's setuid bit grants).
    await sh(pybox, 'cp "$(readlink -f "$(command -v python3)")" /tmp/suidpy && chmod 4755 /tmp/suidpy')
    show = "print(open('/proc/self/status').read())"
    status = status_fields((await run(pybox, "/tmp/suidpy", "-c", show, user="1000")).stdout)
    assert status["Uid"].split()[:2] == ["1000", "0"]
    assert (status["CapEff"], status["CapBnd"]) == (DOCKER_CAPS, DOCKER_CAPS)


async def test_copies_still_see_the_box_disk(pybox: boxlite.Box, tmp_path: Path) -> None:
    # Copies run in the agent's own chrooted helper, outside the box's namespaces: the box's
    # files, with their owners, exactly as before.
    await sh(pybox, "mkdir -p /srv/c && echo hello >/srv/c/f && chown 1000:1000 /srv/c/f")
    assert await pybox.read_file("/srv/c/f") == b"hello\n"
    await pybox.write_file("/srv/c/g", b"from host\n")
    check = await sh(pybox, "cat /srv/c/g; stat -c '%u %g' /srv/c/f")
    assert check.stdout == "from host\n1000 1000\n"


async def test_shutdown_stops_the_box_init_and_keeps_the_disk_clean(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    box = await runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, auto_remove=False))
    await sh(box, "sh -c 'trap \"\" TERM; sleep 1000' & sleep 1000 & echo kept >/root/mark; sync")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await box.stop()
    # SIGTERM, a 2 s grace for the process that ignores it, then SIGKILL (the box init with it).
    assert loop.time() - started < 20
    await box.start()
    again = await sh(box, "cat /root/mark; tr -d '\\0' </proc/1/cmdline; echo; ps -o args | grep -c '[s]leep 1000'")
    assert again.stdout.split() == ["kept", "boxlite-init", "0"], again
    await box.stop()
