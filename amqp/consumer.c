/* consumer.c — the consumer of the inventory service's replies (stock.reserved,
 * stock.rejected; docs/events.md): one thread with its own broker connection.
 *
 * DESIGN
 * Topology, declared on every (re)connection (idempotent): the topic exchange, a durable
 * fanout dead-letter exchange with its queue, and the reply queue (x-dead-letter-exchange
 * set to it, quorum if configured) bound to the exchange under each reply key. Deliveries
 * come with manual acknowledgement, at most `prefetch` at a time.
 * Each delivery is checked before anything is done with it; a malformed one (not JSON, a
 * missing or mistyped field, an unknown type, a type that is not its routing key, a
 * message_id that is not its event_id) is logged and rejected without requeue, so the
 * broker dead-letters it and the consumer carries on. A well-formed one goes to the reply
 * function, and is acknowledged only after it returned, i.e. after its effect was
 * committed (the function dedupes on event_id in the same transaction). A transient
 * failure (database unavailable, deadline, lost race) is rejected with requeue after a
 * back-off; anything else the function may say that can never succeed is dead-lettered.
 * "Unavailable" (the database is down) is retried for as long as it lasts; a deadline or
 * a lost race is about the reply itself as much as the moment, so one reply failing so
 * `reply_max_attempts` times in a row is dead-lettered rather than retried for ever (it
 * would come back first every time and take the consumer's time from the others).
 * The thread never trusts the body: lengths are bounded, and nothing is ever asserted.
 */
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp/amqp.h"
#include "amqp/conn.h"
#include "common/clock.h"
#include "common/log.h"

#define BODY_CAP     (64 * 1024) /* larger bodies are malformed */
#define LOG_BODY_MAX 200         /* bytes of a malformed body quoted in the log */
#define RETRY_MIN_US (200 * 1000LL)
#define EVENT_ID_MAX 255
#define STRIKES_MAX  64 /* replies whose failed attempts are counted at once */

/* Failed attempts of one reply in a row (deadline, lost race). */
struct strike {
    char id[EVENT_ID_MAX + 1];
    int count;
    uint64_t used; /* for replacing the least recently failed */
};

struct amqp_consumer {
    amqp_settings s; /* a copy; the strings are borrowed */
    amqp_reply_fn fn;
    void *arg;
    mq_conn mq;
    pthread_t thread;
    bool up;
    int64_t retry_us; /* back-off before requeueing after a transient failure */
    struct strike strikes[STRIKES_MAX];
    uint64_t strike_clock;

    atomic_uint_fast64_t applied, duplicates, dead_lettered, requeued, reconnects;
    atomic_bool connected;
};

/* Counts a failed attempt of reply `id`; returns how many in a row it has had. */
static int strike(struct amqp_consumer *k, const char *id)
{
    struct strike *slot = &k->strikes[0];
    for (int i = 0; i < STRIKES_MAX; i++) {
        struct strike *s = &k->strikes[i];
        if (s->count && strcmp(s->id, id) == 0) {
            slot = s;
            break;
        }
        if (!s->count || s->used < slot->used)
            slot = s; /* a free one, else the least recently failed */
    }
    if (!slot->count || strcmp(slot->id, id) != 0) {
        snprintf(slot->id, sizeof slot->id, "%s", id);
        slot->count = 0;
    }
    slot->count++;
    slot->used = ++k->strike_clock;
    return slot->count;
}

/* Forgets the failures of reply `id` (it was settled). */
static void unstrike(struct amqp_consumer *k, const char *id)
{
    for (int i = 0; i < STRIKES_MAX; i++)
        if (k->strikes[i].count && strcmp(k->strikes[i].id, id) == 0)
            k->strikes[i].count = 0;
}

static void set_down(struct amqp_consumer *k)
{
    k->up = false;
    atomic_store(&k->connected, false);
}

/* ---- topology ---- */

static void consumer_connect(struct amqp_consumer *k)
{
    const amqp_settings *s = &k->s;
    mq_conn *c = &k->mq;
    if (mq__connect(c) != 0) {
        mq__failed(c, "connect");
        return;
    }
    const char *step = "topology";
    if (mq__declare_exchange(c, s->exchange, "topic") != 0 ||
        mq__declare_exchange(c, s->dead_letter_exchange, "fanout") != 0 ||
        mq__declare_queue(c, s->dead_letter_queue, s->quorum_queues, NULL) != 0 ||
        mq__bind(c, s->dead_letter_queue, s->dead_letter_exchange, "") != 0 ||
        mq__declare_queue(c, s->reply_queue, s->quorum_queues, s->dead_letter_exchange) != 0)
        goto fail;
    /* Each key of the comma-separated list, spaces trimmed. */
    for (const char *p = s->reply_keys; p && *p;) {
        p += strspn(p, " ,");
        size_t len = strcspn(p, ",");
        size_t end = len;
        while (end && p[end - 1] == ' ')
            end--;
        if (end) {
            char key[MQ_SHORTSTR_MAX + 1];
            snprintf(key, sizeof key, "%.*s", (int)end, p);
            if (mq__bind(c, s->reply_queue, s->exchange, key) != 0)
                goto fail;
        }
        p += len;
    }
    step = "basic.qos";
    amqp_basic_qos(c->st, c->ch, 0, (uint16_t)s->prefetch, 0);
    if (mq__rpc_check(c, "basic.qos", NULL) != 0)
        goto fail;
    step = "basic.consume";
    amqp_basic_consume(c->st, c->ch, amqp_cstring_bytes(s->reply_queue), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    if (mq__rpc_check(c, "basic.consume", NULL) != 0)
        goto fail;
    if (mq__up(c))
        atomic_fetch_add(&k->reconnects, 1);
    k->up = true;
    atomic_store(&k->connected, true);
    return;
fail:
    mq__failed(c, step);
}

/* ---- one delivery ---- */

/* At most LOG_BODY_MAX bytes of a body, printable ASCII only, for a log line. */
static void body_excerpt(char *dst, size_t cap, const char *body, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len && i < LOG_BODY_MAX && n + 1 < cap; i++) {
        unsigned char ch = (unsigned char)body[i];
        dst[n++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
    }
    dst[n] = '\0';
}

/* A string member: NULL if absent (or JSON null, when nullable), *bad set when present with
 * another type or out of bounds. */
static const char *str_member(json_t *o, const char *name, size_t max, bool nullable, char *why,
                              size_t whylen, bool *bad)
{
    json_t *v = json_object_get(o, name);
    if (!v || (nullable && json_is_null(v)))
        return NULL;
    if (!json_is_string(v)) {
        snprintf(why, whylen, "%s is not a string", name);
        *bad = true;
        return NULL;
    }
    size_t len = json_string_length(v);
    if (len > max) {
        snprintf(why, whylen, "%s is longer than %zu bytes", name, max);
        *bad = true;
        return NULL;
    }
    return json_string_value(v);
}

/* Checks a reply; fills *out (pointing into root) or writes why it is malformed. */
static bool parse_reply(json_t *root, const char *routing_key, const mq_content *m,
                        order_stock_reply *out, char *why, size_t whylen)
{
    bool bad = false;
    if (!json_is_object(root)) {
        snprintf(why, whylen, "body is not a JSON object");
        return false;
    }
    const char *id = str_member(root, "event_id", EVENT_ID_MAX, false, why, whylen, &bad);
    if (bad)
        return false;
    if (!id || !*id) {
        snprintf(why, whylen, "event_id is missing or empty");
        return false;
    }
    const char *type = str_member(root, "type", MQ_SHORTSTR_MAX, false, why, whylen, &bad);
    if (bad)
        return false;
    if (!type) {
        snprintf(why, whylen, "type is missing");
        return false;
    }
    bool rejected;
    if (strcmp(type, "stock.reserved") == 0) {
        rejected = false;
    } else if (strcmp(type, "stock.rejected") == 0) {
        rejected = true;
    } else {
        snprintf(why, whylen, "unknown type \"%.64s\"", type);
        return false;
    }
    if (strcmp(type, routing_key) != 0) {
        snprintf(why, whylen, "type %s does not match the routing key %.64s", type, routing_key);
        return false;
    }
    const char *order_id = str_member(root, "order_id", 64, false, why, whylen, &bad);
    if (bad)
        return false;
    if (!order_id || !*order_id) {
        snprintf(why, whylen, "order_id is missing or empty");
        return false;
    }
    const char *reason = str_member(root, "reason", ORDER_REASON_MAX, true, why, whylen, &bad);
    if (bad)
        return false;
    if (m->has_message_id && strcmp(m->message_id, id) != 0) {
        snprintf(why, whylen, "message_id %.64s differs from event_id %.64s", m->message_id, id);
        return false;
    }
    *out =
        (order_stock_reply){.id = id, .rejected = rejected, .order_id = order_id, .reason = reason};
    return true;
}

/* Acknowledges, or rejects with or without requeue; a failure loses the connection (the
 * broker then redelivers whatever was not acknowledged). */
static void settle(struct amqp_consumer *k, uint64_t tag, bool ack, bool requeue)
{
    mq_conn *c = &k->mq;
    if (!c->st)
        return;
    int rc = ack ? amqp_basic_ack(c->st, c->ch, tag, 0)
                 : amqp_basic_reject(c->st, c->ch, tag, requeue ? 1 : 0);
    if (rc != AMQP_STATUS_OK) {
        mq__lost(c, amqp_error_string2(rc));
        set_down(k);
    }
}

static void on_delivery(struct amqp_consumer *k, const amqp_frame_t *f)
{
    mq_conn *c = &k->mq;
    const amqp_basic_deliver_t *d = f->payload.method.decoded;
    uint64_t tag = d->delivery_tag;
    bool redelivered = d->redelivered;
    char rk[MQ_SHORTSTR_MAX + 1];
    mq__bytes_str(rk, sizeof rk, d->routing_key);

    mq_content m;
    if (mq__read_content(c, clock_mono_us() + k->s.timeout_us, BODY_CAP, &m) != 0) {
        mq__lost(c, c->error); /* unacknowledged: redelivered on the next connection */
        set_down(k);
        return;
    }

    char why[200] = "";
    order_stock_reply reply;
    json_t *root = NULL;
    bool ok = false;
    if (m.body_size > BODY_CAP) {
        snprintf(why, sizeof why, "body of %llu bytes is larger than %d",
                 (unsigned long long)m.body_size, BODY_CAP);
    } else {
        json_error_t jerr;
        root = json_loadb(m.body, m.len, JSON_REJECT_DUPLICATES, &jerr);
        if (!root)
            snprintf(why, sizeof why, "not JSON: %s (at byte %d)", jerr.text, jerr.position);
        else
            ok = parse_reply(root, rk, &m, &reply, why, sizeof why);
    }

    if (!ok) {
        char excerpt[LOG_BODY_MAX + 1];
        body_excerpt(excerpt, sizeof excerpt, m.body, m.len);
        log_kv(LOG_WARN, "malformed inventory reply; dead-lettering it", LOG_F_INT, "delivery_tag",
               (int64_t)tag, LOG_F_STR, "routing_key", rk, LOG_F_STR, "message_id",
               m.has_message_id ? m.message_id : NULL, LOG_F_STR, "problem", why, LOG_F_INT,
               "body_bytes", (int64_t)m.body_size, LOG_F_STR, "body_start", excerpt, LOG_F_END);
        settle(k, tag, false, false);
        atomic_fetch_add(&k->dead_lettered, 1);
        goto done;
    }

    int rc = k->fn(k->arg, &reply);
    if (rc == ORDER_EDEADLINE || rc == ORDER_EABORTED) {
        int n = strike(k, reply.id);
        if (n >= k->s.reply_max_attempts) {
            log_kv(LOG_ERROR, "inventory reply failed on every attempt; dead-lettering it",
                   LOG_F_STR, "event_id", reply.id, LOG_F_STR, "order_id", reply.order_id,
                   LOG_F_STR, "code", order_code_name(rc), LOG_F_INT, "attempts", (int64_t)n,
                   LOG_F_END);
            unstrike(k, reply.id);
            settle(k, tag, false, false);
            atomic_fetch_add(&k->dead_lettered, 1);
            goto done;
        }
    } else if (rc != ORDER_EUNAVAILABLE) {
        unstrike(k, reply.id);
    }
    switch (rc) {
    case ORDER_OK:
        atomic_fetch_add(&k->applied, 1);
        settle(k, tag, true, false);
        k->retry_us = 0;
        break;
    case ORDER_EDUPLICATE:
        atomic_fetch_add(&k->duplicates, 1);
        settle(k, tag, true, false);
        k->retry_us = 0;
        break;
    case ORDER_ENOTFOUND:
    case ORDER_EINVAL:
        /* It can never apply; keeping it would change nothing. */
        log_kv(LOG_WARN, "inventory reply ignored", LOG_F_STR, "event_id", reply.id, LOG_F_STR,
               "type", rk, LOG_F_STR, "order_id", reply.order_id, LOG_F_STR, "code",
               order_code_name(rc), LOG_F_END);
        settle(k, tag, true, false);
        k->retry_us = 0;
        break;
    case ORDER_EUNAVAILABLE:
    case ORDER_EDEADLINE:
    case ORDER_EABORTED: {
        int64_t max = k->s.backoff_max_us;
        k->retry_us = k->retry_us ? k->retry_us * 2 : RETRY_MIN_US;
        if (k->retry_us > max)
            k->retry_us = max;
        log_kv(LOG_WARN, "inventory reply not applied (transient); requeueing after a back-off",
               LOG_F_STR, "event_id", reply.id, LOG_F_STR, "order_id", reply.order_id, LOG_F_STR,
               "code", order_code_name(rc), LOG_F_INT, "retry_in_ms", k->retry_us / 1000, LOG_F_INT,
               "redelivered", (int64_t)redelivered, LOG_F_END);
        mq__sleep(c, k->retry_us);
        atomic_fetch_add(&k->requeued, 1);
        settle(k, tag, false, true);
        break;
    }
    default:
        log_kv(LOG_ERROR, "inventory reply failed for good; dead-lettering it", LOG_F_STR,
               "event_id", reply.id, LOG_F_STR, "order_id", reply.order_id, LOG_F_STR, "code",
               order_code_name(rc), LOG_F_END);
        settle(k, tag, false, false);
        atomic_fetch_add(&k->dead_lettered, 1);
        break;
    }
done:
    json_decref(root);
    mq__content_free(&m);
}

static void on_frame(void *arg, const amqp_frame_t *f)
{
    struct amqp_consumer *k = arg;
    if (f->frame_type != AMQP_FRAME_METHOD)
        return;
    switch (f->payload.method.id) {
    case AMQP_BASIC_DELIVER_METHOD:
        on_delivery(k, f);
        break;
    case AMQP_BASIC_CANCEL_METHOD: /* the queue was deleted, or a quorum leader moved */
        mq__lost(&k->mq, "the broker cancelled the consumer");
        set_down(k);
        break;
    default:
        break;
    }
}

static void *consumer_main(void *arg)
{
    struct amqp_consumer *k = arg;
    mq_conn *c = &k->mq;
    while (!mq__stopping(c)) {
        if (!k->up) {
            int64_t now = clock_mono_us();
            if (mq__due(c, now))
                consumer_connect(k);
            else
                mq__sleep(c, c->next_attempt_us - now);
            continue;
        }
        if (!amqp_frames_enqueued(c->st) && !amqp_data_in_buffer(c->st)) {
            int64_t wait = mq__service_interval(c);
            if (wait > 1000000)
                wait = 1000000;
            struct pollfd p[2] = {{.fd = c->wake_rd, .events = POLLIN},
                                  {.fd = amqp_get_sockfd(c->st), .events = POLLIN}};
            if (poll(p, 2, (int)(wait / 1000)) > 0 && (p[0].revents & POLLIN))
                mq__drain_wake(c);
        }
        if (mq__stopping(c))
            break;
        if (mq__service(c, on_frame, k) != 0)
            set_down(k);
    }
    /* Unacknowledged deliveries go back to the queue when the channel closes. */
    mq__close(c);
    set_down(k);
    return NULL;
}

/* ---- the public API ---- */

int amqp_consumer_start(const amqp_settings *s, amqp_reply_fn fn, void *arg, amqp_consumer **out,
                        char *err, size_t errlen)
{
    *out = NULL;
    if (!s || !fn || !s->host || !*s->host || s->port <= 0 || s->port > 65535 || !s->exchange ||
        !*s->exchange || !s->reply_queue || !*s->reply_queue || !s->reply_keys || !*s->reply_keys ||
        !s->dead_letter_exchange || !*s->dead_letter_exchange || !s->dead_letter_queue ||
        !*s->dead_letter_queue) {
        snprintf(err, errlen,
                 "amqp consumer: host, port, exchange, reply queue and keys, dead-letter "
                 "exchange and queue are needed");
        return -1;
    }
    struct amqp_consumer *k = calloc(1, sizeof *k);
    if (!k) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    k->s = *s;
    if (k->s.timeout_us <= 0)
        k->s.timeout_us = 5 * 1000000LL;
    if (k->s.backoff_max_us <= 0)
        k->s.backoff_max_us = 30 * 1000000LL;
    if (k->s.prefetch <= 0)
        k->s.prefetch = 10;
    if (k->s.reply_max_attempts <= 0)
        k->s.reply_max_attempts = 10;
    if (k->s.prefetch > 65535)
        k->s.prefetch = 65535;
    k->fn = fn;
    k->arg = arg;
    if (mq__init(&k->mq, &k->s, "consumer") != 0) {
        snprintf(err, errlen, "amqp consumer: cannot create its wake-up pipe");
        free(k);
        return -1;
    }
    if (pthread_create(&k->thread, NULL, consumer_main, k) != 0) {
        snprintf(err, errlen, "amqp consumer: cannot start its thread");
        mq__dispose(&k->mq);
        free(k);
        return -1;
    }
    *out = k;
    return 0;
}

void amqp_consumer_stop(amqp_consumer *k)
{
    if (!k)
        return;
    mq__request_stop(&k->mq);
    pthread_join(k->thread, NULL);
    mq__dispose(&k->mq);
    free(k);
}

void amqp_consumer_stats_get(amqp_consumer *k, amqp_consumer_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!k)
        return;
    out->applied = atomic_load(&k->applied);
    out->duplicates = atomic_load(&k->duplicates);
    out->dead_lettered = atomic_load(&k->dead_lettered);
    out->requeued = atomic_load(&k->requeued);
    out->reconnects = atomic_load(&k->reconnects);
    out->connected = atomic_load(&k->connected);
}
