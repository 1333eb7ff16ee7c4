/* The boot floor's /init: print how long the kernel took to get here, then power off.
 *
 * Freestanding (no libc) so the initramfs stays a few KiB: built with
 *   gcc -static -nostdlib -Os -fno-stack-protector -o init floor_init.c
 * It writes one line to the console (fd 1, the serial port):
 *   BOXLITE-FLOOR boottime_ns=<CLOCK_BOOTTIME> monotonic_ns=<CLOCK_MONOTONIC>
 * and calls reboot(RB_POWER_OFF); with -no-reboot QEMU then exits.
 */
typedef long i64;

static i64 sys3(i64 n, i64 a, i64 b, i64 c) {
    i64 ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

static i64 sys4(i64 n, i64 a, i64 b, i64 c, i64 d) {
    i64 ret;
    register i64 r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return ret;
}

struct timespec_ { i64 sec; i64 nsec; };

#define SYS_write 1
#define SYS_clock_gettime 228
#define SYS_reboot 169
#define SYS_exit 60
#define CLOCK_MONOTONIC 1
#define CLOCK_BOOTTIME 7

static char *put_str(char *p, const char *s) {
    while (*s) *p++ = *s++;
    return p;
}

static char *put_num(char *p, i64 v) {
    char tmp[24];
    int n = 0;
    if (v == 0) tmp[n++] = '0';
    while (v > 0) { tmp[n++] = (char)('0' + v % 10); v /= 10; }
    while (n > 0) *p++ = tmp[--n];
    return p;
}

void _start(void) {
    struct timespec_ boot, mono;
    sys3(SYS_clock_gettime, CLOCK_BOOTTIME, (i64)&boot, 0);
    sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (i64)&mono, 0);
    char buf[128];
    char *p = buf;
    p = put_str(p, "BOXLITE-FLOOR boottime_ns=");
    p = put_num(p, boot.sec * 1000000000L + boot.nsec);
    p = put_str(p, " monotonic_ns=");
    p = put_num(p, mono.sec * 1000000000L + mono.nsec);
    *p++ = '\n';
    sys3(SYS_write, 1, (i64)buf, p - buf);
    /* LINUX_REBOOT_MAGIC1, MAGIC2, LINUX_REBOOT_CMD_POWER_OFF */
    sys4(SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc, 0);
    for (;;) sys3(SYS_exit, 0, 0, 0);
}
