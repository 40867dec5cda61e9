/* test_tls.c — the relay and the consumer over TLS (amqps) against the stack's RabbitMQ,
 * whose TLS listener (ORDERD_TEST_AMQPS_PORT) and throwaway certificates
 * (ORDERD_TEST_AMQP_TLS_DIR: ca.crt, client.crt/.key, and other-ca.crt, other-client.crt/.key
 * from an unrelated CA) scripts/stack.sh makes; scripts/test.sh exports both. Skipped (77)
 * when either is unset.
 *
 * Events flow over TLS with the CA verified, by IP address and by DNS name; replies are
 * consumed over TLS; a client certificate is presented, and one of another CA is refused
 * by the broker; a wrong CA and a wrong server name fail the connection with a log line
 * that names the verification failure, keep the rows unsent and keep retrying with
 * back-off; tls_verify off connects to a broker it cannot verify; the handshake against a
 * peer that never answers is bounded by the timeout, and TCP_USER_TIMEOUT is set on the
 * TLS socket; a broker that goes silent under TLS is given up and reconnected; heartbeats
 * keep an idle TLS connection; bad files and a TLS client on the plain port fail clearly,
 * without key material in the message. */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "amqp/conn.h"
#include "amqptest.h"
#include "live.h"
#include "common/clock.h"
#include "fixture.h"
#include "storage/pgtest.h"

#define S_US 1000000LL

static struct store *S;
static order_store P;

static int AMQPS_PORT;
static char CA[512], CLIENT_CRT[512], CLIENT_KEY[512], OTHER_CA[512], OTHER_CRT[512],
    OTHER_KEY[512];

/* What one test works on. */
static char EX[128], SQ[128], OQ[128], RQ[128], DLX[128], DLQ[128];
static amqp_settings SET;           /* TLS to the stack's amqps port, CA verified, host 127.0.0.1 */
static amqp_connection_state_t RAW; /* plain AMQP, behind the relay's back */

/* ---- stderr capture (the relay's log lines) ---- */

static struct {
    bool on;
    int saved;
    int fd;
} CAP = {.fd = -1, .saved = -1};

static void capture_begin(void)
{
    char p[] = "/tmp/orderd-amqp-tls-log-XXXXXX";
    CAP.fd = mkstemp(p);
    assert_true(CAP.fd >= 0);
    unlink(p);
    fflush(stderr);
    CAP.saved = dup(STDERR_FILENO);
    dup2(CAP.fd, STDERR_FILENO);
    CAP.on = true;
}

/* What was logged so far (heap, NUL-ended). */
static char *captured(void)
{
    off_t n = lseek(CAP.fd, 0, SEEK_END);
    char *buf = calloc(1, (size_t)n + 1);
    assert_non_null(buf);
    ssize_t r = pread(CAP.fd, buf, (size_t)n, 0);
    assert_int_equal(r, n);
    return buf;
}

/* Restores stderr and replays what was captured there, so ctest still shows it. */
static void capture_end(void)
{
    if (!CAP.on)
        return;
    CAP.on = false;
    fflush(stderr);
    dup2(CAP.saved, STDERR_FILENO);
    close(CAP.saved);
    off_t n = lseek(CAP.fd, 0, SEEK_END);
    char buf[4096];
    for (off_t off = 0; off < n;) {
        ssize_t r = pread(CAP.fd, buf, sizeof buf, off);
        if (r <= 0)
            break;
        ssize_t w = write(STDERR_FILENO, buf, (size_t)r);
        (void)w;
        off += r;
    }
    close(CAP.fd);
    CAP.fd = CAP.saved = -1;
}

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

static void assert_contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle))
        fail_msg("expected \"%s\" in: %s", needle, hay);
}

/* ---- set-up ---- */

static int group_setup(void **state)
{
    S = pgt_store(5 * S_US);
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
    amqpt_name(RQ, sizeof RQ, "replies");
    amqpt_name(DLX, sizeof DLX, "dlx");
    amqpt_name(DLQ, sizeof DLQ, "dlq");
    amqpt_settings(&SET);
    SET.exchange = EX;
    SET.stock_queue = SQ;
    SET.order_queue = OQ;
    SET.reply_queue = RQ;
    SET.dead_letter_exchange = DLX;
    SET.dead_letter_queue = DLQ;
    SET.host = "127.0.0.1";
    SET.port = AMQPS_PORT;
    SET.tls = true;
    SET.tls_ca_file = CA;
    RAW = amqpt_connect();
    return 0;
}

/* The consumer a test started and has not stopped (relays: live.h): a failed assertion
 * jumps straight to teardown, which stops it. */
static amqp_consumer *LIVE_CONSUMER;

static int teardown(void **state)
{
    live_relays_stop_all();
    if (LIVE_CONSUMER)
        amqp_consumer_stop(LIVE_CONSUMER);
    LIVE_CONSUMER = NULL;
    capture_end();
    amqpt_delete_queue(RAW, SQ);
    amqpt_delete_queue(RAW, OQ);
    amqpt_delete_queue(RAW, RQ);
    amqpt_delete_queue(RAW, DLQ);
    amqpt_delete_exchange(RAW, DLX);
    amqpt_delete_exchange(RAW, EX);
    amqpt_close(RAW);
    RAW = NULL;
    return 0;
}

static amqp_relay *start(const amqp_settings *s)
{
    return live_relay_start(s, pgt_dsn(), 5 * S_US);
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

/* Consumes SQ and OQ on RAW and checks that exactly the `want` rows of the outbox arrived,
 * each once, with its routing key. */
static void expect_delivered(int want)
{
    amqpt_consume(RAW, SQ);
    amqpt_consume(RAW, OQ);
    amqpt_msg msgs[16];
    size_t n = 0;
    while (n < 16 && amqpt_next(RAW, &msgs[n], 1000000))
        n++;
    assert_int_equal(n, want);
    for (size_t i = 0; i < n; i++) {
        assert_true(msgs[i].has_message_id);
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(msgs[j].message_id, msgs[i].message_id);
        assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE id = $1::uuid AND"
                                    " routing_key = $2 AND published_at IS NOT NULL",
                                    msgs[i].message_id, msgs[i].routing_key, NULL),
                         1);
        amqpt_msg_free(&msgs[i]);
    }
}

/* One relay over `s`: places an order, waits until its two events are sent, checks they
 * arrived, and stops. */
static void relay_roundtrip(const amqp_settings *s)
{
    amqp_relay *r = start(s);
    order_t a;
    fx_place(&P, &a, "ann", 1);
    assert_true(amqpt_wait(all_sent, NULL, 15 * S_US));
    amqp_relay_stats st = stats_of(r);
    assert_true(st.connected);
    assert_int_equal(st.published, 2);
    assert_int_equal(st.nacked + st.unroutable + st.timeouts, 0);
    expect_delivered(2);
    int64_t t0 = clock_mono_us();
    live_relay_stop(r);
    assert_true(clock_mono_us() - t0 < 3 * S_US);
    order_clear(&a);
}

/* A connection attempt made directly (amqp/conn.h): 0 or -1, with the error in `why`. */
static int connect_once(const amqp_settings *s, char *why, size_t cap, int64_t *took_us)
{
    mq_conn c;
    assert_int_equal(mq__init(&c, s, "test"), 0);
    int64_t t0 = clock_mono_us();
    int rc = mq__connect(&c);
    if (took_us)
        *took_us = clock_mono_us() - t0;
    snprintf(why, cap, "%s", rc == 0 ? "" : c.error);
    if (rc == 0)
        mq__close(&c);
    mq__dispose(&c);
    return rc;
}

/* The outbox rows of a broker that never accepted the relay: untouched, unclaimed. */
static void assert_rows_untouched(int64_t n)
{
    assert_int_equal(pgt_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL AND"
                                " attempts = 0 AND claimed_until IS NULL",
                                NULL, NULL, NULL),
                     n);
}

/* ---- the tests ---- */

static void test_relay_over_tls_verifying_the_ca(void **state)
{
    /* 127.0.0.1: checked against the certificate's IP address. */
    relay_roundtrip(&SET);
}

static void test_relay_with_a_client_certificate(void **state)
{
    amqp_settings s = SET;
    s.host = "localhost"; /* checked against its DNS name */
    s.tls_cert_file = CLIENT_CRT;
    s.tls_key_file = CLIENT_KEY;
    relay_roundtrip(&s);
}

static void test_client_certificate_of_another_ca_is_refused_by_the_broker(void **state)
{
    /* The broker verifies what a client presents (verify_peer): this certificate is sent,
     * and refused. */
    amqp_settings s = SET;
    s.tls_cert_file = OTHER_CRT;
    s.tls_key_file = OTHER_KEY;
    char why[256];
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    print_message("refused client certificate: %s\n", why);
    /* With TLS 1.3 the broker judges the certificate after the client's handshake is done:
     * the client reads its alert ("tlsv1 alert unknown ca") only if the alert arrives before
     * the connection is torn down; otherwise all it has is a generic SSL error. Either way
     * the login failed over TLS. */
    if (strstr(why, "alert")) {
        if (!strstr(why, "unknown ca") && !strstr(why, "bad certificate"))
            fail_msg("expected the broker's refusal of the certificate in: %s", why);
    } else if (!strstr(why, "SSL error") && !strstr(why, "reset")) {
        fail_msg("expected a TLS failure in: %s", why);
    }
}

static struct {
    pthread_mutex_t mu;
    int calls;
    char id[64];
} REPLIES = {.mu = PTHREAD_MUTEX_INITIALIZER};

static int on_reply(void *arg, const order_stock_reply *r)
{
    pthread_mutex_lock(&REPLIES.mu);
    REPLIES.calls++;
    snprintf(REPLIES.id, sizeof REPLIES.id, "%s", r->id);
    pthread_mutex_unlock(&REPLIES.mu);
    return ORDER_OK;
}

static bool got_reply(void *arg)
{
    pthread_mutex_lock(&REPLIES.mu);
    bool got = REPLIES.calls >= 1;
    pthread_mutex_unlock(&REPLIES.mu);
    return got;
}

static bool consumer_connected(void *arg)
{
    amqp_consumer_stats st;
    amqp_consumer_stats_get(arg, &st);
    return st.connected;
}

static void test_consumer_over_tls_receives_replies(void **state)
{
    REPLIES.calls = 0;
    char err[256] = "";
    if (amqp_consumer_start(&SET, on_reply, NULL, &LIVE_CONSUMER, err, sizeof err) != 0)
        fail_msg("amqp_consumer_start: %s", err);
    assert_true(amqpt_wait(consumer_connected, LIVE_CONSUMER, 10 * S_US));
    amqpt_publish(RAW, EX, "stock.reserved", "tls-r-1",
                  "{\"event_id\":\"tls-r-1\",\"type\":\"stock.reserved\","
                  "\"order_id\":\"3f1c2a9e-8b7d-4c65-9e21-5a0b6d4f7c10\"}");
    assert_true(amqpt_wait(got_reply, NULL, 5 * S_US));
    usleep(100 * 1000); /* the ack goes out */
    amqp_consumer_stats st;
    amqp_consumer_stats_get(LIVE_CONSUMER, &st);
    assert_int_equal(st.applied, 1);
    assert_int_equal(st.reconnects, 0);
    amqp_consumer_stop(LIVE_CONSUMER);
    LIVE_CONSUMER = NULL;
    assert_string_equal(REPLIES.id, "tls-r-1");
    assert_int_equal(amqpt_count(RAW, RQ), 0);
}

struct attempts {
    amqpt_proxy *px;
    int want;
};

static bool attempted(void *arg)
{
    struct attempts *a = arg;
    return amqpt_proxy_accepted(a->px) >= a->want;
}

/* A relay through a proxy (to count its attempts) that cannot verify the broker: the rows
 * stay unsent and unclaimed, one warn line per outage names the failure, attempts go on
 * with back-off, stopping is prompt, and with the right settings the rows drain. */
static void relay_refused(amqp_settings *bad, const char *reason, const char *or_reason)
{
    amqpt_proxy *px = amqpt_proxy_start("127.0.0.1", AMQPS_PORT);
    bad->port = amqpt_proxy_port(px);
    capture_begin();
    int64_t t0 = clock_mono_us();
    amqp_relay *r = start(bad);
    order_t a;
    fx_place(&P, &a, "ann", 1);
    struct attempts at = {px, 4};
    assert_true(amqpt_wait(attempted, &at, 10 * S_US));
    int64_t took = clock_mono_us() - t0;
    /* Back-off from 100 ms doubling: 4 attempts take at least 100+200+400 ms. */
    if (took < 600 * 1000)
        fail_msg("4 attempts in %lld ms: no back-off", (long long)(took / 1000));
    amqp_relay_stats st = stats_of(r);
    assert_false(st.connected);
    assert_int_equal(st.published, 0);
    assert_rows_untouched(2);

    char *log = captured();
    print_message("%s\n", strstr(log, "\"error\":") ? strstr(log, "\"error\":") : log);
    char want[128];
    snprintf(want, sizeof want, "tls handshake with 127.0.0.1:%d failed: certificate verify failed",
             bad->port);
    assert_contains(log, want);
    if (!strstr(log, reason) && !(or_reason && strstr(log, or_reason)))
        fail_msg("expected \"%s\" in: %s", reason, log);
    /* One line per outage, not one per attempt. */
    assert_int_equal(count_of(log, "rabbitmq connection or topology failed; retrying"), 1);
    free(log);

    t0 = clock_mono_us();
    live_relay_stop(r);
    assert_true(clock_mono_us() - t0 < 2 * S_US);
    capture_end();
    amqpt_proxy_stop(px);

    r = start(&SET);
    assert_true(amqpt_wait(all_sent, NULL, 15 * S_US));
    assert_int_equal(stats_of(r).published, 2);
    expect_delivered(2);
    live_relay_stop(r);
    order_clear(&a);
}

static void test_wrong_ca_is_refused_and_retried(void **state)
{
    amqp_settings bad = SET;
    bad.tls_ca_file = OTHER_CA;
    /* RabbitMQ sends its CA along with its certificate: that one is self-signed and not
     * trusted; a broker sending its certificate alone has no known issuer. */
    relay_refused(&bad, "self-signed certificate in certificate chain",
                  "unable to get local issuer certificate");
}

static void test_server_name_mismatch_is_refused_and_retried(void **state)
{
    amqp_settings bad = SET; /* host 127.0.0.1, which the certificate does carry */
    bad.tls_server_name = "wrong.example";
    relay_refused(&bad, "hostname mismatch", NULL);
}

static void test_server_name_other_than_host(void **state)
{
    char why[256];
    amqp_settings s = SET;
    s.tls_server_name = "localhost"; /* a DNS name of the certificate, host an IP */
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), 0);
    s.tls_server_name = "127.0.0.2"; /* an address the certificate does not carry */
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    assert_contains(why, "IP address mismatch");
    assert_contains(why, "verified name 127.0.0.2");
}

static void test_verify_off_connects_to_an_unverifiable_broker(void **state)
{
    amqp_settings s = SET;
    s.tls_ca_file = OTHER_CA;
    s.tls_server_name = "wrong.example";
    s.tls_skip_verify = true;
    relay_roundtrip(&s);
}

static void test_handshake_with_a_silent_peer_is_bounded(void **state)
{
    /* The proxy takes the TCP connection and never forwards a byte: the ClientHello gets
     * no answer. */
    amqpt_proxy *px = amqpt_proxy_start("127.0.0.1", AMQPS_PORT);
    amqpt_proxy_freeze(px, true);
    amqp_settings s = SET;
    s.port = amqpt_proxy_port(px);
    s.timeout_us = 1 * S_US;
    char why[256], want[128];
    int64_t took;
    assert_int_equal(connect_once(&s, why, sizeof why, &took), -1);
    snprintf(want, sizeof want, "tls handshake with 127.0.0.1:%d failed: timed out", s.port);
    assert_contains(why, want);
    if (took < 900 * 1000 || took > 1800 * 1000)
        fail_msg("the handshake gave up after %lld ms, not about 1000", (long long)took / 1000);

    /* Once it answers: connected, with TCP_USER_TIMEOUT on the TLS socket as on a plain one. */
    amqpt_proxy_freeze(px, false);
    mq_conn c;
    assert_int_equal(mq__init(&c, &s, "test"), 0);
    if (mq__connect(&c) != 0)
        fail_msg("mq__connect: %s", c.error);
    unsigned int uto = 0;
    socklen_t len = sizeof uto;
    assert_int_equal(getsockopt(amqp_get_sockfd(c.st), IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, &len),
                     0);
    assert_int_equal(uto, 1000);
    mq__close(&c);
    mq__dispose(&c);
    amqpt_proxy_stop(px);
}

static bool timed_out_twice(void *arg)
{
    return stats_of(arg).timeouts >= 2;
}

static void test_silent_broker_over_tls_is_given_up_and_retried(void **state)
{
    amqpt_proxy *px = amqpt_proxy_start("127.0.0.1", AMQPS_PORT);
    amqp_settings s = SET;
    s.port = amqpt_proxy_port(px);
    s.timeout_us = 1 * S_US;
    amqp_relay *r = start(&s);
    assert_true(amqpt_wait(is_connected, r, 10 * S_US));

    amqpt_proxy_freeze(px, true); /* the broker hangs mid-session: no error, no answer */
    order_t a;
    fx_place(&P, &a, "ann", 1);
    assert_true(amqpt_wait(timed_out_twice, r, 10 * S_US));
    usleep(1500 * 1000); /* reconnecting into the silence: handshakes time out */
    amqp_relay_stats st = stats_of(r);
    assert_false(st.connected);
    assert_int_equal(st.published, 0);
    assert_true(amqpt_proxy_accepted(px) >= 2);

    amqpt_proxy_freeze(px, false);
    assert_true(amqpt_wait(all_sent, NULL, 15 * S_US));
    st = stats_of(r);
    assert_true(st.connected);
    assert_true(st.reconnects >= 1);
    assert_int_equal(st.published, 2);
    expect_delivered(2);

    /* Stopping while the broker hangs takes about one timeout, not forever. */
    amqpt_proxy_freeze(px, true);
    usleep(200 * 1000);
    int64_t t0 = clock_mono_us();
    live_relay_stop(r);
    assert_true(clock_mono_us() - t0 < 3 * S_US);
    amqpt_proxy_stop(px);
    order_clear(&a);
}

static void test_heartbeats_keep_an_idle_tls_connection(void **state)
{
    SET.heartbeat_s = 1; /* the broker closes a connection silent for two intervals */
    SET.relay_idle_poll_us = 30 * S_US;
    SET.stats_interval_us = 30 * S_US;
    amqp_relay *r = start(&SET);
    assert_true(amqpt_wait(is_connected, r, 10 * S_US));
    sleep(4);
    order_t a;
    fx_place(&P, &a, "ann", 1);
    assert_true(amqpt_wait(all_sent, NULL, 5 * S_US));
    amqp_relay_stats st = stats_of(r);
    assert_int_equal(st.reconnects, 0); /* the same connection all along */
    assert_true(st.connected);
    assert_int_equal(st.published, 2);
    live_relay_stop(r);
    order_clear(&a);
}

static char *read_all(const char *path)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    static char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

static void test_bad_files_and_plain_port_fail_clearly(void **state)
{
    char why[256];
    amqp_settings s = SET;

    s.tls_ca_file = "/nonexistent/ca.crt";
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    assert_string_equal(why,
                        "tls: amqp.tls_ca_file /nonexistent/ca.crt: No such file or directory");

    /* No CA file: the system's store, which does not know the stack's CA. Never "no
     * verification". */
    s.tls_ca_file = NULL;
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    assert_contains(why, "certificate verify failed");

    s.tls_ca_file = CLIENT_KEY; /* a file, but no certificate in it */
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    assert_contains(why, "amqp.tls_ca_file");
    assert_contains(why, "no CA loaded");

    /* A certificate with a key that is not its own: named by path, the key never shown. */
    s = SET;
    s.tls_cert_file = CLIENT_CRT;
    s.tls_key_file = OTHER_KEY;
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    assert_contains(why, "cannot be used");
    assert_contains(why, OTHER_KEY);
    char *key = read_all(OTHER_KEY);
    char *body = strchr(key, '\n'); /* the first line of base64 after "-----BEGIN" */
    assert_non_null(body);
    char line[40];
    snprintf(line, sizeof line, "%.32s", body + 1);
    assert_null(strstr(why, line));

    s.tls_key_file = NULL; /* half a pair */
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    assert_contains(why, "both amqp.tls_cert_file and amqp.tls_key_file");

    /* TLS to the plain AMQP port: the broker answers with its protocol header, not TLS. */
    s = SET;
    s.port = amqpt_closed_port();
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    assert_contains(why, "connect to 127.0.0.1:"); /* no TLS was spoken */
    amqp_settings plain;
    amqpt_settings(&plain);
    s.port = plain.port;
    assert_int_equal(connect_once(&s, why, sizeof why, NULL), -1);
    char want[64];
    snprintf(want, sizeof want, "tls handshake with 127.0.0.1:%d failed: ", plain.port);
    print_message("TLS to the plain port: %s\n", why);
    assert_contains(why, want);
}

int main(void)
{
    if (amqpt_setup("tls") != 0)
        return 1;
    const char *port = getenv("ORDERD_TEST_AMQPS_PORT");
    const char *dir = getenv("ORDERD_TEST_AMQP_TLS_DIR");
    if (!port || !*port || !dir || !*dir) {
        printf("SKIP: amqp TLS tests: ORDERD_TEST_AMQPS_PORT and ORDERD_TEST_AMQP_TLS_DIR are "
               "not both set (scripts/test.sh exports them from `scripts/stack.sh env`; by "
               "hand: eval \"$(scripts/stack.sh env)\" and use ORDERD_STACK_AMQPS_PORT and "
               "ORDERD_STACK_AMQP_TLS_DIR)\n");
        return 77;
    }
    AMQPS_PORT = atoi(port);
    if (AMQPS_PORT <= 0 || AMQPS_PORT > 65535) {
        fprintf(stderr, "FAIL: ORDERD_TEST_AMQPS_PORT=%s is not a port\n", port);
        return 1;
    }
    struct {
        char *dst;
        const char *name;
    } files[] = {{CA, "ca.crt"},
                 {CLIENT_CRT, "client.crt"},
                 {CLIENT_KEY, "client.key"},
                 {OTHER_CA, "other-ca.crt"},
                 {OTHER_CRT, "other-client.crt"},
                 {OTHER_KEY, "other-client.key"}};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(files[i].dst, sizeof CA, "%s/%s", dir, files[i].name);
        if (access(files[i].dst, R_OK) != 0) {
            fprintf(stderr, "FAIL: %s cannot be read (scripts/stack.sh start makes it)\n",
                    files[i].dst);
            return 1;
        }
    }
    if (pgt_setup("amqp_tls", true) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        T(test_relay_over_tls_verifying_the_ca),
        T(test_relay_with_a_client_certificate),
        T(test_client_certificate_of_another_ca_is_refused_by_the_broker),
        T(test_consumer_over_tls_receives_replies),
        T(test_wrong_ca_is_refused_and_retried),
        T(test_server_name_mismatch_is_refused_and_retried),
        T(test_server_name_other_than_host),
        T(test_verify_off_connects_to_an_unverifiable_broker),
        T(test_handshake_with_a_silent_peer_is_bounded),
        T(test_silent_broker_over_tls_is_given_up_and_retried),
        T(test_heartbeats_keep_an_idle_tls_connection),
        T(test_bad_files_and_plain_port_fail_clearly),
#undef T
    };
    int rc = cmocka_run_group_tests(tests, group_setup, group_teardown);
    pgt_teardown();
    return rc;
}
