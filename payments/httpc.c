/* httpc.c — the HTTP client of the payment providers: libcurl, one easy handle per
 * provider instance, and the retry policy both Stripe and PayPal ask of their clients.
 *
 * DESIGN
 * A call is a loop of attempts. Every attempt is bounded by the attempt timeout and by
 * what is left of the caller's deadline (order_ctx), whichever is shorter. An attempt that
 * got no HTTP answer (connect, TLS, reset, timeout) or got 409, 429 or 5xx is retried after
 * a jittered exponential back-off (half the nominal delay fixed, half random, so replicas
 * that failed together do not retry together), unless Stripe-Should-Retry says otherwise,
 * the attempts are used up, or the back-off would outlast the deadline. The request is
 * sent byte for byte the same every time, so its idempotency key protects every retry.
 * Other 4xx are answers, not failures: the caller reads them.
 *
 * The easy handle is reset (curl_easy_reset keeps live connections and the DNS and TLS
 * session caches) and set up afresh for every attempt, so no option leaks from one call
 * into the next. Header lines are never logged: they carry the credentials.
 */
#include "payments/httpc.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include <openssl/crypto.h>

#include "common/clock.h"
#include "common/log.h"

#define MS  1000LL
#define SEC (1000 * MS)
/* A provider's answer is a few kB; anything past this is refused, not buffered. */
#define RESP_MAX (4u << 20)

/* Defaults for zero fields of pay_http_config: Stripe's SDKs use 80 s per request, which
 * is far longer than any caller of orderd waits; the deadline is the real bound. */
#define DEF_TIMEOUT_US         (10 * SEC)
#define DEF_CONNECT_TIMEOUT_US (3 * SEC)
#define DEF_MAX_ATTEMPTS       3
#define DEF_BACKOFF_BASE_US    (500 * MS)
#define DEF_BACKOFF_MAX_US     (5 * SEC)

struct pay_httpc {
    CURL *curl;
    char provider[16];
    char *base;
    char *ca_file;
    int64_t timeout_us, connect_timeout_us, backoff_base_us, backoff_max_us;
    int max_attempts;
    uint64_t rng; /* xorshift64* state for the jitter */
};

/* ---- buffer ---- */

void pay__buf_append(pay__buf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = malloc(cap);
        if (!d) {
            b->oom = true;
            return;
        }
        if (b->data) {
            memcpy(d, b->data, b->len);
            OPENSSL_cleanse(b->data, b->cap);
            free(b->data);
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void pay__buf_puts(pay__buf *b, const char *s)
{
    pay__buf_append(b, s, strlen(s));
}

static void buf_escape(pay__buf *b, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            char ch = (char)c;
            pay__buf_append(b, &ch, 1);
        } else {
            char esc[3] = {'%', hex[c >> 4], hex[c & 15]};
            pay__buf_append(b, esc, 3);
        }
    }
}

void pay__buf_form(pay__buf *b, const char *key, const char *value)
{
    if (b->len)
        pay__buf_append(b, "&", 1);
    buf_escape(b, key);
    pay__buf_append(b, "=", 1);
    buf_escape(b, value ? value : "");
}

void pay__buf_free(pay__buf *b)
{
    if (b->data) {
        OPENSSL_cleanse(b->data, b->cap);
        free(b->data);
    }
    memset(b, 0, sizeof *b);
}

/* ---- small helpers ---- */

bool pay__id_safe(const char *s, size_t max)
{
    size_t n = 0;
    if (!s || !*s)
        return false;
    for (; s[n]; n++) {
        char c = s[n];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return false;
        if (n >= max)
            return false;
    }
    return true;
}

int pay__refuse(order_ctx *ctx, const char *reason, const char *fmt, ...)
{
    char msg[sizeof ctx->err->message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    order_fail(ctx->err, ORDER_EPRECONDITION, "%s", msg);
    snprintf(ctx->err->reason, sizeof ctx->err->reason, "%s", reason);
    return ORDER_EPRECONDITION;
}

/* ---- the client ---- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_FAILED_INIT;

/* curl_global_init is not thread-safe in every libcurl build: once, before any handle. */
static void curl_init(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static char *dup_str(const char *s)
{
    return s ? strdup(s) : NULL;
}

pay_httpc *pay__httpc_create(const char *provider, const char *base, const pay_http_config *cfg,
                             char *err, size_t errlen)
{
    pay_httpc *c = NULL;
    if (!base || (strncmp(base, "https://", 8) != 0 && strncmp(base, "http://", 7) != 0)) {
        snprintf(err, errlen, "%s: api_base must be an http(s) URL", provider);
        return NULL;
    }
    if (cfg->timeout_us < 0 || cfg->connect_timeout_us < 0 || cfg->max_attempts < 0 ||
        cfg->backoff_base_us < 0 || cfg->backoff_max_us < 0) {
        snprintf(err, errlen, "%s: negative http timeout, attempts or back-off", provider);
        return NULL;
    }
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK) {
        snprintf(err, errlen, "%s: curl_global_init: %s", provider,
                 curl_easy_strerror(curl_init_rc));
        return NULL;
    }
    c = calloc(1, sizeof *c);
    if (!c)
        goto oom;
    snprintf(c->provider, sizeof c->provider, "%s", provider);
    c->base = strdup(base);
    c->ca_file = dup_str(cfg->ca_file);
    c->curl = curl_easy_init();
    if (!c->base || (cfg->ca_file && !c->ca_file) || !c->curl)
        goto oom;
    size_t bl = strlen(c->base);
    while (bl > 0 && c->base[bl - 1] == '/') /* "https://x/" + "/v1/..." */
        c->base[--bl] = '\0';
    c->timeout_us = cfg->timeout_us ? cfg->timeout_us : DEF_TIMEOUT_US;
    c->connect_timeout_us =
        cfg->connect_timeout_us ? cfg->connect_timeout_us : DEF_CONNECT_TIMEOUT_US;
    if (c->connect_timeout_us > c->timeout_us)
        c->connect_timeout_us = c->timeout_us;
    c->max_attempts = cfg->max_attempts ? cfg->max_attempts : DEF_MAX_ATTEMPTS;
    c->backoff_base_us = cfg->backoff_base_us ? cfg->backoff_base_us : DEF_BACKOFF_BASE_US;
    c->backoff_max_us = cfg->backoff_max_us ? cfg->backoff_max_us : DEF_BACKOFF_MAX_US;
    if (c->backoff_max_us < c->backoff_base_us)
        c->backoff_max_us = c->backoff_base_us;
    if (getrandom(&c->rng, sizeof c->rng, GRND_NONBLOCK) != (ssize_t)sizeof c->rng)
        c->rng = (uint64_t)clock_mono_us();
    c->rng |= 1; /* xorshift's state must not be zero */
    return c;
oom:
    snprintf(err, errlen, "%s: out of memory", provider);
    pay__httpc_destroy(c);
    return NULL;
}

void pay__httpc_destroy(pay_httpc *c)
{
    if (!c)
        return;
    if (c->curl)
        curl_easy_cleanup(c->curl);
    free(c->base);
    free(c->ca_file);
    free(c);
}

const char *pay__httpc_provider(const pay_httpc *c)
{
    return c->provider;
}

void pay__http_resp_clear(pay__http_resp *resp)
{
    free(resp->body);
    memset(resp, 0, sizeof *resp);
}

bool pay__http_retryable(long status)
{
    return status == 409 || status == 429 || status >= 500;
}

static uint64_t rng_next(pay_httpc *c)
{
    uint64_t x = c->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    c->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void sleep_us(int64_t us)
{
    struct timespec ts = {.tv_sec = us / SEC, .tv_nsec = (long)(us % SEC) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* What one attempt collected. */
typedef struct attempt {
    pay__buf body;
    bool too_large;
    int should_retry;       /* Stripe-Should-Retry: -1 absent, 0 false, 1 true */
    int64_t retry_after_us; /* Retry-After in seconds, 0 if absent */
    bool replayed;
    char request_id[128];
} attempt;

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    attempt *a = userdata;
    size_t n = size * nmemb;
    if (a->body.len + n > RESP_MAX) {
        a->too_large = true;
        return 0; /* curl aborts the transfer with CURLE_WRITE_ERROR */
    }
    pay__buf_append(&a->body, ptr, n);
    return a->body.oom ? 0 : n;
}

/* "Name: value\r\n" -> value without surrounding blanks, if the name matches. */
static bool header_value(const char *line, size_t n, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    if (n <= nl || line[nl] != ':' || strncasecmp(line, name, nl) != 0)
        return false;
    const char *v = line + nl + 1, *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t'))
        end--;
    size_t len = (size_t)(end - v);
    if (len >= cap)
        len = cap - 1;
    memcpy(out, v, len);
    out[len] = '\0';
    return true;
}

static size_t on_header(char *line, size_t size, size_t nitems, void *userdata)
{
    attempt *a = userdata;
    size_t n = size * nitems;
    char v[128];
    if (n >= 5 && strncmp(line, "HTTP/", 5) == 0) {
        /* A new response (after a 100 Continue or an interim answer): forget the last. */
        a->should_retry = -1;
        a->retry_after_us = 0;
        a->replayed = false;
        a->request_id[0] = '\0';
    } else if (header_value(line, n, "Stripe-Should-Retry", v, sizeof v)) {
        a->should_retry = strcasecmp(v, "true") == 0 ? 1 : strcasecmp(v, "false") == 0 ? 0 : -1;
    } else if (header_value(line, n, "Retry-After", v, sizeof v)) {
        char *end;
        long s = strtol(v, &end, 10);
        if (end != v && *end == '\0' && s > 0 && s < 3600)
            a->retry_after_us = s * SEC;
    } else if (header_value(line, n, "Idempotent-Replayed", v, sizeof v)) {
        a->replayed = strcasecmp(v, "true") == 0;
    } else if (header_value(line, n, "Request-Id", a->request_id, sizeof a->request_id) ||
               header_value(line, n, "Paypal-Debug-Id", a->request_id, sizeof a->request_id)) {
    }
    return n;
}

/* Network failures that another attempt cannot fix. */
static bool curl_retryable(CURLcode cc)
{
    switch (cc) {
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_NOT_BUILT_IN:
    case CURLE_OUT_OF_MEMORY:
    case CURLE_WRITE_ERROR: /* our own refusal of an oversized answer */
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
        return false;
    default:
        return true;
    }
}

static int64_t backoff_us(pay_httpc *c, int attempt_no, int64_t retry_after_us)
{
    int64_t d = c->backoff_base_us;
    for (int i = 1; i < attempt_no && d < c->backoff_max_us; i++)
        d *= 2;
    if (d > c->backoff_max_us)
        d = c->backoff_max_us;
    /* Equal jitter: somewhere in [d/2, d]. */
    int64_t half = d / 2;
    d = half + (int64_t)(rng_next(c) % (uint64_t)(d - half + 1));
    if (retry_after_us > d)
        d = retry_after_us < c->backoff_max_us ? retry_after_us : c->backoff_max_us;
    return d;
}

static bool slist_add(struct curl_slist **l, const char *line)
{
    struct curl_slist *t = curl_slist_append(*l, line); /* copies the line */
    if (!t)
        return false;
    *l = t;
    return true;
}

/* The copies hold credentials (Authorization): wipe them before they go back to malloc. */
static void slist_free(struct curl_slist *l)
{
    for (struct curl_slist *p = l; p; p = p->next)
        OPENSSL_cleanse(p->data, strlen(p->data));
    curl_slist_free_all(l);
}

static CURLcode setup(pay_httpc *c, const pay__http_req *req, struct curl_slist *headers,
                      const char *url, int64_t timeout_us, int64_t connect_us, attempt *a,
                      char *errbuf)
{
    CURL *h = c->curl;
    CURLcode cc = CURLE_OK;
#define SET(opt, val)                                                                              \
    do {                                                                                           \
        if (cc == CURLE_OK)                                                                        \
            cc = curl_easy_setopt(h, opt, val);                                                    \
    } while (0)
    curl_easy_reset(h);
    SET(CURLOPT_URL, url);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_NOSIGNAL, 1L); /* worker threads: no SIGALRM for DNS timeouts */
    SET(CURLOPT_ERRORBUFFER, errbuf);
    SET(CURLOPT_TIMEOUT_MS, (long)(timeout_us / MS > 0 ? timeout_us / MS : 1));
    SET(CURLOPT_CONNECTTIMEOUT_MS, (long)(connect_us / MS > 0 ? connect_us / MS : 1));
    SET(CURLOPT_TCP_KEEPALIVE, 1L);
    SET(CURLOPT_FOLLOWLOCATION, 0L);
    SET(CURLOPT_USERAGENT, "orderd");
    SET(CURLOPT_HTTPHEADER, headers);
    SET(CURLOPT_WRITEFUNCTION, on_body);
    SET(CURLOPT_WRITEDATA, a);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, a);
    if (c->ca_file)
        SET(CURLOPT_CAINFO, c->ca_file);
    if (strcmp(req->method, "POST") == 0) {
        SET(CURLOPT_POST, 1L);
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(req->body ? req->body_len : 0));
        SET(CURLOPT_POSTFIELDS, req->body ? req->body : "");
    } else if (strcmp(req->method, "GET") == 0) {
        SET(CURLOPT_HTTPGET, 1L);
    } else {
        SET(CURLOPT_CUSTOMREQUEST, req->method);
    }
#undef SET
    return cc;
}

int pay__http_do(pay_httpc *c, order_ctx *ctx, const pay__http_req *req, pay__http_resp *resp)
{
    memset(resp, 0, sizeof *resp);
    int rc = ORDER_OK;
    struct curl_slist *headers = NULL;
    pay__buf url = {0};
    attempt a = {0};
    char errbuf[CURL_ERROR_SIZE];
    CURLcode cc = CURLE_OK;
    bool clipped = false; /* the last attempt's timeout was the deadline's, not ours */

    pay__buf_puts(&url, c->base);
    pay__buf_puts(&url, req->path);
    if (req->query && *req->query) {
        pay__buf_puts(&url, "?");
        pay__buf_puts(&url, req->query);
    }
    /* No "Expect: 100-continue" round trip for bodies over 1 kB. */
    bool ok = slist_add(&headers, "Expect:") && slist_add(&headers, "Accept: application/json");
    for (const char *const *hl = req->headers; ok && hl && *hl; hl++)
        ok = slist_add(&headers, *hl);
    if (!ok || url.oom) {
        rc = order_fail(ctx->err, ORDER_EINTERNAL, "%s: out of memory", c->provider);
        goto done;
    }

    for (int n = 1;; n++) {
        int64_t remaining = order_ctx_remaining_us(ctx);
        if (remaining <= 0) {
            if (resp->attempts == 0 || cc != CURLE_OK)
                rc = order_fail(ctx->err, ORDER_EDEADLINE,
                                "%s: the deadline passed before %s answered", c->provider,
                                c->provider);
            break;
        }
        int64_t timeout = c->timeout_us;
        clipped = remaining < timeout;
        if (clipped)
            timeout = remaining;
        int64_t connect = c->connect_timeout_us < timeout ? c->connect_timeout_us : timeout;

        pay__buf_free(&a.body);
        memset(&a, 0, sizeof a);
        a.should_retry = -1;
        errbuf[0] = '\0';
        int64_t t0 = clock_mono_us();
        cc = setup(c, req, headers, url.data, timeout, connect, &a, errbuf);
        if (cc == CURLE_OK)
            cc = curl_easy_perform(c->curl);
        int64_t took = clock_mono_us() - t0;
        long status = 0;
        if (cc == CURLE_OK)
            curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &status);
        if (cc == CURLE_OK && a.body.oom)
            cc = CURLE_OUT_OF_MEMORY;
        resp->attempts = n;
        resp->status = cc == CURLE_OK ? status : 0;

        if (log_enabled(LOG_DEBUG))
            log_kv(
                LOG_DEBUG, "payment provider call", LOG_F_STR, "provider", c->provider, LOG_F_STR,
                "method", req->method, LOG_F_STR, "path", req->path, LOG_F_INT, "status",
                (int64_t)resp->status, LOG_F_INT, "attempt", (int64_t)n, LOG_F_INT, "duration_us",
                took, LOG_F_STR, "request_id", a.request_id[0] ? a.request_id : NULL, LOG_F_STR,
                "replayed", a.replayed ? "true" : NULL, LOG_F_STR, "error",
                cc != CURLE_OK ? (errbuf[0] ? errbuf : curl_easy_strerror(cc)) : NULL, LOG_F_END);

        bool retry;
        if (cc != CURLE_OK)
            retry = curl_retryable(cc);
        else if (a.should_retry >= 0)
            retry = a.should_retry == 1; /* Stripe knows best whether this is safe */
        else
            retry = pay__http_retryable(status);
        if (!retry || n >= c->max_attempts)
            break;
        int64_t wait = backoff_us(c, n, a.retry_after_us);
        if (wait >= order_ctx_remaining_us(ctx))
            break; /* no time left for another attempt: say so now, not at the deadline */
        sleep_us(wait);
    }

    if (rc == ORDER_OK && cc != CURLE_OK) {
        const char *why = a.too_large ? "answer too large"
                          : errbuf[0] ? errbuf
                                      : curl_easy_strerror(cc);
        if (order_ctx_remaining_us(ctx) <= 0 || (clipped && cc == CURLE_OPERATION_TIMEDOUT))
            rc = order_fail(ctx->err, ORDER_EDEADLINE,
                            "%s did not answer before the deadline (%d attempt%s)", c->provider,
                            resp->attempts, resp->attempts == 1 ? "" : "s");
        else
            rc = order_fail(ctx->err, ORDER_EUNAVAILABLE, "%s unreachable: %s (%d attempt%s)",
                            c->provider, why, resp->attempts, resp->attempts == 1 ? "" : "s");
    }
    if (rc == ORDER_OK) {
        resp->body = a.body.data; /* hand the last answer over */
        resp->len = a.body.len;
        a.body = (pay__buf){0};
        snprintf(resp->request_id, sizeof resp->request_id, "%s", a.request_id);
        resp->replayed = a.replayed;
    }
done:
    /* Drop the handle's pointers into this frame (error buffer, header list, callback
     * data); the connections stay for the next call. */
    curl_easy_reset(c->curl);
    pay__buf_free(&a.body);
    pay__buf_free(&url);
    slist_free(headers);
    return rc;
}

int pay__http_fail_unavailable(pay_httpc *c, order_ctx *ctx, const pay__http_resp *resp)
{
    if (order_ctx_remaining_us(ctx) <= 0)
        return order_fail(ctx->err, ORDER_EDEADLINE,
                          "%s did not succeed before the deadline (HTTP %ld, %d attempt%s)",
                          c->provider, resp->status, resp->attempts,
                          resp->attempts == 1 ? "" : "s");
    return order_fail(ctx->err, ORDER_EUNAVAILABLE, "%s unavailable: HTTP %ld (%d attempt%s)",
                      c->provider, resp->status, resp->attempts, resp->attempts == 1 ? "" : "s");
}

/* ---- small helpers ---- */

void pay__free_secret(char *s)
{
    if (s) {
        OPENSSL_cleanse(s, strlen(s));
        free(s);
    }
}

void pay__copy(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

json_t *pay__json_object(const pay__http_resp *r)
{
    if (!r->body)
        return NULL;
    json_t *root = json_loadb(r->body, r->len, 0, NULL);
    if (root && !json_is_object(root)) {
        json_decref(root);
        return NULL;
    }
    return root;
}

const char *pay__jstr(const json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}
