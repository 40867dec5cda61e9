/* stripe.c — the STRIPE payment provider (PaymentIntents API) and Stripe webhooks.
 *
 * DESIGN
 * One PaymentIntent per order, created under the idempotency key "orderd-pi-<order id>"
 * (or "orderd-pi-<order id>-pm" when a saved payment method is charged at once: the two
 * requests have different parameters, and one key with two parameter sets is Stripe's
 * idempotency_error), so a retried or replayed PlaceOrder finds the same intent. Refunds
 * and voids have keys of their own per order. Verification never trusts the caller: the
 * intent must be succeeded, for this order (metadata[order_id]), amount and currency.
 *
 * Amounts: orderd keeps ISO-4217 minor units; Stripe's unit differs for a few currencies
 * (currency.c says which and how). Errors: 401/403 mean orderd's key is wrong (logged at
 * error level, then UNAVAILABLE); 409, 429, 5xx and network failures are retried by
 * httpc.c and end UNAVAILABLE (or DEADLINE); any other unexpected 4xx is INTERNAL with
 * Stripe's own message. The secret key never appears in a log line or an error message.
 */
#include "payments/payments.h"

#include <jansson.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/clock.h"
#include "common/log.h"
#include "payments/httpc.h"

#define STRIPE_ID_MAX 255

struct stripe {
    order_payments port; /* first: pay_stripe_destroy gets it back from the port */
    pay_httpc *http;
    char *auth;    /* "Authorization: Bearer sk_...": a credential */
    char *version; /* "Stripe-Version: ..." */
};

/* One error line per outage of credentials, not one per call: set when Stripe refuses the
 * key, cleared by the next call it accepts. */
static atomic_bool creds_reported;

/* ---- JSON helpers ---- */

static bool jint(const json_t *o, const char *key, int64_t *out)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v))
        return false;
    *out = (int64_t)json_integer_value(v);
    return true;
}

/* An expandable field: a string id, or the expanded object with an "id". */
static const char *jid(const json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : pay__jstr(v, "id");
}

/* A best-effort look-up must not leave its failure in ctx->err when the operation it
 * serves succeeds. call() writes only the code and the message. */
typedef struct err_mark {
    int code;
    char message[sizeof((order_error *)0)->message];
} err_mark;

static err_mark err_save(const order_ctx *ctx)
{
    err_mark m = {.code = ctx->err->code};
    memcpy(m.message, ctx->err->message, sizeof m.message);
    return m;
}

static void err_restore(order_ctx *ctx, const err_mark *m)
{
    ctx->err->code = m->code;
    memcpy(ctx->err->message, m->message, sizeof m->message);
}

/* ---- calls ---- */

/* One Stripe request. form may be NULL; idem NULL = no Idempotency-Key. */
static int call(struct stripe *s, order_ctx *ctx, const char *method, const char *path,
                const char *query, const pay__buf *form, const char *idem, pay__http_resp *resp,
                json_t **root)
{
    char idem_line[320];
    const char *headers[6];
    size_t n = 0;
    headers[n++] = s->auth;
    headers[n++] = s->version;
    if (strcmp(method, "POST") == 0)
        headers[n++] = "Content-Type: application/x-www-form-urlencoded";
    if (idem) {
        snprintf(idem_line, sizeof idem_line, "Idempotency-Key: %s", idem);
        headers[n++] = idem_line;
    }
    headers[n] = NULL;
    memset(resp, 0, sizeof *resp);
    *root = NULL;
    pay__http_req req = {
        .method = method,
        .path = path,
        .query = query,
        .body = form ? form->data : NULL,
        .body_len = form ? form->len : 0,
        .headers = headers,
    };
    if (form && form->oom)
        return order_fail(ctx->err, ORDER_EINTERNAL, "stripe: out of memory");
    int rc = pay__http_do(s->http, ctx, &req, resp);
    if (rc != ORDER_OK)
        return rc;
    *root = pay__json_object(resp);
    if (resp->status >= 200 && resp->status < 300) {
        atomic_store(&creds_reported, false);
        if (!*root)
            return order_fail(ctx->err, ORDER_EUNAVAILABLE,
                              "stripe answered %s %s with something that is not JSON", method,
                              path);
    }
    return ORDER_OK;
}

static json_t *error_of(const json_t *root)
{
    return json_object_get(root, "error");
}

/* The failures every call shares: a refused key, an outage that outlasted the retries, and
 * any other answer the caller did not expect. `what` says what orderd was doing. */
static int fail(struct stripe *s, order_ctx *ctx, const pay__http_resp *r, const json_t *root,
                const char *what)
{
    if (r->status == 401 || r->status == 403) {
        if (!atomic_exchange(&creds_reported, true))
            log_kv(LOG_ERROR, "stripe rejected orderd's credentials", LOG_F_INT, "status",
                   (int64_t)r->status, LOG_F_STR, "request_id",
                   r->request_id[0] ? r->request_id : NULL, LOG_F_END);
        return order_fail(ctx->err, ORDER_EUNAVAILABLE, "stripe rejected orderd's credentials");
    }
    if (pay__http_retryable(r->status))
        return pay__http_fail_unavailable(s->http, ctx, r);
    const json_t *e = error_of(root);
    const char *msg = pay__jstr(e, "message"), *code = pay__jstr(e, "code"),
               *type = pay__jstr(e, "type");
    log_kv(LOG_WARN, "stripe refused a request", LOG_F_STR, "what", what, LOG_F_INT, "status",
           (int64_t)r->status, LOG_F_STR, "type", type, LOG_F_STR, "code", code, LOG_F_STR,
           "message", msg, LOG_F_STR, "request_id", r->request_id[0] ? r->request_id : NULL,
           LOG_F_END);
    return order_fail(ctx->err, ORDER_EINTERNAL, "stripe refused to %s (HTTP %ld%s%s): %s", what,
                      r->status, code ? " " : "", code ? code : "", msg ? msg : "no error message");
}

/* ---- paid facts ---- */

/* Fills *paid from a succeeded intent: the charge (expanded, or fetched) says when and
 * where the receipt is. A charge that cannot be read now does not undo the payment: the
 * time falls back to now and the charge id stays. */
static void fill_paid(struct stripe *s, order_ctx *ctx, const json_t *pi, order_payment_info *paid)
{
    memset(paid, 0, sizeof *paid);
    pay__copy(paid->provider_status, sizeof paid->provider_status, pay__jstr(pi, "status"));
    json_t *charge = json_object_get(pi, "latest_charge");
    json_t *fetched = NULL;
    const char *charge_id = jid(pi, "latest_charge");
    pay__copy(paid->charge_id, sizeof paid->charge_id, charge_id);
    if (json_is_string(charge) && pay__id_safe(charge_id, STRIPE_ID_MAX)) {
        char path[300];
        pay__http_resp r;
        snprintf(path, sizeof path, "/v1/charges/%s", charge_id);
        err_mark saved = err_save(ctx);
        if (call(s, ctx, "GET", path, NULL, NULL, NULL, &r, &fetched) == ORDER_OK &&
            r.status == 200)
            charge = fetched;
        else
            log_kv(LOG_WARN, "stripe charge of a succeeded payment could not be read", LOG_F_STR,
                   "charge_id", charge_id, LOG_F_STR, "error", ctx->err->message, LOG_F_END);
        err_restore(ctx, &saved);
        pay__http_resp_clear(&r);
    }
    int64_t created = 0;
    if (json_is_object(charge) && jint(charge, "created", &created) && created > 0)
        paid->paid_at_us = created * 1000000;
    else
        paid->paid_at_us = clock_wall_us();
    if (json_is_object(charge))
        pay__copy(paid->receipt_url, sizeof paid->receipt_url, pay__jstr(charge, "receipt_url"));
    json_decref(fetched);
}

/* ORDER_EPRECONDITION PAYMENT_DECLINED from an intent (status) and its error fields. */
static int declined(order_ctx *ctx, const char *pi_status, const json_t *err_obj,
                    const char *fallback_message)
{
    const char *code = pay__jstr(err_obj, "decline_code");
    if (!code)
        code = pay__jstr(err_obj, "code");
    const char *msg = pay__jstr(err_obj, "message");
    pay__refuse(ctx, "PAYMENT_DECLINED", "stripe declined the payment: %s",
                msg ? msg : fallback_message);
    if (code)
        order_error_meta(ctx->err, "decline_code", "%s", code);
    order_error_meta(ctx->err, "provider_status", "%s",
                     pi_status ? pi_status
                     : code    ? code
                               : "declined");
    return ORDER_EPRECONDITION;
}

/* A 5xx Stripe stored under the Idempotency-Key after the work began, replayed (as it is
 * to every retry for 24 h: docs.stripe.com/idempotency). */
static bool replayed_5xx(const pay__http_resp *r)
{
    return r->status >= 500 && r->replayed;
}

/* ---- the port ---- */

/* Stripe refused the saved method itself (no such method, saved to a customer the request
 * did not name, or to another one): to the caller, like a decline, since no retry of this
 * request can succeed; metadata field names the request field to fix. */
static int method_refused(order_ctx *ctx, const json_t *err_obj, const char *param)
{
    const char *code = pay__jstr(err_obj, "code"), *msg = pay__jstr(err_obj, "message");
    pay__refuse(ctx, "PAYMENT_DECLINED", "stripe refused the saved payment method: %s",
                msg ? msg : "no message");
    order_error_meta(ctx->err, "decline_code", "%s", code ? code : "payment_method_refused");
    order_error_meta(ctx->err, "provider_status", "refused");
    order_error_meta(ctx->err, "field", "%s",
                     strcmp(param, "customer") == 0 ? "payment_customer" : "payment_method");
    return ORDER_EPRECONDITION;
}

/* Stripe refused a request naming a saved method (400/404 with param payment_method or
 * customer): a refusal for good, like a decline. false if it is not that. */
static bool saved_method_refused(order_ctx *ctx, const order_t *o, const pay__http_resp *r,
                                 json_t *root, int *rc)
{
    const char *param = pay__jstr(error_of(root), "param");
    if ((r->status != 400 && r->status != 404) || !param ||
        (strcmp(param, "payment_method") != 0 && strcmp(param, "customer") != 0))
        return false;
    log_kv(LOG_INFO, "stripe refused a saved payment method", LOG_F_STR, "order_id", o->id,
           LOG_F_STR, "param", param, LOG_F_STR, "code", pay__jstr(error_of(root), "code"),
           LOG_F_STR, "request_id", r->request_id[0] ? r->request_id : NULL, LOG_F_END);
    *rc = method_refused(ctx, error_of(root), param);
    return true;
}

static int st_create(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                     order_payment_action *out, order_payment_info *paid)
{
    struct stripe *s = self;
    memset(out, 0, sizeof *out);
    memset(paid, 0, sizeof *paid);
    out->provider = ORDER_PROVIDER_STRIPE;
    bool for_saved = saved && saved->method && *saved->method;

    char cur[4], amount_s[24], key[64], description[64];
    int64_t amount;
    if (!pay__currency_case(o->currency, cur, false) ||
        !pay__stripe_amount(o->currency, o->total_minor, &amount))
        return pay__refuse(ctx, "AMOUNT_NOT_REPRESENTABLE",
                           "%lld minor units of %s have no exact Stripe amount",
                           (long long)o->total_minor, o->currency);
    snprintf(amount_s, sizeof amount_s, "%lld", (long long)amount);
    snprintf(key, sizeof key, "orderd-pi-%s%s", o->id, for_saved ? "-pm" : "");
    snprintf(description, sizeof description, "Order %s", o->id);

    pay__buf form = {0};
    pay__buf_form(&form, "amount", amount_s);
    pay__buf_form(&form, "currency", cur);
    pay__buf_form(&form, "automatic_payment_methods[enabled]", "true");
    pay__buf_form(&form, "description", description);
    pay__buf_form(&form, "metadata[order_id]", o->id);
    if (for_saved) {
        /* Created for the saved method, confirmed by st_charge once the order keeps the
         * intent's id. Off-session: nobody is there to follow a redirect, and Stripe wants
         * a return_url for redirect-based methods unless they are ruled out. */
        pay__buf_form(&form, "automatic_payment_methods[allow_redirects]", "never");
        pay__buf_form(&form, "payment_method", saved->method);
        if (saved->customer && *saved->customer)
            pay__buf_form(&form, "customer", saved->customer);
    }
    pay__http_resp r;
    json_t *root = NULL;
    int rc = call(s, ctx, "POST", "/v1/payment_intents", NULL, &form, key, &r, &root);
    if (rc == ORDER_OK && replayed_5xx(&r)) {
        /* The key is spent for 24 h. A second key may leave an intent made under the first
         * orphaned, but a created intent moves no money: the order keeps the new one. */
        json_decref(root);
        pay__http_resp_clear(&r);
        strncat(key, "-2", sizeof key - strlen(key) - 1);
        rc = call(s, ctx, "POST", "/v1/payment_intents", NULL, &form, key, &r, &root);
    }
    pay__buf_free(&form);
    if (rc != ORDER_OK)
        goto done;

    if (r.status == 200) {
        const char *id = pay__jstr(root, "id"), *status = pay__jstr(root, "status");
        if (!id || !status) {
            rc = order_fail(ctx->err, ORDER_EUNAVAILABLE,
                            "stripe answered a PaymentIntent without id or status");
            goto done;
        }
        pay__copy(out->reference, sizeof out->reference, id);
        pay__copy(out->client_secret, sizeof out->client_secret, pay__jstr(root, "client_secret"));
        goto done;
    }
    const char *ecode = pay__jstr(error_of(root), "code");
    if (r.status == 400 && ecode &&
        (strcmp(ecode, "amount_too_small") == 0 || strcmp(ecode, "amount_too_large") == 0)) {
        /* No retry can succeed: the order must not stay PENDING (holding stock) and the
         * caller must not see INTERNAL. Reported as a refusal the domain fails the order on. */
        rc = declined(ctx, "refused", error_of(root), "stripe refused the amount");
        goto done;
    }
    if (for_saved && saved_method_refused(ctx, o, &r, root, &rc))
        goto done;
    rc = fail(s, ctx, &r, root, "create a PaymentIntent");
done:
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

static void pi_status(struct stripe *s, order_ctx *ctx, const char *ref, char *out, size_t cap);

/* What a confirmed (or re-read) PaymentIntent's status means for an off-session charge. */
static int charge_outcome(struct stripe *s, order_ctx *ctx, json_t *root, order_payment_info *paid)
{
    const char *status = pay__jstr(root, "status");
    if (!status)
        return order_fail(ctx->err, ORDER_EUNAVAILABLE,
                          "stripe answered a PaymentIntent without status");
    if (strcmp(status, "succeeded") == 0) {
        fill_paid(s, ctx, root, paid);
        return ORDER_OK;
    }
    if (strcmp(status, "processing") == 0) {
        pay__copy(paid->provider_status, sizeof paid->provider_status,
                  status); /* a webhook tells */
        return ORDER_OK;
    }
    json_t *lpe = json_object_get(root, "last_payment_error");
    int rc = declined(ctx, status, lpe,
                      strcmp(status, "requires_action") == 0
                          ? "the payment method needs the customer's authentication"
                          : "the payment method was not charged");
    if (!pay__jstr(lpe, "decline_code") && !pay__jstr(lpe, "code") &&
        strcmp(status, "requires_action") == 0)
        order_error_meta(ctx->err, "decline_code", "authentication_required");
    return rc;
}

static int st_charge(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                     order_payment_info *paid)
{
    struct stripe *s = self;
    memset(paid, 0, sizeof *paid);
    const char *ref = o->pay_reference;
    if (!pay__id_safe(ref, STRIPE_ID_MAX))
        return order_fail(ctx->err, ORDER_EINTERNAL, "order %s has a malformed Stripe reference",
                          o->id);
    char path[320], key[64];
    snprintf(path, sizeof path, "/v1/payment_intents/%s/confirm", ref);
    snprintf(key, sizeof key, "orderd-charge-%s", o->id);
    pay__buf form = {0};
    pay__buf_form(&form, "payment_method", saved->method);
    pay__buf_form(&form, "off_session", "true");
    pay__buf_form(&form, "expand[]", "latest_charge");
    pay__http_resp r;
    json_t *root = NULL;
    int rc = call(s, ctx, "POST", path, NULL, &form, key, &r, &root);
    if (rc == ORDER_OK && r.status >= 500) {
        /* Stripe stores a 5xx under the key and replays it to every retry for 24 h
         * (docs.stripe.com/idempotency): the intent as it is now says what happened. Still
         * unconfirmed, it is confirmed once more under a key of its own; an intent succeeds
         * at most once, so this cannot charge twice. */
        char get_path[320], st[64];
        pi_status(s, ctx, ref, st, sizeof st);
        if (strcmp(st, "requires_confirmation") == 0) {
            json_decref(root);
            pay__http_resp_clear(&r);
            snprintf(key, sizeof key, "orderd-charge-%s-2", o->id);
            rc = call(s, ctx, "POST", path, NULL, &form, key, &r, &root);
        } else if (st[0]) {
            json_decref(root);
            pay__http_resp_clear(&r);
            snprintf(get_path, sizeof get_path, "/v1/payment_intents/%s", ref);
            rc = call(s, ctx, "GET", get_path, "expand%5B%5D=latest_charge", NULL, NULL, &r, &root);
        }
    }
    pay__buf_free(&form);
    if (rc != ORDER_OK)
        goto done;
    if (r.status == 200) {
        rc = charge_outcome(s, ctx, root, paid);
        goto done;
    }
    if (r.status == 402) { /* a card_error: the intent stays (requires_payment_method) */
        json_t *e = error_of(root), *pi = json_object_get(e, "payment_intent");
        rc = declined(ctx, json_is_object(pi) ? pay__jstr(pi, "status") : NULL, e,
                      "the card was declined");
        goto done;
    }
    if (saved_method_refused(ctx, o, &r, root, &rc))
        goto done;
    const char *code = pay__jstr(error_of(root), "code");
    if (r.status == 400 && code && strcmp(code, "payment_intent_unexpected_state") == 0) {
        /* Confirmed already (another replica, or this call's earlier answer lost under a
         * key Stripe no longer replays): the intent as it is now is the outcome. */
        json_decref(root);
        pay__http_resp_clear(&r);
        snprintf(path, sizeof path, "/v1/payment_intents/%s", ref);
        rc = call(s, ctx, "GET", path, "expand%5B%5D=latest_charge", NULL, NULL, &r, &root);
        if (rc == ORDER_OK)
            rc = r.status == 200 ? charge_outcome(s, ctx, root, paid)
                                 : fail(s, ctx, &r, root, "read a PaymentIntent");
        goto done;
    }
    rc = fail(s, ctx, &r, root, "confirm a PaymentIntent");
done:
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

static int st_verify(void *self, order_ctx *ctx, const order_t *o, const char *reference,
                     order_payment_info *info)
{
    struct stripe *s = self;
    memset(info, 0, sizeof *info);
    if (!pay__id_safe(reference, STRIPE_ID_MAX))
        return pay__refuse(ctx, "PAYMENT_NOT_FOUND", "%s is not a Stripe PaymentIntent id",
                           reference && *reference ? "the reference" : "an empty reference");
    char path[300];
    snprintf(path, sizeof path, "/v1/payment_intents/%s", reference);
    pay__http_resp r;
    json_t *root = NULL;
    int rc = call(s, ctx, "GET", path, "expand%5B%5D=latest_charge", NULL, NULL, &r, &root);
    if (rc != ORDER_OK)
        goto done;
    if (r.status == 404) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_FOUND", "stripe has no PaymentIntent %s", reference);
        goto done;
    }
    if (r.status != 200) {
        rc = fail(s, ctx, &r, root, "read a PaymentIntent");
        goto done;
    }

    const char *status = pay__jstr(root, "status");
    const char *order_id = pay__jstr(json_object_get(root, "metadata"), "order_id");
    const char *currency = pay__jstr(root, "currency");
    char want_cur[4];
    int64_t amount = -1, want = -1;
    jint(root, "amount", &amount);
    bool cur_ok = pay__currency_case(o->currency, want_cur, false);
    const char *mismatch = NULL;
    if (!order_id || strcasecmp(order_id, o->id) != 0)
        mismatch = "it belongs to another order";
    else if (!cur_ok || !currency || strcmp(currency, want_cur) != 0)
        mismatch = "its currency differs from the order's";
    else if (!pay__stripe_amount(o->currency, o->total_minor, &want) || amount != want)
        mismatch = "its amount differs from the order's total";
    if (mismatch) {
        rc = pay__refuse(ctx, "PAYMENT_MISMATCH", "PaymentIntent %s does not pay order %s: %s",
                         reference, o->id, mismatch);
        order_error_meta(ctx->err, "provider_status", "%s", status ? status : "unknown");
        goto done;
    }
    if (!status || strcmp(status, "succeeded") != 0) {
        rc = pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED", "PaymentIntent %s is %s", reference,
                         status ? status : "of unknown status");
        order_error_meta(ctx->err, "provider_status", "%s", status ? status : "unknown");
        goto done;
    }
    fill_paid(s, ctx, root, info);
done:
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

/* What a PaymentIntent's current status means for a void. */
static int void_by_status(order_ctx *ctx, const char *ref, const char *status)
{
    if (status && strcmp(status, "canceled") == 0)
        return ORDER_OK;
    if (status && strcmp(status, "succeeded") == 0) {
        pay__refuse(ctx, "PAYMENT_ALREADY_SUCCEEDED",
                    "PaymentIntent %s succeeded: refund it instead", ref);
    } else {
        /* processing: it may still succeed or fail; a later settlement tries again. */
        pay__refuse(ctx, "PAYMENT_NOT_CANCELABLE", "PaymentIntent %s is %s and cannot be voided",
                    ref, status ? status : "of unknown status");
    }
    order_error_meta(ctx->err, "provider_status", "%s", status ? status : "unknown");
    return ORDER_EPRECONDITION;
}

static int st_cancel(void *self, order_ctx *ctx, const order_t *o)
{
    struct stripe *s = self;
    const char *ref = o->pay_reference;
    if (!ref[0])
        return ORDER_OK; /* no intent was ever created: nothing to void */
    if (!pay__id_safe(ref, STRIPE_ID_MAX))
        return order_fail(ctx->err, ORDER_EINTERNAL, "order %s has a malformed Stripe reference",
                          o->id);
    char cancel_path[320], get_path[320], key[64];
    snprintf(cancel_path, sizeof cancel_path, "/v1/payment_intents/%s/cancel", ref);
    snprintf(get_path, sizeof get_path, "/v1/payment_intents/%s", ref);
    snprintf(key, sizeof key, "orderd-void-%s", o->id);
    pay__buf form = {0};
    pay__buf_form(&form, "cancellation_reason", "requested_by_customer");
    pay__http_resp r = {0};
    json_t *root = NULL;
    int rc = ORDER_OK;
    /* Round two goes without the key: Stripe replays a stored answer for 24 h, and a
     * refusal stored while the intent was processing must not outlive that state.
     * Cancelling twice is harmless (the second is refused as unexpected_state). */
    for (int round = 0; round < 2; round++) {
        json_decref(root);
        pay__http_resp_clear(&r);
        rc = call(s, ctx, "POST", cancel_path, NULL, &form, round == 0 ? key : NULL, &r, &root);
        if (rc != ORDER_OK)
            break;
        if (r.status == 200) {
            rc = void_by_status(ctx, ref, pay__jstr(root, "status"));
            break;
        }
        if (r.status == 404) {
            log_kv(LOG_WARN, "stripe has no PaymentIntent to void", LOG_F_STR, "order_id", o->id,
                   LOG_F_STR, "reference", ref, LOG_F_END);
            rc = ORDER_OK;
            break;
        }
        if (replayed_5xx(&r) && round == 0)
            continue; /* the key is spent for 24 h: round two goes without it */
        const char *code = pay__jstr(error_of(root), "code");
        if (r.status != 400 || !code || strcmp(code, "payment_intent_unexpected_state") != 0) {
            rc = fail(s, ctx, &r, root, "cancel a PaymentIntent");
            break;
        }
        /* Not cancelable as it was then: read the intent as it is now. */
        json_decref(root);
        pay__http_resp_clear(&r);
        rc = call(s, ctx, "GET", get_path, NULL, NULL, NULL, &r, &root);
        if (rc != ORDER_OK)
            break;
        if (r.status != 200) {
            rc = fail(s, ctx, &r, root, "read a PaymentIntent");
            break;
        }
        const char *st = pay__jstr(root, "status");
        bool settled = st && (strcmp(st, "canceled") == 0 || strcmp(st, "succeeded") == 0 ||
                              strcmp(st, "processing") == 0);
        if (settled || round == 1) {
            rc = void_by_status(ctx, ref, st);
            break;
        }
    }
    pay__buf_free(&form);
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

/* The refund of an intent that was already refunded in full: best effort, "" if unknown. */
static void find_refund(struct stripe *s, order_ctx *ctx, const char *ref,
                        char refund_id[ORDER_REFERENCE_MAX + 1])
{
    pay__buf q = {0};
    pay__buf_form(&q, "payment_intent", ref);
    pay__buf_form(&q, "limit", "1");
    pay__http_resp r = {0};
    json_t *root = NULL;
    err_mark saved = err_save(ctx);
    if (!q.oom && call(s, ctx, "GET", "/v1/refunds", q.data, NULL, NULL, &r, &root) == ORDER_OK &&
        r.status == 200)
        pay__copy(refund_id, ORDER_REFERENCE_MAX + 1,
                  pay__jstr(json_array_get(json_object_get(root, "data"), 0), "id"));
    err_restore(ctx, &saved);
    json_decref(root);
    pay__http_resp_clear(&r);
    pay__buf_free(&q);
}

/* The intent's status now ("" if it cannot be read); ctx->err is left as it was. */
static void pi_status(struct stripe *s, order_ctx *ctx, const char *ref, char *out, size_t cap)
{
    char path[300];
    pay__http_resp r;
    json_t *root = NULL;
    err_mark saved = err_save(ctx);
    out[0] = '\0';
    snprintf(path, sizeof path, "/v1/payment_intents/%s", ref);
    if (call(s, ctx, "GET", path, NULL, NULL, NULL, &r, &root) == ORDER_OK && r.status == 200)
        pay__copy(out, cap, pay__jstr(root, "status"));
    err_restore(ctx, &saved);
    json_decref(root);
    pay__http_resp_clear(&r);
}

static int st_refund(void *self, order_ctx *ctx, const order_t *o,
                     char refund_id[ORDER_REFERENCE_MAX + 1])
{
    struct stripe *s = self;
    const char *ref = o->pay_reference;
    refund_id[0] = '\0';
    if (!ref[0])
        return pay__refuse(ctx, "PAYMENT_NOT_FOUND", "order %s has no Stripe payment", o->id);
    if (!pay__id_safe(ref, STRIPE_ID_MAX))
        return order_fail(ctx->err, ORDER_EINTERNAL, "order %s has a malformed Stripe reference",
                          o->id);
    pay__buf form = {0};
    pay__buf_form(&form, "payment_intent", ref);
    pay__buf_form(&form, "reason", "requested_by_customer");
    pay__buf_form(&form, "metadata[order_id]", o->id);
    pay__http_resp r = {0};
    json_t *root = NULL;
    int rc = ORDER_OK;
    /* Round two only when round one got back a refusal Stripe stored under the key while
     * the intent had not succeeded, and it has succeeded since: a full refund cannot
     * happen twice (the second is charge_already_refunded), so a second key is safe. */
    for (int round = 0; round < 2; round++) {
        char key[80], status[64];
        snprintf(key, sizeof key, "orderd-refund-%s%s", o->id, round ? "-2" : "");
        json_decref(root);
        pay__http_resp_clear(&r);
        rc = call(s, ctx, "POST", "/v1/refunds", NULL, &form, key, &r, &root);
        if (rc != ORDER_OK)
            break;
        if (r.status == 200) {
            const char *st = pay__jstr(root, "status");
            pay__copy(refund_id, ORDER_REFERENCE_MAX + 1, pay__jstr(root, "id"));
            if (st && (strcmp(st, "failed") == 0 || strcmp(st, "canceled") == 0)) {
                rc = pay__refuse(ctx, "REFUND_FAILED", "stripe refund %s of order %s is %s",
                                 refund_id, o->id, st);
                order_error_meta(ctx->err, "provider_status", "%s", st);
            }
            break;
        }
        const char *code = pay__jstr(error_of(root), "code");
        if (r.status == 400 && code && strcmp(code, "charge_already_refunded") == 0) {
            find_refund(s, ctx, ref, refund_id);
            break;
        }
        if (r.status == 404) {
            rc = pay__refuse(ctx, "PAYMENT_NOT_FOUND", "stripe has no PaymentIntent %s", ref);
            break;
        }
        if (replayed_5xx(&r) && round == 0)
            continue; /* the key is spent for 24 h; the second key cannot refund twice */
        if (r.status != 400) {
            rc = fail(s, ctx, &r, root, "refund a PaymentIntent");
            break;
        }
        /* "does not have a successful charge to refund" (no code), unexpected_state, ...:
         * what matters is whether the intent has succeeded now. */
        pi_status(s, ctx, ref, status, sizeof status);
        if (status[0] && strcmp(status, "succeeded") != 0) {
            rc = pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED",
                             "PaymentIntent %s has not succeeded: nothing to refund", ref);
            order_error_meta(ctx->err, "provider_status", "%s", status);
            break;
        }
        if (!status[0] || !r.replayed || round == 1) {
            rc = fail(s, ctx, &r, root, "refund a PaymentIntent");
            break;
        }
    }
    pay__buf_free(&form);
    json_decref(root);
    pay__http_resp_clear(&r);
    return rc;
}

/* ---- construction ---- */

static bool header_safe(const char *s)
{
    return s && *s && !strpbrk(s, "\r\n");
}

static char *header_line(const char *name, const char *prefix, const char *value)
{
    size_t n = strlen(name) + strlen(prefix) + strlen(value) + 3;
    char *line = malloc(n);
    if (line)
        snprintf(line, n, "%s: %s%s", name, prefix, value);
    return line;
}

order_payments *pay_stripe_create(const pay_stripe_config *cfg, char *err, size_t errlen)
{
    if (!header_safe(cfg->secret_key) || !header_safe(cfg->api_version)) {
        snprintf(err, errlen, "stripe: secret_key and api_version are required");
        return NULL;
    }
    bool production = cfg->environment && strcasecmp(cfg->environment, "production") == 0;
    bool test_key = strncmp(cfg->secret_key, "sk_test_", 8) == 0 ||
                    strncmp(cfg->secret_key, "rk_test_", 8) == 0;
    bool live_key = strncmp(cfg->secret_key, "sk_live_", 8) == 0 ||
                    strncmp(cfg->secret_key, "rk_live_", 8) == 0;
    if (production && test_key) {
        snprintf(err, errlen, "stripe: a test key is refused when environment is production");
        return NULL;
    }
    if (!production && live_key) {
        snprintf(err, errlen, "stripe: a live key is refused outside production");
        return NULL;
    }
    struct stripe *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "stripe: out of memory");
        return NULL;
    }
    s->http = pay__httpc_create("stripe", cfg->api_base, &cfg->http, err, errlen);
    if (!s->http)
        goto fail;
    s->auth = header_line("Authorization", "Bearer ", cfg->secret_key);
    s->version = header_line("Stripe-Version", "", cfg->api_version);
    if (!s->auth || !s->version) {
        snprintf(err, errlen, "stripe: out of memory");
        goto fail;
    }
    s->port = (order_payments){
        .self = s,
        .create = st_create,
        .charge = st_charge,
        .verify = st_verify,
        .refund = st_refund,
        .cancel = st_cancel,
    };
    return &s->port;
fail:
    pay_stripe_destroy(&s->port);
    return NULL;
}

void pay_stripe_destroy(order_payments *p)
{
    if (!p)
        return;
    struct stripe *s = (struct stripe *)p;
    pay__httpc_destroy(s->http);
    pay__free_secret(s->auth);
    free(s->version);
    free(s);
}

/* ---- webhooks ---- */

#define SIG_HEX 64
#define SIG_MAX 8 /* v1 signatures looked at; Stripe sends one, two while rotating secrets */

static bool hmac_sha256_hex(const char *key, const char *t, size_t tlen, const char *body,
                            size_t len, char out[SIG_HEX + 1])
{
    bool ok = false;
    unsigned char mac[32];
    size_t maclen = 0;
    EVP_MAC *m = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *c = m ? EVP_MAC_CTX_new(m) : NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    if (c && EVP_MAC_init(c, (const unsigned char *)key, strlen(key), params) &&
        EVP_MAC_update(c, (const unsigned char *)t, tlen) &&
        EVP_MAC_update(c, (const unsigned char *)".", 1) &&
        EVP_MAC_update(c, (const unsigned char *)body, len) &&
        EVP_MAC_final(c, mac, &maclen, sizeof mac) && maclen == sizeof mac) {
        static const char hex[] = "0123456789abcdef";
        for (size_t i = 0; i < sizeof mac; i++) {
            out[2 * i] = hex[mac[i] >> 4];
            out[2 * i + 1] = hex[mac[i] & 15];
        }
        out[SIG_HEX] = '\0';
        ok = true;
    }
    EVP_MAC_CTX_free(c);
    EVP_MAC_free(m);
    OPENSSL_cleanse(mac, sizeof mac);
    return ok;
}

/* Checks Stripe-Signature against the body; PAY_WEBHOOK_OK or BAD_SIGNATURE with err. */
static int check_signature(const char *secret, int64_t tolerance_s, int64_t now_s,
                           const char *header, const char *body, size_t len, char *err,
                           size_t errlen)
{
    if (!secret || !*secret) {
        snprintf(err, errlen, "no Stripe webhook secret is configured");
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    if (!header || !*header) {
        snprintf(err, errlen, "no Stripe-Signature header");
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    /* t=<digits>, v1=<hex> (any number), anything else (v0, future schemes) ignored. */
    char t[24] = "";
    char v1[SIG_MAX][SIG_HEX + 1];
    int nv1 = 0;
    bool t_bad = false;
    for (const char *p = header; *p;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        while (n && (*p == ' ' || *p == '\t')) {
            p++;
            n--;
        }
        while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
            n--;
        if (n > 2 && p[0] == 't' && p[1] == '=') {
            if (n - 2 >= sizeof t || strspn(p + 2, "0123456789") < n - 2)
                t_bad = true;
            else
                snprintf(t, sizeof t, "%.*s", (int)(n - 2), p + 2);
        } else if (n == 3 + SIG_HEX && strncmp(p, "v1=", 3) == 0 && nv1 < SIG_MAX) {
            for (int i = 0; i < SIG_HEX; i++) {
                char c = p[3 + i];
                v1[nv1][i] = (char)(c >= 'A' && c <= 'F' ? c - 'A' + 'a' : c);
            }
            v1[nv1][SIG_HEX] = '\0';
            nv1++;
        }
        p += n;
        while (*p && *p != ',')
            p++;
        if (*p == ',')
            p++;
    }
    if (t_bad || !t[0]) {
        snprintf(err, errlen, "Stripe-Signature has no valid timestamp (t=)");
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    if (nv1 == 0) {
        snprintf(err, errlen, "Stripe-Signature has no v1 signature");
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    char want[SIG_HEX + 1];
    if (!hmac_sha256_hex(secret, t, strlen(t), body ? body : "", body ? len : 0, want)) {
        snprintf(err, errlen, "HMAC-SHA256 is not available");
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    bool match = false;
    for (int i = 0; i < nv1; i++) /* every one, whatever matched: no early exit to time */
        match |= CRYPTO_memcmp(want, v1[i], SIG_HEX) == 0;
    OPENSSL_cleanse(want, sizeof want);
    if (!match) {
        snprintf(err, errlen, "no v1 signature matches the body and the endpoint secret");
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    if (tolerance_s <= 0)
        tolerance_s = 300; /* Stripe's default; a webhook is never accepted at any age */
    long long ts = strtoll(t, NULL, 10);
    if (ts > now_s + tolerance_s || ts < now_s - tolerance_s) {
        snprintf(err, errlen,
                 "the signature's timestamp is %lld s away from now (tolerance %lld s)",
                 (long long)(ts - now_s), (long long)tolerance_s);
        return PAY_WEBHOOK_BAD_SIGNATURE;
    }
    return PAY_WEBHOOK_OK;
}

static void event_amount(order_payment_event *ev, const char *currency, int64_t amount)
{
    int64_t minor;
    char upper[4];
    if (currency && pay__currency_case(currency, upper, true) &&
        pay__stripe_to_minor(upper, amount, &minor)) {
        ev->amount_minor = minor;
        memcpy(ev->currency, upper, sizeof upper);
    }
}

static void event_order_id(order_payment_event *ev, const json_t *obj)
{
    const char *id = pay__jstr(json_object_get(obj, "metadata"), "order_id");
    if (id && order_id_valid(id))
        pay__copy(ev->order_id, sizeof ev->order_id, id);
}

int pay_stripe_webhook(const char *endpoint_secret, int64_t tolerance_s, int64_t now_s,
                       const char *signature_header, const char *body, size_t len,
                       order_payment_event *ev, char *err, size_t errlen)
{
    memset(ev, 0, sizeof *ev);
    ev->provider = ORDER_PROVIDER_STRIPE;
    ev->amount_minor = -1;
    err[0] = '\0';
    int rc = check_signature(endpoint_secret, tolerance_s, now_s, signature_header, body, len, err,
                             errlen);
    if (rc != PAY_WEBHOOK_OK)
        return rc;

    json_error_t jerr;
    json_t *root = json_loadb(body, len, 0, &jerr);
    json_t *obj = json_object_get(json_object_get(root, "data"), "object");
    const char *id = pay__jstr(root, "id"), *type = pay__jstr(root, "type");
    int64_t created = 0;
    if (!json_is_object(root) || !id || !*id || strlen(id) > ORDER_REFERENCE_MAX || !type ||
        !json_is_object(obj) || !jint(root, "created", &created)) {
        snprintf(err, errlen, "not a Stripe event%s%s", root ? "" : ": ", root ? "" : jerr.text);
        json_decref(root);
        return PAY_WEBHOOK_MALFORMED;
    }
    pay__copy(ev->id, sizeof ev->id, id);
    pay__copy(ev->type, sizeof ev->type, type);
    ev->occurred_at_us = created * 1000000;
    int64_t amount;

    if (strncmp(type, "payment_intent.", 15) == 0) {
        pay__copy(ev->reference, sizeof ev->reference, pay__jstr(obj, "id"));
        event_order_id(ev, obj);
        pay__copy(ev->charge_id, sizeof ev->charge_id, jid(obj, "latest_charge"));
        json_t *charge = json_object_get(obj, "latest_charge");
        if (json_is_object(charge))
            pay__copy(ev->receipt_url, sizeof ev->receipt_url, pay__jstr(charge, "receipt_url"));
        if ((jint(obj, "amount_received", &amount) && amount > 0) || jint(obj, "amount", &amount))
            event_amount(ev, pay__jstr(obj, "currency"), amount);
        if (strcmp(type, "payment_intent.succeeded") == 0) {
            ev->kind = ORDER_PAY_EVENT_SUCCEEDED;
        } else if (strcmp(type, "payment_intent.payment_failed") == 0) {
            json_t *lpe = json_object_get(obj, "last_payment_error");
            const char *code = pay__jstr(lpe, "decline_code");
            ev->kind = ORDER_PAY_EVENT_FAILED;
            pay__copy(ev->failure_code, sizeof ev->failure_code,
                      code ? code : pay__jstr(lpe, "code"));
            pay__copy(ev->failure_message, sizeof ev->failure_message, pay__jstr(lpe, "message"));
        } else if (strcmp(type, "payment_intent.canceled") == 0) {
            ev->kind = ORDER_PAY_EVENT_CANCELED;
        }
    } else if (strcmp(type, "charge.refunded") == 0) {
        int64_t refunded = 0;
        ev->kind = ORDER_PAY_EVENT_REFUNDED;
        pay__copy(ev->charge_id, sizeof ev->charge_id, pay__jstr(obj, "id"));
        pay__copy(ev->reference, sizeof ev->reference, jid(obj, "payment_intent"));
        pay__copy(ev->receipt_url, sizeof ev->receipt_url, pay__jstr(obj, "receipt_url"));
        event_order_id(ev, obj);
        if (jint(obj, "amount", &amount)) {
            event_amount(ev, pay__jstr(obj, "currency"), amount);
            ev->full_refund = jint(obj, "amount_refunded", &refunded) && refunded >= amount;
        }
        json_t *refunds = json_object_get(json_object_get(obj, "refunds"), "data");
        pay__copy(ev->refund_id, sizeof ev->refund_id, pay__jstr(json_array_get(refunds, 0), "id"));
    }
    json_decref(root);
    return PAY_WEBHOOK_OK;
}
