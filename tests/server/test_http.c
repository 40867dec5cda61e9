/* test_http.c — server/http.c and server/metrics.c: the HTTP side port over a real socket
 * (libcurl as the client), with fakes for what lies behind it (the domain, the payment
 * adapters' webhook verification, the background services and the adapters' statistics),
 * and the Prometheus text rendering.
 *
 * What a provider or an operator would notice: status codes and bodies per outcome, the
 * raw body handed over byte for byte, the size limit, header names in any case, one domain
 * service per pool thread closed at stop, the metrics page well formed and counting.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "amqp/amqp.h"
#include "cache/cache.h"
#include "common/metrics.h"
#include "payments/payments.h"
#include "server/internal.h"

/* ---- fakes ---- */

/* server.c's method table (not linked here): the paths metrics.c keeps rows for. */
static const char *const fake_methods[] = {"/orders.v1.OrderService/PlaceOrder",
                                           "/orders.v1.OrderService/GetOrder",
                                           "/grpc.health.v1.Health/Check"};

size_t srv_method_count(void)
{
    return sizeof fake_methods / sizeof *fake_methods;
}

const char *srv_method_path(size_t i)
{
    return i < srv_method_count() ? fake_methods[i] : NULL;
}

static pthread_mutex_t fake_mu = PTHREAD_MUTEX_INITIALIZER;

/* The fakes run on MHD's threads, where cmocka's asserts (longjmp) must not be used: they
 * count what went wrong, and the teardown asserts the count is zero. */
static atomic_int fake_violations;
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: fake saw: %s\n", __FILE__, __LINE__, #cond);                   \
            atomic_fetch_add(&fake_violations, 1);                                                 \
        }                                                                                          \
    } while (0)

struct srv_bg {
    atomic_int users; /* threads inside the service now: never more than one */
    order_service svc;
    int paypal_dummy;
};
static int bg_opens, bg_closes, bg_shared;
static atomic_int apply_sleep_ms; /* each apply takes this long */
static bool bg_fail;              /* srv_bg_open fails */

srv_bg *srv_bg_open(srv_server *srv, const char *actor, char *err, size_t errlen)
{
    pthread_mutex_lock(&fake_mu);
    bool fail = bg_fail;
    if (!fail)
        bg_opens++;
    pthread_mutex_unlock(&fake_mu);
    if (fail) {
        snprintf(err, errlen, "connection refused");
        return NULL;
    }
    srv_bg *bg = calloc(1, sizeof *bg);
    CHECK(strcmp(actor, "webhooks") == 0);
    return bg;
}

void srv_bg_close(srv_bg *bg)
{
    if (!bg)
        return;
    pthread_mutex_lock(&fake_mu);
    bg_closes++;
    pthread_mutex_unlock(&fake_mu);
    free(bg);
}

order_service *srv_bg_service(srv_bg *bg)
{
    return &bg->svc;
}

order_ctx srv_bg_ctx(srv_bg *bg, order_error *err, int64_t timeout_us)
{
    order_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    memset(err, 0, sizeof *err);
    ctx.err = err;
    ctx.deadline_mono_us = timeout_us; /* the fake only checks it was asked for */
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "webhooks");
    return ctx;
}

static bool paypal_provider = true;
order_payments *srv_bg_provider(srv_bg *bg, order_provider p)
{
    static order_payments paypal;
    return p == ORDER_PROVIDER_PAYPAL && paypal_provider ? &paypal : NULL;
}

/* What the verification fakes saw, and the event they hand back. */
static char seen_body[8192];
static size_t seen_len;
static char seen_secret[128];
static int64_t seen_tolerance;
static pay_paypal_headers seen_pp;
static char seen_pp_store[5][128];
static char seen_webhook_id[128];
static order_payment_event next_ev;

static void fill_event(order_payment_event *ev, order_provider p)
{
    *ev = next_ev;
    ev->provider = p;
}

int pay_stripe_webhook(const char *endpoint_secret, int64_t tolerance_s, int64_t now_s,
                       const char *signature_header, const char *body, size_t len,
                       order_payment_event *ev, char *err, size_t errlen)
{
    pthread_mutex_lock(&fake_mu);
    snprintf(seen_secret, sizeof seen_secret, "%s", endpoint_secret);
    seen_tolerance = tolerance_s;
    seen_len = len < sizeof seen_body ? len : sizeof seen_body;
    memcpy(seen_body, body, seen_len);
    pthread_mutex_unlock(&fake_mu);
    CHECK(now_s > 1600000000); /* the wall clock, in seconds */
    if (strcmp(signature_header, "t=1,v1=good") == 0) {
        fill_event(ev, ORDER_PROVIDER_STRIPE);
        return PAY_WEBHOOK_OK;
    }
    if (strcmp(signature_header, "t=1,v1=malformed") == 0) {
        snprintf(err, errlen, "not JSON");
        return PAY_WEBHOOK_MALFORMED;
    }
    snprintf(err, errlen, "no matching v1 signature");
    return PAY_WEBHOOK_BAD_SIGNATURE;
}

static void keep(int i, const char **dst, const char *src)
{
    if (!src) {
        *dst = NULL;
        return;
    }
    snprintf(seen_pp_store[i], sizeof seen_pp_store[i], "%s", src);
    *dst = seen_pp_store[i];
}

static int paypal_rc = PAY_WEBHOOK_OK;
int pay_paypal_webhook(order_payments *paypal, order_ctx *ctx, const char *webhook_id,
                       const pay_paypal_headers *h, const char *body, size_t len,
                       order_payment_event *ev, char *err, size_t errlen)
{
    CHECK(paypal != NULL);
    CHECK(ctx != NULL);
    CHECK(ctx->deadline_mono_us > 0);
    pthread_mutex_lock(&fake_mu);
    keep(0, &seen_pp.auth_algo, h->auth_algo);
    keep(1, &seen_pp.cert_url, h->cert_url);
    keep(2, &seen_pp.transmission_id, h->transmission_id);
    keep(3, &seen_pp.transmission_sig, h->transmission_sig);
    keep(4, &seen_pp.transmission_time, h->transmission_time);
    snprintf(seen_webhook_id, sizeof seen_webhook_id, "%s", webhook_id);
    seen_len = len < sizeof seen_body ? len : sizeof seen_body;
    memcpy(seen_body, body, seen_len);
    pthread_mutex_unlock(&fake_mu);
    if (paypal_rc == PAY_WEBHOOK_OK)
        fill_event(ev, ORDER_PROVIDER_PAYPAL);
    else
        snprintf(err, errlen, "verification said no");
    return paypal_rc;
}

static int apply_rc = ORDER_OK;
static int apply_calls;
static bool apply_changes = true;
int order_apply_payment_event(order_service *svc, order_ctx *ctx, const order_payment_event *ev,
                              order_t *out, bool *changed)
{
    CHECK(svc != NULL);
    CHECK(ctx->deadline_mono_us > 0);
    srv_bg *bg = (srv_bg *)((char *)svc - offsetof(srv_bg, svc));
    if (atomic_fetch_add(&bg->users, 1) != 0) { /* another thread is in this service */
        pthread_mutex_lock(&fake_mu);
        bg_shared++;
        pthread_mutex_unlock(&fake_mu);
    }
    int ms = atomic_load(&apply_sleep_ms);
    if (ms > 0)
        usleep((useconds_t)ms * 1000);
    atomic_fetch_sub(&bg->users, 1);
    pthread_mutex_lock(&fake_mu);
    apply_calls++;
    pthread_mutex_unlock(&fake_mu);
    if (out) {
        snprintf(out->id, sizeof out->id, "%s", "3f2504e0-4f89-41d3-9a0c-0305e82c3301");
        out->items = calloc(1, sizeof *out->items); /* must be order_clear'ed (ASan) */
        out->nitems = 1;
    }
    if (apply_rc != ORDER_OK)
        snprintf(ctx->err->message, sizeof ctx->err->message, "fake says %d", apply_rc);
    ctx->err->code = apply_rc;
    if (changed)
        *changed = apply_rc == ORDER_OK && apply_changes;
    return apply_rc;
}

void order_clear(order_t *o)
{
    free(o->items);
    memset(o, 0, sizeof *o);
}

const char *order_code_name(int code)
{
    return code == ORDER_OK ? "OK" : "FAKE_CODE";
}

void cache_stats_get(const struct cache *c, cache_stats *out)
{
    memset(out, 0, sizeof *out);
    out->hits = 10;
    out->misses = 3;
    out->errors = (uintptr_t)c & 1 ? 0 : 1;
}

void srv_limits_stats(const srv_limits *l, uint64_t *fallback_decisions, uint64_t *refused)
{
    *fallback_decisions = 7;
    *refused = 5;
}

void amqp_relay_stats_get(amqp_relay *r, amqp_relay_stats *out)
{
    memset(out, 0, sizeof *out);
    out->published = 42;
    out->backlog = 3;
    out->oldest_unsent_age_us = 1500000;
    out->connected = true;
}

void amqp_consumer_stats_get(amqp_consumer *c, amqp_consumer_stats *out)
{
    memset(out, 0, sizeof *out);
    out->applied = 4;
    out->reconnects = 1;
}

/* ---- fixtures ---- */

static srv_config cfg;
static srv_server srv;
static unsigned char secret[] = "whsec_test_secret";

static void reset_fakes(void)
{
    bg_opens = bg_closes = bg_shared = 0;
    atomic_store(&apply_sleep_ms, 0);
    bg_fail = false;
    paypal_provider = true;
    paypal_rc = PAY_WEBHOOK_OK;
    apply_rc = ORDER_OK;
    apply_calls = 0;
    memset(&next_ev, 0, sizeof next_ev);
    snprintf(next_ev.id, sizeof next_ev.id, "evt_1");
    snprintf(next_ev.type, sizeof next_ev.type, "payment_intent.succeeded");
    snprintf(next_ev.order_id, sizeof next_ev.order_id, "3f2504e0-4f89-41d3-9a0c-0305e82c3301");
    next_ev.kind = ORDER_PAY_EVENT_SUCCEEDED;
    seen_len = 0;
}

static int start(void **state)
{
    (void)state;
    reset_fakes();
    memset(&cfg, 0, sizeof cfg);
    memset(&srv, 0, sizeof srv);
    snprintf(cfg.http_listen, sizeof cfg.http_listen, "127.0.0.1:0");
    cfg.http_threads = 2;
    cfg.http_max_body_bytes = 4096;
    cfg.stripe_enabled = true;
    cfg.stripe_webhook_secret = secret;
    cfg.stripe_webhook_secret_len = sizeof secret - 1; /* not NUL-terminated in the config */
    cfg.stripe_webhook_tolerance_us = 300 * 1000000LL;
    cfg.paypal_enabled = true;
    snprintf(cfg.paypal_webhook_id, sizeof cfg.paypal_webhook_id, "WH-123");
    srv.cfg = &cfg;
    atomic_store(&srv.health, 1);
    char err[256] = "";
    if (srv_http_start(&srv, err, sizeof err) != 0) {
        fprintf(stderr, "srv_http_start: %s\n", err);
        return -1;
    }
    return srv.http && srv__http_port(&srv) > 0 ? 0 : -1;
}

static int stop(void **state)
{
    (void)state;
    srv_http_stop(&srv);
    int v = atomic_exchange(&fake_violations, 0);
    if (v)
        fprintf(stderr, "%d fake check(s) failed\n", v);
    return v ? -1 : 0;
}

/* ---- a small HTTP client ---- */

typedef struct reply {
    long status;
    char body[65536];
    size_t len;
    char ctype[128];
    char allow[64];
} reply;

static size_t on_body(char *p, size_t sz, size_t n, void *arg)
{
    reply *r = arg;
    size_t k = sz * n;
    size_t room = sizeof r->body - 1 - r->len;
    size_t c = k < room ? k : room;
    memcpy(r->body + r->len, p, c);
    r->len += c;
    r->body[r->len] = '\0';
    return k;
}

static void header_value(const char *line, size_t n, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    if (n <= nl + 1 || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return;
    const char *v = line + nl + 1;
    while (*v == ' ')
        v++;
    size_t len = (size_t)(line + n - v);
    while (len > 0 && (v[len - 1] == '\r' || v[len - 1] == '\n'))
        len--;
    if (len >= cap)
        len = cap - 1;
    memcpy(out, v, len);
    out[len] = '\0';
}

static size_t on_header(char *p, size_t sz, size_t n, void *arg)
{
    reply *r = arg;
    header_value(p, sz * n, "Content-Type", r->ctype, sizeof r->ctype);
    header_value(p, sz * n, "Allow", r->allow, sizeof r->allow);
    return sz * n;
}

/* A chunked upload: hands out `left` bytes of 'x' in pieces. */
typedef struct stream {
    size_t left;
} stream;
static size_t on_read(char *p, size_t sz, size_t n, void *arg)
{
    stream *s = arg;
    size_t k = sz * n < s->left ? sz * n : s->left;
    memset(p, 'x', k);
    s->left -= k;
    return k;
}

/* method "GET"/"POST"/...; body NULL = none; chunked_len > 0 streams that many bytes
 * chunked instead of body. Returns curl's verdict. */
static CURLcode request_rc(const char *method, const char *path, const char *const *headers,
                           const char *body, size_t len, size_t chunked_len, reply *out)
{
    memset(out, 0, sizeof *out);
    CURL *e = curl_easy_init();
    assert_non_null(e);
    char url[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%u%s", srv__http_port(&srv), path);
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_TIMEOUT, 10L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, out);
    struct curl_slist *hl = NULL;
    for (size_t i = 0; headers && headers[i]; i++)
        hl = curl_slist_append(hl, headers[i]);
    stream st = {chunked_len};
    if (strcmp(method, "HEAD") == 0)
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    else if (chunked_len) {
        hl = curl_slist_append(hl, "Transfer-Encoding: chunked");
        curl_easy_setopt(e, CURLOPT_POST, 1L);
        curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(e, CURLOPT_READDATA, &st);
    } else if (body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)len);
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0 && strcmp(method, "POST") != 0)
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, hl);
    CURLcode rc = curl_easy_perform(e);
    if (rc != CURLE_OK)
        fprintf(stderr, "curl: %s\n", curl_easy_strerror(rc));
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &out->status);
    curl_slist_free_all(hl);
    curl_easy_cleanup(e);
    return rc;
}

static void request(const char *method, const char *path, const char *const *headers,
                    const char *body, size_t len, size_t chunked_len, reply *out)
{
    assert_int_equal(request_rc(method, path, headers, body, len, chunked_len, out), CURLE_OK);
}

static void get(const char *path, reply *r)
{
    request("GET", path, NULL, NULL, 0, 0, r);
}

static void stripe(const char *sig, const char *body, size_t len, reply *r)
{
    char h[128] = "";
    if (sig)
        snprintf(h, sizeof h, "Stripe-Signature: %s", sig);
    const char *hs[] = {h, "Content-Type: application/json", NULL};
    request("POST", "/webhooks/stripe", sig ? hs : hs + 1, body, len, 0, r);
}

/* The value of one sample line ("name{labels} value") on the metrics page; -1 if absent. */
static long long sample(const char *page, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = page; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ')
            return atoll(p + n + 1);
    }
    return -1;
}

static long long webhook_count(const char *provider, const char *result)
{
    metrics_buf b;
    metrics_buf_init(&b);
    assert_int_equal(srv__metrics_render(NULL, &b), 0);
    char series[128];
    snprintf(series, sizeof series, "orderd_webhooks_total{provider=\"%s\",result=\"%s\"}",
             provider, result);
    long long v = sample(b.data, series);
    metrics_buf_dispose(&b);
    return v;
}

/* ---- the text format ---- */

static void test_text_format_primitives(void **state)
{
    (void)state;
    metrics_buf b;
    metrics_buf_init(&b);
    metrics_family(&b, "x_total", "counter", "Line one\nand a back\\slash.");
    const char *labels[] = {"k", "a\"b\\c\nd", "z", "plain", NULL};
    metrics_sample_u64(&b, "x_total", labels, 18446744073709551615ull);
    metrics_sample_fixed(&b, "s", NULL, 1500, 6);
    metrics_sample_fixed(&b, "s", NULL, -2500000, 6);
    metrics_sample_fixed(&b, "s", NULL, 10000000, 6);
    metrics_sample_fixed(&b, "s", NULL, 0, 6);
    metrics_sample_fixed(&b, "s", NULL, INT64_MIN, 6);
    metrics_sample_i64(&b, "g", NULL, -3);
    assert_false(metrics_buf_failed(&b));
    assert_string_equal(b.data, "# HELP x_total Line one\\nand a back\\\\slash.\n"
                                "# TYPE x_total counter\n"
                                "x_total{k=\"a\\\"b\\\\c\\nd\",z=\"plain\"} 18446744073709551615\n"
                                "s 0.0015\n"
                                "s -2.5\n"
                                "s 10\n"
                                "s 0\n"
                                "s -9223372036854.775808\n"
                                "g -3\n");
    metrics_buf_dispose(&b);
}

static void test_histogram_buckets(void **state)
{
    (void)state;
    static const int64_t bounds[] = {1000, 5000, 10000};
    static metrics_hist h;
    metrics_hist_observe(&h, bounds, 3, 1000);  /* on a bound: counted in it (le) */
    metrics_hist_observe(&h, bounds, 3, 1001);  /* next one up */
    metrics_hist_observe(&h, bounds, 3, -5);    /* clamped to 0 */
    metrics_hist_observe(&h, bounds, 3, 20000); /* +Inf only */
    metrics_buf b;
    metrics_buf_init(&b);
    const char *labels[] = {"method", "m", NULL};
    metrics_hist_write(&b, "d_seconds", labels, &h, bounds, 3, 6);
    assert_string_equal(b.data, "d_seconds_bucket{method=\"m\",le=\"0.001\"} 2\n"
                                "d_seconds_bucket{method=\"m\",le=\"0.005\"} 3\n"
                                "d_seconds_bucket{method=\"m\",le=\"0.01\"} 3\n"
                                "d_seconds_bucket{method=\"m\",le=\"+Inf\"} 4\n"
                                "d_seconds_sum{method=\"m\"} 0.022001\n"
                                "d_seconds_count{method=\"m\"} 4\n");
    metrics_buf_dispose(&b);
}

/* Every sample belongs to a family whose HELP and TYPE came first, and no family is
 * declared twice: what a Prometheus scrape rejects otherwise. */
static void assert_well_formed(const char *page)
{
    char families[128][96];
    size_t nf = 0;
    const char *p = page;
    while (*p) {
        const char *eol = strchr(p, '\n');
        assert_non_null(eol); /* every line ends with \n, the last one too */
        char line[512];
        size_t n = (size_t)(eol - p);
        assert_true(n < sizeof line);
        memcpy(line, p, n);
        line[n] = '\0';
        char name[96];
        if (sscanf(line, "# TYPE %95s", name) == 1) {
            for (size_t i = 0; i < nf; i++)
                assert_string_not_equal(families[i], name);
            assert_true(nf < 128);
            snprintf(families[nf++], sizeof families[0], "%s", name);
        } else if (line[0] != '#') {
            size_t k = strcspn(line, "{ ");
            assert_true(k > 0 && k < sizeof name);
            memcpy(name, line, k);
            name[k] = '\0';
            bool found = false;
            for (size_t i = 0; i < nf && !found; i++) {
                size_t fl = strlen(families[i]);
                found = strcmp(name, families[i]) == 0 ||
                        (strncmp(name, families[i], fl) == 0 &&
                         (strcmp(name + fl, "_bucket") == 0 || strcmp(name + fl, "_sum") == 0 ||
                          strcmp(name + fl, "_count") == 0));
            }
            if (!found)
                fail_msg("sample without a TYPE line first: %s", line);
            assert_non_null(strrchr(line, ' '));
        }
        p = eol + 1;
    }
}

static void test_metrics_page(void **state)
{
    (void)state;
    srv_metrics_rpc("/orders.v1.OrderService/GetOrder", GRPC_STATUS_OK, 2000);
    srv_metrics_rpc("/orders.v1.OrderService/GetOrder", GRPC_STATUS_OK, 700);
    srv_metrics_rpc("/orders.v1.OrderService/GetOrder", GRPC_STATUS_NOT_FOUND, 30000000);
    srv_metrics_rpc("/nope.Service/Invented", GRPC_STATUS_UNIMPLEMENTED, 50);
    srv_metrics_rpc("/orders.v1.OrderService/PlaceOrder", (grpc_status_code)99, 50);
    srv_metrics_rpc(NULL, GRPC_STATUS_OK, 50);

    srv_worker workers[3];
    memset(workers, 0, sizeof workers);
    workers[0].cache = (struct cache *)(uintptr_t)0x1000; /* errors 1 each (even address) */
    workers[2].cache = (struct cache *)(uintptr_t)0x2000;
    srv_server s;
    memset(&s, 0, sizeof s);
    s.workers = workers;
    s.nworkers = 3;
    s.limits = (srv_limits *)(uintptr_t)0x3000;
    s.relay = (struct amqp_relay *)(uintptr_t)0x4000;
    s.relays[0] = s.relay;
    s.nrelays = 1;
    s.consumer = (struct amqp_consumer *)(uintptr_t)0x5000;

    metrics_buf b;
    metrics_buf_init(&b);
    assert_int_equal(srv__metrics_render(&s, &b), 0);
    const char *page = b.data;
    assert_well_formed(page);

    assert_int_equal(sample(page, "orderd_up"), 1);
    assert_int_equal(
        sample(
            page,
            "orderd_rpc_requests_total{method=\"/orders.v1.OrderService/GetOrder\",code=\"OK\"}"),
        2);
    assert_int_equal(sample(page, "orderd_rpc_requests_total{method=\"/orders.v1.OrderService/"
                                  "GetOrder\",code=\"NOT_FOUND\"}"),
                     1);
    /* Unknown paths share one row, whatever they are called: no label explosion. */
    assert_int_equal(
        sample(page, "orderd_rpc_requests_total{method=\"other\",code=\"UNIMPLEMENTED\"}"), 1);
    assert_int_equal(sample(page, "orderd_rpc_requests_total{method=\"other\",code=\"OK\"}"), 1);
    assert_null(strstr(page, "Invented"));
    /* A code outside 0..16 counts as UNKNOWN. */
    assert_int_equal(sample(page, "orderd_rpc_requests_total{method=\"/orders.v1.OrderService/"
                                  "PlaceOrder\",code=\"UNKNOWN\"}"),
                     1);
    /* Series that never happened are not listed. */
    assert_int_equal(sample(page, "orderd_rpc_requests_total{method=\"/orders.v1.OrderService/"
                                  "ListOrders\",code=\"OK\"}"),
                     -1);

    const char *go =
        "orderd_rpc_duration_seconds_bucket{method=\"/orders.v1.OrderService/GetOrder\"";
    char series[256];
    snprintf(series, sizeof series, "%s,le=\"0.001\"}", go);
    assert_int_equal(sample(page, series), 1);
    snprintf(series, sizeof series, "%s,le=\"0.0025\"}", go);
    assert_int_equal(sample(page, series), 2);
    snprintf(series, sizeof series, "%s,le=\"10\"}", go);
    assert_int_equal(sample(page, series), 2);
    snprintf(series, sizeof series, "%s,le=\"+Inf\"}", go);
    assert_int_equal(sample(page, series), 3);
    assert_non_null(strstr(page, "orderd_rpc_duration_seconds_sum{method=\"/orders.v1."
                                 "OrderService/GetOrder\"} 30.0027\n"));
    assert_int_equal(sample(page, "orderd_rpc_duration_seconds_count{method=\"/orders.v1."
                                  "OrderService/GetOrder\"}"),
                     3);
    assert_non_null(strstr(page, "# TYPE orderd_rpc_duration_seconds histogram\n"));

    /* Every webhook series exists from the start. */
    assert_true(webhook_count("stripe", "bad_signature") >= 0);
    assert_true(webhook_count("paypal", "error") >= 0);

    /* Adapters: summed over the workers that have a cache. */
    assert_int_equal(sample(page, "orderd_cache_hits_total"), 20);
    assert_int_equal(sample(page, "orderd_cache_misses_total"), 6);
    assert_int_equal(sample(page, "orderd_cache_errors_total"), 2);
    assert_int_equal(sample(page, "orderd_ratelimit_fallback_decisions_total"), 7);
    assert_int_equal(sample(page, "orderd_ratelimit_refused_total"), 5);
    assert_int_equal(sample(page, "orderd_outbox_published_total"), 42);
    assert_int_equal(sample(page, "orderd_outbox_backlog"), 3);
    assert_non_null(strstr(page, "\norderd_outbox_oldest_unsent_age_seconds 1.5\n"));
    assert_int_equal(sample(page, "orderd_amqp_connected{connection=\"relay\"}"), 1);
    assert_int_equal(sample(page, "orderd_amqp_connected{connection=\"consumer\"}"), 0);
    assert_int_equal(sample(page, "orderd_amqp_reconnects_total{connection=\"consumer\"}"), 1);
    assert_int_equal(sample(page, "orderd_inventory_replies_total{result=\"applied\"}"), 4);
    metrics_buf_dispose(&b);

    /* Nothing configured: no adapter series at all (not zeros that look like data). */
    memset(&s, 0, sizeof s);
    metrics_buf_init(&b);
    assert_int_equal(srv__metrics_render(&s, &b), 0);
    assert_well_formed(b.data);
    assert_null(strstr(b.data, "orderd_cache_"));
    assert_null(strstr(b.data, "orderd_outbox_"));
    assert_null(strstr(b.data, "orderd_ratelimit_"));
    metrics_buf_dispose(&b);
}

/* ---- the side port ---- */

static void test_health(void **state)
{
    (void)state;
    reply r;
    get("/healthz", &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"status\":\"SERVING\"}");
    assert_string_equal(r.ctype, "application/json");

    atomic_store(&srv.health, 2);
    get("/healthz", &r);
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "{\"status\":\"NOT_SERVING\"}");

    atomic_store(&srv.health, 1);
    atomic_store(&srv.draining, true); /* a shutdown began: load balancers must stop */
    get("/healthz", &r);
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "{\"status\":\"NOT_SERVING\"}");
    atomic_store(&srv.draining, false);

    request("HEAD", "/healthz", NULL, NULL, 0, 0, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, 0);
}

static void test_metrics_endpoint(void **state)
{
    (void)state;
    reply r;
    get("/metrics", &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.ctype, "text/plain; version=0.0.4; charset=utf-8");
    assert_int_equal(sample(r.body, "orderd_up"), 1);
    assert_well_formed(r.body);
}

/* Probes and scrapes can keep their connection: one TCP connection for several requests. */
static void test_keep_alive(void **state)
{
    (void)state;
    CURL *e = curl_easy_init();
    assert_non_null(e);
    char url[128];
    reply r;
    const char *paths[] = {"/healthz", "/metrics", "/healthz"};
    for (size_t i = 0; i < 3; i++) {
        memset(&r, 0, sizeof r);
        snprintf(url, sizeof url, "http://127.0.0.1:%u%s", srv__http_port(&srv), paths[i]);
        curl_easy_setopt(e, CURLOPT_URL, url);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, &r);
        assert_int_equal(curl_easy_perform(e), CURLE_OK);
        long status = 0, connects = -1;
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &connects);
        assert_int_equal(status, 200);
        assert_int_equal(connects, i == 0 ? 1 : 0);
    }
    curl_easy_cleanup(e);
}

static void test_routes_and_methods(void **state)
{
    (void)state;
    reply r;
    get("/nope", &r);
    assert_int_equal(r.status, 404);
    assert_string_equal(r.body, "{\"error\":\"not found\"}");
    get("/metrics/", &r);
    assert_int_equal(r.status, 404);

    get("/webhooks/stripe", &r);
    assert_int_equal(r.status, 405);
    assert_string_equal(r.allow, "POST");
    request("POST", "/metrics", NULL, "x", 1, 0, &r);
    assert_int_equal(r.status, 405);
    assert_string_equal(r.allow, "GET, HEAD");
    request("DELETE", "/healthz", NULL, NULL, 0, 0, &r);
    assert_int_equal(r.status, 405);
    assert_int_equal(apply_calls, 0);
}

static void test_stripe_applied_with_exact_body(void **state)
{
    (void)state;
    long long before = webhook_count("stripe", "applied");
    /* Bytes a text-minded server might mangle: CRLF, a NUL, high bytes, no final newline. */
    static const char body[] = "{\"id\":\"evt_1\",\r\n\"x\":\"\xc3\xa9\"}\0tail";
    reply r;
    stripe("t=1,v1=good", body, sizeof body - 1, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"received\":true}");
    assert_int_equal(seen_len, sizeof body - 1);
    assert_memory_equal(seen_body, body, sizeof body - 1);
    assert_string_equal(seen_secret, "whsec_test_secret"); /* NUL-terminated copy */
    assert_int_equal(seen_tolerance, 300);
    assert_int_equal(apply_calls, 1);
    assert_int_equal(webhook_count("stripe", "applied"), before + 1);
}

static void test_stripe_refusals(void **state)
{
    (void)state;
    reply r;
    long long bad = webhook_count("stripe", "bad_signature");
    stripe("t=1,v1=forged", "{}", 2, &r);
    assert_int_equal(r.status, 400);
    assert_string_equal(r.body, "{\"error\":\"signature verification failed\"}");
    stripe(NULL, "{}", 2, &r); /* no header at all */
    assert_int_equal(r.status, 400);
    assert_int_equal(webhook_count("stripe", "bad_signature"), bad + 2);

    stripe("t=1,v1=malformed", "{", 1, &r);
    assert_int_equal(r.status, 400);
    assert_string_equal(r.body, "{\"error\":\"malformed event\"}");
    assert_int_equal(apply_calls, 0);
    assert_null(strstr(r.body, "whsec")); /* never echoes the secret */
}

static void test_stripe_domain_outcomes(void **state)
{
    (void)state;
    static const struct {
        int rc;
        long status;
        const char *result;
    } cases[] = {
        {ORDER_EDUPLICATE, 200, "duplicate"},  {ORDER_ENOTFOUND, 200, "ignored"},
        {ORDER_EPRECONDITION, 200, "ignored"}, {ORDER_EUNAVAILABLE, 503, "unavailable"},
        {ORDER_EDEADLINE, 503, "unavailable"}, {ORDER_EABORTED, 503, "unavailable"},
        {ORDER_EINTERNAL, 500, "error"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        apply_rc = cases[i].rc;
        long long before = webhook_count("stripe", cases[i].result);
        reply r;
        stripe("t=1,v1=good", "{}", 2, &r);
        assert_int_equal(r.status, cases[i].status);
        if (r.status == 200)
            assert_string_equal(r.body, "{\"received\":true}");
        assert_int_equal(webhook_count("stripe", cases[i].result), before + 1);
    }
    assert_int_equal(apply_calls, (int)(sizeof cases / sizeof *cases));

    /* Applied, but it changed nothing (ConfirmPayment got there first): not "applied". */
    apply_rc = ORDER_OK;
    apply_changes = false;
    long long applied = webhook_count("stripe", "applied"),
              ignored = webhook_count("stripe", "ignored");
    reply nochange;
    stripe("t=1,v1=good", "{}", 2, &nochange);
    apply_changes = true;
    assert_int_equal(nochange.status, 200);
    assert_int_equal(webhook_count("stripe", "applied"), applied);
    assert_int_equal(webhook_count("stripe", "ignored"), ignored + 1);

    /* Events orderd does not act on are acknowledged without touching the domain. */
    apply_rc = ORDER_EINTERNAL;
    next_ev.kind = ORDER_PAY_EVENT_IGNORED;
    reply r;
    stripe("t=1,v1=good", "{}", 2, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(apply_calls, (int)(sizeof cases / sizeof *cases) + 1);
}

static void test_body_limit(void **state)
{
    (void)state;
    size_t n = (size_t)cfg.http_max_body_bytes + 1;
    char *big = malloc(n);
    memset(big, 'a', n);
    reply r;
    /* Declared too long: refused before the body is read (curl waits for 100 Continue). */
    stripe("t=1,v1=good", big, n, &r);
    assert_int_equal(r.status, 413);
    assert_string_equal(r.body, "{\"error\":\"request body too large\"}");
    /* Exactly at the limit is fine. */
    stripe("t=1,v1=good", big, n - 1, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(seen_len, n - 1);
    free(big);

    /* Chunked, no length declared: counted as it comes, dropped past the limit, refused at
     * its end; far past it, the connection is cut. */
    seen_len = 0;
    const char *hs[] = {"Stripe-Signature: t=1,v1=good", NULL};
    request("POST", "/webhooks/stripe", hs, NULL, 0, n + 1000, &r);
    assert_int_equal(r.status, 413);
    CURLcode rc = request_rc("POST", "/webhooks/stripe", hs, NULL, 0, 100 * n, &r);
    assert_true(rc != CURLE_OK || r.status == 413);
    assert_int_equal(seen_len, 0); /* never reached verification */
    assert_int_equal(apply_calls, 1);
}

/* A body announced too long is refused at once, without waiting for a byte of it (a raw
 * client that sends the headers only gets its 413 straight away). */
static void test_body_limit_before_reading(void **state)
{
    (void)state;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)srv__http_port(&srv));
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    struct timeval tv = {3, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static const char req[] = "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
                              "Stripe-Signature: t=1,v1=good\r\n"
                              "Content-Length: 1000000000\r\n\r\n";
    assert_int_equal(send(fd, req, sizeof req - 1, 0), (ssize_t)(sizeof req - 1));
    char buf[512] = "";
    ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
    assert_true(n > 0);
    buf[n] = '\0';
    assert_true(strncmp(buf, "HTTP/1.1 413 ", 13) == 0);
    close(fd);
    assert_int_equal(seen_len, 0);
}

static void test_stripe_unconfigured(void **state)
{
    (void)state;
    srv_http_stop(&srv);
    char err[256];
    cfg.stripe_webhook_secret = NULL;
    cfg.stripe_webhook_secret_len = 0;
    assert_int_equal(srv_http_start(&srv, err, sizeof err), 0);
    reply r;
    stripe("t=1,v1=good", "{}", 2, &r);
    assert_int_equal(r.status, 503); /* Stripe on, secret missing: a mistake to fix */
    srv_http_stop(&srv);
    cfg.stripe_enabled = false;
    assert_int_equal(srv_http_start(&srv, err, sizeof err), 0);
    stripe("t=1,v1=good", "{}", 2, &r);
    assert_int_equal(r.status, 404);
    assert_int_equal(seen_len, 0);
    assert_int_equal(apply_calls, 0);
}

static void test_paypal(void **state)
{
    (void)state;
    /* Header names in any case; values handed over as sent. */
    const char *hs[] = {"paypal-auth-algo: SHA256withRSA",
                        "Paypal-Cert-Url: https://api.paypal.com/v1/notifications/certs/C",
                        "PAYPAL-TRANSMISSION-ID: 69cd13f0-d67a-11e5-baa3-778b53f4ae55",
                        "PayPal-Transmission-Sig: c2lnbmF0dXJl",
                        "paypal-transmission-time: 2016-02-18T20:01:35Z",
                        NULL};
    static const char body[] = "{\"id\":\"WH-1\",\"event_type\":\"PAYMENT.CAPTURE.COMPLETED\"}";
    reply r;
    request("POST", "/webhooks/paypal", hs, body, sizeof body - 1, 0, &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(seen_pp.auth_algo, "SHA256withRSA");
    assert_string_equal(seen_pp.cert_url, "https://api.paypal.com/v1/notifications/certs/C");
    assert_string_equal(seen_pp.transmission_id, "69cd13f0-d67a-11e5-baa3-778b53f4ae55");
    assert_string_equal(seen_pp.transmission_sig, "c2lnbmF0dXJl");
    assert_string_equal(seen_pp.transmission_time, "2016-02-18T20:01:35Z");
    assert_string_equal(seen_webhook_id, "WH-123");
    assert_memory_equal(seen_body, body, sizeof body - 1);
    assert_int_equal(apply_calls, 1);

    /* A missing header reaches the verifier as NULL (it refuses). */
    paypal_rc = PAY_WEBHOOK_BAD_SIGNATURE;
    request("POST", "/webhooks/paypal", hs + 1, body, sizeof body - 1, 0, &r);
    assert_int_equal(r.status, 400);
    assert_null(seen_pp.auth_algo);

    paypal_rc = PAY_WEBHOOK_UNAVAILABLE; /* PayPal's verification API is down */
    long long before = webhook_count("paypal", "unavailable");
    request("POST", "/webhooks/paypal", hs, body, sizeof body - 1, 0, &r);
    assert_int_equal(r.status, 503);
    assert_int_equal(webhook_count("paypal", "unavailable"), before + 1);
    assert_int_equal(apply_calls, 1);

    paypal_rc = PAY_WEBHOOK_OK;
    paypal_provider = false;
    request("POST", "/webhooks/paypal", hs, body, sizeof body - 1, 0, &r);
    assert_int_equal(r.status, 503);

    srv_http_stop(&srv);
    cfg.paypal_enabled = false;
    char err[256];
    assert_int_equal(srv_http_start(&srv, err, sizeof err), 0);
    request("POST", "/webhooks/paypal", hs, body, sizeof body - 1, 0, &r);
    assert_int_equal(r.status, 404);
    assert_int_equal(apply_calls, 1);
}

/* At most http.threads domain services, each used by one connection thread at a time,
 * all closed by srv_http_stop. */
typedef struct burst_arg {
    int ok;
} burst_arg;
static void *burst(void *p)
{
    burst_arg *a = p;
    for (int i = 0; i < 10; i++) {
        reply r;
        stripe("t=1,v1=good", "{}", 2, &r);
        a->ok += r.status == 200;
    }
    return NULL;
}

static void test_services_per_thread(void **state)
{
    (void)state;
    pthread_t th[4];
    burst_arg args[4] = {{0}};
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&th[i], NULL, burst, &args[i]), 0);
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].ok, 10);
    }
    assert_int_equal(apply_calls, 40);
    assert_true(bg_opens >= 1 && bg_opens <= cfg.http_threads);
    assert_int_equal(bg_shared, 0);
    srv_http_stop(&srv);
    assert_null(srv.http);
    assert_int_equal(bg_closes, bg_opens);
    srv_http_stop(&srv); /* twice is harmless */
}

/* Webhooks stuck in the domain (a slow provider) hold up neither /healthz nor /metrics:
 * every connection has its own thread. */
static void *one_webhook(void *p)
{
    reply *r = p;
    stripe("t=1,v1=good", "{}", 2, r);
    return NULL;
}

static void test_health_answers_while_webhooks_are_stuck(void **state)
{
    (void)state;
    atomic_store(&apply_sleep_ms, 1500);
    enum { N = 6 }; /* more than http.threads: some wait for a domain service */
    pthread_t th[N];
    reply wr[N];
    for (int i = 0; i < N; i++)
        assert_int_equal(pthread_create(&th[i], NULL, one_webhook, &wr[i]), 0);
    usleep(200 * 1000); /* the webhooks are in */
    for (int i = 0; i < 3; i++) {
        reply r;
        request("GET", "/healthz", NULL, NULL, 0, 0, &r);
        assert_int_equal(r.status, 200);
        request("GET", "/metrics", NULL, NULL, 0, 0, &r);
        assert_int_equal(r.status, 200);
        assert_true(apply_calls < N); /* answered while webhooks were still being applied */
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(wr[i].status, 200);
    }
    assert_int_equal(apply_calls, N);
    assert_true(bg_opens <= cfg.http_threads);
    assert_int_equal(bg_shared, 0);
}

static void test_service_open_failure(void **state)
{
    (void)state;
    bg_fail = true;
    reply r;
    stripe("t=1,v1=good", "{}", 2, &r);
    assert_int_equal(r.status, 503);
    assert_int_equal(apply_calls, 0);
    bg_fail = false;
    /* The failed thread retries after its back-off; another thread may open at once. */
    for (int i = 0; i < 30 && r.status != 200; i++) {
        usleep(100000);
        stripe("t=1,v1=good", "{}", 2, &r);
    }
    assert_int_equal(r.status, 200);
}

static void test_listen_failures(void **state)
{
    (void)state;
    /* A port somebody else holds: the server must refuse to start, and say why. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 1), 0);
    socklen_t al = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &al), 0);

    srv_server s;
    memset(&s, 0, sizeof s);
    srv_config c;
    memset(&c, 0, sizeof c);
    c.http_threads = 2;
    c.http_max_body_bytes = 4096;
    s.cfg = &c;
    char err[256] = "";
    snprintf(c.http_listen, sizeof c.http_listen, "127.0.0.1:%u", ntohs(a.sin_port));
    assert_int_equal(srv_http_start(&s, err, sizeof err), -1);
    assert_null(s.http);
    assert_non_null(strstr(err, c.http_listen));
    assert_non_null(strstr(err, "cannot listen: Address already in use"));
    close(fd);

    const char *bad[] = {"nonsense", "127.0.0.1",      "127.0.0.1:99999",
                         "::1:80",   "127.0.0.1:http", "no-such-host.invalid:8080"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(c.http_listen, sizeof c.http_listen, "%s", bad[i]);
        err[0] = '\0';
        assert_int_equal(srv_http_start(&s, err, sizeof err), -1);
        assert_true(err[0] != '\0');
        assert_null(s.http);
    }

    /* Names and IPv6 literals resolve; "" is off. */
    snprintf(c.http_listen, sizeof c.http_listen, "localhost:0");
    assert_int_equal(srv_http_start(&s, err, sizeof err), 0);
    assert_true(srv__http_port(&s) > 0);
    srv_http_stop(&s);
    c.http_listen[0] = '\0';
    assert_int_equal(srv_http_start(&s, err, sizeof err), 0);
    assert_null(s.http);
    assert_int_equal(srv__http_port(&s), 0);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_format_primitives),
        cmocka_unit_test(test_histogram_buckets),
        cmocka_unit_test(test_metrics_page),
        cmocka_unit_test_setup_teardown(test_health, start, stop),
        cmocka_unit_test_setup_teardown(test_metrics_endpoint, start, stop),
        cmocka_unit_test_setup_teardown(test_keep_alive, start, stop),
        cmocka_unit_test_setup_teardown(test_routes_and_methods, start, stop),
        cmocka_unit_test_setup_teardown(test_stripe_applied_with_exact_body, start, stop),
        cmocka_unit_test_setup_teardown(test_stripe_refusals, start, stop),
        cmocka_unit_test_setup_teardown(test_stripe_domain_outcomes, start, stop),
        cmocka_unit_test_setup_teardown(test_body_limit, start, stop),
        cmocka_unit_test_setup_teardown(test_body_limit_before_reading, start, stop),
        cmocka_unit_test_setup_teardown(test_stripe_unconfigured, start, stop),
        cmocka_unit_test_setup_teardown(test_paypal, start, stop),
        cmocka_unit_test_setup_teardown(test_services_per_thread, start, stop),
        cmocka_unit_test_setup_teardown(test_health_answers_while_webhooks_are_stuck, start, stop),
        cmocka_unit_test_setup_teardown(test_service_open_failure, start, stop),
        cmocka_unit_test(test_listen_failures),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
