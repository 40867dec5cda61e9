/* test_relay.c — the outbox relay against a real RabbitMQ and PostgreSQL: every event of
 * every kind arrives with its properties, in order per order, and is marked sent; NOTIFY
 * wakes an idle relay; heartbeats keep an idle connection; a broker that cannot be reached
 * leaves the rows unsent while the backlog gauge grows, and they drain once one can; an
 * unroutable family is retried with back-off and counted while the other flows; two relays
 * on one outbox deliver every event once and in order; quorum queues, and a queue that
 * exists with other arguments; published rows are pruned. */
#include <jansson.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "amqptest.h"
#include "live.h"
#include "common/clock.h"
#include "fixture.h"
#include "storage/pgtest.h"

static struct store *S;
static order_store P;

/* What one test works on. */
static char EX[128], SQ[128], OQ[128];
static amqp_settings SET;
static amqp_connection_state_t RAW;

static int group_setup(void **state)
{
    S = pgt_store(5 * 1000000);
    store_order_port(S, &P);
    return 0;
}

static int group_teardown(void **state)
{
    store_close(S);
    return 0;
}

static int setup(void **state)
{
    fx_reset();
    amqpt_name(EX, sizeof EX, "events");
    amqpt_name(SQ, sizeof SQ, "stock");
    amqpt_name(OQ, sizeof OQ, "order");
    amqpt_settings(&SET);
    SET.exchange = EX;
    SET.stock_queue = SQ;
    SET.order_queue = OQ;
    RAW = amqpt_connect();
    return 0;
}

static int teardown(void **state)
{
    live_relays_stop_all();
    amqpt_delete_queue(RAW, SQ);
    amqpt_delete_queue(RAW, OQ);
    amqpt_delete_exchange(RAW, EX);
    amqpt_close(RAW);
    RAW = NULL;
    return 0;
}

static amqp_relay *start(const amqp_settings *s)
{
    return live_relay_start(s, pgt_dsn(), 5 * 1000000);
}

static amqp_relay_stats stats_of(amqp_relay *r)
{
    amqp_relay_stats st;
    amqp_relay_stats_get(r, &st);
    return st;
}

static bool all_sent(void *arg)
{
    return fx_unsent() == 0;
}

static bool is_connected(void *arg)
{
    return stats_of(arg).connected;
}

/* The outbox row of an event id. */
struct row {
    int64_t seq;
    char routing_key[64];
    char order_id[ORDER_ID_LEN + 1];
    char *payload;
    int64_t created_s;
    bool published;
    int attempts;
};

static bool row_get(const char *id, struct row *out)
{
    const char *p[1] = {id};
    PGresult *r =
        PQexecParams(pgt_conn(),
                     "SELECT seq, routing_key, order_id, payload::text,"
                     " floor(extract(epoch FROM created_at))::bigint, published_at IS NOT NULL,"
                     " attempts FROM outbox WHERE id = $1::uuid",
                     1, NULL, p, NULL, NULL, 0);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    bool found = PQntuples(r) == 1;
    if (found) {
        out->seq = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        snprintf(out->routing_key, sizeof out->routing_key, "%s", PQgetvalue(r, 0, 1));
        snprintf(out->order_id, sizeof out->order_id, "%s", PQgetvalue(r, 0, 2));
        out->payload = strdup(PQgetvalue(r, 0, 3));
        out->created_s = strtoll(PQgetvalue(r, 0, 4), NULL, 10);
        out->published = PQgetvalue(r, 0, 5)[0] == 't';
        out->attempts = atoi(PQgetvalue(r, 0, 6));
    }
    PQclear(r);
    return found;
}

/* Receives up to `want` messages from the consumers of RAW (waiting at most timeout_us for
 * each); returns how many came. */
static size_t collect(amqpt_msg *msgs, size_t want, int64_t timeout_us)
{
    size_t n = 0;
    while (n < want && amqpt_next(RAW, &msgs[n], timeout_us))
        n++;
    return n;
}

/* Checks each message against its outbox row, and that, per (order, family), messages came
 * in seq order. Frees the messages. Returns how many distinct event ids were seen. */
struct seen {
    char order_id[ORDER_ID_LEN + 1];
    char family[8];
    int64_t last_seq;
};

static void check_messages(amqpt_msg *msgs, size_t n, const char *exchange)
{
    struct seen *seen = calloc(n + 1, sizeof *seen);
    size_t nseen = 0;
    for (size_t i = 0; i < n; i++) {
        amqpt_msg *m = &msgs[i];
        assert_true(m->has_message_id);
        for (size_t j = 0; j < i; j++) /* delivered once */
            assert_string_not_equal(msgs[j].message_id, m->message_id);
        struct row w;
        if (!row_get(m->message_id, &w))
            fail_msg("message %s is no outbox row", m->message_id);
        assert_true(w.published);
        assert_string_equal(m->exchange, exchange);
        assert_string_equal(m->routing_key, w.routing_key);
        assert_string_equal(m->type, w.routing_key);
        assert_string_equal(m->content_type, "application/json");
        assert_string_equal(m->app_id, "orderd");
        assert_int_equal(m->delivery_mode, 2);
        assert_true(m->has_timestamp);
        assert_int_equal((int64_t)m->timestamp, w.created_s);
        assert_string_equal(m->header_order_id, w.order_id);
        assert_string_equal(m->body, w.payload); /* the body is the stored payload as it is */
        json_error_t je;
        json_t *b = json_loads(m->body, 0, &je);
        assert_non_null(b);
        assert_string_equal(json_string_value(json_object_get(b, "event_id")), m->message_id);
        assert_string_equal(json_string_value(json_object_get(b, "type")), m->routing_key);
        assert_string_equal(json_string_value(json_object_get(b, "order_id")), w.order_id);
        json_decref(b);

        char family[8];
        snprintf(family, sizeof family, "%.*s", (int)strcspn(w.routing_key, "."), w.routing_key);
        struct seen *s = NULL;
        for (size_t j = 0; j < nseen; j++)
            if (strcmp(seen[j].order_id, w.order_id) == 0 && strcmp(seen[j].family, family) == 0)
                s = &seen[j];
        if (!s) {
            s = &seen[nseen++];
            snprintf(s->order_id, sizeof s->order_id, "%s", w.order_id);
            snprintf(s->family, sizeof s->family, "%s", family);
            s->last_seq = 0;
        }
        if (w.seq <= s->last_seq)
            fail_msg("order %s, family %s: seq %lld came after %lld", w.order_id, family,
                     (long long)w.seq, (long long)s->last_seq);
        s->last_seq = w.seq;
        free(w.payload);
        amqpt_msg_free(m);
    }
    free(seen);
}

/* ---- the tests ---- */

static void test_publishes_every_event_with_its_properties(void **state)
{
    order_t a, b, c, d;
    fx_place(&P, &a, "ann", 2);
    fx_move(&P, a.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, NULL);
    fx_move(&P, a.id, ORDER_STATUS_PAID, ORDER_STATUS_SHIPPED, NULL);
    fx_move(&P, a.id, ORDER_STATUS_SHIPPED, ORDER_STATUS_DELIVERED, NULL);
    fx_place(&P, &b, "bob", 1);
    fx_move(&P, b.id, ORDER_STATUS_PENDING, ORDER_STATUS_CANCELLED, "changed my mind");
    fx_place(&P, &c, "cat", 1);
    fx_move(&P, c.id, ORDER_STATUS_PENDING, ORDER_STATUS_EXPIRED, "unpaid");
    fx_place(&P, &d, "dan", 3);
    fx_move(&P, d.id, ORDER_STATUS_PENDING, ORDER_STATUS_FAILED, "stock rejected");
    assert_int_equal(fx_rows(), 18);
    /* All ten routing keys are there. */
    assert_int_equal(pgt_scalar("SELECT count(DISTINCT routing_key) FROM outbox", NULL, NULL, NULL),
                     10);

    amqp_relay *r = start(&SET);
    assert_true(amqpt_wait(all_sent, NULL, 15 * 1000000));
    /* The relay declared both queues and their bindings. */
    amqpt_consume(RAW, SQ);
    amqpt_consume(RAW, OQ);
    amqpt_msg msgs[32];
    size_t n = collect(msgs, 32, 1000000);
    assert_int_equal(n, 18);
    size_t nstock = 0;
    for (size_t i = 0; i < n; i++)
        nstock += strncmp(msgs[i].routing_key, "stock.", 6) == 0;
    assert_int_equal(nstock, 8); /* 4 reserves, 1 commit, 3 restores */
    check_messages(msgs, n, EX);

    amqp_relay_stats st = stats_of(r);
    assert_int_equal(st.published, 18);
    assert_int_equal(st.nacked + st.unroutable + st.timeouts, 0);
    assert_true(st.connected);
    int64_t t0 = clock_mono_us();
    live_relay_stop(r);
    assert_true(clock_mono_us() - t0 < 3 * 1000000);
    order_clear(&a);
    order_clear(&b);
    order_clear(&c);
    order_clear(&d);
}

static void test_notify_wakes_an_idle_relay(void **state)
{
    SET.heartbeat_s = 0;                     /* nothing else wakes it */
    SET.relay_idle_poll_us = 60 * 1000000LL; /* only NOTIFY can be this quick */
    SET.stats_interval_us = 60 * 1000000LL;
    amqp_relay *r = start(&SET);
    assert_true(amqpt_wait(is_connected, r, 10 * 1000000));
    usleep(500 * 1000); /* idle in its wait now */
    order_t a;
    int64_t t0 = clock_mono_us();
    fx_place(&P, &a, "ann", 1);
    assert_true(amqpt_wait(all_sent, NULL, 5 * 1000000));
    assert_true(clock_mono_us() - t0 < 3 * 1000000);
    assert_int_equal(stats_of(r).published, 2);
    live_relay_stop(r);
    order_clear(&a);
}

static void test_heartbeats_keep_an_idle_connection(void **state)
{
    SET.heartbeat_s = 1; /* the broker closes a connection silent for two intervals */
    SET.relay_idle_poll_us = 30 * 1000000LL;
    SET.stats_interval_us = 30 * 1000000LL;
    amqp_relay *r = start(&SET);
    assert_true(amqpt_wait(is_connected, r, 10 * 1000000));
    sleep(5);
    order_t a;
    fx_place(&P, &a, "ann", 1);
    assert_true(amqpt_wait(all_sent, NULL, 5 * 1000000));
    amqp_relay_stats st = stats_of(r);
    assert_int_equal(st.reconnects, 0); /* the same connection all along */
    assert_true(st.connected);
    assert_int_equal(st.published, 2);
    live_relay_stop(r);
    order_clear(&a);
}

static bool backlog_is(void *arg)
{
    struct {
        amqp_relay *r;
        int64_t want;
    } *w = arg;
    return stats_of(w->r).backlog == w->want;
}

static void test_unreachable_broker_keeps_rows_then_drains(void **state)
{
    amqp_settings bad = SET;
    bad.port = amqpt_closed_port();
    amqp_relay *r = start(&bad);
    order_t a, b;
    fx_place(&P, &a, "ann", 1);
    fx_place(&P, &b, "bob", 2);
    struct {
        amqp_relay *r;
        int64_t want;
    } w = {r, 4};
    assert_true(amqpt_wait(backlog_is, &w, 5 * 1000000));
    usleep(600 * 1000); /* several connection attempts */
    amqp_relay_stats st = stats_of(r);
    assert_false(st.connected);
    assert_int_equal(st.published, 0);
    assert_true(st.oldest_unsent_age_us > 0);
    /* Never claimed: without a broker there is nothing to try. */
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL AND"
                                " attempts = 0 AND claimed_until IS NULL",
                                NULL, NULL, NULL),
                     4);
    /* More orders: the gauge grows. */
    order_t c;
    fx_place(&P, &c, "cat", 1);
    fx_move(&P, c.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, NULL);
    w.want = 8;
    assert_true(amqpt_wait(backlog_is, &w, 5 * 1000000));
    int64_t t0 = clock_mono_us();
    live_relay_stop(r); /* promptly, even while reconnecting */
    assert_true(clock_mono_us() - t0 < 2 * 1000000);

    r = start(&SET);
    assert_true(amqpt_wait(all_sent, NULL, 15 * 1000000));
    w.r = r;
    w.want = 0;
    assert_true(amqpt_wait(backlog_is, &w, 5 * 1000000));
    assert_int_equal(stats_of(r).published, 8);
    amqpt_consume(RAW, SQ);
    amqpt_consume(RAW, OQ);
    amqpt_msg msgs[16];
    size_t n = collect(msgs, 16, 1000000);
    assert_int_equal(n, 8);
    check_messages(msgs, n, EX);
    live_relay_stop(r);
    order_clear(&a);
    order_clear(&b);
    order_clear(&c);
}

static bool family_sent(void *arg)
{
    return pgt_scalar("SELECT count(*) FROM outbox WHERE family = $1 AND published_at IS NULL", arg,
                      NULL, NULL) == 0;
}

static bool stock_retried(void *arg)
{
    return pgt_scalar("SELECT count(*) FROM outbox WHERE routing_key = 'stock.reserve'"
                      " AND published_at IS NULL AND attempts >= 3"
                      " AND last_error LIKE 'unroutable: basic.return 312 NO_ROUTE%'",
                      NULL, NULL, NULL) == 2;
}

static void test_unroutable_family_backs_off_while_the_other_flows(void **state)
{
    /* The consuming side owns its queues: only order.* is bound. */
    amqpt_exchange(RAW, EX, "topic");
    amqpt_queue(RAW, OQ, false, NULL);
    amqpt_bind(RAW, OQ, EX, "order.*");
    SET.declare_queues = false;
    amqp_relay *r = start(&SET);

    order_t a, b;
    fx_place(&P, &a, "ann", 1);
    fx_move(&P, a.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, NULL);
    fx_place(&P, &b, "bob", 1);
    static char order_family[] = "order";
    assert_true(amqpt_wait(family_sent, order_family, 10 * 1000000));
    /* The stock heads come back (back-off 0.25-0.5 s, then 0.5-1 s), counted unroutable;
     * a's stock.commit waits behind its head. */
    assert_true(amqpt_wait(stock_retried, NULL, 10 * 1000000));
    assert_int_equal(pgt_scalar("SELECT attempts FROM outbox WHERE routing_key = 'stock.commit'",
                                NULL, NULL, NULL),
                     0);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE routing_key LIKE 'stock.%'"
                                " AND published_at IS NOT NULL",
                                NULL, NULL, NULL),
                     0);
    amqp_relay_stats st = stats_of(r);
    assert_true(st.unroutable >= 4);
    assert_int_equal(st.published, 3);
    assert_true(st.connected);

    amqpt_consume(RAW, OQ);
    amqpt_msg msgs[8];
    size_t n = collect(msgs, 8, 500 * 1000);
    assert_int_equal(n, 3); /* a placed, a paid, b placed; nothing else was routable */
    check_messages(msgs, n, EX);

    /* A queue for stock.* appears: the retries deliver, in order. */
    amqpt_queue(RAW, SQ, false, NULL);
    amqpt_bind(RAW, SQ, EX, "stock.*");
    assert_true(amqpt_wait(all_sent, NULL, 10 * 1000000));
    amqpt_consume(RAW, SQ);
    n = collect(msgs, 8, 1000000);
    assert_int_equal(n, 3);
    check_messages(msgs, n, EX);
    assert_int_equal(stats_of(r).published, 6);
    live_relay_stop(r);
    order_clear(&a);
    order_clear(&b);
}

/* Places orders and moves them along while the relays run. */
#define WRITER_ORDERS 40
static void *writer(void *arg)
{
    struct store *s = pgt_store(5 * 1000000);
    order_store p;
    store_order_port(s, &p);
    for (int i = 0; i < WRITER_ORDERS; i++) {
        order_t o;
        fx_place(&p, &o, "writer", 1 + i % 3);
        fx_move(&p, o.id, ORDER_STATUS_PENDING, ORDER_STATUS_PAID, NULL);
        fx_move(&p, o.id, ORDER_STATUS_PAID, ORDER_STATUS_SHIPPED, NULL);
        order_clear(&o);
    }
    store_close(s);
    return NULL;
}

static void test_two_relays_share_the_outbox(void **state)
{
    SET.relay_batch = 5; /* many rounds, so both take part */
    amqp_relay *r1 = start(&SET);
    amqp_relay *r2 = start(&SET);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, writer, NULL), 0);
    pthread_join(t, NULL);
    assert_int_equal(fx_rows(), WRITER_ORDERS * 5);
    assert_true(amqpt_wait(all_sent, NULL, 30 * 1000000));

    amqpt_consume(RAW, SQ);
    amqpt_consume(RAW, OQ);
    size_t cap = WRITER_ORDERS * 5 + 10;
    amqpt_msg *msgs = calloc(cap, sizeof *msgs);
    size_t n = collect(msgs, cap, 1000000);
    assert_int_equal(n, WRITER_ORDERS * 5); /* each event once: no more, no fewer */
    check_messages(msgs, n, EX);            /* ...and in order per order and family */
    free(msgs);
    amqp_relay_stats s1 = stats_of(r1), s2 = stats_of(r2);
    assert_int_equal(s1.published + s2.published, WRITER_ORDERS * 5);
    live_relay_stop(r1);
    live_relay_stop(r2);
}

static void test_quorum_queues_and_a_queue_declared_otherwise(void **state)
{
    /* The stock queue exists already as a classic queue; the relay wants quorum queues. */
    amqpt_queue(RAW, SQ, false, NULL);
    SET.quorum_queues = true;
    amqp_relay *r = start(&SET);
    order_t a;
    fx_place(&P, &a, "ann", 1);
    assert_true(amqpt_wait(all_sent, NULL, 15 * 1000000));
    /* It carried on: bound the existing queue, declared the other as quorum. */
    assert_int_equal(amqpt_queue_try(RAW, OQ, false, NULL), 406); /* it is not classic */
    assert_int_equal(amqpt_queue_try(RAW, OQ, true, NULL), 0);
    assert_int_equal(amqpt_queue_try(RAW, SQ, false, NULL), 0); /* still classic */
    amqpt_consume(RAW, SQ);
    amqpt_consume(RAW, OQ);
    amqpt_msg msgs[4];
    size_t n = collect(msgs, 4, 1000000);
    assert_int_equal(n, 2);
    check_messages(msgs, n, EX);
    live_relay_stop(r);
    order_clear(&a);
}

static bool pruned(void *arg)
{
    return fx_rows() == 0;
}

static void test_prunes_published_rows(void **state)
{
    SET.outbox_retention_us = 300 * 1000;
    amqp_relay *r = start(&SET);
    order_t a;
    fx_place(&P, &a, "ann", 1);
    fx_move(&P, a.id, ORDER_STATUS_PENDING, ORDER_STATUS_CANCELLED, "no");
    assert_true(amqpt_wait(pruned, NULL, 10 * 1000000));
    assert_int_equal(stats_of(r).pruned, 4);
    assert_int_equal(stats_of(r).published, 4);
    live_relay_stop(r);
    order_clear(&a);
}

static bool timed_out_twice(void *arg)
{
    return stats_of(arg).timeouts >= 2;
}

static void test_silent_broker_is_given_up_and_retried(void **state)
{
    amqpt_proxy *px = amqpt_proxy_start(SET.host, SET.port);
    amqp_settings s = SET;
    s.port = amqpt_proxy_port(px);
    s.timeout_us = 1000000;
    amqp_relay *r = start(&s);
    assert_true(amqpt_wait(is_connected, r, 10 * 1000000));

    amqpt_proxy_freeze(px, true); /* the broker hangs: no error, no answer */
    order_t a;
    fx_place(&P, &a, "ann", 1);
    assert_true(amqpt_wait(timed_out_twice, r, 10 * 1000000));
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL"
                                " AND attempts >= 1 AND last_error LIKE 'no publisher confirm%'",
                                NULL, NULL, NULL),
                     2);
    usleep(1500 * 1000); /* reconnecting into the silence: login attempts time out */
    amqp_relay_stats st = stats_of(r);
    assert_false(st.connected);
    assert_int_equal(st.published, 0);
    assert_true(amqpt_proxy_accepted(px) >= 2);

    amqpt_proxy_freeze(px, false);
    assert_true(amqpt_wait(all_sent, NULL, 15 * 1000000));
    st = stats_of(r);
    assert_true(st.connected);
    assert_true(st.reconnects >= 1);
    assert_int_equal(st.published, 2);
    amqpt_consume(RAW, SQ);
    amqpt_consume(RAW, OQ);
    amqpt_msg msgs[4];
    size_t n = collect(msgs, 4, 1000000);
    assert_int_equal(n, 2);
    check_messages(msgs, n, EX);

    /* Stopping while the broker hangs takes about one timeout, not forever. */
    amqpt_proxy_freeze(px, true);
    usleep(200 * 1000);
    int64_t t0 = clock_mono_us();
    live_relay_stop(r);
    assert_true(clock_mono_us() - t0 < 3 * 1000000);
    amqpt_proxy_stop(px);
    order_clear(&a);
}

/* pgt_dsn() with its host and port replaced by 127.0.0.1:port. */
static void dsn_via(char *buf, size_t cap, int port, char *host, size_t hcap, int *orig_port)
{
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(pgt_dsn(), &err);
    assert_non_null(opts);
    size_t len = 0;
    buf[0] = '\0';
    snprintf(host, hcap, "127.0.0.1");
    *orig_port = 5432;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val)
            continue;
        if (strcmp(o->keyword, "host") == 0 || strcmp(o->keyword, "hostaddr") == 0) {
            if (o->val[0] == '/')
                fail_msg("this test needs PostgreSQL over TCP");
            snprintf(host, hcap, "%s", o->val);
            continue;
        }
        if (strcmp(o->keyword, "port") == 0) {
            *orig_port = atoi(o->val);
            continue;
        }
        len += (size_t)snprintf(buf + len, cap - len, "%s='%s' ", o->keyword, o->val);
    }
    snprintf(buf + len, cap - len, "host=127.0.0.1 port=%d", port);
    PQconninfoFree(opts);
}

static void test_silent_postgres_keeps_the_relay_responsive(void **state)
{
    char dsn[1024], host[256];
    int pgport;
    dsn_via(dsn, sizeof dsn, 0, host, sizeof host, &pgport);
    amqpt_proxy *px = amqpt_proxy_start(host, pgport);
    dsn_via(dsn, sizeof dsn, amqpt_proxy_port(px), host, sizeof host, &pgport);
    amqp_relay *r = live_relay_start(&SET, dsn, 1000000);
    assert_true(amqpt_wait(is_connected, r, 10 * 1000000));
    usleep(300 * 1000);

    amqpt_proxy_freeze(px, true); /* PostgreSQL hangs */
    order_t a;
    fx_place(&P, &a, "ann", 1); /* written directly, not through the proxy */
    usleep(1500 * 1000);
    assert_int_equal(fx_unsent(), 2);
    amqpt_proxy_freeze(px, false);
    assert_true(amqpt_wait(all_sent, NULL, 20 * 1000000));
    assert_int_equal(stats_of(r).published, 2);

    amqpt_proxy_freeze(px, true);
    usleep(500 * 1000); /* mid-call on the silent server, most likely */
    int64_t t0 = clock_mono_us();
    live_relay_stop(r);
    assert_true(clock_mono_us() - t0 < 5 * 1000000);
    amqpt_proxy_stop(px);
    order_clear(&a);
}

int main(void)
{
    if (amqpt_setup("relay") != 0 || pgt_setup("amqp_relay", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_publishes_every_event_with_its_properties, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_notify_wakes_an_idle_relay, setup, teardown),
        cmocka_unit_test_setup_teardown(test_heartbeats_keep_an_idle_connection, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreachable_broker_keeps_rows_then_drains, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_unroutable_family_backs_off_while_the_other_flows,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_relays_share_the_outbox, setup, teardown),
        cmocka_unit_test_setup_teardown(test_quorum_queues_and_a_queue_declared_otherwise, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_prunes_published_rows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_silent_broker_is_given_up_and_retried, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_silent_postgres_keeps_the_relay_responsive, setup,
                                        teardown),
    };
    int rc = cmocka_run_group_tests(tests, group_setup, group_teardown);
    pgt_teardown();
    return rc;
}
