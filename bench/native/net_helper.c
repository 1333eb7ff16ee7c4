/* The guest side of the network figures: runs in the bench's network VM (bench/network.py),
 * after its /init configured eth0, and prints its results on the console.
 *
 *   net_helper download IP PORT PATH
 *       GET PATH over HTTP/1.0 from IP:PORT; reads the whole body into a 256 KiB buffer,
 *       checks every byte against the bench server's pattern (the little-endian 64-bit word
 *       at body offset k, k a multiple of 8, is k ^ PATTERN_KEY) and that the body is
 *       Content-Length long. Prints
 *       BOXLITE-NET download bytes=N ns=T connect_ns=C first_byte_ns=F ok=1|0
 *       where T runs from before connect() to the last byte, timed with CLOCK_MONOTONIC.
 *   net_helper connect IP PORT N
 *       N times: socket(), connect() timed, close(). Prints
 *       BOXLITE-NET connect ns=T1,T2,...,TN ok=1|0
 *
 * Built static (gcc -static -O2) by the bench.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PATTERN_KEY 0x5a17c0deb0c5f00dULL
#define BUFFER (256 * 1024)

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int connect_to(const char *ip, int port) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
        fprintf(stderr, "net_helper: bad address %s\n", ip);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("net_helper: socket");
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "net_helper: connect %s:%d: %s\n", ip, port, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* Checks body bytes [off, off + len) against the pattern. */
static int check(const unsigned char *p, uint64_t off, size_t len) {
    size_t i = 0;
    /* The unaligned head, byte by byte. */
    while (i < len && (off + i) % 8 != 0) {
        uint64_t word_at = (off + i) & ~7ULL;
        uint64_t word = word_at ^ PATTERN_KEY;
        if (p[i] != (unsigned char)(word >> (8 * ((off + i) - word_at)))) return 0;
        i++;
    }
    /* Whole words. */
    for (; i + 8 <= len; i += 8) {
        uint64_t got;
        memcpy(&got, p + i, 8);
        if (got != ((off + i) ^ PATTERN_KEY)) return 0;
    }
    /* The tail. */
    for (; i < len; i++) {
        uint64_t word_at = (off + i) & ~7ULL;
        uint64_t word = word_at ^ PATTERN_KEY;
        if (p[i] != (unsigned char)(word >> (8 * ((off + i) - word_at)))) return 0;
    }
    return 1;
}

static int download(const char *ip, int port, const char *path) {
    static unsigned char buf[BUFFER];
    long long t0 = now_ns();
    int fd = connect_to(ip, port);
    if (fd < 0) return 1;
    long long t_conn = now_ns();
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, ip);
    if (write(fd, req, (size_t)n) != n) {
        perror("net_helper: write");
        return 1;
    }
    /* The header, then the body. */
    size_t have = 0;
    long long t_first = 0;
    unsigned char *body = NULL;
    while (body == NULL) {
        ssize_t r = read(fd, buf + have, sizeof buf - have - 1);
        if (r <= 0) {
            fprintf(stderr, "net_helper: the response ended in its header\n");
            return 1;
        }
        if (t_first == 0) t_first = now_ns();
        have += (size_t)r;
        buf[have] = 0;
        char *end = strstr((char *)buf, "\r\n\r\n");
        if (end) body = (unsigned char *)end + 4;
        else if (have >= sizeof buf - 1) {
            fprintf(stderr, "net_helper: header too long\n");
            return 1;
        }
    }
    const char *cl = strstr((char *)buf, "Content-Length:");
    long long expected = cl ? atoll(cl + 15) : -1;
    uint64_t got = 0;
    int ok = 1;
    size_t first = have - (size_t)(body - buf);
    if (first > 0) {
        ok &= check(body, 0, first);
        got += first;
    }
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("net_helper: read");
            ok = 0;
            break;
        }
        if (r == 0) break;
        ok &= check(buf, got, (size_t)r);
        got += (uint64_t)r;
    }
    long long t1 = now_ns();
    close(fd);
    if (expected < 0 || (uint64_t)expected != got) ok = 0;
    printf("BOXLITE-NET download bytes=%llu ns=%lld connect_ns=%lld first_byte_ns=%lld expected=%lld ok=%d\n",
           (unsigned long long)got, t1 - t0, t_conn - t0, t_first - t0, expected, ok);
    fflush(stdout);
    return ok ? 0 : 1;
}

static int connects(const char *ip, int port, long count) {
    long long *ns = calloc((size_t)count, sizeof *ns);
    int ok = 1;
    long done = 0;
    for (; done < count; done++) {
        struct sockaddr_in addr;
        memset(&addr, 0, sizeof addr);
        addr.sin_family = AF_INET;
        addr.sin_port = htons((uint16_t)port);
        inet_pton(AF_INET, ip, &addr.sin_addr);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            perror("net_helper: socket");
            ok = 0;
            break;
        }
        long long t0 = now_ns();
        int rc = connect(fd, (struct sockaddr *)&addr, sizeof addr);
        long long t1 = now_ns();
        if (rc < 0) {
            fprintf(stderr, "net_helper: connect %ld to %s:%d: %s\n", done, ip, port, strerror(errno));
            close(fd);
            ok = 0;
            break;
        }
        ns[done] = t1 - t0;
        close(fd);
    }
    printf("BOXLITE-NET connect ns=");
    for (long i = 0; i < done; i++) printf(i ? ",%lld" : "%lld", ns[i]);
    printf(" ok=%d\n", ok);
    fflush(stdout);
    free(ns);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    if (argc == 5 && strcmp(argv[1], "download") == 0) return download(argv[2], atoi(argv[3]), argv[4]);
    if (argc == 5 && strcmp(argv[1], "connect") == 0) return connects(argv[2], atoi(argv[3]), strtol(argv[4], NULL, 10));
    fprintf(stderr, "usage: net_helper download IP PORT PATH | net_helper connect IP PORT N\n");
    return 2;
}
