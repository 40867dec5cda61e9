/* relay.c — the outbox relay: one thread that moves the rows of the transactional outbox to
 * RabbitMQ with publisher confirms, and marks a row sent only after the broker's ack.
 *
 * DESIGN
 * A round claims a batch (storage/outbox.h: the heads of the (order, family) chains that
 * are due, leased for relay_claim_us), publishes every row persistent and mandatory, then
 * reads frames until each delivery tag of the batch is confirmed or timeout_us passes:
 * - basic.ack / basic.nack, either possibly `multiple`, settle the tags they cover;
 * - basic.return (mandatory, no queue bound) comes before its message's ack; its content
 *   is read and matched to the row by message_id, and that ack then does NOT mean
 *   delivered;
 * - acked and not returned: sent; nacked, returned, unconfirmed at the deadline, or cut
 *   off by a lost connection: failed, with a per-row back-off (outbox.h). A timeout or a
 *   lost connection also drops the connection (its delivery tags start again at 1).
 * The lease outlasts a round (publish + confirm wait + the marking transaction), so a row
 * is never published by two relays at once unless a relay stalls past its lease; even then
 * a chain's next event waits until its head is marked sent, so per-order order holds.
 * Delivery is at least once: a row whose ack arrives but whose marking fails (PostgreSQL
 * down) is published again after its lease; consumers dedupe on message_id.
 *
 * When nothing is due the thread poll()s the PostgreSQL socket (LISTEN orderd_outbox: the
 * orders trigger notifies after writing events), the broker's socket, and its wake-up
 * pipe, for at most relay_idle_poll_us and never longer than heartbeat/2, then services
 * the broker's frames and heartbeats without blocking (conn.h). Every stats_interval_us it
 * refreshes the backlog gauges and prunes published rows older than the retention.
 */
#include <pthread.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp/amqp.h"
#include "amqp/conn.h"
#include "common/clock.h"
#include "common/log.h"
#include "storage/outbox.h"
#include "storage/storage.h"

#define RETRY_BASE_US       (500 * 1000LL)  /* first per-row retry delay, doubling per attempt */
#define PRUNE_BATCH         1000            /* rows deleted per statement */
#define PRUNE_MAX_ROUND     20              /* statements per stats interval */
#define SLOW_CLAIM_US       (200 * 1000LL)  /* a claim this slow means stale statistics */
#define ANALYZE_GAP_US      (5 * 1000000LL) /* at most one slow-claim ANALYZE per this */
#define ANALYZE_MIN_BACKLOG 500             /* backlogs below this plan fine either way */

struct amqp_relay {
    amqp_settings s; /* a copy; the strings are borrowed */
    char *dsn;
    struct store *store; /* used by the thread only, once started */
    mq_conn mq;
    pthread_t thread;
    bool up;           /* connected, topology declared, confirms on */
    uint64_t next_tag; /* the delivery tag of the next publish on this channel */
    uint64_t listen_tag;
    int64_t pg_op_us; /* bound of one PostgreSQL call */
    int64_t claim_us;
    int64_t retry_base_us;

    int64_t last_backlog;
    int64_t analyzed_backlog; /* backlog at the last ANALYZE; -1 = none yet */
    int64_t analyzed_at_us;   /* monotonic */
    bool backlog_warned;

    atomic_uint_fast64_t published, nacked, unroutable, timeouts, reconnects, pruned;
    atomic_int_fast64_t backlog, oldest_age_us;
    atomic_bool connected;
};

static order_ctx pg_ctx(struct amqp_relay *r, order_error *e)
{
    memset(e, 0, sizeof *e);
    order_ctx ctx = {.deadline_mono_us = clock_mono_us() + r->pg_op_us, .err = e};
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "outbox-relay");
    ctx.caller.roles = ORDER_ROLE_SERVICE;
    return ctx;
}

static void set_down(struct amqp_relay *r)
{
    r->up = false;
    atomic_store(&r->connected, false);
}

/* ---- connecting and topology ---- */

static void relay_connect(struct amqp_relay *r)
{
    const amqp_settings *s = &r->s;
    mq_conn *c = &r->mq;
    if (mq__connect(c) != 0) {
        mq__failed(c, "connect");
        return;
    }
    const char *step = "topology";
    if (mq__declare_exchange(c, s->exchange, "topic") != 0)
        goto fail;
    if (s->declare_queues) {
        /* The stock queue is bound to the three keys orderd publishes, not to "stock.*":
         * the inventory service's replies (stock.reserved, stock.rejected) travel on the
         * same exchange and would otherwise come back to it on its own queue. */
        static const char *const stock_keys[] = {"stock.reserve", "stock.commit", "stock.restore"};
        if (s->stock_queue && *s->stock_queue) {
            if (mq__declare_queue(c, s->stock_queue, s->quorum_queues, NULL) != 0)
                goto fail;
            for (size_t i = 0; i < sizeof stock_keys / sizeof stock_keys[0]; i++)
                if (mq__bind(c, s->stock_queue, s->exchange, stock_keys[i]) != 0)
                    goto fail;
        }
        if (s->order_queue && *s->order_queue &&
            (mq__declare_queue(c, s->order_queue, s->quorum_queues, NULL) != 0 ||
             mq__bind(c, s->order_queue, s->exchange, "order.*") != 0))
            goto fail;
    }
    step = "confirm.select";
    amqp_confirm_select(c->st, c->ch);
    if (mq__rpc_check(c, "confirm.select", NULL) != 0)
        goto fail;
    r->next_tag = 1; /* per channel, from 1 */
    if (mq__up(c))
        atomic_fetch_add(&r->reconnects, 1);
    r->up = true;
    atomic_store(&r->connected, true);
    return;
fail:
    mq__failed(c, step);
}

/* ---- one batch ---- */

enum { P_WAIT, P_ACK, P_NACK };

struct pending {
    uint64_t tag; /* 0: not published */
    int state;
    bool returned;
    char return_text[160];
};

static void settle(struct pending *p, size_t n, uint64_t tag, bool multiple, int state,
                   size_t *waiting)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i].tag == 0 || p[i].state != P_WAIT)
            continue;
        if (p[i].tag == tag || (multiple && p[i].tag < tag)) {
            p[i].state = state;
            (*waiting)--;
        }
    }
}

/* basic.return: read the returned message and flag its row. -1 if the connection broke. */
static int on_return(struct amqp_relay *r, const amqp_frame_t *f, store_outbox_row *rows,
                     struct pending *p, size_t n, int64_t deadline)
{
    const amqp_basic_return_t *m = f->payload.method.decoded;
    char text[128], key[MQ_SHORTSTR_MAX + 1];
    mq__bytes_str(text, sizeof text, m->reply_text);
    mq__bytes_str(key, sizeof key, m->routing_key);
    unsigned code = m->reply_code;
    mq_content body;
    if (mq__read_content(&r->mq, deadline, 0, &body) != 0)
        return -1;
    bool found = false;
    for (size_t i = 0; i < n && body.has_message_id; i++) {
        if (p[i].tag && strcmp(rows[i].id, body.message_id) == 0) {
            p[i].returned = true;
            snprintf(p[i].return_text, sizeof p[i].return_text, "%u %s", code, text);
            found = true;
            break;
        }
    }
    if (!found)
        log_kv(LOG_WARN, "basic.return of a message not in this batch", LOG_F_STR, "message_id",
               body.message_id, LOG_F_STR, "routing_key", key, LOG_F_END);
    mq__content_free(&body);
    return 0;
}

static void mark(struct amqp_relay *r, const char *const *ids, size_t n, bool sent,
                 const char *error)
{
    if (n == 0)
        return;
    order_error e;
    order_ctx ctx = pg_ctx(r, &e);
    int rc = sent ? store_outbox_mark_sent(r->store, &ctx, ids, n)
                  : store_outbox_mark_failed(r->store, &ctx, ids, n, error, r->retry_base_us,
                                             r->s.relay_retry_max_us);
    if (rc != ORDER_OK)
        /* The rows stay leased until their claim runs out, then go again: a sent row is
         * published twice (consumers dedupe on message_id), a failed one retried sooner. */
        log_kv(LOG_WARN,
               sent ? "outbox: marking rows sent failed; they will be republished"
                    : "outbox: recording a failed publish failed; the rows retry after their lease",
               LOG_F_INT, "rows", (int64_t)n, LOG_F_STR, "code", order_code_name(rc), LOG_F_STR,
               "error", e.message, LOG_F_END);
}

static void publish_batch(struct amqp_relay *r, store_outbox_row *rows, size_t n)
{
    const amqp_settings *s = &r->s;
    mq_conn *c = &r->mq;
    struct pending *p = calloc(n, sizeof *p);
    const char **ids = calloc(n, sizeof *ids);
    if (!p || !ids) {
        free(p);
        free(ids);
        log_kv(LOG_ERROR, "outbox relay: out of memory; the batch retries after its lease",
               LOG_F_END);
        return;
    }

    bool lost = false, timed_out = false;
    char lost_why[256] = "";
    size_t waiting = 0;
    for (size_t i = 0; i < n; i++) {
        store_outbox_row *w = &rows[i];
        amqp_table_entry_t h = {.key = amqp_cstring_bytes("order_id")};
        h.value.kind = AMQP_FIELD_KIND_UTF8;
        h.value.value.bytes = amqp_cstring_bytes(w->order_id);
        amqp_basic_properties_t props = {0};
        props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
                       AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_TYPE_FLAG |
                       AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_APP_ID_FLAG;
        props.content_type = amqp_cstring_bytes("application/json");
        props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
        props.message_id = amqp_cstring_bytes(w->id);
        props.type = amqp_cstring_bytes(w->routing_key);
        props.timestamp = (uint64_t)(w->created_at_s > 0 ? w->created_at_s : 0);
        props.app_id = amqp_cstring_bytes("orderd");
        props.headers.num_entries = 1;
        props.headers.entries = &h;
        amqp_bytes_t body = {.len = w->payload_len, .bytes = w->payload};
        int rc = amqp_basic_publish(c->st, c->ch, amqp_cstring_bytes(s->exchange),
                                    amqp_cstring_bytes(w->routing_key), 1, 0, &props, body);
        if (rc != AMQP_STATUS_OK) {
            lost = true;
            snprintf(lost_why, sizeof lost_why, "publish: %s", amqp_error_string2(rc));
            break;
        }
        p[i].tag = r->next_tag++;
        p[i].state = P_WAIT;
        waiting++;
    }

    int64_t deadline = clock_mono_us() + s->timeout_us;
    while (waiting > 0 && !lost) {
        amqp_frame_t f;
        int rc = mq__wait_frame(c, &f, deadline);
        if (rc == AMQP_STATUS_TIMEOUT) {
            timed_out = true;
            break;
        }
        if (rc != AMQP_STATUS_OK) {
            lost = true;
            snprintf(lost_why, sizeof lost_why, "waiting for confirms: %s", amqp_error_string2(rc));
            break;
        }
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue; /* stray content of something already given up on */
        switch (f.payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
            const amqp_basic_ack_t *a = f.payload.method.decoded;
            settle(p, n, a->delivery_tag, a->multiple, P_ACK, &waiting);
            break;
        }
        case AMQP_BASIC_NACK_METHOD: {
            const amqp_basic_nack_t *a = f.payload.method.decoded;
            settle(p, n, a->delivery_tag, a->multiple, P_NACK, &waiting);
            break;
        }
        case AMQP_BASIC_RETURN_METHOD:
            if (on_return(r, &f, rows, p, n, deadline) != 0) {
                lost = true;
                snprintf(lost_why, sizeof lost_why, "%s", c->error);
            }
            break;
        case AMQP_CHANNEL_CLOSE_METHOD:
        case AMQP_CONNECTION_CLOSE_METHOD:
            mq__on_close_frame(c, &f); /* e.g. 404: the exchange was deleted */
            lost = true;
            snprintf(lost_why, sizeof lost_why, "%s", c->error);
            break;
        default:
            break;
        }
        if (c->st)
            amqp_maybe_release_buffers(c->st);
    }

    /* Sort the outcomes. */
    size_t nsent = 0, nnack = 0, nret = 0, nlate = 0, nlost = 0;
    for (size_t i = 0; i < n; i++)
        if (p[i].tag && p[i].state == P_ACK && !p[i].returned)
            ids[nsent++] = rows[i].id;
    /* Counted before the rows are marked: whoever sees them marked sees them counted (a
     * row republished after a failed mark is counted again: it was published again). */
    atomic_fetch_add(&r->published, nsent);
    mark(r, ids, nsent, true, NULL);

    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!p[i].tag || p[i].state != P_NACK || p[i].returned)
            continue;
        ids[k++] = rows[i].id;
    }
    nnack = k;
    mark(r, ids, k, false, "nacked by the broker");
    if (k) {
        atomic_fetch_add(&r->nacked, k);
        log_kv(LOG_WARN, "outbox: the broker nacked events; they will be retried", LOG_F_INT,
               "rows", (int64_t)k, LOG_F_END);
    }

    /* Returned rows, one marking per distinct broker answer (usually one). */
    for (size_t i = 0; i < n; i++) {
        if (!p[i].returned)
            continue;
        nret++;
        log_kv(LOG_WARN, "outbox: event unroutable (no queue bound for its routing key); retrying",
               LOG_F_STR, "routing_key", rows[i].routing_key, LOG_F_STR, "message_id", rows[i].id,
               LOG_F_STR, "order_id", rows[i].order_id, LOG_F_INT, "attempts",
               (int64_t)rows[i].attempts, LOG_F_STR, "reply", p[i].return_text, LOG_F_END);
    }
    for (size_t i = 0; i < n; i++) {
        if (!p[i].returned || !p[i].return_text[0])
            continue;
        char err[256];
        snprintf(err, sizeof err, "unroutable: basic.return %s (no queue bound for the key)",
                 p[i].return_text);
        k = 0;
        for (size_t j = i; j < n; j++) {
            if (p[j].returned && strcmp(p[j].return_text, p[i].return_text) == 0) {
                ids[k++] = rows[j].id;
                if (j != i)
                    p[j].return_text[0] = '\0'; /* done */
            }
        }
        p[i].return_text[0] = '\0';
        mark(r, ids, k, false, err);
    }
    atomic_fetch_add(&r->unroutable, nret);

    k = 0;
    for (size_t i = 0; i < n; i++)
        if (!p[i].returned && (p[i].tag == 0 || p[i].state == P_WAIT))
            ids[k++] = rows[i].id;
    if (k) {
        char err[300];
        if (lost) {
            nlost = k;
            snprintf(err, sizeof err, "connection lost: %s", lost_why);
        } else {
            nlate = k;
            snprintf(err, sizeof err, "no publisher confirm within %lld ms",
                     (long long)(s->timeout_us / 1000));
            atomic_fetch_add(&r->timeouts, k);
        }
        mark(r, ids, k, false, err);
    }

    if (log_enabled(LOG_DEBUG))
        log_kv(LOG_DEBUG, "outbox batch", LOG_F_INT, "rows", (int64_t)n, LOG_F_INT, "sent",
               (int64_t)nsent, LOG_F_INT, "nacked", (int64_t)nnack, LOG_F_INT, "unroutable",
               (int64_t)nret, LOG_F_INT, "unconfirmed", (int64_t)nlate, LOG_F_INT, "lost",
               (int64_t)nlost, LOG_F_END);

    if (timed_out) {
        /* A broker that does not confirm in time may be gone without a word: start over
         * on a fresh connection rather than wait on this one. */
        char why[128];
        snprintf(why, sizeof why, "no publisher confirm within %lld ms",
                 (long long)(s->timeout_us / 1000));
        mq__lost(c, why);
        set_down(r);
    } else if (lost) {
        if (c->st)
            mq__lost(c, lost_why);
        set_down(r);
    }
    free(p);
    free(ids);
}

/* One claim and its publishing. true if rows were published (look again at once). */
static void relay_analyze(struct amqp_relay *r, int64_t backlog, const char *why);

static bool relay_round(struct amqp_relay *r)
{
    order_error e;
    order_ctx ctx = pg_ctx(r, &e);
    /* LISTEN before the claim, and notifications drained before it: whatever is committed
     * after this claim's snapshot notifies afterwards and wakes the next wait. */
    if (store_outbox_listen(r->store, &ctx, &r->listen_tag) != ORDER_OK)
        return false;
    (void)store_outbox_notified(r->store);
    store_outbox_row *rows;
    size_t n;
    ctx = pg_ctx(r, &e);
    int64_t t0 = clock_mono_us();
    int rc = store_outbox_claim(r->store, &ctx, r->s.relay_batch, r->claim_us, &rows, &n);
    /* A slow claim means a plan made from statistics that do not know the backlog (see
     * store_outbox_analyze): refresh them, at most every few seconds. Only after the
     * claimed rows are published: the lease is sized for publishing, not for an ANALYZE
     * too, and a lease run out lets another relay publish the same head first. */
    bool slow = clock_mono_us() - t0 > SLOW_CLAIM_US;
    if (rc == ORDER_OK && n > 0) {
        publish_batch(r, rows, n);
        store_outbox_rows_free(rows, n);
    }
    if (slow && clock_mono_us() - r->analyzed_at_us > ANALYZE_GAP_US)
        relay_analyze(r, -1, "slow claim");
    return rc == ORDER_OK && n > 0 && r->up;
}

/* ---- gauges and pruning ---- */

/* Keeps the outbox's statistics in step with its backlog (store_outbox_analyze). */
static void relay_analyze(struct amqp_relay *r, int64_t backlog, const char *why)
{
    order_error e;
    order_ctx ctx = pg_ctx(r, &e);
    r->analyzed_at_us = clock_mono_us();
    if (store_outbox_analyze(r->store, &ctx) == ORDER_OK) {
        r->analyzed_backlog = backlog >= 0 ? backlog : r->last_backlog;
        log_kv(LOG_DEBUG, "outbox statistics refreshed", LOG_F_STR, "why", why, LOG_F_INT,
               "backlog", r->analyzed_backlog, LOG_F_END);
    }
}

/* Whether the backlog moved far enough from the one the statistics saw. */
static bool backlog_moved(const struct amqp_relay *r, int64_t backlog)
{
    int64_t seen = r->analyzed_backlog;
    if (seen < 0)
        return true;
    return backlog > 2 * seen + ANALYZE_MIN_BACKLOG ||
           (seen >= ANALYZE_MIN_BACKLOG && backlog < seen / 4);
}

static void relay_stats(struct amqp_relay *r)
{
    const amqp_settings *s = &r->s;
    order_error e;
    order_ctx ctx = pg_ctx(r, &e);
    int64_t backlog, age;
    if (store_outbox_stats(r->store, &ctx, &backlog, &age) == ORDER_OK) {
        atomic_store(&r->backlog, backlog);
        atomic_store(&r->oldest_age_us, age);
        /* "Growing": more rows than last time, and the oldest has waited longer than an
         * interval (under normal traffic the backlog goes up and down within one). */
        if (backlog > r->last_backlog && age > s->stats_interval_us) {
            log_kv(LOG_WARN, "outbox backlog growing", LOG_F_INT, "backlog", backlog, LOG_F_INT,
                   "oldest_unsent_age_ms", age / 1000, LOG_F_STR, "broker",
                   r->up ? "connected" : "disconnected", LOG_F_END);
            r->backlog_warned = true;
        } else if (backlog == 0 && r->backlog_warned) {
            log_kv(LOG_INFO, "outbox backlog drained", LOG_F_END);
            r->backlog_warned = false;
        }
        r->last_backlog = backlog;
        if (backlog_moved(r, backlog))
            relay_analyze(r, backlog, "backlog moved");
    }
    if (s->outbox_retention_us <= 0)
        return;
    for (int i = 0; i < PRUNE_MAX_ROUND; i++) {
        int64_t deleted = 0;
        ctx = pg_ctx(r, &e);
        if (store_outbox_prune(r->store, &ctx, s->outbox_retention_us, PRUNE_BATCH, &deleted) !=
            ORDER_OK)
            break;
        atomic_fetch_add(&r->pruned, (uint64_t)deleted);
        if (deleted < PRUNE_BATCH)
            break;
    }
}

/* ---- waiting ---- */

static void relay_wait(struct amqp_relay *r, int64_t next_stats)
{
    mq_conn *c = &r->mq;
    int64_t now = clock_mono_us();
    int64_t until = now + r->s.relay_idle_poll_us;
    if (next_stats < until)
        until = next_stats;
    if (!r->up) {
        if (c->next_attempt_us < until)
            until = c->next_attempt_us;
    } else {
        int64_t svc = mq__service_interval(c);
        if (svc != INT64_MAX && now + svc < until)
            until = now + svc;
        if (amqp_frames_enqueued(c->st) || amqp_data_in_buffer(c->st))
            until = now;
    }
    int pending = store_outbox_notified(r->store);
    if (pending > 0)
        return;

    struct pollfd pfd[3];
    int np = 0, pg = -1;
    pfd[np++] = (struct pollfd){.fd = c->wake_rd, .events = POLLIN};
    int pgfd = pending < 0 ? -1 : store_outbox_listen_fd(r->store);
    if (pgfd >= 0) {
        pg = np;
        pfd[np++] = (struct pollfd){.fd = pgfd, .events = POLLIN};
    }
    if (r->up) {
        int fd = amqp_get_sockfd(c->st);
        if (fd >= 0)
            pfd[np++] = (struct pollfd){.fd = fd, .events = POLLIN};
    }
    int64_t left = until - now;
    int ms = left <= 0 ? 0 : (int)((left + 999) / 1000);
    int n = poll(pfd, (nfds_t)np, ms);
    if (n > 0 && (pfd[0].revents & POLLIN))
        mq__drain_wake(c);
    if (r->up && mq__service(c, NULL, NULL) != 0)
        set_down(r);
    if (n > 0 && pg >= 0 && pfd[pg].revents)
        (void)store_outbox_notified(r->store);
}

static void *relay_main(void *arg)
{
    struct amqp_relay *r = arg;
    int64_t next_stats = 0;
    while (!mq__stopping(&r->mq)) {
        int64_t now = clock_mono_us();
        if (!r->up && mq__due(&r->mq, now))
            relay_connect(r);
        if (now >= next_stats) {
            relay_stats(r);
            next_stats = clock_mono_us() + r->s.stats_interval_us;
        }
        if (mq__stopping(&r->mq))
            break;
        if (!(r->up && relay_round(r)))
            relay_wait(r, next_stats);
    }
    mq__close(&r->mq);
    set_down(r);
    return NULL;
}

/* ---- the public API ---- */

int amqp_relay_start(const amqp_settings *s, const char *pg_dsn, int64_t pg_statement_timeout_us,
                     amqp_relay **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!s || !s->host || !*s->host || s->port <= 0 || s->port > 65535 || !s->exchange ||
        !*s->exchange || !pg_dsn) {
        snprintf(err, errlen, "amqp relay: host, port, exchange and a PostgreSQL DSN are needed");
        return -1;
    }
    struct amqp_relay *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    r->analyzed_backlog = -1;
    r->mq.wake_rd = r->mq.wake_wr = -1; /* mq__dispose is safe before mq__init */
    r->s = *s;
    /* Defaults for what was left 0. */
    if (r->s.timeout_us <= 0)
        r->s.timeout_us = 5 * 1000000LL;
    if (r->s.backoff_max_us <= 0)
        r->s.backoff_max_us = 30 * 1000000LL;
    if (r->s.relay_batch <= 0)
        r->s.relay_batch = 100;
    if (r->s.relay_idle_poll_us <= 0)
        r->s.relay_idle_poll_us = 1000000;
    if (r->s.relay_retry_max_us <= 0)
        r->s.relay_retry_max_us = 60 * 1000000LL;
    if (r->s.stats_interval_us <= 0)
        r->s.stats_interval_us = 10 * 1000000LL;
    r->retry_base_us =
        RETRY_BASE_US < r->s.relay_retry_max_us ? RETRY_BASE_US : r->s.relay_retry_max_us;
    r->pg_op_us =
        pg_statement_timeout_us > 0 ? pg_statement_timeout_us + 2 * 1000000LL : 10 * 1000000LL;
    /* The lease must outlast a round: publish, confirm wait (timeout_us), then marking. */
    int64_t min_claim = 2 * r->s.timeout_us + r->pg_op_us;
    r->claim_us = r->s.relay_claim_us > min_claim ? r->s.relay_claim_us : min_claim;
    if (r->s.relay_claim_us > 0 && r->s.relay_claim_us < min_claim)
        log_kv(LOG_WARN, "outbox relay: claim lease raised to outlast a publish round", LOG_F_INT,
               "configured_ms", r->s.relay_claim_us / 1000, LOG_F_INT, "used_ms", min_claim / 1000,
               LOG_F_END);

    r->dsn = strdup(pg_dsn);
    if (!r->dsn) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (mq__init(&r->mq, &r->s, "relay") != 0) {
        snprintf(err, errlen, "amqp relay: cannot create its wake-up pipe");
        goto fail;
    }
    /* Opened here so a bad DSN is reported now; an unreachable PostgreSQL is not an error
     * (the store reconnects). From the thread's start on, only the thread uses it. */
    char serr[256] = "";
    r->store = store_open(r->dsn, pg_statement_timeout_us, serr, sizeof serr);
    if (!r->store) {
        snprintf(err, errlen, "amqp relay: %s", serr);
        goto fail;
    }
    if (pthread_create(&r->thread, NULL, relay_main, r) != 0) {
        snprintf(err, errlen, "amqp relay: cannot start its thread");
        goto fail;
    }
    *out = r;
    return 0;
fail:
    store_close(r->store);
    mq__dispose(&r->mq);
    free(r->dsn);
    free(r);
    return -1;
}

void amqp_relay_stop(amqp_relay *r)
{
    if (!r)
        return;
    mq__request_stop(&r->mq);
    pthread_join(r->thread, NULL);
    store_close(r->store);
    mq__dispose(&r->mq);
    free(r->dsn);
    free(r);
}

void amqp_relay_stats_get(amqp_relay *r, amqp_relay_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!r)
        return;
    out->published = atomic_load(&r->published);
    out->nacked = atomic_load(&r->nacked);
    out->unroutable = atomic_load(&r->unroutable);
    out->timeouts = atomic_load(&r->timeouts);
    out->reconnects = atomic_load(&r->reconnects);
    out->pruned = atomic_load(&r->pruned);
    out->backlog = atomic_load(&r->backlog);
    out->oldest_unsent_age_us = atomic_load(&r->oldest_age_us);
    out->connected = atomic_load(&r->connected);
}
