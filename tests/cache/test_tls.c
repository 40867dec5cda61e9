/* test_tls.c — the cache over TLS (the in-process OpenSSL tunnel of cache/tls.c) against a
 * private redis-server listening only on a TLS port, with a throwaway CA and certificates
 * made by the openssl CLI at start: the cache and the limiter work over TLS, a wrong CA or
 * server name refuses the connection (calls answer "down" quickly), mutual TLS needs the
 * client certificate, a killed Redis makes calls answer "down" within the timeout, and a
 * restarted one is reconnected over TLS. Also pushes large values through the tunnel. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cache/internal.h"
#include "common/clock.h"
#include "redistest.h"

#define CALL_BOUND_US (300 * MS * rt_slow()) /* one call with Redis gone or refused */

static char dir[128];
static char ca[256], other_ca[256], srv_crt[256], srv_key[256], cli_crt[256], cli_key[256];
static int tls_port;
static pid_t redis_pid = -1;
static bool auth_clients;

static int sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    if (rc != 0)
        fprintf(stderr, "FAIL: %s -> %d\n", cmd, rc);
    return rc;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int p = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        p = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return p;
}

static cache_options tls_options(void)
{
    cache_options o = {
        .host = "127.0.0.1",
        .port = tls_port,
        .timeout_us = 100 * MS * rt_slow(),
        .backoff_min_us = 20 * MS,
        .backoff_max_us = 100 * MS,
        .key_prefix = "t:",
        .order_ttl_us = 60 * 1000 * MS,
        .tls = true,
        .tls_ca_file = ca,
    };
    if (auth_clients) {
        o.tls_cert_file = cli_crt;
        o.tls_key_file = cli_key;
    }
    return o;
}

static void redis_kill(void)
{
    if (redis_pid > 0) {
        kill(redis_pid, SIGKILL);
        waitpid(redis_pid, NULL, 0);
        redis_pid = -1;
    }
}

static int redis_spawn(void)
{
    const char *server = getenv("ORDERD_TEST_REDIS_SERVER");
    if (!server || !*server)
        server = "redis-server";
    char portbuf[16], logpath[192];
    snprintf(portbuf, sizeof portbuf, "%d", tls_port);
    snprintf(logpath, sizeof logpath, "%s/redis.log", dir);
    const char *argv[] = {server,
                          "--port",
                          "0",
                          "--tls-port",
                          portbuf,
                          "--bind",
                          "127.0.0.1",
                          "--tls-cert-file",
                          srv_crt,
                          "--tls-key-file",
                          srv_key,
                          "--tls-ca-cert-file",
                          ca,
                          "--tls-auth-clients",
                          auth_clients ? "yes" : "no",
                          "--save",
                          "",
                          "--appendonly",
                          "no",
                          "--dir",
                          dir,
                          "--daemonize",
                          "no",
                          NULL};
    pid_t p = rt_spawn_server(argv, logpath);
    if (p < 0)
        return -1;
    redis_pid = p;
    /* Ready when a TLS cache connects. */
    cache_options o = tls_options();
    o.timeout_us = 1000 * MS;
    int64_t until = clock_mono_us() + 10 * 1000 * MS;
    while (clock_mono_us() < until) {
        struct cache *c = rt_cache(&o);
        bool up = cache_up(c);
        cache_close(c);
        if (up)
            return 0;
        rt_sleep_us(20 * MS);
    }
    fprintf(stderr, "FAIL: TLS redis did not answer on %d (see %s)\n", tls_port, logpath);
    redis_kill();
    return -1;
}

static int redis_start(bool with_auth_clients)
{
    redis_kill();
    auth_clients = with_auth_clients;
    return redis_spawn();
}

static int group_setup(void **state)
{
    signal(SIGPIPE, SIG_IGN);
    alarm((unsigned)(120 * rt_slow()));
    snprintf(dir, sizeof dir, "/tmp/orderd-tls-test-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(ca, sizeof ca, "%s/ca.crt", dir);
    snprintf(other_ca, sizeof other_ca, "%s/other-ca.crt", dir);
    snprintf(srv_crt, sizeof srv_crt, "%s/server.crt", dir);
    snprintf(srv_key, sizeof srv_key, "%s/server.key", dir);
    snprintf(cli_crt, sizeof cli_crt, "%s/client.crt", dir);
    snprintf(cli_key, sizeof cli_key, "%s/client.key", dir);
    const char *ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    if (sh("cd %s && openssl req -x509 %s -keyout ca.key -out ca.crt -days 2 -subj "
           "/CN=orderd-test-ca 2>/dev/null",
           dir, ec) ||
        sh("cd %s && openssl req -x509 %s -keyout other-ca.key -out other-ca.crt -days 2 -subj "
           "/CN=orderd-other-ca 2>/dev/null",
           dir, ec) ||
        sh("cd %s && openssl req %s -keyout server.key -out server.csr -subj /CN=localhost "
           "2>/dev/null && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext && "
           "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
           "-extfile san.ext -out server.crt 2>/dev/null",
           dir, ec) ||
        sh("cd %s && openssl req %s -keyout client.key -out client.csr -subj /CN=orderd-client "
           "2>/dev/null && openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key "
           "-CAcreateserial -days 2 -out client.crt 2>/dev/null",
           dir, ec))
        return -1;
    tls_port = free_port();
    if (tls_port < 0)
        return -1;
    return redis_start(false);
}

static int group_teardown(void **state)
{
    redis_kill();
    if (dir[0])
        sh("rm -rf %s", dir);
    return 0;
}

/* Asserts that a rate-limit call answers "down" (-1), and quickly. */
static void limit_down_quickly(struct cache *c)
{
    cache_limit lim = {.rate_per_s = 100, .burst = 10};
    cache_limit_result r;
    int64_t t0 = clock_mono_us();
    assert_int_equal(cache_rate_limit(c, "tls", &lim, &r), -1);
    int64_t took = clock_mono_us() - t0;
    if (took > CALL_BOUND_US)
        fail_msg("cache_rate_limit took %lld us", (long long)took);
}

static void limit_works(struct cache *c)
{
    cache_limit lim = {.rate_per_s = 100, .burst = 10};
    cache_limit_result r;
    assert_int_equal(cache_rate_limit(c, "tls", &lim, &r), 0);
    assert_true(r.allowed);
}

/* Refused connects never hang and leave the cache down. */
static void assert_refused(const cache_options *o)
{
    int64_t t0 = clock_mono_us();
    struct cache *c = rt_cache(o);
    if (clock_mono_us() - t0 > CALL_BOUND_US)
        fail_msg("cache_open took %lld us", (long long)(clock_mono_us() - t0));
    assert_false(cache_up(c));
    limit_down_quickly(c);
    rt_sleep_us(30 * MS); /* past the back-off: a second attempt is refused too */
    limit_down_quickly(c);
    cache_stats st;
    cache_stats_get(c, &st);
    assert_true(st.errors >= 2);
    cache_close(c);
}

static void test_cache_and_limits_over_tls(void **state)
{
    assert_int_equal(redis_start(false), 0);
    const char *hosts[] = {"127.0.0.1", "localhost"}; /* IP SAN, then DNS SAN with SNI */
    for (int h = 0; h < 2; h++) {
        cache_options o = tls_options();
        o.host = hosts[h];
        struct cache *c = rt_cache(&o);
        assert_true(cache_up(c));
        limit_works(c);

        fake_store fs;
        fake_init(&fs);
        char id[ORDER_ID_LEN + 1];
        fake_id(id, 10 + h);
        fake_put(&fs, id, "cust-1", 3);
        order_store inner = fake_port(&fs), s;
        cache_store_wrap(c, &inner, &test_codec, &s);
        for (int i = 0; i < 3; i++) {
            order_error e;
            order_ctx ctx = rt_ctx(&e, 0);
            order_t got = {0};
            assert_int_equal(s.order_get(s.self, &ctx, id, &got), ORDER_OK);
            assert_int_equal(got.version, 3);
            order_clear(&got);
        }
        assert_int_equal(atomic_load(&fs.gets), 1); /* one fill, then hits */
        cache_stats st;
        cache_stats_get(c, &st);
        assert_int_equal(st.fills, 1);
        assert_int_equal(st.hits, 2);
        assert_int_equal(st.errors, 0);
        cache_close(c);
        fake_destroy(&fs);
    }
}

static void test_wrong_ca_refused(void **state)
{
    assert_int_equal(redis_start(false), 0);
    cache_options o = tls_options();
    o.tls_ca_file = other_ca;
    assert_refused(&o);
}

static void test_wrong_server_name_refused(void **state)
{
    assert_int_equal(redis_start(false), 0);
    cache_options o = tls_options();
    o.tls_server_name = "redis.example.com";
    assert_refused(&o);
    o.tls_server_name = "10.1.2.3"; /* an IP the certificate does not name */
    assert_refused(&o);
    o.tls_server_name = "localhost"; /* right name, other address */
    struct cache *c = rt_cache(&o);
    assert_true(cache_up(c));
    cache_close(c);
}

static void test_no_ca_is_bad_options(void **state)
{
    cache_options o = tls_options();
    o.tls_ca_file = NULL;
    char err[256] = "";
    assert_null(cache_open(&o, err, sizeof err));
    assert_non_null(strstr(err, "CA"));
}

static void test_mutual_tls(void **state)
{
    assert_int_equal(redis_start(true), 0);
    cache_options o = tls_options();
    o.tls_cert_file = NULL;
    o.tls_key_file = NULL;
    assert_refused(&o); /* the server wants a client certificate */
    o = tls_options();
    struct cache *c = rt_cache(&o);
    assert_true(cache_up(c));
    limit_works(c);
    cache_close(c);
    assert_int_equal(redis_start(false), 0);
}

static void test_kill_and_restart(void **state)
{
    assert_int_equal(redis_start(false), 0);
    cache_options o = tls_options();
    struct cache *c = rt_cache(&o);
    limit_works(c);
    redis_kill();
    for (int i = 0; i < 5; i++) {
        limit_down_quickly(c); /* first the broken tunnel, then refused reconnects */
        rt_sleep_us(10 * MS);
    }
    assert_int_equal(redis_spawn(), 0);
    int64_t until = clock_mono_us() + 2000 * MS * rt_slow();
    bool back = false;
    while (!back && clock_mono_us() < until) {
        cache_limit lim = {.rate_per_s = 100, .burst = 10};
        cache_limit_result r;
        back = cache_rate_limit(c, "tls", &lim, &r) == 0;
        if (!back)
            rt_sleep_us(10 * MS);
    }
    assert_true(back);
    cache_close(c);
}

/* A hung Redis (SIGSTOP): calls over the tunnel are bounded by the per-call timeout
 * (hiredis's socket timeouts on its end of the pair), then it is reconnected. */
static void test_hung_redis_bounded(void **state)
{
    assert_int_equal(redis_start(false), 0);
    cache_options o = tls_options();
    struct cache *c = rt_cache(&o);
    limit_works(c);
    kill(redis_pid, SIGSTOP);
    limit_down_quickly(c); /* times out after o.timeout_us, drops the tunnel */
    limit_down_quickly(c); /* back-off, or a handshake that times out */
    kill(redis_pid, SIGCONT);
    int64_t until = clock_mono_us() + 2000 * MS * rt_slow();
    bool back = false;
    while (!back && clock_mono_us() < until) {
        cache_limit lim = {.rate_per_s = 100, .burst = 10};
        cache_limit_result r;
        back = cache_rate_limit(c, "tls", &lim, &r) == 0;
        if (!back)
            rt_sleep_us(10 * MS);
    }
    assert_true(back);
    cache_close(c);
}

/* Values much larger than the pump's buffers, both ways, and a deep pipeline. */
static void test_large_values_through_tunnel(void **state)
{
    assert_int_equal(redis_start(false), 0);
    cache_options co = tls_options();
    cache_tls_options to = {.ca_file = ca, .verify = true};
    int fd = -1;
    cache__tls *t = NULL;
    char why[256] = "";
    assert_int_equal(
        cache__tls_connect("127.0.0.1", tls_port, &to, co.timeout_us, &fd, &t, why, sizeof why), 0);
    redisContext *rc = redisConnectFd(fd);
    assert_non_null(rc);
    struct timeval tv = {5, 0};
    redisSetTimeout(rc, tv);
    size_t n = 3 * 1024 * 1024 + 7;
    char *big = malloc(n);
    assert_non_null(big);
    for (size_t i = 0; i < n; i++)
        big[i] = (char)('a' + i % 23);
    for (int k = 0; k < 4; k++)
        redisAppendCommand(rc, "SET big:%d %b", k, big, n);
    for (int k = 0; k < 4; k++)
        redisAppendCommand(rc, "GET big:%d", k);
    for (int k = 0; k < 8; k++) {
        void *r = NULL;
        assert_int_equal(redisGetReply(rc, &r), REDIS_OK);
        redisReply *rep = r;
        if (k < 4) {
            assert_int_equal(rep->type, REDIS_REPLY_STATUS);
        } else {
            assert_int_equal(rep->type, REDIS_REPLY_STRING);
            assert_int_equal(rep->len, n);
            assert_memory_equal(rep->str, big, n);
        }
        freeReplyObject(rep);
    }
    free(big);
    redisFree(rc);
    cache__tls_close(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cache_and_limits_over_tls),
        cmocka_unit_test(test_wrong_ca_refused),
        cmocka_unit_test(test_wrong_server_name_refused),
        cmocka_unit_test(test_no_ca_is_bad_options),
        cmocka_unit_test(test_mutual_tls),
        cmocka_unit_test(test_kill_and_restart),
        cmocka_unit_test(test_hung_redis_bounded),
        cmocka_unit_test(test_large_values_through_tunnel),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
