// Batched asynchronous reads with Linux native AIO (io_submit / io_getevents) — the disk tier's
// reader for O_DIRECT shard files (kv/tiers/disk_worker.py).
//
// Why not a pool of reader threads: a sparse layer reads a few dozen scattered 12 KiB slots,
// and on a host with few cores every read's thread must be scheduled (and take Python's lock)
// beside the model's own threads; here one call queues every read of a group with the kernel
// and one call waits for them, so no user thread runs while the disk works.
//
// A handle queues reads in *groups* (a batch of a request, a read-ahead): kvo_aio_submit queues
// one group's reads and starts as many as the in-flight limit allows; kvo_aio_wait(group) reaps
// completions (starting queued reads as slots free) until that group is done and returns its
// bytes, or an error. Every submitted group must be waited for exactly once. Not thread-safe:
// one handle per thread that reads.
#define _GNU_SOURCE
#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KVO_AIO_GROUPS 64              // groups outstanding at once
#define KVO_AIO_SHORT (-(1LL << 40))   // kvo_aio_wait: a read returned fewer bytes than asked

typedef struct {
    int64_t buf, len, off;
    int fd, group;
} kvo_read;

typedef struct {
    aio_context_t ctx;
    int capacity;                       // iocbs (the most reads in flight)
    int inflight;
    struct iocb *cbs;                   // [capacity]
    int *free_cb, nfree;                // free iocb indices
    kvo_read *queue;                    // reads not started yet (FIFO)
    int64_t qhead, qtail, qcap;
    int64_t remaining[KVO_AIO_GROUPS];  // per group: reads not completed (-1: group slot free)
    int64_t bytes[KVO_AIO_GROUPS];
    int64_t error[KVO_AIO_GROUPS];      // first error: -errno or KVO_AIO_SHORT; 0 none
    int limit[KVO_AIO_GROUPS];          // per group: its reads in flight at most
    int64_t bad_off[KVO_AIO_GROUPS];    // file offset of the first failed read
} kvo_aio;

static long sys_io_setup(unsigned n, aio_context_t *ctx) { return syscall(SYS_io_setup, n, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **p) { return syscall(SYS_io_submit, ctx, n, p); }
static long sys_io_getevents(aio_context_t ctx, long lo, long hi, struct io_event *ev) {
    return syscall(SYS_io_getevents, ctx, lo, hi, ev, NULL);
}

// A handle for up to `capacity` reads in flight; NULL (*err = errno) when the kernel refuses.
void *kvo_aio_new(int capacity, int *err) {
    kvo_aio *h = calloc(1, sizeof *h);
    *err = ENOMEM;
    if (!h) return NULL;
    h->capacity = capacity;
    h->cbs = calloc((size_t)capacity, sizeof *h->cbs);
    h->free_cb = calloc((size_t)capacity, sizeof *h->free_cb);
    h->qcap = 256;
    h->queue = malloc((size_t)h->qcap * sizeof *h->queue);
    if (!h->cbs || !h->free_cb || !h->queue || sys_io_setup((unsigned)capacity, &h->ctx) < 0) {
        int e = errno;
        free(h->cbs); free(h->free_cb); free(h->queue); free(h);
        *err = e ? e : ENOMEM;
        return NULL;
    }
    for (int i = 0; i < capacity; i++) h->free_cb[i] = i;
    h->nfree = capacity;
    *err = 0;
    for (int g = 0; g < KVO_AIO_GROUPS; g++) h->remaining[g] = -1;
    return h;
}

static int64_t in_flight_of(const kvo_aio *h, int group) {
    int64_t n = 0;
    for (int i = 0; i < h->capacity; i++)
        n += h->cbs[i].aio_data == (uint64_t)(group + 1);
    return n;
}

// Start queued reads while iocbs are free and the head read's group is under its limit.
static int start_queued(kvo_aio *h) {
    struct iocb *batch[256];
    int n = 0;
    while (h->qhead < h->qtail && h->nfree > 0 && n < 256) {
        kvo_read *r = &h->queue[h->qhead];
        if (in_flight_of(h, r->group) >= h->limit[r->group]) break;   // FIFO: wait for its group
        int i = h->free_cb[--h->nfree];
        struct iocb *cb = &h->cbs[i];
        memset(cb, 0, sizeof *cb);
        cb->aio_data = (uint64_t)(r->group + 1);
        cb->aio_fildes = (uint32_t)r->fd;
        cb->aio_lio_opcode = IOCB_CMD_PREAD;
        cb->aio_buf = (uint64_t)r->buf;
        cb->aio_nbytes = (uint64_t)r->len;
        cb->aio_offset = r->off;
        cb->aio_reserved2 = 0;
        batch[n++] = cb;
        h->qhead++;
        h->inflight++;
    }
    int done = 0;
    while (done < n) {
        long s = sys_io_submit(h->ctx, n - done, batch + done);
        if (s < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            return -errno;
        }
        done += (int)s;
    }
    return 0;
}

// Queue `n` reads (into address buf[i], len[i] bytes, from file offset off[i]) of one group, at
// most `limit` of them in flight; returns the group id (>= 0) or -errno.
int64_t kvo_aio_submit(void *handle, int fd, int64_t n, const int64_t *buf, const int64_t *len,
                       const int64_t *off, int limit) {
    kvo_aio *h = handle;
    int g = -1;
    for (int i = 0; i < KVO_AIO_GROUPS; i++)
        if (h->remaining[i] < 0) { g = i; break; }
    if (g < 0) return -EBUSY;
    if (h->qtail + n > h->qcap) {                   // compact, then grow
        memmove(h->queue, h->queue + h->qhead, (size_t)(h->qtail - h->qhead) * sizeof *h->queue);
        h->qtail -= h->qhead;
        h->qhead = 0;
        if (h->qtail + n > h->qcap) {
            int64_t cap = h->qcap;
            while (cap < h->qtail + n) cap *= 2;
            kvo_read *q = realloc(h->queue, (size_t)cap * sizeof *q);
            if (!q) return -ENOMEM;
            h->queue = q;
            h->qcap = cap;
        }
    }
    for (int64_t i = 0; i < n; i++)
        h->queue[h->qtail++] = (kvo_read){buf[i], len[i], off[i], fd, g};
    h->remaining[g] = n;
    h->bytes[g] = 0;
    h->error[g] = 0;
    h->bad_off[g] = -1;
    h->limit[g] = limit < 1 ? 1 : (limit > h->capacity ? h->capacity : limit);
    int rc = start_queued(h);
    return rc < 0 ? rc : g;
}

// Wait until every read of `group` completed; its bytes, or its first error (-errno, or
// KVO_AIO_SHORT for a short read) with that read's file offset in *bad_off. Frees the group.
int64_t kvo_aio_wait(void *handle, int group, int64_t *bad_off) {
    kvo_aio *h = handle;
    struct io_event ev[64];
    if (group < 0 || group >= KVO_AIO_GROUPS || h->remaining[group] < 0) return -EINVAL;
    int64_t fail = 0;
    while (h->remaining[group] > 0) {
        int rc = start_queued(h);
        if (rc < 0) { fail = rc; break; }
        long got = sys_io_getevents(h->ctx, 1, 64, ev);
        if (got < 0) {
            if (errno == EINTR) continue;
            fail = -errno;
            break;
        }
        for (long e = 0; e < got; e++) {
            struct iocb *cb = (struct iocb *)(uintptr_t)ev[e].obj;
            int g = (int)cb->aio_data - 1;
            int i = (int)(cb - h->cbs);
            if (ev[e].res < 0) {
                if (!h->error[g]) { h->error[g] = ev[e].res; h->bad_off[g] = (int64_t)cb->aio_offset; }
            } else {
                if ((uint64_t)ev[e].res != cb->aio_nbytes && !h->error[g]) {
                    h->error[g] = KVO_AIO_SHORT;
                    h->bad_off[g] = (int64_t)cb->aio_offset;
                }
                h->bytes[g] += ev[e].res;
            }
            cb->aio_data = 0;
            h->free_cb[h->nfree++] = i;
            h->inflight--;
            h->remaining[g]--;
        }
    }
    int64_t out = fail ? fail : (h->error[group] ? h->error[group] : h->bytes[group]);
    if (bad_off) *bad_off = h->bad_off[group];
    h->remaining[group] = -1;
    return out;
}

// Wait for everything in flight and release the handle.
void kvo_aio_free(void *handle) {
    kvo_aio *h = handle;
    if (!h) return;
    for (int g = 0; g < KVO_AIO_GROUPS; g++)
        if (h->remaining[g] >= 0) kvo_aio_wait(h, g, NULL);
    sys_io_destroy(h->ctx);
    free(h->cbs); free(h->free_cb); free(h->queue); free(h);
}

int64_t kvo_aio_short(void) { return KVO_AIO_SHORT; }
