/* server.c — the gRPC C-core server: workers, completion queues, the call life cycle,
 * the interceptor chain and graceful shutdown. See internal.h for the design and
 * ../shared/notes/grpc-core-1.51.md for the C-core rules this file follows (numbers in
 * comments such as "(#18)" refer to rows of that note).
 */
#include "server/server.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "cache/cache.h"
#include "common/clock.h"
#include "common/log.h"
#include "payments/payments.h"
#include "server/internal.h"
#include "storage/storage.h"

/* How often an idle worker wakes up: health Watch updates and shutdown are noticed on
 * this tick, and a worker whose accepted call is slow to send its message posts its next
 * request call. */
#define TICK_MS 100

/* ---- the method table ---- */

#define ROLES_ANY  (ORDER_ROLE_CUSTOMER | ORDER_ROLE_SERVICE | ORDER_ROLE_ADMIN)
#define ROLES_PRIV (ORDER_ROLE_SERVICE | ORDER_ROLE_ADMIN)

#define UNARY(p, r, cls, fn)                                                                       \
    {                                                                                              \
        .path = (p), .kind = METHOD_UNARY, .roles = (r), .rl_class = (cls), .unary = (fn)          \
    }
#define STREAM(p, k, r, cfg, pre)                                                                  \
    {                                                                                              \
        .path = (p), .kind = (k), .roles = (r), .roles_from_config = (cfg),                        \
        .stream_start = pre##_start, .stream_recv = pre##_recv, .stream_sent = pre##_sent,         \
        .stream_tick = pre##_tick                                                                  \
    }

/* Rate-limit classes: reads, writes and catalogue upkeep are budgeted separately; health
 * and reflection are never limited. */
static const srv_method methods[] = {
    UNARY("/orders.v1.OrderService/PlaceOrder", ROLES_ANY, "write", srv_rpc_place_order),
    UNARY("/orders.v1.OrderService/GetOrder", ROLES_ANY, "read", srv_rpc_get_order),
    UNARY("/orders.v1.OrderService/ListOrders", ROLES_ANY, "read", srv_rpc_list_orders),
    UNARY("/orders.v1.OrderService/CancelOrder", ROLES_ANY, "write", srv_rpc_cancel_order),
    UNARY("/orders.v1.OrderService/ConfirmPayment", ROLES_ANY, "write", srv_rpc_confirm_payment),
    UNARY("/orders.v1.OrderService/UpdateOrderStatus", ROLES_PRIV, "write",
          srv_rpc_update_order_status),
    UNARY("/orders.v1.OrderService/UpsertProduct", ORDER_ROLE_ADMIN, "admin",
          srv_rpc_upsert_product),
    UNARY("/orders.v1.OrderService/GetProduct", ROLES_ANY, "read", srv_rpc_get_product),
    UNARY("/grpc.health.v1.Health/Check", 0, NULL, srv_health_check),
    STREAM("/grpc.health.v1.Health/Watch", METHOD_SERVER_STREAM, 0, false, srv_health_watch),
    STREAM("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", METHOD_BIDI, 0, true,
           srv_reflection),
    STREAM("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", METHOD_BIDI, 0, true,
           srv_reflection),
};

size_t srv_method_count(void)
{
    return sizeof methods / sizeof *methods;
}

const char *srv_method_path(size_t i)
{
    return i < srv_method_count() ? methods[i].path : NULL;
}

static const srv_method *method_find(grpc_slice path)
{
    for (size_t i = 0; i < sizeof methods / sizeof *methods; i++)
        if (grpc_slice_str_cmp(path, methods[i].path) == 0)
            return &methods[i];
    return NULL;
}

/* ---- calls ---- */

static srv_call *call_new(srv_worker *w)
{
    srv_call *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->err = calloc(1, sizeof *c->err);
    if (!c->err) {
        free(c);
        return NULL;
    }
    c->w = w;
    c->refs = 1;
    c->tag_new = (srv_tag){c, TAG_NEW_CALL};
    c->tag_recv = (srv_tag){c, TAG_RECV};
    c->tag_send = (srv_tag){c, TAG_SEND};
    c->tag_close = (srv_tag){c, TAG_CLOSE};
    c->status_slice = grpc_empty_slice();
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    c->ctx.err = c->err;
    return c;
}

static void stream_unlink(srv_call *c)
{
    srv_worker *w = c->w;
    if (c->prev_stream)
        c->prev_stream->next_stream = c->next_stream;
    else if (w->streams == c)
        w->streams = c->next_stream;
    if (c->next_stream)
        c->next_stream->prev_stream = c->prev_stream;
    c->next_stream = c->prev_stream = NULL;
}

static void call_unref(srv_call *c)
{
    if (--c->refs > 0)
        return;
    stream_unlink(c);
    if (c->stream_free)
        c->stream_free(c->stream_state);
    if (c->recv_bb)
        grpc_byte_buffer_destroy(c->recv_bb);
    if (c->send_bb)
        grpc_byte_buffer_destroy(c->send_bb);
    grpc_slice_unref(c->status_slice);
    for (size_t i = 0; i < c->ntrailing; i++)
        grpc_slice_unref(c->trailing[i].value);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->call)
        grpc_call_unref(c->call);
    free(c->err);
    free(c);
}

/* Starts a batch holding one reference; undoes it if the core refuses the batch (#19:
 * then no tag will ever arrive). */
static bool call_batch(srv_call *c, const grpc_op *ops, size_t n, srv_tag *tag)
{
    c->refs++;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        log_kv(LOG_ERROR, "grpc_call_start_batch failed", LOG_F_STR, "method", c->method_name,
               LOG_F_INT, "error", (int64_t)e, LOG_F_END);
        c->refs--;
        return false;
    }
    return true;
}

static const char *md_get(const srv_call *c, const char *key, size_t *len)
{
    for (size_t i = 0; i < c->md.count; i++) {
        if (grpc_slice_str_cmp(c->md.metadata[i].key, key) == 0) {
            *len = GRPC_SLICE_LENGTH(c->md.metadata[i].value);
            return (const char *)GRPC_SLICE_START_PTR(c->md.metadata[i].value);
        }
    }
    *len = 0;
    return NULL;
}

/* The request id for logs: the caller's x-request-id if it is sane, else a fresh one. */
static void set_request_id(srv_call *c)
{
    size_t len;
    const char *v = md_get(c, "x-request-id", &len);
    if (v && len > 0 && len < sizeof c->request_id) {
        bool ok = true;
        for (size_t i = 0; i < len; i++) {
            char ch = v[i];
            if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.' || ch == ':'))
                ok = false;
        }
        if (ok) {
            memcpy(c->request_id, v, len);
            c->request_id[len] = '\0';
            return;
        }
    }
    unsigned char rnd[8] = {0};
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        memset(rnd, 0, sizeof rnd);
    for (int i = 0; i < 8; i++)
        snprintf(c->request_id + 2 * i, 3, "%02x", rnd[i]);
}

static void access_log(srv_call *c, grpc_status_code code, const char *message)
{
    int64_t us = clock_mono_us() - c->start_mono_us;
    srv_metrics_rpc(c->method_name, code, us);
    double ms = (double)us / 1000.0;
    log_level lvl = (code == GRPC_STATUS_INTERNAL || code == GRPC_STATUS_UNKNOWN) ? LOG_ERROR
                    : code == GRPC_STATUS_UNAVAILABLE                             ? LOG_WARN
                                                                                  : LOG_INFO;
    if (!log_enabled(lvl))
        return;
    log_kv(lvl, "call", LOG_F_STR, "request_id", c->request_id, LOG_F_STR, "method", c->method_name,
           LOG_F_STR, "caller", c->ctx.caller.subject[0] ? c->ctx.caller.subject : NULL, LOG_F_STR,
           "status", srv_status_name(code), LOG_F_INT, "code", (int64_t)code, LOG_F_DBL,
           "duration_ms", ms, LOG_F_STR, "error", code == GRPC_STATUS_OK ? NULL : message,
           LOG_F_INT, "worker", (int64_t)c->w->index, LOG_F_END);
}

/* Sends status (with initial metadata if never sent, #18) and an optional message. */
static void send_final(srv_call *c, grpc_byte_buffer *body, grpc_status_code code,
                       const char *message, const uint8_t *details, size_t details_len)
{
    if (c->status_sent) {
        if (body)
            grpc_byte_buffer_destroy(body);
        return;
    }
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->sent_initial_md) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = 0;
        n++;
        c->sent_initial_md = true;
    }
    if (body) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = body;
        c->send_bb = body; /* alive until the batch completes (#14) */
        n++;
    }
    grpc_slice_unref(c->status_slice);
    c->status_slice = grpc_slice_from_copied_string(message ? message : "");
    if (details && details_len) {
        c->trailing[0].key = grpc_slice_from_static_string("grpc-status-details-bin");
        c->trailing[0].value = grpc_slice_from_copied_buffer((const char *)details, details_len);
        c->ntrailing = 1;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n].data.send_status_from_server.status_details = &c->status_slice;
    ops[n].data.send_status_from_server.trailing_metadata_count = c->ntrailing;
    ops[n].data.send_status_from_server.trailing_metadata = c->ntrailing ? c->trailing : NULL;
    n++;
    c->status_sent = true;
    c->final_code = code;
    c->send_in_flight = true;
    if (!call_batch(c, ops, n, &c->tag_send)) {
        c->send_in_flight = false;
        if (c->send_bb) {
            grpc_byte_buffer_destroy(c->send_bb);
            c->send_bb = NULL;
        }
    }
    access_log(c, code, message);
}

void srv_reply_error(srv_reply *r, grpc_status_code code, const char *fmt, ...)
{
    r->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->message, sizeof r->message, fmt, ap);
    va_end(ap);
    if (r->body) {
        grpc_byte_buffer_destroy(r->body);
        r->body = NULL;
    }
}

void srv_reply_domain(srv_reply *r, order_error *err)
{
    srv_reply_error(r, srv_status_for(err->code), "%s",
                    err->message[0] ? err->message : order_code_name(err->code));
    r->err = err;
}

void srv_call_reply(srv_call *c, srv_reply *r)
{
    size_t dlen = 0;
    uint8_t *details = NULL;
    if (r->code == GRPC_STATUS_OK && r->body) {
        size_t len = grpc_byte_buffer_length(r->body);
        if (len > (size_t)c->w->srv->cfg->max_send_message_bytes) {
            srv_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED,
                            "the response (%zu bytes) exceeds server.max_send_message_bytes; ask "
                            "for less, e.g. a smaller page_size",
                            len);
        }
    }
    if (r->code != GRPC_STATUS_OK && r->retry_after_us > 0)
        details = srv_status_details_quota(r->message, r->retry_after_us, r->quota_subject,
                                           r->quota_description, &dlen);
    else if (r->code != GRPC_STATUS_OK)
        details = srv_status_details(r->code, r->message, r->err, r->reason, &dlen);
    send_final(c, r->code == GRPC_STATUS_OK ? r->body : NULL, r->code, r->message, details, dlen);
    if (r->code != GRPC_STATUS_OK && r->body)
        grpc_byte_buffer_destroy(r->body);
    r->body = NULL;
    free(details);
}

grpc_byte_buffer *srv_pack(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s); /* the buffer holds its own reference (#14) */
    return bb;
}

bool srv_stream_send(srv_call *c, const ProtobufCMessage *msg)
{
    if (c->send_in_flight || c->status_sent || c->cancelled)
        return false;
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->sent_initial_md) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
        c->sent_initial_md = true;
    }
    c->send_bb = srv_pack(msg);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = c->send_bb;
    n++;
    c->send_in_flight = true;
    if (!call_batch(c, ops, n, &c->tag_send)) {
        c->send_in_flight = false;
        grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
        return false;
    }
    return true;
}

bool srv_stream_recv(srv_call *c)
{
    if (c->recv_in_flight || c->status_sent)
        return false;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    c->recv_in_flight = true;
    if (!call_batch(c, &op, 1, &c->tag_recv)) {
        c->recv_in_flight = false;
        return false;
    }
    return true;
}

void srv_stream_finish(srv_call *c, grpc_status_code code, const char *message)
{
    if (c->status_sent || c->send_in_flight)
        return;
    stream_unlink(c);
    size_t dlen = 0;
    uint8_t *details = NULL;
    if (code != GRPC_STATUS_OK)
        details = srv_status_details(code, message, NULL, NULL, &dlen);
    send_final(c, NULL, code, message, details, dlen);
    free(details);
}

/* ---- the interceptor chain: authentication, then role check (rate limits come next) ---- */

typedef bool (*interceptor)(srv_call *c, srv_reply *r);

static unsigned method_roles(const srv_call *c)
{
    return c->method->roles_from_config ? c->w->srv->cfg->reflection_roles : c->method->roles;
}

static bool intercept_authn(srv_call *c, srv_reply *r)
{
    if (method_roles(c) == 0)
        return true; /* health checks need no token */
    size_t len;
    const char *v = md_get(c, "authorization", &len);
    if (!v) {
        srv_reply_error(r, GRPC_STATUS_UNAUTHENTICATED,
                        "missing credentials: send metadata 'authorization: Bearer <JWT>'");
        return false;
    }
    char why[128] = "";
    if (srv_auth_verify(c->w->srv->auth, v, len, clock_wall_us() / 1000000, &c->ctx.caller, why,
                        sizeof why) != 0) {
        srv_reply_error(r, GRPC_STATUS_UNAUTHENTICATED, "invalid bearer token: %s", why);
        return false;
    }
    return true;
}

static bool intercept_rbac(srv_call *c, srv_reply *r)
{
    unsigned need = method_roles(c);
    if (need == 0 || (c->ctx.caller.roles & need))
        return true;
    srv_reply_error(r, GRPC_STATUS_PERMISSION_DENIED, "the caller's roles may not call %s",
                    c->method_name);
    return false;
}

static const interceptor chain[] = {intercept_authn, intercept_rbac};

/* ---- the worker loop ---- */

/* While draining, each worker holds this many requests, so that every call the core has
 * already queued is matched and served before the core starts refusing calls. */
#define DRAIN_SLOTS 64

/* Posts request calls up to the worker's target: one when running (the worker asks for a
 * call only when it is free), DRAIN_SLOTS when draining, none once the core shuts down. */
static void post_request(srv_worker *w)
{
    int want = atomic_load(&w->srv->draining) ? DRAIN_SLOTS : 1;
    while (w->posted < want && !atomic_load(&w->srv->shutting_down)) {
        srv_call *c = call_new(w);
        if (!c) {
            log_msgf(LOG_ERROR, "out of memory: worker %d cannot accept calls", w->index);
            return;
        }
        grpc_call_error e = grpc_server_request_call(w->srv->server, &c->call, &c->details, &c->md,
                                                     w->cq, w->cq, &c->tag_new);
        if (e != GRPC_CALL_OK) {
            log_kv(LOG_ERROR, "grpc_server_request_call failed", LOG_F_INT, "error", (int64_t)e,
                   LOG_F_END);
            call_unref(c);
            return;
        }
        w->posted++;
    }
}

static void run_unary(srv_call *c, const uint8_t *req, size_t len)
{
    srv_reply r = {.code = GRPC_STATUS_OK};
    if (c->cancelled) {
        srv_reply_error(&r, GRPC_STATUS_CANCELLED, "the call was cancelled before it ran");
    } else if (order_ctx_remaining_us(&c->ctx) <= 0) {
        srv_reply_error(&r, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded before the call ran");
    } else {
        /* The rate-limit interceptor runs once the request is here: for GetOrder the limiter
         * and the cache lookup then share one Redis round trip. */
        char id[ORDER_ID_LEN + 1];
        const char *prefetch = NULL;
        if (c->method->unary == srv_rpc_get_order && c->w->srv->cfg->cache_enabled &&
            srv_get_order_peek_id(req, len, id))
            prefetch = id;
        order_error_reset(c->err);
        if (srv_ratelimit_check(c, &r, prefetch))
            c->method->unary(c, req, len, &r);
    }
    srv_call_reply(c, &r);
}

static void on_new_call(srv_worker *w, srv_call *c, bool ok)
{
    w->posted--;
    if (!ok) { /* the server is shutting down (#10): do not re-post */
        call_unref(c);
        return;
    }
    c->start_mono_us = clock_mono_us();
    size_t mlen = GRPC_SLICE_LENGTH(c->details.method);
    if (mlen >= sizeof c->method_name)
        mlen = sizeof c->method_name - 1;
    memcpy(c->method_name, GRPC_SLICE_START_PTR(c->details.method), mlen);
    c->method_name[mlen] = '\0';
    set_request_id(c);

    /* Deadline: the core's clock is not ours (#20); carry the time left over. */
    gpr_timespec dl = c->details.deadline;
    if (dl.tv_sec == INT64_MAX) {
        c->ctx.deadline_mono_us = INT64_MAX;
    } else {
        gpr_timespec left = gpr_time_sub(dl, gpr_now(dl.clock_type));
        c->ctx.deadline_mono_us = clock_mono_us() + left.tv_sec * 1000000 + left.tv_nsec / 1000;
    }

    /* The only cancellation signal (#22). */
    grpc_op close_op;
    memset(&close_op, 0, sizeof close_op);
    close_op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    close_op.data.recv_close_on_server.cancelled = &c->close_cancelled; /* lives in the call */
    call_batch(c, &close_op, 1, &c->tag_close);

    c->method = method_find(c->details.method);
    srv_reply r = {.code = GRPC_STATUS_OK};
    if (!c->method) {
        srv_reply_error(&r, GRPC_STATUS_UNIMPLEMENTED, "unknown method %s", c->method_name);
        srv_call_reply(c, &r);
        call_unref(c);
        post_request(w);
        return;
    }
    for (size_t i = 0; i < sizeof chain / sizeof *chain; i++) {
        if (!chain[i](c, &r)) {
            srv_call_reply(c, &r);
            call_unref(c);
            post_request(w);
            return;
        }
    }
    if (c->method->kind == METHOD_UNARY) {
        /* Wait for the request message; the worker takes no new call until it has answered
         * this one (the tick posts one anyway if the message is slow to come). */
        if (!srv_stream_recv(c)) {
            srv_reply_error(&r, GRPC_STATUS_INTERNAL, "cannot read the request");
            srv_call_reply(c, &r);
        }
        call_unref(c);
        return;
    }
    /* Streams live on this worker's CQ; the worker is free again at once. */
    c->next_stream = w->streams;
    if (w->streams)
        w->streams->prev_stream = c;
    w->streams = c;
    c->method->stream_start(c);
    call_unref(c);
    post_request(w);
}

static void on_recv(srv_worker *w, srv_call *c, bool ok)
{
    c->recv_in_flight = false;
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    uint8_t *data = NULL;
    size_t len = 0;
    grpc_slice s = grpc_empty_slice();
    bool have = false;
    if (ok && bb) {
        grpc_byte_buffer_reader rd;
        if (grpc_byte_buffer_reader_init(&rd, bb)) { /* also decompresses (#13) */
            s = grpc_byte_buffer_reader_readall(&rd);
            grpc_byte_buffer_reader_destroy(&rd);
            data = GRPC_SLICE_START_PTR(s);
            len = GRPC_SLICE_LENGTH(s);
            have = true;
        }
        grpc_byte_buffer_destroy(bb);
    } else if (bb) {
        grpc_byte_buffer_destroy(bb);
    }

    if (c->method->kind == METHOD_UNARY) {
        if (!ok) {
            /* The call died before its message came; nothing to answer. */
        } else if (!have) {
            /* Half-closed without a message, or the message was unreadable (#12). */
            srv_reply r = {.code = GRPC_STATUS_OK};
            srv_reply_error(&r, GRPC_STATUS_INVALID_ARGUMENT, "the request message is missing");
            srv_call_reply(c, &r);
        } else {
            run_unary(c, data, len);
        }
        post_request(w);
    } else if (ok) {
        c->method->stream_recv(c, have ? data : NULL, len, !have);
    }
    grpc_slice_unref(s);
    call_unref(c);
}

static void on_send(srv_call *c, bool ok)
{
    c->send_in_flight = false;
    if (c->send_bb) {
        grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
    }
    if (!c->status_sent && c->method && c->method->stream_sent)
        c->method->stream_sent(c, ok);
    call_unref(c);
}

static void on_close(srv_call *c)
{
    /* RECV_CLOSE_ON_SERVER completes when the call is over for the client: a final status
     * already sent, or cancelled (reset, deadline, connection lost). */
    if (c->close_cancelled || !c->status_sent)
        c->cancelled = true;
    if (c->method && c->method->kind != METHOD_UNARY && !c->status_sent) {
        /* The peer is gone: end the stream on our side too. */
        stream_unlink(c);
        c->status_sent = true;
        access_log(c, GRPC_STATUS_CANCELLED, "cancelled by the client");
    }
    call_unref(c);
}

static void worker_tick(srv_worker *w)
{
    /* An idle worker re-opens a lost Redis connection too (back-off permitting): if one of
     * its cache writes failed during the outage, reconnecting bumps the epoch, which must
     * not wait for this worker's next call while other replicas serve old entries. */
    if (w->cache)
        cache_up(w->cache);
    for (srv_call *c = w->streams, *next; c; c = next) {
        next = c->next_stream;
        c->method->stream_tick(c);
    }
    post_request(w);
}

static void *worker_main(void *arg)
{
    srv_worker *w = arg;
    post_request(w);
    for (;;) {
        gpr_timespec until =
            gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(TICK_MS, GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(w->cq, until, NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            worker_tick(w);
            continue;
        }
        srv_tag *tag = ev.tag;
        srv_call *c = tag->call;
        switch (tag->kind) {
        case TAG_NEW_CALL:
            on_new_call(w, c, ev.success);
            break;
        case TAG_RECV:
            on_recv(w, c, ev.success);
            break;
        case TAG_SEND:
            on_send(c, ev.success);
            break;
        case TAG_CLOSE:
            on_close(c);
            break;
        }
    }
    return NULL;
}

/* ---- start and stop ---- */

static int worker_init(srv_server *srv, srv_worker *w, int index)
{
    char err[256] = "";
    w->index = index;
    w->srv = srv;
    w->cq = grpc_completion_queue_create_for_next(NULL);
    if (srv_deps_open(srv, &w->d, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "cannot set up a worker (PostgreSQL, Redis, payment providers)",
               LOG_F_STR, "error", err, LOG_F_END);
        return -1;
    }
    w->cache = w->d.cache;
    grpc_server_register_completion_queue(srv->server, w->cq, NULL); /* (#7) */
    return 0;
}

static void worker_dispose(srv_worker *w)
{
    if (w->cq) {
        grpc_completion_queue_shutdown(w->cq);
        while (grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(w->cq);
    }
    w->cache = NULL;
    srv_deps_close(&w->d);
}

static grpc_server *server_create(const srv_config *cfg)
{
    grpc_arg args[5];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = cfg->max_receive_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = cfg->max_send_message_bytes;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_MAX_METADATA_SIZE; /* room for large tokens (#17) */
    args[2].value.integer = cfg->max_metadata_bytes;
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = (char *)GRPC_ARG_ALLOW_REUSEPORT; /* a second instance must fail (#5) */
    args[3].value.integer = 0;
    args[4].type = GRPC_ARG_INTEGER;
    args[4].key = (char *)GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS;
    args[4].value.integer = 1;
    grpc_channel_args ca = {.num_args = 5, .args = args};
    return grpc_server_create(&ca, NULL);
}

int srv_server_run(const srv_config *cfg, const sigset_t *wait_for)
{
    int rc = 1;
    char err[256] = "";
    srv_server srv = {.cfg = cfg};
    atomic_init(&srv.draining, false);
    atomic_init(&srv.shutting_down, false);
    atomic_init(&srv.health, 2 /* NOT_SERVING until PostgreSQL answers */);
    atomic_init(&srv.health_stop, false);

    if (srv_reflection_init(err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "cannot load the reflection descriptors", LOG_F_STR, "error", err,
               LOG_F_END);
        return 1;
    }
    if (cfg->redis_tls && (cfg->cache_enabled || cfg->ratelimit_enabled) &&
        !cfg->redis_tls_ca_file[0]) {
        log_kv(LOG_ERROR, "redis.tls needs redis.tls_ca_file", LOG_F_STR, "error",
               "the Redis server certificate is always verified; set redis.tls_ca_file to the "
               "CA bundle that signed it",
               LOG_F_END);
        srv_reflection_dispose();
        return 1;
    }
    if (srv_limits_create(cfg, &srv.limits, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "bad rate-limit settings", LOG_F_STR, "error", err, LOG_F_END);
        srv_reflection_dispose();
        return 1;
    }
    srv.auth = srv_auth_create(cfg, err, sizeof err);
    if (!srv.auth) {
        log_kv(LOG_ERROR, "cannot set up authentication", LOG_F_STR, "error", err, LOG_F_END);
        srv_limits_destroy(srv.limits);
        srv_reflection_dispose();
        return 1;
    }

    srv.server = server_create(cfg);
    srv.shutdown_cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(srv.server, srv.shutdown_cq, NULL);
    srv.nworkers = cfg->workers;
    srv.workers = calloc((size_t)srv.nworkers, sizeof *srv.workers);
    int started = 0;
    bool server_started = false, health_started = false;
    if (!srv.workers)
        goto out;
    for (int i = 0; i < srv.nworkers; i++)
        if (worker_init(&srv, &srv.workers[i], i) != 0)
            goto out;

    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(srv.server, cfg->listen, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) { /* 0, not -1, on failure (#4) */
        log_kv(LOG_ERROR, "cannot listen: the address is in use or invalid", LOG_F_STR, "listen",
               cfg->listen, LOG_F_END);
        goto out;
    }
    grpc_server_start(srv.server);
    server_started = true;
    if (srv_health_monitor_start(&srv) != 0)
        goto out;
    health_started = true;
    for (; started < srv.nworkers; started++) {
        if (pthread_create(&srv.workers[started].thread, NULL, worker_main,
                           &srv.workers[started]) != 0) {
            log_msgf(LOG_ERROR, "cannot start worker thread %d", started);
            goto out;
        }
    }
    if (srv_background_start(&srv, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "cannot start the background work (relay, consumer, sweeper)", LOG_F_STR,
               "error", err, LOG_F_END);
        goto out;
    }
    if (cfg->http_listen[0] && srv_http_start(&srv, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "cannot start the HTTP side port", LOG_F_STR, "listen", cfg->http_listen,
               LOG_F_STR, "error", err, LOG_F_END);
        goto out;
    }
    log_kv(LOG_INFO, "orderd serving", LOG_F_STR, "listen", cfg->listen, LOG_F_INT, "port",
           (int64_t)port, LOG_F_INT, "workers", (int64_t)srv.nworkers, LOG_F_STR, "grpc_core",
           grpc_version_string(), LOG_F_END);

    int sig = 0;
    sigwait(wait_for, &sig);
    log_kv(LOG_INFO, "shutting down: draining in-flight calls", LOG_F_STR, "signal",
           sig == SIGTERM ? "SIGTERM" : "SIGINT", LOG_F_INT, "grace_ms",
           cfg->shutdown_grace_us / 1000, LOG_F_END);
    rc = 0;
    atomic_store(&srv.health, 2); /* NOT_SERVING: let load balancers move away */
    /* Calls the core has queued but no worker has taken yet would be refused by the
     * shutdown below; let the workers take them first (each posts DRAIN_SLOTS requests
     * within a tick or as soon as it finishes its current call). */
    atomic_store(&srv.draining, true);
    usleep(3 * TICK_MS * 1000);

out:
    /* Webhooks and background work first: they use the database and providers too. */
    srv_http_stop(&srv);
    srv_background_stop(&srv);
    atomic_store(&srv.shutting_down, true);
    if (server_started) {
        /* (#25) shutdown_and_notify, wait with a grace period while the workers keep
         * polling, then cancel what is left. */
        static int shutdown_tag;
        grpc_server_shutdown_and_notify(srv.server, srv.shutdown_cq, &shutdown_tag);
        gpr_timespec grace =
            gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                         gpr_time_from_micros(cfg->shutdown_grace_us, GPR_TIMESPAN));
        /* shutdown_cq is a NEXT queue that only ever carries this one tag. */
        grpc_event ev = grpc_completion_queue_next(srv.shutdown_cq, grace, NULL);
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            log_msgf(LOG_WARN, "grace period over: cancelling the calls still running");
            grpc_server_cancel_all_calls(srv.server);
            grpc_completion_queue_next(srv.shutdown_cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        }
    } else if (srv.server) {
        static int shutdown_tag2;
        grpc_server_shutdown_and_notify(srv.server, srv.shutdown_cq, &shutdown_tag2);
        grpc_completion_queue_next(srv.shutdown_cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    }
    for (int i = 0; i < srv.nworkers && srv.workers; i++)
        if (srv.workers[i].cq)
            grpc_completion_queue_shutdown(srv.workers[i].cq);
    for (int i = 0; i < started; i++)
        pthread_join(srv.workers[i].thread, NULL);
    if (health_started)
        srv_health_monitor_stop(&srv);
    if (srv.server)
        grpc_server_destroy(srv.server);
    for (int i = 0; i < srv.nworkers && srv.workers; i++) {
        worker_dispose(&srv.workers[i]);
    }
    free(srv.workers);
    grpc_completion_queue_shutdown(srv.shutdown_cq);
    while (grpc_completion_queue_next(srv.shutdown_cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
               .type != GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(srv.shutdown_cq);
    srv_auth_destroy(srv.auth);
    srv_limits_destroy(srv.limits);
    srv_reflection_dispose();
    if (rc == 0)
        log_msgf(LOG_INFO, "orderd stopped");
    return rc;
}
