/* orderd-bench: a closed-loop gRPC load generator for orderd, on the gRPC C-core client API.
 *
 * DESIGN. `--concurrency N` call slots are spread over `--connections C` channels and
 * `--threads T` client threads. Each thread owns one completion queue and its slots; a slot
 * runs one unary call at a time as a single batch {SEND_INITIAL_METADATA, SEND_MESSAGE,
 * SEND_CLOSE_FROM_CLIENT, RECV_INITIAL_METADATA, RECV_MESSAGE, RECV_STATUS_ON_CLIENT} and
 * starts the next call from the completion, so every event of a slot is handled on one
 * thread and nothing is locked on the hot path. Channels get distinct args and a local
 * subchannel pool, so C channels really are C TCP connections.
 *
 * Every response is checked: the grpc-status, then that the message decodes, then that
 * it says what it should (the order asked for, a placed order with its lines, SERVING).
 * Errors are counted per status code over every call made, warm-up and drain included.
 * Latency (completion minus start, monotonic clock) of every successful call in the
 * measurement window is kept and sorted at the end: percentiles are exact, not binned.
 *
 * Duration mode: the window is [warm-up end, warm-up end + duration]; a call counts when
 * it completes inside it; no call starts after it; the calls still in flight are drained
 * and checked but not counted. Requests mode (--requests N): exactly N calls are started
 * after the warm-up and all are counted; the window ends at the last completion.
 *
 * Output: a human summary on stdout, or with --json the summary on stderr and one JSON
 * line on stdout. Exit status: 0 all calls fine, 1 some call failed (unless
 * --allow-errors), 2 usage or set-up error.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "grpc/health/v1/health.pb-c.h"
#include "common/rpc_status.h"
#include "orders/v1/orders.pb-c.h"

/* ---- what the tool can call ---------------------------------------------------------- */

enum bench_method { BM_HEALTH, BM_GET, BM_PLACE, BM_MIXED, BM_SEED };

/* One kind per RPC; a slot's call is one of these. */
enum bench_kind { BK_HEALTH, BK_GET, BK_PLACE, BK_COUNT };

static const char *const kind_name[BK_COUNT] = {"health", "get", "place"};
static const char *const kind_path[BK_COUNT] = {
    "/grpc.health.v1.Health/Check",
    "/orders.v1.OrderService/GetOrder",
    "/orders.v1.OrderService/PlaceOrder",
};

/* Error buckets: the 17 gRPC codes (0 unused), then our own checks. */
enum { ERR_DECODE = 17, ERR_CHECK = 18, ERR_CALL = 19, ERR_COUNT = 20 };
/* Names of the error buckets: gRPC's own codes, then ours. */
static const char *err_name(int bucket)
{
    switch (bucket) {
    case ERR_DECODE:
        return "DECODE"; /* status OK but no message, or one that does not decode */
    case ERR_CHECK:
        return "CHECK"; /* decoded, but not the answer asked for */
    case ERR_CALL:
        return "CALL"; /* the batch was refused or completed with success=0 */
    default:
        return rpc_status_name(bucket);
    }
}

#define FIRST_ERRORS 5

/* ---- options --------------------------------------------------------------------------- */

struct bench_opts {
    const char *target;
    char *token; /* bearer token, without "Bearer " */
    enum bench_method method;
    int concurrency;
    int connections;
    int threads;
    double duration_s;
    double warmup_s;
    long requests; /* > 0: requests mode */
    char **products;
    int n_products;
    int quantity;
    int order_ids_from;
    const char *order_ids_file; /* get/mixed: read the order ids from here instead */
    const char *save_order_ids; /* place: write the ids of the orders placed here */
    int get_percent;            /* mixed: share of GetOrder calls */
    double deadline_s;
    double connect_timeout_s;
    const char *customer_id;
    const char *currency;
    long long price_minor;
    bool json;
    bool allow_errors;
    bool quiet;
};

/* ---- small helpers --------------------------------------------------------------------- */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("orderd-bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p)
        die("out of memory");
    return p;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static gpr_timespec deadline_after(double seconds)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_micros((int64_t)(seconds * 1e6), GPR_TIMESPAN));
}

/* "10s", "500ms", "2m", "1h", or a plain number of seconds. */
static double parse_duration(const char *s, const char *what)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0)
        die("bad %s: '%s'", what, s);
    if (*end == 0 || strcmp(end, "s") == 0)
        return v;
    if (strcmp(end, "ms") == 0)
        return v / 1000.0;
    if (strcmp(end, "m") == 0)
        return v * 60.0;
    if (strcmp(end, "h") == 0)
        return v * 3600.0;
    die("bad %s: '%s' (use e.g. 500ms, 10s, 2m)", what, s);
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die("bad %s: '%s' (%ld..%ld)", what, s, lo, hi);
    return v;
}

static char *read_token_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        die("cannot open token file %s: %s", path, strerror(errno));
    char buf[16384];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        buf[--n] = 0;
    if (n == 0)
        die("token file %s is empty", path);
    return xstrdup(buf);
}

static void split_products(struct bench_opts *o, const char *list)
{
    char *copy = xstrdup(list);
    int cap = 1;
    for (const char *p = list; *p; p++)
        cap += *p == ',';
    o->products = xmalloc(sizeof(char *) * (size_t)cap);
    o->n_products = 0;
    for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save))
        if (*tok)
            o->products[o->n_products++] = xstrdup(tok);
    free(copy);
    if (o->n_products == 0)
        die("--products is empty");
}

/* Serialises a protobuf-c message into a byte buffer the caller destroys. */
static grpc_byte_buffer *pack_message(const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(len);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1); /* takes its own ref */
    grpc_slice_unref(s);
    return bb;
}

/* Decodes a received byte buffer (possibly several slices); NULL if it does not decode. */
static ProtobufCMessage *unpack_message(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb)
{
    grpc_byte_buffer_reader r;
    if (!bb || !grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    return m;
}

/* ---- latency samples ------------------------------------------------------------------- */

struct samples {
    uint64_t *v; /* nanoseconds */
    size_t n, cap;
};

static void samples_push(struct samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4096;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v)
            die("out of memory");
    }
    s->v[s->n++] = ns;
}

static void samples_append(struct samples *dst, const struct samples *src)
{
    for (size_t i = 0; i < src->n; i++)
        samples_push(dst, src->v[i]);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted samples, in ms. */
static double percentile_ms(const struct samples *s, double q)
{
    if (s->n == 0)
        return 0;
    size_t rank = (size_t)ceil(q * (double)s->n);
    if (rank < 1)
        rank = 1;
    if (rank > s->n)
        rank = s->n;
    return (double)s->v[rank - 1] / 1e6;
}

/* ---- one run (a phase: preload, or the measured run) ------------------------------------ */

struct bench_run;
struct bench_worker;

struct bench_slot {
    struct bench_worker *w;
    grpc_channel *channel;
    grpc_call *call;
    enum bench_kind kind;
    grpc_byte_buffer *send_bb;
    grpc_byte_buffer *recv_bb;
    grpc_metadata_array initial_md;
    grpc_metadata_array trailing_md;
    grpc_status_code status;
    grpc_slice details;
    int64_t t_start;
    bool counted; /* requests mode: this call is one of the N */
    size_t get_index;
    int n_lines;
    bool dead; /* start failed: slot retired */
};

struct bench_worker {
    struct bench_run *run;
    int index;
    pthread_t thread;
    grpc_completion_queue *cq;
    grpc_metadata auth_md;
    struct bench_slot *slots;
    int n_slots;
    int outstanding;
    uint64_t seq;
    uint64_t rng;
    size_t get_cursor;
    /* results */
    struct samples lat[BK_COUNT];
    uint64_t measured[BK_COUNT]; /* calls completed inside the window, ok or not */
    uint64_t errors[ERR_COUNT];
    uint64_t checked;
    int64_t last_done;
    char *first_errors[FIRST_ERRORS];
    int n_first_errors;
    char **ids;
    size_t n_ids, cap_ids;
};

struct bench_run {
    const struct bench_opts *o;
    enum bench_method method;
    grpc_channel **channels;
    int n_channels;
    int concurrency;
    int threads;
    char *const *order_ids;
    size_t n_order_ids;
    bool collect_ids;
    long requests;       /* > 0: requests mode */
    atomic_long claimed; /* requests mode: calls started inside the window */
    int64_t t0, t_measure, t_end;
    char id_prefix[40];
    struct bench_worker *workers;
};

/* Phase result, merged over workers. */
struct bench_result {
    struct samples lat[BK_COUNT];
    struct samples all;
    uint64_t measured[BK_COUNT];
    uint64_t measured_total;
    uint64_t ok_total;
    uint64_t errors[ERR_COUNT];
    uint64_t errors_total;
    uint64_t checked;
    double window_s;
    double elapsed_s;    /* the whole phase, warm-up and drain included */
    double client_cpu_s; /* user + system CPU of this process over the whole phase */
    char *first_errors[FIRST_ERRORS * 4];
    int n_first_errors;
    char **ids;
    size_t n_ids;
};

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static bool may_start(struct bench_slot *slot, int64_t now)
{
    struct bench_run *r = slot->w->run;
    if (r->requests > 0) {
        slot->counted = false;
        if (now < r->t_measure)
            return true; /* warm-up */
        if (atomic_fetch_add(&r->claimed, 1) < r->requests) {
            slot->counted = true;
            return true;
        }
        return false;
    }
    return now < r->t_end;
}

static enum bench_kind pick_kind(struct bench_worker *w)
{
    switch (w->run->method) {
    case BM_HEALTH:
        return BK_HEALTH;
    case BM_GET:
        return BK_GET;
    case BM_PLACE:
        return BK_PLACE;
    case BM_MIXED:
        return (int)(xorshift(&w->rng) % 100) < w->run->o->get_percent ? BK_GET : BK_PLACE;
    case BM_SEED:
        break;
    }
    abort();
}

static grpc_byte_buffer *build_request(struct bench_slot *slot)
{
    struct bench_worker *w = slot->w;
    struct bench_run *r = w->run;
    const struct bench_opts *o = r->o;
    switch (slot->kind) {
    case BK_HEALTH: {
        Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        return pack_message(&req.base);
    }
    case BK_GET: {
        Orders__V1__GetOrderRequest req = ORDERS__V1__GET_ORDER_REQUEST__INIT;
        /* Round robin over the preloaded orders, each worker starting at its own offset. */
        slot->get_index =
            (w->get_cursor++ * (size_t)r->threads + (size_t)w->index) % r->n_order_ids;
        req.order_id = r->order_ids[slot->get_index];
        return pack_message(&req.base);
    }
    case BK_PLACE: {
        Orders__V1__PlaceOrderRequest req = ORDERS__V1__PLACE_ORDER_REQUEST__INIT;
        Orders__V1__LineItem lines[64];
        Orders__V1__LineItem *plines[64];
        char request_id[96];
        int n = o->n_products < 64 ? o->n_products : 64;
        for (int i = 0; i < n; i++) {
            Orders__V1__LineItem li = ORDERS__V1__LINE_ITEM__INIT;
            li.product_id = o->products[i];
            li.quantity = o->quantity;
            lines[i] = li;
            plines[i] = &lines[i];
        }
        /* Unique idempotency key: random per process, then worker and sequence. */
        snprintf(request_id, sizeof request_id, "%s-%d-%" PRIu64, r->id_prefix, w->index, w->seq++);
        req.request_id = request_id;
        if (o->customer_id)
            req.customer_id = (char *)o->customer_id;
        req.n_items = (size_t)n;
        req.items = plines;
        req.payment_provider = ORDERS__V1__PAYMENT_PROVIDER__PAYMENT_PROVIDER_LOCAL;
        slot->n_lines = n;
        return pack_message(&req.base);
    }
    case BK_COUNT:
        break;
    }
    abort();
}

/* Counts an error; keeps the message of the first error of each bucket for the report. */
static void note_error(struct bench_worker *w, int bucket, const char *detail)
{
    if (w->errors[bucket]++ == 0 && w->n_first_errors < FIRST_ERRORS) {
        char buf[512];
        snprintf(buf, sizeof buf, "%s: %s", err_name(bucket), detail);
        w->first_errors[w->n_first_errors++] = xstrdup(buf);
    }
}

/* Starts the next call on a slot; on failure the slot is retired and counted. */
static void slot_start(struct bench_slot *slot)
{
    struct bench_worker *w = slot->w;
    const struct bench_opts *o = w->run->o;

    slot->kind = pick_kind(w);
    slot->send_bb = build_request(slot);
    slot->recv_bb = NULL;
    grpc_metadata_array_init(&slot->initial_md);
    grpc_metadata_array_init(&slot->trailing_md);
    slot->details = grpc_empty_slice();
    slot->status = GRPC_STATUS_UNKNOWN;

    slot->t_start = now_ns();
    slot->call = grpc_channel_create_call(slot->channel, NULL, GRPC_PROPAGATE_DEFAULTS, w->cq,
                                          grpc_slice_from_static_string(kind_path[slot->kind]),
                                          NULL, deadline_after(o->deadline_s), NULL);
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (slot->kind != BK_HEALTH) { /* health needs no token: the bare round trip */
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &w->auth_md;
    }
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = slot->send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &slot->initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &slot->recv_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &slot->trailing_md;
    ops[5].data.recv_status_on_client.status = &slot->status;
    ops[5].data.recv_status_on_client.status_details = &slot->details;
    ops[5].data.recv_status_on_client.error_string = NULL;

    grpc_call_error e = grpc_call_start_batch(slot->call, ops, 6, slot, NULL);
    if (e != GRPC_CALL_OK) {
        /* No tag will ever arrive for a refused batch. */
        char buf[64];
        snprintf(buf, sizeof buf, "grpc_call_start_batch returned %d", (int)e);
        note_error(w, ERR_CALL, buf);
        w->checked++;
        grpc_call_unref(slot->call);
        slot->call = NULL;
        grpc_byte_buffer_destroy(slot->send_bb);
        grpc_metadata_array_destroy(&slot->initial_md);
        grpc_metadata_array_destroy(&slot->trailing_md);
        slot->dead = true;
        return;
    }
    w->outstanding++;
}

/* Checks the answer; returns true when it is a good one. */
static bool slot_check(struct bench_slot *slot, bool success)
{
    struct bench_worker *w = slot->w;
    struct bench_run *r = w->run;
    char buf[400];

    if (!success) {
        note_error(w, ERR_CALL, "batch completed with success=0");
        return false;
    }
    if (slot->status != GRPC_STATUS_OK) {
        char *d = grpc_slice_to_c_string(slot->details);
        snprintf(buf, sizeof buf, "%s: %s", kind_name[slot->kind], d);
        gpr_free(d);
        int bucket = (int)slot->status > 0 && (int)slot->status <= 16 ? (int)slot->status
                                                                      : GRPC_STATUS_UNKNOWN;
        note_error(w, bucket, buf);
        return false;
    }
    if (!slot->recv_bb) {
        snprintf(buf, sizeof buf, "%s: status OK without a response message",
                 kind_name[slot->kind]);
        note_error(w, ERR_DECODE, buf);
        return false;
    }
    switch (slot->kind) {
    case BK_HEALTH: {
        Grpc__Health__V1__HealthCheckResponse *m =
            (Grpc__Health__V1__HealthCheckResponse *)unpack_message(
                &grpc__health__v1__health_check_response__descriptor, slot->recv_bb);
        if (!m) {
            note_error(w, ERR_DECODE, "health: response does not decode");
            return false;
        }
        bool ok = m->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
        if (!ok) {
            snprintf(buf, sizeof buf, "health: status %d, not SERVING", (int)m->status);
            note_error(w, ERR_CHECK, buf);
        }
        grpc__health__v1__health_check_response__free_unpacked(m, NULL);
        return ok;
    }
    case BK_GET: {
        Orders__V1__Order *m =
            (Orders__V1__Order *)unpack_message(&orders__v1__order__descriptor, slot->recv_bb);
        if (!m) {
            note_error(w, ERR_DECODE, "get: Order does not decode");
            return false;
        }
        const char *want = r->order_ids[slot->get_index];
        bool ok = strcmp(m->order_id, want) == 0 && m->n_items > 0;
        if (!ok) {
            snprintf(buf, sizeof buf, "get: asked for %s, got order '%s' with %zu items", want,
                     m->order_id, m->n_items);
            note_error(w, ERR_CHECK, buf);
        }
        orders__v1__order__free_unpacked(m, NULL);
        return ok;
    }
    case BK_PLACE: {
        Orders__V1__PlaceOrderResponse *m = (Orders__V1__PlaceOrderResponse *)unpack_message(
            &orders__v1__place_order_response__descriptor, slot->recv_bb);
        if (!m) {
            note_error(w, ERR_DECODE, "place: PlaceOrderResponse does not decode");
            return false;
        }
        bool ok = m->order && m->order->order_id[0] && m->order->n_items == (size_t)slot->n_lines;
        if (!ok) {
            snprintf(buf, sizeof buf,
                     "place: response without an order id or with %zu lines instead of %d",
                     m->order ? m->order->n_items : 0, slot->n_lines);
            note_error(w, ERR_CHECK, buf);
        } else if (r->collect_ids) {
            if (w->n_ids == w->cap_ids) {
                w->cap_ids = w->cap_ids ? w->cap_ids * 2 : 256;
                w->ids = realloc(w->ids, w->cap_ids * sizeof *w->ids);
                if (!w->ids)
                    die("out of memory");
            }
            w->ids[w->n_ids++] = xstrdup(m->order->order_id);
        }
        orders__v1__place_order_response__free_unpacked(m, NULL);
        return ok;
    }
    case BK_COUNT:
        break;
    }
    abort();
}

static void slot_finish(struct bench_slot *slot, bool success)
{
    struct bench_worker *w = slot->w;
    struct bench_run *r = w->run;
    int64_t done = now_ns();
    bool ok = slot_check(slot, success);
    w->checked++;

    bool measured = r->requests > 0 ? slot->counted : (done >= r->t_measure && done <= r->t_end);
    if (measured) {
        w->measured[slot->kind]++;
        if (ok)
            samples_push(&w->lat[slot->kind], (uint64_t)(done - slot->t_start));
        if (done > w->last_done)
            w->last_done = done;
    }

    grpc_byte_buffer_destroy(slot->send_bb);
    if (slot->recv_bb)
        grpc_byte_buffer_destroy(slot->recv_bb);
    grpc_metadata_array_destroy(&slot->initial_md);
    grpc_metadata_array_destroy(&slot->trailing_md);
    grpc_slice_unref(slot->details);
    grpc_call_unref(slot->call);
    slot->call = NULL;
}

static void *worker_main(void *arg)
{
    struct bench_worker *w = arg;
    for (int i = 0; i < w->n_slots; i++)
        if (may_start(&w->slots[i], now_ns()))
            slot_start(&w->slots[i]);

    while (w->outstanding > 0) {
        grpc_event ev = grpc_completion_queue_next(w->cq, deadline_after(0.25), NULL);
        if (ev.type == GRPC_QUEUE_TIMEOUT)
            continue;
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        struct bench_slot *slot = ev.tag;
        w->outstanding--;
        slot_finish(slot, ev.success != 0);
        if (may_start(slot, now_ns()))
            slot_start(slot);
    }

    grpc_completion_queue_shutdown(w->cq);
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
    }
    grpc_completion_queue_destroy(w->cq);
    w->cq = NULL;
    return NULL;
}

/* Runs one phase to completion and merges the workers' results into *res. */
static void run_phase(struct bench_run *r, struct bench_result *res)
{
    const struct bench_opts *o = r->o;
    memset(res, 0, sizeof *res);
    r->workers = xmalloc(sizeof *r->workers * (size_t)r->threads);
    char bearer[16400];
    snprintf(bearer, sizeof bearer, "Bearer %s", o->token ? o->token : "");

    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != sizeof seed)
        seed = (uint64_t)now_ns();

    for (int t = 0; t < r->threads; t++) {
        struct bench_worker *w = &r->workers[t];
        w->run = r;
        w->index = t;
        w->cq = grpc_completion_queue_create_for_next(NULL);
        w->auth_md.key = grpc_slice_from_static_string("authorization");
        w->auth_md.value = grpc_slice_from_copied_string(bearer);
        w->rng = (seed ^ ((uint64_t)t + 1) * 0x9E3779B97F4A7C15ull) | 1;
        w->n_slots = r->concurrency / r->threads + (t < r->concurrency % r->threads);
        w->slots = xmalloc(sizeof *w->slots * (size_t)w->n_slots);
    }
    /* Slot i (over all workers) uses channel i % C: calls spread evenly over connections. */
    for (int i = 0; i < r->concurrency; i++) {
        struct bench_worker *w = &r->workers[i % r->threads];
        struct bench_slot *s = &w->slots[i / r->threads];
        s->w = w;
        s->channel = r->channels[i % r->n_channels];
    }

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    r->t0 = now_ns();
    r->t_measure = r->t0 + (int64_t)(o->warmup_s * 1e9);
    r->t_end = r->requests > 0 ? INT64_MAX : r->t_measure + (int64_t)(o->duration_s * 1e9);
    atomic_store(&r->claimed, 0);

    for (int t = 0; t < r->threads; t++)
        if (pthread_create(&r->workers[t].thread, NULL, worker_main, &r->workers[t]) != 0)
            die("pthread_create failed");
    for (int t = 0; t < r->threads; t++)
        pthread_join(r->workers[t].thread, NULL);
    res->elapsed_s = (double)(now_ns() - r->t0) / 1e9;
    getrusage(RUSAGE_SELF, &ru1);
#define TV_S(tv) ((double)(tv).tv_sec + (double)(tv).tv_usec / 1e6)
    res->client_cpu_s =
        TV_S(ru1.ru_utime) - TV_S(ru0.ru_utime) + TV_S(ru1.ru_stime) - TV_S(ru0.ru_stime);
#undef TV_S

    int64_t last = r->t_measure;
    for (int t = 0; t < r->threads; t++) {
        struct bench_worker *w = &r->workers[t];
        for (int k = 0; k < BK_COUNT; k++) {
            samples_append(&res->lat[k], &w->lat[k]);
            samples_append(&res->all, &w->lat[k]);
            res->measured[k] += w->measured[k];
            res->measured_total += w->measured[k];
            res->ok_total += w->lat[k].n;
            free(w->lat[k].v);
        }
        for (int e = 1; e < ERR_COUNT; e++) {
            res->errors[e] += w->errors[e];
            res->errors_total += w->errors[e];
        }
        res->checked += w->checked;
        if (w->last_done > last)
            last = w->last_done;
        for (int i = 0; i < w->n_first_errors; i++) {
            /* One example per bucket over all workers: messages start with the bucket name. */
            bool seen = false;
            size_t blen = strcspn(w->first_errors[i], ":");
            for (int j = 0; j < res->n_first_errors && !seen; j++)
                seen = strncmp(res->first_errors[j], w->first_errors[i], blen + 1) == 0;
            if (!seen &&
                res->n_first_errors < (int)(sizeof res->first_errors / sizeof res->first_errors[0]))
                res->first_errors[res->n_first_errors++] = w->first_errors[i];
            else
                free(w->first_errors[i]);
        }
        if (w->n_ids) {
            res->ids = realloc(res->ids, (res->n_ids + w->n_ids) * sizeof *res->ids);
            if (!res->ids)
                die("out of memory");
            memcpy(res->ids + res->n_ids, w->ids, w->n_ids * sizeof *w->ids);
            res->n_ids += w->n_ids;
        }
        free(w->ids);
        grpc_slice_unref(w->auth_md.value);
        free(w->slots);
    }
    free(r->workers);
    r->workers = NULL;

    res->window_s = r->requests > 0 ? (double)(last - r->t_measure) / 1e9 : o->duration_s;
    for (int k = 0; k < BK_COUNT; k++)
        if (res->lat[k].n)
            qsort(res->lat[k].v, res->lat[k].n, sizeof(uint64_t), cmp_u64);
    if (res->all.n)
        qsort(res->all.v, res->all.n, sizeof(uint64_t), cmp_u64);
}

static void result_free(struct bench_result *res)
{
    for (int k = 0; k < BK_COUNT; k++)
        free(res->lat[k].v);
    free(res->all.v);
    for (int i = 0; i < res->n_first_errors; i++)
        free(res->first_errors[i]);
    /* ids are handed over to the caller */
}

/* ---- channels ---------------------------------------------------------------------------- */

static grpc_channel *channel_create(const char *target, int index)
{
    grpc_arg args[4];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
    args[0].value.integer = 1;
    /* A distinct arg per channel: channels never share a subchannel (a TCP connection). */
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)"orderd_bench.channel_index";
    args[1].value.integer = index;
    /* No retry filter: we measure the server, one attempt per call. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_ENABLE_RETRIES;
    args[2].value.integer = 0;
    args[3].type = GRPC_ARG_STRING;
    args[3].key = (char *)GRPC_ARG_PRIMARY_USER_AGENT_STRING;
    args[3].value.string = (char *)"orderd-bench/0.1";
    grpc_channel_args ch_args = {4, args};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, creds, &ch_args);
    grpc_channel_credentials_release(creds);
    return ch;
}

static bool channel_wait_ready(grpc_channel *ch, double timeout_s)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    gpr_timespec deadline = deadline_after(timeout_s);
    grpc_connectivity_state st = grpc_channel_check_connectivity_state(ch, 1);
    while (st != GRPC_CHANNEL_READY) {
        grpc_channel_watch_connectivity_state(ch, st, deadline, cq, NULL);
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (!ev.success)
            break; /* deadline passed without a change */
        st = grpc_channel_check_connectivity_state(ch, 1);
    }
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    return st == GRPC_CHANNEL_READY;
}

/* ---- seeding products (one blocking call at a time) ------------------------------------- */

static int seed_products(const struct bench_opts *o, grpc_channel *ch)
{
    char bearer[16400];
    snprintf(bearer, sizeof bearer, "Bearer %s", o->token ? o->token : "");
    grpc_metadata md = {.key = grpc_slice_from_static_string("authorization"),
                        .value = grpc_slice_from_copied_string(bearer)};
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    int failures = 0;
    for (int i = 0; i < o->n_products; i++) {
        char name[160];
        snprintf(name, sizeof name, "Bench product %s", o->products[i]);
        Orders__V1__Product p = ORDERS__V1__PRODUCT__INIT;
        p.product_id = o->products[i];
        p.name = name;
        p.unit_price_minor = o->price_minor + 100 * i;
        p.currency = (char *)o->currency;
        p.active = 1;
        Orders__V1__UpsertProductRequest req = ORDERS__V1__UPSERT_PRODUCT_REQUEST__INIT;
        req.product = &p;

        grpc_byte_buffer *send = pack_message(&req.base), *recv = NULL;
        grpc_metadata_array imd, tmd;
        grpc_metadata_array_init(&imd);
        grpc_metadata_array_init(&tmd);
        grpc_status_code status = GRPC_STATUS_UNKNOWN;
        grpc_slice details = grpc_empty_slice();
        grpc_call *call = grpc_channel_create_call(
            ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
            grpc_slice_from_static_string("/orders.v1.OrderService/UpsertProduct"), NULL,
            deadline_after(o->deadline_s), NULL);
        grpc_op ops[6];
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &md;
        ops[1].op = GRPC_OP_SEND_MESSAGE;
        ops[1].data.send_message.send_message = send;
        ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
        ops[4].op = GRPC_OP_RECV_MESSAGE;
        ops[4].data.recv_message.recv_message = &recv;
        ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
        ops[5].data.recv_status_on_client.status = &status;
        ops[5].data.recv_status_on_client.status_details = &details;
        bool ok = false;
        if (grpc_call_start_batch(call, ops, 6, &ops, NULL) == GRPC_CALL_OK) {
            grpc_event ev =
                grpc_completion_queue_pluck(cq, &ops, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            if (ev.success && status == GRPC_STATUS_OK) {
                Orders__V1__Product *got =
                    (Orders__V1__Product *)unpack_message(&orders__v1__product__descriptor, recv);
                ok = got && strcmp(got->product_id, p.product_id) == 0;
                if (got)
                    orders__v1__product__free_unpacked(got, NULL);
                if (!ok)
                    fprintf(stderr, "orderd-bench: UpsertProduct %s: unexpected response\n",
                            p.product_id);
            } else {
                char *d = grpc_slice_to_c_string(details);
                fprintf(stderr, "orderd-bench: UpsertProduct %s: %s: %s\n", p.product_id,
                        (int)status >= 0 && (int)status <= 16 ? err_name((int)status) : "?", d);
                gpr_free(d);
            }
        } else {
            fprintf(stderr, "orderd-bench: UpsertProduct %s: batch refused\n", p.product_id);
        }
        if (ok && !o->quiet)
            fprintf(stderr, "orderd-bench: product %s upserted (%lld %s)\n", p.product_id,
                    (long long)p.unit_price_minor, p.currency);
        failures += !ok;
        grpc_call_unref(call);
        grpc_byte_buffer_destroy(send);
        if (recv)
            grpc_byte_buffer_destroy(recv);
        grpc_metadata_array_destroy(&imd);
        grpc_metadata_array_destroy(&tmd);
        grpc_slice_unref(details);
    }
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    grpc_completion_queue_destroy(cq);
    grpc_slice_unref(md.value);
    return failures;
}

/* ---- reporting ------------------------------------------------------------------------- */

static const char *method_name(enum bench_method m)
{
    switch (m) {
    case BM_HEALTH:
        return "health";
    case BM_GET:
        return "get";
    case BM_PLACE:
        return "place";
    case BM_MIXED:
        return "mixed";
    case BM_SEED:
        return "seed";
    }
    return "?";
}

static void print_human(FILE *f, const struct bench_opts *o, const struct bench_run *r,
                        const struct bench_result *res)
{
    fprintf(f, "method       %s (%s)\n", method_name(o->method),
            o->method == BM_MIXED ? "GetOrder + PlaceOrder"
                                  : kind_path[o->method == BM_HEALTH ? BK_HEALTH
                                              : o->method == BM_GET  ? BK_GET
                                                                     : BK_PLACE]);
    fprintf(f, "target       %s\n", o->target);
    fprintf(f, "concurrency  %d   connections %d   client threads %d\n", r->concurrency,
            r->n_channels, r->threads);
    if (r->requests > 0)
        fprintf(f, "window       %ld requests in %.3f s (warm-up %.1f s)\n", r->requests,
                res->window_s, o->warmup_s);
    else
        fprintf(f, "window       %.1f s (warm-up %.1f s, deadline %.1f s)\n", res->window_s,
                o->warmup_s, o->deadline_s);
    fprintf(f,
            "calls        %" PRIu64 " in the window, %" PRIu64 " ok; %" PRIu64
            " checked in all (warm-up and drain included)\n",
            res->measured_total, res->ok_total, res->checked);
    fprintf(f, "errors       %" PRIu64, res->errors_total);
    if (res->errors_total) {
        fputs(" (", f);
        bool first = true;
        for (int e = 1; e < ERR_COUNT; e++)
            if (res->errors[e]) {
                fprintf(f, "%s%s=%" PRIu64, first ? "" : " ", err_name(e), res->errors[e]);
                first = false;
            }
        fputs(")", f);
    }
    fputc('\n', f);
    fprintf(f, "throughput   %.1f calls/s",
            res->window_s > 0 ? (double)res->measured_total / res->window_s : 0.0);
    if (res->ok_total != res->measured_total)
        fprintf(f, " (successful ones: %.1f calls/s)",
                res->window_s > 0 ? (double)res->ok_total / res->window_s : 0.0);
    fputc('\n', f);
    const struct samples *s = &res->all;
    fprintf(
        f,
        "latency ms   p50 %.3f   p90 %.3f   p99 %.3f   p99.9 %.3f   max %.3f   (ok calls: %zu)\n",
        percentile_ms(s, 0.50), percentile_ms(s, 0.90), percentile_ms(s, 0.99),
        percentile_ms(s, 0.999), percentile_ms(s, 1.0), s->n);
    fprintf(f, "client CPU   %.2f s over %.2f s (%.0f %% of one core; %.1f us per call)\n",
            res->client_cpu_s, res->elapsed_s,
            res->elapsed_s > 0 ? 100.0 * res->client_cpu_s / res->elapsed_s : 0.0,
            res->checked ? 1e6 * res->client_cpu_s / (double)res->checked : 0.0);
    if (o->method == BM_MIXED)
        for (int k = BK_GET; k <= BK_PLACE; k++)
            fprintf(f,
                    "  %-6s     %" PRIu64 " calls, %.1f calls/s, p50 %.3f p99 %.3f max %.3f ms\n",
                    kind_name[k], res->measured[k],
                    res->window_s > 0 ? (double)res->measured[k] / res->window_s : 0.0,
                    percentile_ms(&res->lat[k], 0.5), percentile_ms(&res->lat[k], 0.99),
                    percentile_ms(&res->lat[k], 1.0));
    for (int i = 0; i < res->n_first_errors; i++)
        fprintf(f, "first of     %s\n", res->first_errors[i]);
}

static void json_latency(FILE *f, const struct samples *s)
{
    double sum = 0;
    for (size_t i = 0; i < s->n; i++)
        sum += (double)s->v[i];
    fprintf(f, "{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f,\"mean\":%.3f}",
            percentile_ms(s, 0.50), percentile_ms(s, 0.90), percentile_ms(s, 0.99),
            percentile_ms(s, 0.999), percentile_ms(s, 1.0), s->n ? sum / (double)s->n / 1e6 : 0.0);
}

static void print_json(FILE *f, const struct bench_opts *o, const struct bench_run *r,
                       const struct bench_result *res, uint64_t preload_calls)
{
    fprintf(f,
            "{\"method\":\"%s\",\"target\":\"%s\",\"concurrency\":%d,\"connections\":%d,"
            "\"threads\":%d,",
            method_name(o->method), o->target, r->concurrency, r->n_channels, r->threads);
    fprintf(f,
            "\"window_s\":%.3f,\"warmup_s\":%.3f,\"calls\":%" PRIu64 ",\"ok\":%" PRIu64
            ",\"checked\":%" PRIu64 ",",
            res->window_s, o->warmup_s, res->measured_total, res->ok_total, res->checked);
    fprintf(f, "\"errors_total\":%" PRIu64 ",\"errors\":{", res->errors_total);
    bool first = true;
    for (int e = 1; e < ERR_COUNT; e++)
        if (res->errors[e]) {
            fprintf(f, "%s\"%s\":%" PRIu64, first ? "" : ",", err_name(e), res->errors[e]);
            first = false;
        }
    fprintf(f, "},\"elapsed_s\":%.3f,\"client_cpu_s\":%.3f,\"preload_calls\":%" PRIu64,
            res->elapsed_s, res->client_cpu_s, preload_calls);
    fprintf(f, ",\"throughput\":%.1f,\"latency_ms\":",
            res->window_s > 0 ? (double)res->measured_total / res->window_s : 0.0);
    json_latency(f, &res->all);
    if (o->method == BM_MIXED) {
        fputs(",\"by_method\":{", f);
        for (int k = BK_GET; k <= BK_PLACE; k++) {
            fprintf(f, "%s\"%s\":{\"calls\":%" PRIu64 ",\"throughput\":%.1f,\"latency_ms\":",
                    k == BK_GET ? "" : ",", kind_name[k], res->measured[k],
                    res->window_s > 0 ? (double)res->measured[k] / res->window_s : 0.0);
            json_latency(f, &res->lat[k]);
            fputc('}', f);
        }
        fputc('}', f);
    }
    fputs("}\n", f);
}

/* ---- order id files ------------------------------------------------------------------------- */

/* Reads one order id per line (blank lines skipped); dies when there is none. */
static char **read_ids_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        die("cannot open %s: %s", path, strerror(errno));
    char **ids = NULL, line[256];
    size_t cap = 0;
    *n = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0])
            continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 256;
            ids = realloc(ids, cap * sizeof *ids);
            if (!ids)
                die("out of memory");
        }
        ids[(*n)++] = xstrdup(line);
    }
    fclose(f);
    if (*n == 0)
        die("%s holds no order id", path);
    return ids;
}

static void write_ids_file(const char *path, char *const *ids, size_t n)
{
    FILE *f = fopen(path, "w");
    if (!f)
        die("cannot create %s: %s", path, strerror(errno));
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s\n", ids[i]);
    if (fclose(f) != 0)
        die("cannot write %s: %s", path, strerror(errno));
}

/* ---- main -------------------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fputs("usage: orderd-bench [options]\n"
          "  --target HOST:PORT       server (default 127.0.0.1:50051)\n"
          "  --token TOKEN            bearer token (JWT); or --token-file PATH\n"
          "  --method M               health | get | place | mixed | seed (default get)\n"
          "                           health: /grpc.health.v1.Health/Check, no token: the bare "
          "round trip\n"
          "                           seed: upsert the --products (admin token) and exit\n"
          "  --concurrency N          calls in flight (default 8)\n"
          "  --connections C          channels = TCP connections, calls spread over them (default "
          "min(N,4))\n"
          "  --threads T              client threads, one completion queue each (default 1)\n"
          "  --duration D             measurement window, e.g. 10s (default 10s)\n"
          "  --requests N             instead of --duration: exactly N calls after the warm-up\n"
          "  --warmup D               calls before the window, not counted (default 2s)\n"
          "  --deadline D             per-call deadline (default 5s)\n"
          "  --products a,b           product ids; place: one line each (default sku-a,sku-b)\n"
          "  --quantity Q             quantity of each line (default 1)\n"
          "  --order-ids-from N       get/mixed: place N orders first, then read them round robin "
          "(default 256)\n"
          "  --order-ids-file PATH    get/mixed: read these order ids (one per line) instead of "
          "placing orders\n"
          "  --save-order-ids PATH    place: write the ids of all orders placed (warm-up included) "
          "to PATH\n"
          "  --get-percent P          mixed: share of GetOrder calls (default 80)\n"
          "  --customer-id ID         PlaceOrder customer_id (admin/service tokens only)\n"
          "  --price-minor P          seed: price of the first product (default 1299; +100 per "
          "next)\n"
          "  --currency CUR           seed: currency (default USD)\n"
          "  --connect-timeout D      wait this long for every channel to connect (default 5s)\n"
          "  --json                   one JSON line on stdout (the human summary goes to stderr)\n"
          "  --allow-errors           exit 0 even if calls failed\n"
          "  --quiet                  no progress lines\n",
          f);
}

int main(int argc, char **argv)
{
    struct bench_opts o = {
        .target = "127.0.0.1:50051",
        .method = BM_GET,
        .concurrency = 8,
        .connections = 0,
        .threads = 1,
        .duration_s = 10,
        .warmup_s = 2,
        .quantity = 1,
        .order_ids_from = -1,
        .get_percent = 80,
        .deadline_s = 5,
        .connect_timeout_s = 5,
        .currency = "USD",
        .price_minor = 1299,
    };
    const char *products = "sku-a,sku-b";

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--json") == 0) {
            o.json = true;
            continue;
        }
        if (strcmp(a, "--allow-errors") == 0) {
            o.allow_errors = true;
            continue;
        }
        if (strcmp(a, "--quiet") == 0) {
            o.quiet = true;
            continue;
        }
        /* Everything else takes a value, as "--opt value" or "--opt=value". */
        const char *v = NULL;
        char name[64];
        const char *eq = strchr(a, '=');
        if (eq && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = 0;
            v = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", a);
            if (i + 1 >= argc) {
                usage(stderr);
                die("%s needs a value", a);
            }
            v = argv[++i];
        }
        if (strcmp(name, "--target") == 0)
            o.target = v;
        else if (strcmp(name, "--token") == 0)
            o.token = xstrdup(v);
        else if (strcmp(name, "--token-file") == 0)
            o.token = read_token_file(v);
        else if (strcmp(name, "--method") == 0) {
            if (strcmp(v, "health") == 0)
                o.method = BM_HEALTH;
            else if (strcmp(v, "get") == 0)
                o.method = BM_GET;
            else if (strcmp(v, "place") == 0)
                o.method = BM_PLACE;
            else if (strcmp(v, "mixed") == 0)
                o.method = BM_MIXED;
            else if (strcmp(v, "seed") == 0)
                o.method = BM_SEED;
            else
                die("unknown --method '%s' (health|get|place|mixed|seed)", v);
        } else if (strcmp(name, "--concurrency") == 0)
            o.concurrency = (int)parse_long(v, name, 1, 100000);
        else if (strcmp(name, "--connections") == 0)
            o.connections = (int)parse_long(v, name, 1, 10000);
        else if (strcmp(name, "--threads") == 0)
            o.threads = (int)parse_long(v, name, 1, 64);
        else if (strcmp(name, "--duration") == 0)
            o.duration_s = parse_duration(v, name);
        else if (strcmp(name, "--requests") == 0)
            o.requests = parse_long(v, name, 1, LONG_MAX);
        else if (strcmp(name, "--warmup") == 0)
            o.warmup_s = parse_duration(v, name);
        else if (strcmp(name, "--deadline") == 0)
            o.deadline_s = parse_duration(v, name);
        else if (strcmp(name, "--connect-timeout") == 0)
            o.connect_timeout_s = parse_duration(v, name);
        else if (strcmp(name, "--products") == 0)
            products = v;
        else if (strcmp(name, "--quantity") == 0)
            o.quantity = (int)parse_long(v, name, 0, INT32_MAX);
        else if (strcmp(name, "--order-ids-from") == 0)
            o.order_ids_from = (int)parse_long(v, name, 1, 10000000);
        else if (strcmp(name, "--order-ids-file") == 0)
            o.order_ids_file = v;
        else if (strcmp(name, "--save-order-ids") == 0)
            o.save_order_ids = v;
        else if (strcmp(name, "--get-percent") == 0)
            o.get_percent = (int)parse_long(v, name, 0, 100);
        else if (strcmp(name, "--customer-id") == 0)
            o.customer_id = v;
        else if (strcmp(name, "--price-minor") == 0)
            o.price_minor = parse_long(v, name, 0, LONG_MAX);
        else if (strcmp(name, "--currency") == 0)
            o.currency = v;
        else {
            usage(stderr);
            die("unknown option %s", name);
        }
    }
    split_products(&o, products);
    if (o.method != BM_HEALTH && !o.token)
        die("--token or --token-file is required for --method %s", method_name(o.method));
    if (o.deadline_s <= 0)
        die("--deadline must be > 0");
    if (o.requests == 0 && o.duration_s <= 0 && o.method != BM_SEED)
        die("--duration must be > 0");
    if (o.n_products > 64)
        die("at most 64 --products");
    bool need_ids = o.method == BM_GET || o.method == BM_MIXED;
    if (o.order_ids_from < 0)
        o.order_ids_from = need_ids && !o.order_ids_file ? 256 : 0;
    if (o.order_ids_file && o.order_ids_from > 0)
        die("--order-ids-file and --order-ids-from exclude each other");
    if (o.save_order_ids && o.method != BM_PLACE)
        die("--save-order-ids goes with --method place");

    if (o.connections == 0)
        o.connections = o.concurrency < 4 ? o.concurrency : 4;
    if (o.connections > o.concurrency)
        o.connections = o.concurrency; /* an idle channel measures nothing */
    if (o.threads > o.concurrency)
        o.threads = o.concurrency;

    grpc_init();
    grpc_channel **channels = xmalloc(sizeof *channels * (size_t)o.connections);
    for (int c = 0; c < o.connections; c++) {
        channels[c] = channel_create(o.target, c);
        if (!channel_wait_ready(channels[c], o.connect_timeout_s))
            die("channel %d to %s is not READY after %.1f s: is the server running?", c, o.target,
                o.connect_timeout_s);
    }

    int rc = 0;
    if (o.method == BM_SEED) {
        rc = seed_products(&o, channels[0]) ? 1 : 0;
    } else {
        char **ids = NULL;
        size_t n_ids = 0;
        uint64_t preload_errors = 0, preload_calls = 0;
        if (need_ids && o.order_ids_file) {
            ids = read_ids_file(o.order_ids_file, &n_ids);
        } else if (need_ids && o.order_ids_from > 0) {
            /* Preload: place the orders the GetOrder calls will read back; not measured. */
            struct bench_run pre = {.o = &o,
                                    .method = BM_PLACE,
                                    .channels = channels,
                                    .n_channels = o.connections,
                                    .concurrency = o.concurrency,
                                    .threads = o.threads,
                                    .collect_ids = true,
                                    .requests = o.order_ids_from};
            unsigned char rnd[6] = {0};
            if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd)
                memcpy(rnd, &(int64_t){now_ns()}, sizeof rnd);
            snprintf(pre.id_prefix, sizeof pre.id_prefix, "bench-pre-%02x%02x%02x%02x%02x%02x",
                     rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5]);
            struct bench_opts po = o;
            po.warmup_s = 0;
            pre.o = &po;
            struct bench_result pres;
            int64_t t = now_ns();
            run_phase(&pre, &pres);
            ids = pres.ids;
            n_ids = pres.n_ids;
            preload_errors = pres.errors_total;
            preload_calls = pres.checked;
            if (!o.quiet)
                fprintf(stderr,
                        "orderd-bench: preloaded %zu orders in %.2f s (%" PRIu64 " errors)\n",
                        n_ids, (double)(now_ns() - t) / 1e9, preload_errors);
            for (int i = 0; i < pres.n_first_errors; i++)
                fprintf(stderr, "preload error  %s\n", pres.first_errors[i]);
            result_free(&pres);
            if (n_ids == 0)
                die("no order could be placed for --method %s; see the errors above",
                    method_name(o.method));
        }

        struct bench_run run = {.o = &o,
                                .method = o.method,
                                .channels = channels,
                                .n_channels = o.connections,
                                .concurrency = o.concurrency,
                                .threads = o.threads,
                                .order_ids = ids,
                                .n_order_ids = n_ids,
                                .requests = o.requests,
                                .collect_ids = o.save_order_ids != NULL};
        unsigned char rnd[6] = {0};
        if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd)
            memcpy(rnd, &(int64_t){now_ns()}, sizeof rnd);
        snprintf(run.id_prefix, sizeof run.id_prefix, "bench-%02x%02x%02x%02x%02x%02x", rnd[0],
                 rnd[1], rnd[2], rnd[3], rnd[4], rnd[5]);
        struct bench_result res;
        run_phase(&run, &res);
        print_human(o.json ? stderr : stdout, &o, &run, &res);
        if (o.json)
            print_json(stdout, &o, &run, &res, preload_calls);
        if (o.save_order_ids) {
            write_ids_file(o.save_order_ids, res.ids, res.n_ids);
            for (size_t i = 0; i < res.n_ids; i++)
                free(res.ids[i]);
            free(res.ids);
        }
        fflush(stdout);
        if ((res.errors_total || preload_errors) && !o.allow_errors)
            rc = 1;
        result_free(&res);
        for (size_t i = 0; i < n_ids; i++)
            free(ids[i]);
        free(ids);
    }

    for (int c = 0; c < o.connections; c++)
        grpc_channel_destroy(channels[c]);
    free(channels);
    grpc_shutdown();
    for (int i = 0; i < o.n_products; i++)
        free(o.products[i]);
    free(o.products);
    free(o.token);
    return rc;
}
