/* paypal.c — the PAYPAL payment provider (Orders v2) and PayPal webhooks.
 *
 * DESIGN
 * One PayPal order per orderd order, created under PayPal-Request-Id
 * "orderd-create-<order id>"; the payer approves it at the approval URL; verification
 * captures it ("orderd-capture-<order id>") and accepts only a COMPLETED capture of this
 * order's amount, currency and id; a refund refunds the capture ("orderd-refund-<order
 * id>"); a void only checks that nothing was captured, since an uncaptured PayPal order
 * simply lapses.
 *
 * OAuth2: the client-credentials token is cached process-wide, one per (api_base,
 * client_id), behind a mutex, until 60 s (or a tenth of its lifetime, if shorter) before
 * it expires. One thread fetches while the others wait on a condition variable, bounded
 * by their own deadlines, so a burst of calls costs one grant. An API call answered 401
 * drops that token (only if nobody replaced it meanwhile) and is tried once more with a
 * fresh one. Client id, secret and token are never logged.
 */
#include "payments/payments.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "payments/httpc.h"

#define PAYPAL_ID_MAX 255
#define TOKEN_MAX     4096

struct paypal {
    order_payments port; /* first: the port pointer is the provider pointer */
    pay_httpc *http;
    char *api_base;
    char *client_id;
    char *basic; /* "Authorization: Basic base64(id:secret)": a credential */
    char *return_url, *cancel_url, *brand_name;
};

static atomic_bool creds_reported;

/* ---- the process-wide token cache ---- */

typedef struct token_entry {
    struct token_entry *next;
    char *api_base, *client_id;
    char *token;           /* NULL = none cached */
    int64_t refresh_at_us; /* monotonic: fetch a new one from then on */
    bool fetching;         /* a thread is asking PayPal for one now */
} token_entry;

static pthread_mutex_t tok_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tok_cv;
static pthread_once_t tok_once = PTHREAD_ONCE_INIT;
static token_entry *tok_head; /* guarded by tok_mu; entries live as long as the process */

static void tok_init(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC); /* deadlines are monotonic */
    pthread_cond_init(&tok_cv, &a);
    pthread_condattr_destroy(&a);
}

/* Under tok_mu. NULL on no memory. */
static token_entry *tok_entry(const struct paypal *p)
{
    for (token_entry *e = tok_head; e; e = e->next)
        if (strcmp(e->api_base, p->api_base) == 0 && strcmp(e->client_id, p->client_id) == 0)
            return e;
    token_entry *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->api_base = strdup(p->api_base);
    e->client_id = strdup(p->client_id);
    if (!e->api_base || !e->client_id) {
        free(e->api_base);
        free(e->client_id);
        free(e);
        return NULL;
    }
    e->next = tok_head;
    tok_head = e;
    return e;
}

/* ---- JSON helpers ---- */

/* PayPal's machine-readable problem: details[0].issue, else name (else OAuth's error). */
static const char *issue_of(const json_t *root)
{
    const char *s = pay__jstr(json_array_get(json_object_get(root, "details"), 0), "issue");
    if (!s)
        s = pay__jstr(root, "name");
    if (!s)
        s = pay__jstr(root, "error");
    return s;
}

static const char *message_of(const json_t *root)
{
    const char *s = pay__jstr(json_array_get(json_object_get(root, "details"), 0), "description");
    if (!s)
        s = pay__jstr(root, "message");
    if (!s)
        s = pay__jstr(root, "error_description");
    return s;
}

static bool issue_is(const json_t *root, const char *want)
{
    const char *s = issue_of(root);
    return s && strcmp(s, want) == 0;
}

/* ---- calls ---- */

static int fail(struct paypal *p, order_ctx *ctx, const pay__http_resp *r, const json_t *root,
                const char *what)
{
    if (r->status == 401 || r->status == 403) {
        if (!atomic_exchange(&creds_reported, true))
            log_kv(LOG_ERROR, "paypal rejected orderd's credentials", LOG_F_INT, "status",
                   (int64_t)r->status, LOG_F_STR, "debug_id",
                   r->request_id[0] ? r->request_id : NULL, LOG_F_END);
        return order_fail(ctx->err, ORDER_EUNAVAILABLE, "paypal rejected orderd's credentials");
    }
    if (pay__http_retryable(r->status))
        return pay__http_fail_unavailable(p->http, ctx, r);
    const char *issue = issue_of(root), *msg = message_of(root);
    log_kv(LOG_WARN, "paypal refused a request", LOG_F_STR, "what", what, LOG_F_INT, "status",
           (int64_t)r->status, LOG_F_STR, "issue", issue, LOG_F_STR, "message", msg, LOG_F_STR,
           "debug_id", r->request_id[0] ? r->request_id : NULL, LOG_F_END);
    return order_fail(ctx->err, ORDER_EINTERNAL, "paypal refused to %s (HTTP %ld%s%s): %s", what,
                      r->status, issue ? " " : "", issue ? issue : "",
                      msg ? msg : "no error message");
}

/* POST /v1/oauth2/token. On success *token is a heap copy and *ttl_us its lifetime. */
static int grant(struct paypal *p, order_ctx *ctx, char **token, int64_t *ttl_us)
{
    const char *headers[] = {p->basic, "Content-Type: application/x-www-form-urlencoded", NULL};
    static const char body[] = "grant_type=client_credentials";
    pay__http_req req = {
        .method = "POST",
        .path = "/v1/oauth2/token",
        .body = body,
        .body_len = sizeof body - 1,
        .headers = headers,
    };
    pay__http_resp r;
    int rc = pay__http_do(p->http, ctx, &req, &r);
    json_t *root = rc == ORDER_OK ? pay__json_object(&r) : NULL;
    if (rc != ORDER_OK)
        goto done;
    if (r.status != 200) {
        rc = fail(p, ctx, &r, root, "grant an access token");
        goto done;
    }
    const char *tok = pay__jstr(root, "access_token");
    json_t *exp = json_object_get(root, "expires_in");
    if (!tok || !*tok || strlen(tok) > TOKEN_MAX || strpbrk(tok, "\r\n") || !json_is_integer(exp) ||
        json_integer_value(exp) <= 0) {
        rc = order_fail(ctx->err, ORDER_EUNAVAILABLE, "paypal granted no usable access token");
        goto done;
    }
    *token = strdup(tok);
    if (!*token) {
        rc = order_fail(ctx->err, ORDER_EINTERNAL, "paypal: out of memory");
        goto done;
    }
    *ttl_us = (int64_t)json_integer_value(exp) * 1000000;
done:
    if (root) {
        json_t *t = json_object_get(root, "access_token");
        if (json_is_string(t)) /* wipe the copy jansson holds */
            OPENSSL_cleanse((char *)json_string_value(t), json_string_length(t));
    }
    json_decref(root);
    if (r.body)
        OPENSSL_cleanse(r.body, r.len);
    pay__http_resp_clear(&r);
    return rc;
}

/* "Authorization: Bearer <token>" into line, from the cache or a new grant. */
static int bearer(struct paypal *p, order_ctx *ctx, char *line, size_t cap)
{
    pthread_once(&tok_once, tok_init);
    pthread_mutex_lock(&tok_mu);
    token_entry *e = tok_entry(p);
    if (!e) {
        pthread_mutex_unlock(&tok_mu);
        return order_fail(ctx->err, ORDER_EINTERNAL, "paypal: out of memory");
    }
    for (;;) {
        if (e->token && clock_mono_us() < e->refresh_at_us) {
            snprintf(line, cap, "Authorization: Bearer %s", e->token);
            pthread_mutex_unlock(&tok_mu);
            return ORDER_OK;
        }
        if (!e->fetching)
            break;
        /* Another thread is fetching: wait for it, but never past our own deadline. */
        int64_t remaining = order_ctx_remaining_us(ctx);
        if (remaining <= 0) {
            pthread_mutex_unlock(&tok_mu);
            return order_fail(ctx->err, ORDER_EDEADLINE,
                              "the deadline passed while waiting for a paypal token");
        }
        int64_t until = clock_mono_us() + (remaining < 1000000 ? remaining : 1000000);
        struct timespec ts = {.tv_sec = until / 1000000, .tv_nsec = (until % 1000000) * 1000};
        pthread_cond_timedwait(&tok_cv, &tok_mu, &ts);
    }
    e->fetching = true;
    pthread_mutex_unlock(&tok_mu);

    char *tok = NULL;
    int64_t ttl = 0;
    int rc = grant(p, ctx, &tok, &ttl);

    pthread_mutex_lock(&tok_mu);
    e->fetching = false;
    if (rc == ORDER_OK) {
        int64_t margin = ttl / 10 < 60 * 1000000LL ? ttl / 10 : 60 * 1000000LL;
        pay__free_secret(e->token);
        e->token = tok;
        e->refresh_at_us = clock_mono_us() + ttl - margin;
        snprintf(line, cap, "Authorization: Bearer %s", tok);
    }
    pthread_cond_broadcast(&tok_cv);
    pthread_mutex_unlock(&tok_mu);
    return rc;
}

/* Drops the cached token that `line` carries, unless another thread replaced it already. */
static void drop_token(struct paypal *p, const char *line)
{
    static const char prefix[] = "Authorization: Bearer ";
    pthread_mutex_lock(&tok_mu);
    token_entry *e = tok_entry(p);
    if (e && e->token && strcmp(line + sizeof prefix - 1, e->token) == 0) {
        pay__free_secret(e->token);
        e->token = NULL;
    }
    pthread_mutex_unlock(&tok_mu);
}

/* One API call with the bearer token. body NULL = GET. request_id NULL = none. */
static int call(struct paypal *p, order_ctx *ctx, const char *method, const char *path,
                const char *body, const char *request_id, pay__http_resp *resp, json_t **root)
{
    char auth[TOKEN_MAX + 32], rid[160];
    const char *headers[6];
    int rc = ORDER_OK;
    memset(resp, 0, sizeof *resp);
    *root = NULL;
    for (int round = 0; round < 2; round++) {
        size_t n = 0;
        rc = bearer(p, ctx, auth, sizeof auth);
        if (rc != ORDER_OK)
            break;
        headers[n++] = auth;
        if (strcmp(method, "POST") == 0)
            headers[n++] = "Content-Type: application/json";
        /* The whole order back (custom_id, amounts), not just its id and status. */
        headers[n++] = "Prefer: return=representation";
        if (request_id) {
            snprintf(rid, sizeof rid, "PayPal-Request-Id: %s", request_id);
            headers[n++] = rid;
        }
        headers[n] = NULL;
        pay__http_req req = {
            .method = method,
            .path = path,
            .body = body,
            .body_len = body ? strlen(body) : 0,
            .headers = headers,
        };
        pay__http_resp_clear(resp);
        rc = pay__http_do(p->http, ctx, &req, resp);
        if (rc != ORDER_OK || resp->status != 401 || round == 1)
            break;
        drop_token(p, auth); /* expired or revoked early: once more with a new one */
    }
    OPENSSL_cleanse(auth, sizeof auth);
    if (rc != ORDER_OK)
        return rc;
    *root = pay__json_object(resp);
    if (resp->status >= 200 && resp->status < 300) {
        atomic_store(&creds_reported, false);
        if (!*root)
            return order_fail(ctx->err, ORDER_EUNAVAILABLE,
                              "paypal answered %s %s with something that is not JSON", method,
                              path);
    }
    return ORDER_OK;
}

/* ---- orders ---- */

static json_t *first_unit(const json_t *order)
{
    return json_array_get(json_object_get(order, "purchase_units"), 0);
}

static json_t *first_capture(const json_t *order)
{
    json_t *payments = json_object_get(first_unit(order), "payments");
    return json_array_get(json_object_get(payments, "captures"), 0);
}

static const char *link_href(const json_t *links, const char *rel)
{
    size_t i;
    json_t *l;
    json_array_foreach(links, i, l)
    {
        const char *r = pay__jstr(l, "rel");
        if (r && strcmp(r, rel) == 0)
            return pay__jstr(l, "href");
    }
    return NULL;
}

static int pp_create(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                     order_payment_action *out, order_payment_info *paid)
{
    struct paypal *p = self;
    memset(out, 0, sizeof *out);
    memset(paid, 0, sizeof *paid);
    out->provider = ORDER_PROVIDER_PAYPAL;
    if (saved) {
        order_fail(ctx->err, ORDER_EINVAL, "PayPal cannot charge a saved payment method");
        order_violate(ctx->err, "payment_method",
                      "saved payment methods are only supported with STRIPE");
        return ORDER_EINVAL;
    }
    char value[32], cur[4], rid[64];
    if (!pay__currency_case(o->currency, cur, true) ||
        !pay__paypal_value(cur, o->total_minor, value, sizeof value))
        return pay__refuse(ctx, "AMOUNT_NOT_REPRESENTABLE",
                           "%lld minor units of %s have no exact PayPal amount",
                           (long long)o->total_minor, o->currency);
    json_t *ec = json_pack("{s:s, s:s, s:s}", "return_url", p->return_url, "cancel_url",
                           p->cancel_url, "user_action", "PAY_NOW");
    if (ec && p->brand_name)
        json_object_set_new(ec, "brand_name", json_string(p->brand_name));
    json_t *req = ec ? json_pack("{s:s, s:[{s:s, s:s, s:{s:s, s:s}}], s:{s:{s:o}}}", "intent",
                                 "CAPTURE", "purchase_units", "custom_id", o->id, "invoice_id",
                                 o->id, "amount", "currency_code", cur, "value", value,
                                 "payment_source", "paypal", "experience_context", ec)
                     : NULL; /* "o" steals ec, even on failure */
    char *body = req ? json_dumps(req, JSON_COMPACT) : NULL;
    json_decref(req);
    if (!body)
        return order_fail(ctx->err, ORDER_EINTERNAL, "paypal: out of memory");
    snprintf(rid, sizeof rid, "orderd-create-%s", o->id);
    pay__http_resp r;
    json_t *root = NULL;
    int rc = call(p, ctx, "POST", "/v2/checkout/orders", body, rid, &r, &root);
    free(body);
    if (rc != ORDER_OK)
        goto done;
    if (r.status == 422 &&
        (issue_is(root, "CURRENCY_NOT_SUPPORTED") || issue_is(root, "DECIMAL_PRECISION") ||
         issue_is(root, "CANNOT_BE_ZERO_OR_NEGATIVE"))) {
        /* No retry can succeed: the order is refused, not an internal error. */
        rc = pay__refuse(ctx, "AMOUNT_NOT_REPRESENTABLE", "paypal cannot take %s %s: %s", value,
                         cur, issue_of(root));
        goto done;
    }
    if (r.status != 200 && r.status != 201) {
        rc = fail(p, ctx, &r, root, "create an order");
        goto done;
    }
    const char *id = pay__jstr(root, "id");
    json_t *links = json_object_get(root, "links");
    const char *href = link_href(links, "payer-action");
    if (!href)
        href = link_href(links, "approve");
    if (!id || !pay__id_safe(id, PAYPAL_ID_MAX)) {
        rc = order_fail(ctx->err, ORDER_EUNAVAILABLE, "paypal answered an order without an id");
        goto done;
    }
    pay__copy(out->reference, sizeof out->reference, id);
    pay__copy(out->approval_url, sizeof out->approval_url, href);
    pay__copy(paid->provider_status, sizeof paid->provider_status, pay__jstr(root, "status"));
done:
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

/* Whether a PayPal order (as captured or read) is a completed payment of o. */
static int judge(const json_t *order, order_ctx *ctx, const order_t *o, const char *ref,
                 order_payment_info *info)
{
    json_t *unit = first_unit(order), *cap = first_capture(order);
    const char *custom = pay__jstr(unit, "custom_id");
    if (!custom)
        custom = pay__jstr(cap, "custom_id");
    json_t *amount = json_object_get(cap ? cap : unit, "amount");
    const char *cur = pay__jstr(amount, "currency_code"), *status = pay__jstr(cap, "status");
    const char *shown = status ? status : pay__jstr(order, "status");
    int64_t minor = -1;
    const char *mismatch = NULL;
    if (!custom || strcasecmp(custom, o->id) != 0)
        mismatch = "it belongs to another order";
    else if (!cur || strcmp(cur, o->currency) != 0)
        mismatch = "its currency differs from the order's";
    else if (!pay__paypal_parse_value(cur, pay__jstr(amount, "value"), &minor) ||
             minor != o->total_minor)
        mismatch = "its amount differs from the order's total";
    if (mismatch) {
        pay__refuse(ctx, "PAYMENT_MISMATCH", "PayPal order %s does not pay order %s: %s", ref,
                    o->id, mismatch);
        order_error_meta(ctx->err, "provider_status", "%s", shown ? shown : "unknown");
        return ORDER_EPRECONDITION;
    }
    if (status && (strcmp(status, "DECLINED") == 0 || strcmp(status, "FAILED") == 0)) {
        pay__refuse(ctx, "PAYMENT_DECLINED", "the capture of PayPal order %s was %s", ref, status);
        order_error_meta(ctx->err, "decline_code", "%s", status);
        order_error_meta(ctx->err, "provider_status", "%s", status);
        return ORDER_EPRECONDITION;
    }
    if (!status || strcmp(status, "COMPLETED") != 0) {
        pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED", "PayPal order %s is not paid: %s", ref,
                    shown ? shown : "no capture");
        order_error_meta(ctx->err, "provider_status", "%s", shown ? shown : "unknown");
        return ORDER_EPRECONDITION;
    }
    memset(info, 0, sizeof *info);
    pay__copy(info->charge_id, sizeof info->charge_id, pay__jstr(cap, "id"));
    pay__copy(info->provider_status, sizeof info->provider_status, status);
    if (!pay__rfc3339_us(pay__jstr(cap, "create_time"), &info->paid_at_us) &&
        !pay__rfc3339_us(pay__jstr(cap, "update_time"), &info->paid_at_us))
        info->paid_at_us = clock_wall_us();
    return ORDER_OK;
}

/* 422 issues of POST /v2/checkout/orders/{id}/capture that refuse the payment itself
 * (developer.paypal.com, orders.capture 422): to the caller a decline, not INTERNAL. */
static bool capture_refused_for_good(const json_t *root)
{
    static const char *const refusals[] = {
        "INSTRUMENT_DECLINED",
        "PAYER_CANNOT_PAY",
        "TRANSACTION_REFUSED",
        "COMPLIANCE_VIOLATION",
        "PAYER_ACCOUNT_LOCKED_OR_CLOSED",
        "PAYER_ACCOUNT_RESTRICTED",
        "MAX_NUMBER_OF_PAYMENT_ATTEMPTS_EXCEEDED",
        "TRANSACTION_LIMIT_EXCEEDED",
        "TRANSACTION_RECEIVING_LIMIT_EXCEEDED",
        "TRANSACTION_BLOCKED_BY_PAYEE",
        "PAYEE_BLOCKED_TRANSACTION",
        "DUPLICATE_INVOICE_ID",
        "CARD_BRAND_NOT_SUPPORTED",
        "DOMESTIC_TRANSACTION_REQUIRED",
        "DECLINED_DUE_TO_RELATED_TXN",
    };
    for (size_t i = 0; i < sizeof refusals / sizeof *refusals; i++)
        if (issue_is(root, refusals[i]))
            return true;
    return false;
}

static int get_order(struct paypal *p, order_ctx *ctx, const char *ref, pay__http_resp *r,
                     json_t **root)
{
    char path[320];
    snprintf(path, sizeof path, "/v2/checkout/orders/%s", ref);
    return call(p, ctx, "GET", path, NULL, NULL, r, root);
}

static int pp_verify(void *self, order_ctx *ctx, const order_t *o, const char *reference,
                     order_payment_info *info)
{
    struct paypal *p = self;
    memset(info, 0, sizeof *info);
    if (!pay__id_safe(reference, PAYPAL_ID_MAX))
        return pay__refuse(ctx, "PAYMENT_NOT_FOUND", "%s is not a PayPal order id",
                           reference && *reference ? "the reference" : "an empty reference");
    char path[320], rid[64];
    snprintf(path, sizeof path, "/v2/checkout/orders/%s/capture", reference);
    snprintf(rid, sizeof rid, "orderd-capture-%s", o->id);
    pay__http_resp r;
    json_t *root = NULL;
    /* Capturing is charging: first make sure the PayPal order is this order's, so that no
     * caller can capture another order's approved payment through this one. */
    int rc = get_order(p, ctx, reference, &r, &root);
    if (rc != ORDER_OK)
        goto done;
    if (r.status == 404) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_FOUND", "paypal has no order %s", reference);
        goto done;
    }
    if (r.status != 200) {
        rc = fail(p, ctx, &r, root, "read an order");
        goto done;
    }
    const char *owner = pay__jstr(first_unit(root), "custom_id");
    if (!owner || strcasecmp(owner, o->id) != 0) {
        rc = pay__refuse(ctx, "PAYMENT_MISMATCH", "PayPal order %s does not pay order %s: %s",
                         reference, o->id, "it belongs to another order");
        order_error_meta(ctx->err, "provider_status", "%s",
                         pay__jstr(root, "status") ? pay__jstr(root, "status") : "unknown");
        goto done;
    }
    json_decref(root);
    root = NULL;
    pay__http_resp_clear(&r);
    rc = call(p, ctx, "POST", path, "{}", rid, &r, &root);
    if (rc != ORDER_OK)
        goto done;
    if (r.status == 200 || r.status == 201) {
        rc = judge(root, ctx, o, reference, info);
    } else if (r.status == 404) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_FOUND", "paypal has no order %s", reference);
    } else if (r.status == 422 && issue_is(root, "ORDER_ALREADY_CAPTURED")) {
        json_decref(root);
        pay__http_resp_clear(&r);
        rc = get_order(p, ctx, reference, &r, &root);
        if (rc == ORDER_OK)
            rc = r.status == 200 ? judge(root, ctx, o, reference, info)
                                 : fail(p, ctx, &r, root, "read an order");
    } else if (r.status == 422 && issue_is(root, "ORDER_NOT_APPROVED")) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED",
                         "PayPal order %s was not approved by the payer", reference);
        order_error_meta(ctx->err, "provider_status", "ORDER_NOT_APPROVED");
    } else if (r.status == 422 && capture_refused_for_good(root)) {
        /* INSTRUMENT_DECLINED and PayPal's other business refusals of a capture
         * (PAYER_CANNOT_PAY, TRANSACTION_REFUSED, COMPLIANCE_VIOLATION, ...): no retry of
         * this capture can succeed. */
        const char *issue = issue_of(root);
        rc = pay__refuse(ctx, "PAYMENT_DECLINED", "paypal declined the payment of order %s: %s",
                         reference, issue);
        order_error_meta(ctx->err, "decline_code", "%s", issue);
        order_error_meta(ctx->err, "provider_status", "%s", issue);
    } else if (r.status == 422 && (issue_is(root, "PAYER_ACTION_REQUIRED") ||
                                   issue_is(root, "REDIRECT_PAYER_FOR_ALTERNATE_FUNDING"))) {
        /* The payer can still fix it at PayPal (another funding source, a challenge). */
        rc = pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED", "PayPal order %s needs the payer: %s",
                         reference, issue_of(root));
        order_error_meta(ctx->err, "provider_status", "%s", issue_of(root));
    } else {
        rc = fail(p, ctx, &r, root, "capture an order");
    }
done:
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

static int pp_refund(void *self, order_ctx *ctx, const order_t *o,
                     char refund_id[ORDER_REFERENCE_MAX + 1])
{
    struct paypal *p = self;
    char capture[ORDER_REFERENCE_MAX + 1], path[320], rid[64];
    pay__http_resp r = {0};
    json_t *root = NULL;
    int rc = ORDER_OK;
    refund_id[0] = '\0';
    pay__copy(capture, sizeof capture, o->pay_charge_id);
    if (!capture[0] && o->pay_reference[0]) {
        if (!pay__id_safe(o->pay_reference, PAYPAL_ID_MAX))
            return order_fail(ctx->err, ORDER_EINTERNAL,
                              "order %s has a malformed PayPal reference", o->id);
        rc = get_order(p, ctx, o->pay_reference, &r, &root);
        if (rc != ORDER_OK)
            goto done;
        if (r.status == 404) {
            rc = pay__refuse(ctx, "PAYMENT_NOT_FOUND", "paypal has no order %s", o->pay_reference);
            goto done;
        }
        if (r.status != 200) {
            rc = fail(p, ctx, &r, root, "read an order");
            goto done;
        }
        pay__copy(capture, sizeof capture, pay__jstr(first_capture(root), "id"));
        json_decref(root);
        root = NULL;
        pay__http_resp_clear(&r);
    }
    if (!capture[0]) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED",
                         "order %s has no PayPal capture: nothing to refund", o->id);
        goto done;
    }
    if (!pay__id_safe(capture, PAYPAL_ID_MAX)) {
        rc = order_fail(ctx->err, ORDER_EINTERNAL, "order %s has a malformed PayPal capture id",
                        o->id);
        goto done;
    }
    snprintf(path, sizeof path, "/v2/payments/captures/%s/refund", capture);
    snprintf(rid, sizeof rid, "orderd-refund-%s", o->id);
    rc = call(p, ctx, "POST", path, "{}", rid, &r, &root);
    if (rc != ORDER_OK)
        goto done;
    if (r.status == 200 || r.status == 201) {
        const char *status = pay__jstr(root, "status");
        pay__copy(refund_id, ORDER_REFERENCE_MAX + 1, pay__jstr(root, "id"));
        if (status && (strcmp(status, "FAILED") == 0 || strcmp(status, "CANCELLED") == 0)) {
            rc = pay__refuse(ctx, "REFUND_FAILED", "paypal refund %s of order %s is %s", refund_id,
                             o->id, status);
            order_error_meta(ctx->err, "provider_status", "%s", status);
        }
    } else if (r.status == 422 && issue_is(root, "PENDING_CAPTURE")) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED",
                         "the capture of order %s is pending: it cannot be refunded yet", o->id);
        order_error_meta(ctx->err, "provider_status", "PENDING");
    } else if (r.status == 422 && issue_is(root, "CAPTURE_FULLY_REFUNDED")) {
        rc = ORDER_OK; /* the refund id is not cheap to find: left "" */
    } else if (r.status == 404) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_FOUND", "paypal has no capture %s", capture);
    } else {
        rc = fail(p, ctx, &r, root, "refund a capture");
    }
done:
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

static int pp_cancel(void *self, order_ctx *ctx, const order_t *o)
{
    struct paypal *p = self;
    if (!o->pay_reference[0])
        return ORDER_OK;
    if (!pay__id_safe(o->pay_reference, PAYPAL_ID_MAX))
        return order_fail(ctx->err, ORDER_EINTERNAL, "order %s has a malformed PayPal reference",
                          o->id);
    pay__http_resp r;
    json_t *root = NULL;
    int rc = get_order(p, ctx, o->pay_reference, &r, &root);
    if (rc != ORDER_OK)
        goto done;
    if (r.status == 404) {
        rc = ORDER_OK; /* expired and gone: nothing can be captured any more */
        goto done;
    }
    if (r.status != 200) {
        rc = fail(p, ctx, &r, root, "read an order");
        goto done;
    }
    const char *status = pay__jstr(root, "status");
    const char *cap_status = pay__jstr(first_capture(root), "status");
    bool captured =
        status && strcmp(status, "COMPLETED") == 0 &&
        !(cap_status && (strcmp(cap_status, "DECLINED") == 0 || strcmp(cap_status, "FAILED") == 0));
    if (captured && cap_status && strcmp(cap_status, "PENDING") == 0) {
        /* Captured but not cleared (e-check, review): PayPal refuses to refund it yet
         * (422 PENDING_CAPTURE); settled later, like a Stripe intent that is processing. */
        rc = pay__refuse(ctx, "PAYMENT_NOT_CANCELABLE",
                         "the capture of PayPal order %s is pending and cannot be undone yet",
                         o->pay_reference);
        order_error_meta(ctx->err, "provider_status", "PENDING");
    } else if (captured) {
        rc = pay__refuse(ctx, "PAYMENT_ALREADY_SUCCEEDED",
                         "PayPal order %s was captured: refund it instead", o->pay_reference);
        order_error_meta(ctx->err, "provider_status", "%s", cap_status ? cap_status : status);
    }
    /* Otherwise (CREATED, APPROVED, PAYER_ACTION_REQUIRED, VOIDED) it lapses by itself. */
done:
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

/* ---- construction ---- */

static bool header_safe(const char *s)
{
    return s && *s && !strpbrk(s, "\r\n");
}

static char *basic_auth(const char *id, const char *secret)
{
    size_t n = strlen(id) + 1 + strlen(secret);
    char *plain = malloc(n + 1);
    size_t enc_cap = 4 * ((n + 2) / 3) + 1;
    char *line = malloc(sizeof "Authorization: Basic " + enc_cap);
    if (plain && line) {
        snprintf(plain, n + 1, "%s:%s", id, secret);
        int len = snprintf(line, sizeof "Authorization: Basic ", "Authorization: Basic ");
        EVP_EncodeBlock((unsigned char *)line + len, (const unsigned char *)plain, (int)n);
    } else {
        free(line);
        line = NULL;
    }
    if (plain)
        OPENSSL_cleanse(plain, n + 1);
    free(plain);
    return line;
}

order_payments *pay_paypal_create(const pay_paypal_config *cfg, char *err, size_t errlen)
{
    if (!header_safe(cfg->client_id) || !header_safe(cfg->client_secret)) {
        snprintf(err, errlen, "paypal: client_id and client_secret are required");
        return NULL;
    }
    if (!cfg->return_url || !*cfg->return_url || !cfg->cancel_url || !*cfg->cancel_url) {
        snprintf(err, errlen, "paypal: return_url and cancel_url are required");
        return NULL;
    }
    struct paypal *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "paypal: out of memory");
        return NULL;
    }
    p->http = pay__httpc_create("paypal", cfg->api_base, &cfg->http, err, errlen);
    if (!p->http)
        goto fail;
    p->api_base = strdup(cfg->api_base);
    p->client_id = strdup(cfg->client_id);
    p->basic = basic_auth(cfg->client_id, cfg->client_secret);
    p->return_url = strdup(cfg->return_url);
    p->cancel_url = strdup(cfg->cancel_url);
    p->brand_name = cfg->brand_name && *cfg->brand_name ? strdup(cfg->brand_name) : NULL;
    if (!p->api_base || !p->client_id || !p->basic || !p->return_url || !p->cancel_url ||
        (cfg->brand_name && *cfg->brand_name && !p->brand_name)) {
        snprintf(err, errlen, "paypal: out of memory");
        goto fail;
    }
    p->port = (order_payments){
        .self = p,
        .create = pp_create,
        .verify = pp_verify,
        .refund = pp_refund,
        .cancel = pp_cancel,
    };
    return &p->port;
fail:
    pay_paypal_destroy(&p->port);
    return NULL;
}

void pay_paypal_destroy(order_payments *port)
{
    if (!port)
        return;
    struct paypal *p = (struct paypal *)port;
    pay__httpc_destroy(p->http);
    free(p->api_base);
    free(p->client_id);
    pay__free_secret(p->basic);
    free(p->return_url);
    free(p->cancel_url);
    free(p->brand_name);
    free(p);
}

/* ---- webhooks ---- */

/* The verification request: the five headers and webhook_id, then the event exactly as it
 * was received. The event is spliced in as raw bytes rather than re-serialized, so nothing
 * a JSON round trip may change (number forms, escapes) can fail the signature check. */
static char *verify_body(const char *webhook_id, const pay_paypal_headers *h, const char *body,
                         size_t len)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "auth_algo", h->auth_algo, "cert_url",
                          h->cert_url, "transmission_id", h->transmission_id, "transmission_sig",
                          h->transmission_sig, "transmission_time", h->transmission_time,
                          "webhook_id", webhook_id);
    char *head = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!head)
        return NULL;
    pay__buf b = {0};
    size_t hl = strlen(head);
    pay__buf_append(&b, head, hl - 1); /* without the closing brace */
    pay__buf_puts(&b, ",\"webhook_event\":");
    pay__buf_append(&b, body, len);
    pay__buf_puts(&b, "}");
    free(head);
    if (b.oom) {
        pay__buf_free(&b);
        return NULL;
    }
    return b.data;
}

static void event_amount(order_payment_event *ev, const json_t *amount)
{
    int64_t minor;
    char upper[4];
    const char *cur = pay__jstr(amount, "currency_code");
    if (cur && pay__currency_case(cur, upper, true) &&
        pay__paypal_parse_value(upper, pay__jstr(amount, "value"), &minor)) {
        ev->amount_minor = minor;
        memcpy(ev->currency, upper, sizeof upper);
    }
}

/* The last path segment of a link: ".../v2/payments/captures/2GG279541U471931P" -> id. */
static void link_id(char *dst, size_t cap, const char *href)
{
    const char *slash = href ? strrchr(href, '/') : NULL;
    pay__copy(dst, cap, slash && pay__id_safe(slash + 1, PAYPAL_ID_MAX) ? slash + 1 : NULL);
}

static int parse_event(const json_t *root, order_payment_event *ev, char *err, size_t errlen)
{
    const char *id = pay__jstr(root, "id"), *type = pay__jstr(root, "event_type");
    json_t *res = json_object_get(root, "resource");
    if (!id || !*id || strlen(id) > ORDER_REFERENCE_MAX || !type || !json_is_object(res)) {
        snprintf(err, errlen, "not a PayPal event (id, event_type and resource are required)");
        return PAY_WEBHOOK_MALFORMED;
    }
    pay__copy(ev->id, sizeof ev->id, id);
    pay__copy(ev->type, sizeof ev->type, type);
    if (!pay__rfc3339_us(pay__jstr(root, "create_time"), &ev->occurred_at_us))
        ev->occurred_at_us = 0;
    const char *custom = pay__jstr(res, "custom_id");
    if (custom && order_id_valid(custom))
        pay__copy(ev->order_id, sizeof ev->order_id, custom);
    bool completed = strcmp(type, "PAYMENT.CAPTURE.COMPLETED") == 0;
    bool denied = strcmp(type, "PAYMENT.CAPTURE.DENIED") == 0;
    if (completed || denied) {
        ev->kind = completed ? ORDER_PAY_EVENT_SUCCEEDED : ORDER_PAY_EVENT_DENIED;
        pay__copy(ev->charge_id, sizeof ev->charge_id, pay__jstr(res, "id"));
        json_t *related =
            json_object_get(json_object_get(res, "supplementary_data"), "related_ids");
        pay__copy(ev->reference, sizeof ev->reference, pay__jstr(related, "order_id"));
        event_amount(ev, json_object_get(res, "amount"));
        if (denied) {
            const char *reason = pay__jstr(json_object_get(res, "status_details"), "reason");
            pay__copy(ev->failure_code, sizeof ev->failure_code, reason ? reason : "DENIED");
        }
    } else if (strcmp(type, "PAYMENT.CAPTURE.REFUNDED") == 0) {
        /* The resource is the refund; its "up" link is the capture it refunds. */
        ev->kind = ORDER_PAY_EVENT_REFUNDED;
        pay__copy(ev->refund_id, sizeof ev->refund_id, pay__jstr(res, "id"));
        link_id(ev->charge_id, sizeof ev->charge_id,
                link_href(json_object_get(res, "links"), "up"));
        event_amount(ev, json_object_get(res, "amount"));
        /* Full until the capture says otherwise (pay_paypal_webhook asks it): the refund
         * alone does not tell what the capture was. */
        ev->full_refund = true;
    }
    return PAY_WEBHOOK_OK;
}

/* Whether a refund event refunded the whole capture: the capture's own status says
 * (REFUNDED, or PARTIALLY_REFUNDED). UNAVAILABLE if it cannot be read now. */
static int refund_scope(struct paypal *p, order_ctx *ctx, order_payment_event *ev, char *err,
                        size_t errlen)
{
    if (!ev->charge_id[0])
        return PAY_WEBHOOK_OK;
    char path[320];
    snprintf(path, sizeof path, "/v2/payments/captures/%s", ev->charge_id);
    pay__http_resp r;
    json_t *root = NULL;
    int out = PAY_WEBHOOK_OK;
    int rc = call(p, ctx, "GET", path, NULL, NULL, &r, &root);
    if (rc != ORDER_OK) {
        snprintf(err, errlen, "%s", ctx->err->message);
        out = PAY_WEBHOOK_UNAVAILABLE;
    } else if (r.status == 200) {
        const char *status = pay__jstr(root, "status");
        ev->full_refund = !(status && strcmp(status, "PARTIALLY_REFUNDED") == 0);
    } else if (r.status != 404) {
        fail(p, ctx, &r, root, "read a capture");
        snprintf(err, errlen, "%s", ctx->err->message);
        out = PAY_WEBHOOK_UNAVAILABLE;
    }
    json_decref(root);
    pay__http_resp_clear(&r);
    return out;
}

/* What a genuine delivery's headers look like, checked before PayPal is asked: printable
 * ASCII of sane length, PayPal's one algorithm, a certificate on an https paypal.com host.
 * Anything else cannot verify, so it is refused (400) here, without an outbound call that
 * an anonymous client could otherwise trigger at will (and which, were its values not
 * valid UTF-8 for the JSON request, would be answered 503). */
static bool header_plausible(size_t i, const char *v)
{
    size_t n = strlen(v);
    if (n > 2048)
        return false;
    for (size_t k = 0; k < n; k++)
        if ((unsigned char)v[k] < 0x21 || (unsigned char)v[k] > 0x7e)
            return false;
    if (i == 0) /* PAYPAL-AUTH-ALGO */
        return strcmp(v, "SHA256withRSA") == 0;
    if (i == 1) { /* PAYPAL-CERT-URL: https://<host ending in paypal.com>/... */
        if (strncmp(v, "https://", 8) != 0)
            return false;
        const char *host = v + 8;
        size_t hl = strcspn(host, "/:?#");
        return (hl == 10 && strncmp(host, "paypal.com", 10) == 0) ||
               (hl > 11 && strncmp(host + hl - 11, ".paypal.com", 11) == 0);
    }
    return true;
}

int pay_paypal_webhook(order_payments *paypal, order_ctx *ctx, const char *webhook_id,
                       const pay_paypal_headers *h, const char *body, size_t len,
                       order_payment_event *ev, char *err, size_t errlen)
{
    memset(ev, 0, sizeof *ev);
    ev->provider = ORDER_PROVIDER_PAYPAL;
    ev->amount_minor = -1;
    err[0] = '\0';
    if (!paypal || paypal->create != pp_create) {
        snprintf(err, errlen, "PayPal is not configured");
        return PAY_WEBHOOK_UNAVAILABLE;
    }
    struct paypal *p = (struct paypal *)paypal;

    json_error_t jerr;
    json_t *event = body ? json_loadb(body, len, 0, &jerr) : NULL;
    if (!json_is_object(event)) {
        snprintf(err, errlen, "not a PayPal event: %s", event ? "not an object" : jerr.text);
        json_decref(event);
        return PAY_WEBHOOK_MALFORMED;
    }
    const char *const names[] = {"PAYPAL-AUTH-ALGO", "PAYPAL-CERT-URL", "PAYPAL-TRANSMISSION-ID",
                                 "PAYPAL-TRANSMISSION-SIG", "PAYPAL-TRANSMISSION-TIME"};
    const char *const values[] = {h ? h->auth_algo : NULL, h ? h->cert_url : NULL,
                                  h ? h->transmission_id : NULL, h ? h->transmission_sig : NULL,
                                  h ? h->transmission_time : NULL};
    for (size_t i = 0; i < 5; i++) {
        if (!values[i] || !*values[i]) {
            snprintf(err, errlen, "no %s header", names[i]);
            json_decref(event);
            return PAY_WEBHOOK_BAD_SIGNATURE;
        }
        if (!header_plausible(i, values[i])) {
            snprintf(err, errlen, "%s is not one PayPal sends", names[i]);
            json_decref(event);
            return PAY_WEBHOOK_BAD_SIGNATURE;
        }
    }
    if (!webhook_id || !*webhook_id) {
        snprintf(err, errlen, "no PayPal webhook_id is configured");
        json_decref(event);
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    char *req = verify_body(webhook_id, h, body, len);
    if (!req) {
        snprintf(err, errlen, "out of memory");
        json_decref(event);
        return PAY_WEBHOOK_UNAVAILABLE;
    }
    pay__http_resp r;
    json_t *root = NULL;
    int rc =
        call(p, ctx, "POST", "/v1/notifications/verify-webhook-signature", req, NULL, &r, &root);
    free(req);
    int out;
    if (rc != ORDER_OK) {
        snprintf(err, errlen, "%s", ctx->err->message);
        out = PAY_WEBHOOK_UNAVAILABLE;
    } else if (r.status == 200) {
        const char *vs = pay__jstr(root, "verification_status");
        if (vs && strcmp(vs, "SUCCESS") == 0) {
            out = parse_event(event, ev, err, errlen);
            if (out == PAY_WEBHOOK_OK && ev->kind == ORDER_PAY_EVENT_REFUNDED)
                out = refund_scope(p, ctx, ev, err, errlen);
        } else {
            snprintf(err, errlen, "paypal says the signature does not verify (%s)",
                     vs ? vs : "no verification_status");
            out = PAY_WEBHOOK_BAD_SIGNATURE;
        }
    } else {
        /* orderd cannot tell now whether the webhook is genuine (its credentials, its
         * webhook_id, or PayPal itself): 503, and PayPal delivers it again later. */
        fail(p, ctx, &r, root, "verify a webhook signature");
        snprintf(err, errlen, "%s", ctx->err->message);
        out = PAY_WEBHOOK_UNAVAILABLE;
    }
    json_decref(root);
    json_decref(event);
    pay__http_resp_clear(&r);
    return out;
}
