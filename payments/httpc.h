/* httpc.h — what the files of payments/ share (stripe.c and paypal.c; local.c uses pay__refuse):
 * a small libcurl client with the retry policy of pay_http_config, a growable buffer with
 * form encoding, and the currency and time conversions (currency.c). Nothing outside
 * payments/ includes this file, and no libcurl type crosses it.
 *
 * Ownership: a pay_httpc owns one CURL easy handle (so its connections are reused from
 * call to call) and is used by one thread at a time. A pay__http_resp owns its body; free
 * it with pay__http_resp_clear().
 */
#ifndef ORDERD_PAYMENTS_HTTPC_H
#define ORDERD_PAYMENTS_HTTPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "orders/orders.h"
#include "payments/payments.h"

/* ---- a growable byte buffer (always NUL-terminated) ---- */

typedef struct pay__buf {
    char *data; /* NULL until something is appended; heap, owned */
    size_t len;
    size_t cap;
    bool oom; /* an append failed: the content is incomplete */
} pay__buf;

void pay__buf_append(pay__buf *b, const char *s, size_t n);
void pay__buf_puts(pay__buf *b, const char *s);
/** Appends "key=value" (with '&' before it unless first), both percent-encoded as
 *  application/x-www-form-urlencoded (RFC 3986 unreserved characters kept). */
void pay__buf_form(pay__buf *b, const char *key, const char *value);
/** Frees the data (after wiping it: request bodies may hold credentials) and resets. */
void pay__buf_free(pay__buf *b);

/* ---- the client ---- */

typedef struct pay_httpc pay_httpc;

/** One request. Header lines may hold credentials: they are never logged. */
typedef struct pay__http_req {
    const char *method;         /* "GET" or "POST" */
    const char *path;           /* "/v1/payment_intents/pi_1": appended to the base; logged */
    const char *query;          /* NULL, or an already-encoded query string (no '?'); not logged */
    const char *body;           /* NULL = none (an empty body for POST) */
    size_t body_len;            /* bytes of body */
    const char *const *headers; /* NULL-terminated "Name: value" lines, or NULL */
} pay__http_req;

typedef struct pay__http_resp {
    long status; /* HTTP status of the last attempt; 0 if none answered */
    char *body;  /* heap, NUL-terminated, owned; NULL if empty */
    size_t len;
    int attempts;         /* how many were made */
    char request_id[128]; /* Stripe Request-Id / PayPal Paypal-Debug-Id, for logs */
    bool replayed;        /* Stripe Idempotent-Replayed: true */
} pay__http_resp;

/** Creates a client for `base` (e.g. "https://api.stripe.com", no trailing slash).
 *  `provider` ("stripe", "paypal") names it in logs and messages. NULL with err on a bad
 *  configuration or no memory. Zero fields of cfg take defaults (see httpc.c). */
pay_httpc *pay__httpc_create(const char *provider, const char *base, const pay_http_config *cfg,
                             char *err, size_t errlen);
void pay__httpc_destroy(pay_httpc *c);
const char *pay__httpc_provider(const pay_httpc *c);

/**
 * Performs req, retrying network errors, 409, 429 and 5xx (or as a Stripe-Should-Retry
 * header says) with jittered exponential back-off, each attempt bounded by the attempt
 * timeout and by ctx's deadline; the same request (so the same idempotency key) every
 * time. Returns ORDER_OK when some attempt got an HTTP response (any status: the last one
 * is in *resp), ORDER_EUNAVAILABLE when none did (network), ORDER_EDEADLINE when the
 * deadline passed first; ctx->err names the provider. *resp is always initialised.
 */
int pay__http_do(pay_httpc *c, order_ctx *ctx, const pay__http_req *req, pay__http_resp *resp);

/** Frees resp's body and zeroes it. */
void pay__http_resp_clear(pay__http_resp *resp);

/** Whether the status is one the client retries (409, 429, 5xx). */
bool pay__http_retryable(long status);

/**
 * The failure for a response that stayed retryable after every attempt (409, 429, 5xx):
 * ORDER_EDEADLINE if ctx's deadline has passed, else ORDER_EUNAVAILABLE, with a message
 * naming the provider and the status.
 */
int pay__http_fail_unavailable(pay_httpc *c, order_ctx *ctx, const pay__http_resp *resp);

/* ---- identifiers and errors ---- */

/** True if s is non-empty, at most max bytes, and made only of [A-Za-z0-9_-]: a provider
 *  id that can be put into a URL path as it is. */
bool pay__id_safe(const char *s, size_t max);

/** ORDER_EPRECONDITION with a reason and a printf message; returns the code. */
int pay__refuse(order_ctx *ctx, const char *reason, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- money and time (currency.c) ---- */

/** A Stripe amount (its "smallest currency unit") from ISO-4217 minor units. false if the
 *  currency is unknown or the amount has no exact Stripe form. */
bool pay__stripe_amount(const char *iso_currency, int64_t minor, int64_t *out);
/** The inverse: ISO-4217 minor units from a Stripe amount (currency in any case). */
bool pay__stripe_to_minor(const char *currency, int64_t amount, int64_t *out);
/** PayPal's decimal string ("12.34", JPY "1200") from minor units, exactly. false if the
 *  currency is unknown, the amount negative or not representable, or cap too small. */
bool pay__paypal_value(const char *iso_currency, int64_t minor, char *out, size_t cap);
/** The inverse: minor units from a PayPal value string, exactly (no rounding). */
bool pay__paypal_parse_value(const char *iso_currency, const char *value, int64_t *out);
/** Copies src (3 letters) upper- or lower-cased into out[4]; false if not 3 letters. */
bool pay__currency_case(const char *src, char out[4], bool upper);
/** RFC 3339 ("2024-05-01T12:34:56.789Z", "...+02:00") to Unix microseconds. */
bool pay__rfc3339_us(const char *s, int64_t *out);

/* ---- small helpers both providers use ---- */

/** Wipes and frees a heap C string holding a credential. NULL is a no-op. */
void pay__free_secret(char *s);
/** Copies src (NULL = "") into dst, truncating to cap-1 bytes. */
void pay__copy(char *dst, size_t cap, const char *src);
/** The response body as a JSON object; NULL if it has none or is not an object. */
json_t *pay__json_object(const pay__http_resp *r);
/** o[key] if it is a string, else NULL. */
const char *pay__jstr(const json_t *o, const char *key);

#endif
