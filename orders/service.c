/* service.c — the use cases: place, get, list, cancel, confirm payment, change status,
 * catalogue upkeep.
 *
 * DESIGN
 * Each use case validates everything it can before touching a port, reporting every
 * violation at once; then it asks the store for exactly one atomic change (an insert
 * under an idempotency key, or one conditional status transition). Payment-provider
 * calls happen after the order's own change has committed and are themselves idempotent
 * (keyed by the order), so a retry of the same call completes what a failure left
 * undone instead of doing it twice.
 */
#include "orders/orders.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- helpers ---- */

/* Wall-clock time in Unix microseconds, for the facts the domain records (refunded_at). */
static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void notice(order_service *svc, const char *what, const order_t *o, const order_error *e)
{
    if (svc->notice)
        svc->notice(what, o, e);
}

static bool is_terminal_unpaid(order_status s)
{
    return s == ORDER_STATUS_CANCELLED || s == ORDER_STATUS_EXPIRED || s == ORDER_STATUS_FAILED;
}

static bool deadline_passed(order_ctx *ctx)
{
    if (order_ctx_remaining_us(ctx) <= 0) {
        order_fail(ctx->err, ORDER_EDEADLINE, "deadline exceeded before the work started");
        return true;
    }
    return false;
}

/* A customer sees only their own orders; to them another's order does not exist. */
static bool may_see(const order_ctx *ctx, const order_t *o)
{
    return order_caller_is_privileged(&ctx->caller) ||
           strcmp(o->customer_id, ctx->caller.subject) == 0;
}

static int check_order_id(order_ctx *ctx, const char *id)
{
    if (!id || !*id) {
        order_violate(ctx->err, "order_id", "must not be empty");
    } else if (!order_id_valid(id)) {
        order_violate(ctx->err, "order_id",
                      "must be a UUID such as 3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e90");
    }
    if (ctx->err->nviolations)
        return order_fail(ctx->err, ORDER_EINVAL, "invalid order_id");
    return ORDER_OK;
}

/* Loads an order the caller may see; NOT_FOUND otherwise (same answer as a missing one). */
static int load_visible(order_service *svc, order_ctx *ctx, const char *id, order_t *out)
{
    int rc = svc->store.order_get(svc->store.self, ctx, id, out);
    if (rc == ORDER_OK && !may_see(ctx, out)) {
        order_clear(out);
        rc = ORDER_ENOTFOUND;
    }
    /* The domain's words, not the store's: otherwise a customer could tell "not yours"
     * from "no such order" by the message. */
    if (rc == ORDER_ENOTFOUND)
        return order_fail(ctx->err, ORDER_ENOTFOUND, "order %s not found", id);
    return rc;
}

/* FAILED_PRECONDITION naming the current status, as the contract promises. */
static int fail_status(order_ctx *ctx, const order_t *o, const char *what)
{
    order_error *e = ctx->err;
    e->current_status = o->status;
    snprintf(e->precondition_type, sizeof e->precondition_type, "ORDER_STATUS");
    snprintf(e->precondition_subject, sizeof e->precondition_subject, "%s", o->id);
    return order_fail(e, ORDER_EPRECONDITION, "cannot %s: order is %s", what,
                      order_status_enum_name(o->status));
}

static order_payments *provider_of(order_service *svc, order_provider p)
{
    if ((int)p < 0 || (int)p > ORDER_PROVIDER_MAX)
        return NULL;
    return svc->providers[p];
}

static bool id_char_ok(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
}

/* ---- place ---- */

bool order_fingerprint(const order_place_cmd *cmd, const char *customer_id, char *buf, size_t cap)
{
    size_t off = 0;
    int n = snprintf(buf, cap, "v1|%s|%d|", customer_id, (int)cmd->provider);
    if (n < 0 || (size_t)n >= cap)
        return false;
    off = (size_t)n;
    for (size_t i = 0; i < cmd->nlines; i++) {
        n = snprintf(buf + off, cap - off, "%s:%d;",
                     cmd->lines[i].product_id ? cmd->lines[i].product_id : "",
                     (int)cmd->lines[i].quantity);
        if (n < 0 || (size_t)n >= cap - off)
            return false;
        off += (size_t)n;
    }
    if (cmd->payment_method && *cmd->payment_method) {
        n = snprintf(buf + off, cap - off, "|pm=%s", cmd->payment_method);
        if (n < 0 || (size_t)n >= cap - off)
            return false;
        off += (size_t)n;
    }
    if (cmd->payment_customer && *cmd->payment_customer) {
        n = snprintf(buf + off, cap - off, "|cus=%s", cmd->payment_customer);
        if (n < 0 || (size_t)n >= cap - off)
            return false;
    }
    return true;
}

/* Field checks that need no port. Returns the customer the order is for in *customer. */
static void validate_place(order_service *svc, order_ctx *ctx, const order_place_cmd *cmd,
                           const char **customer)
{
    order_error *e = ctx->err;
    size_t len = cmd->request_id ? strlen(cmd->request_id) : 0;
    if (len == 0)
        order_violate(e, "request_id", "must not be empty: it is the idempotency key");
    else if (len > ORDER_REQUEST_ID_MAX)
        order_violate(e, "request_id", "must be at most %d bytes of UTF-8 (got %zu)",
                      ORDER_REQUEST_ID_MAX, len);

    const char *cust = cmd->customer_id ? cmd->customer_id : "";
    if (order_caller_is_privileged(&ctx->caller)) {
        size_t cl = strlen(cust);
        if (cl == 0)
            order_violate(e, "customer_id", "must be set when a service or admin places an order");
        else if (cl > ORDER_CUSTOMER_MAX)
            order_violate(e, "customer_id", "must be at most %d bytes of UTF-8",
                          ORDER_CUSTOMER_MAX);
        *customer = cust;
    } else {
        *customer = ctx->caller.subject;
    }

    if (cmd->nlines == 0)
        order_violate(e, "items", "must hold at least one line");
    else if (cmd->nlines > ORDER_MAX_LINES)
        order_violate(e, "items", "must hold at most %d lines (got %zu)", ORDER_MAX_LINES,
                      cmd->nlines);
    for (size_t i = 0; i < cmd->nlines && i < ORDER_MAX_LINES; i++) {
        char field[64];
        const char *pid = cmd->lines[i].product_id ? cmd->lines[i].product_id : "";
        size_t pl = strlen(pid);
        if (pl == 0) {
            snprintf(field, sizeof field, "items[%zu].product_id", i);
            order_violate(e, field, "must not be empty");
        } else if (pl > ORDER_PRODUCT_ID_MAX) {
            snprintf(field, sizeof field, "items[%zu].product_id", i);
            order_violate(e, field, "must be at most %d bytes of UTF-8", ORDER_PRODUCT_ID_MAX);
        }
        int32_t q = cmd->lines[i].quantity;
        if (q < ORDER_MIN_QUANTITY || q > ORDER_MAX_QUANTITY) {
            snprintf(field, sizeof field, "items[%zu].quantity", i);
            order_violate(e, field, "must be between %d and %d (got %d)", ORDER_MIN_QUANTITY,
                          ORDER_MAX_QUANTITY, (int)q);
        }
    }

    size_t pml = cmd->payment_method ? strlen(cmd->payment_method) : 0;
    if (pml > ORDER_PAYMENT_METHOD_MAX)
        order_violate(e, "payment_method", "must be at most %d bytes of UTF-8",
                      ORDER_PAYMENT_METHOD_MAX);
    else if (pml && cmd->provider != ORDER_PROVIDER_STRIPE)
        order_violate(e, "payment_method",
                      "saved payment methods are only supported with PAYMENT_PROVIDER_STRIPE");
    size_t pcl = cmd->payment_customer ? strlen(cmd->payment_customer) : 0;
    if (pcl > ORDER_PAYMENT_METHOD_MAX)
        order_violate(e, "payment_customer", "must be at most %d bytes of UTF-8",
                      ORDER_PAYMENT_METHOD_MAX);
    else if (pcl && !pml)
        order_violate(e, "payment_customer", "is only used with payment_method");
    if (cmd->provider == ORDER_PROVIDER_UNSPECIFIED)
        order_violate(e, "payment_provider", "must be set");
    else if (!provider_of(svc, cmd->provider))
        order_violate(e, "payment_provider", "%s payments are not available on this server",
                      order_provider_name(cmd->provider) ? order_provider_name(cmd->provider)
                                                         : "unknown");
}

/* Whether a line's product_id is worth a catalogue lookup; validate_place reports the rest. */
static bool line_id_ok(const order_line_cmd *l)
{
    return l->product_id && *l->product_id && strlen(l->product_id) <= ORDER_PRODUCT_ID_MAX;
}

/* Prices the lines from the catalogue into o (items, currency, totals). Violations for
 * unknown / inactive products and mixed currencies go to ctx->err, after any that
 * validate_place put there: returns ORDER_EINVAL if there are any. */
static int price_lines(order_service *svc, order_ctx *ctx, const order_place_cmd *cmd, order_t *o)
{
    order_error *e = ctx->err;
    size_t n = cmd->nlines;
    const char **ids = calloc(n, sizeof *ids);
    order_product *products = calloc(n, sizeof *products);
    bool *found = calloc(n, sizeof *found);
    o->items = calloc(n, sizeof *o->items);
    int rc = ORDER_OK;
    if (!ids || !products || !found || !o->items) {
        rc = order_fail(e, ORDER_EINTERNAL, "out of memory");
        goto done;
    }
    size_t nids = 0;
    for (size_t i = 0; i < n; i++)
        if (line_id_ok(&cmd->lines[i]))
            ids[nids++] = cmd->lines[i].product_id;
    if (nids) {
        rc = svc->store.products_get(svc->store.self, ctx, ids, nids, products, found);
        if (rc != ORDER_OK)
            goto done;
    }

    const char *currency = NULL;
    int64_t subtotal = 0;
    bool overflow = false;
    for (size_t i = 0, j = 0; i < n; i++) {
        if (!line_id_ok(&cmd->lines[i]))
            continue;   /* already reported */
        size_t k = j++; /* the line's slot in ids / products / found */
        char field[64];
        snprintf(field, sizeof field, "items[%zu].product_id", i);
        if (!found[k]) {
            order_violate(e, field, "unknown product %s", ids[k]);
            continue;
        }
        const order_product *p = &products[k];
        if (!p->active) {
            order_violate(e, field, "product %s is not available", p->id);
            continue;
        }
        if (!currency) {
            currency = p->currency;
        } else if (strcmp(currency, p->currency) != 0) {
            order_violate(
                e, field,
                "product %s is priced in %s but the order is in %s: one order, one currency", p->id,
                p->currency, currency);
            continue;
        }
        order_item *it = &o->items[o->nitems++];
        snprintf(it->product_id, sizeof it->product_id, "%s", p->id);
        snprintf(it->name, sizeof it->name, "%s", p->name);
        it->quantity = cmd->lines[i].quantity;
        it->unit_price_minor = p->unit_price_minor;
        if (!money_mul(p->unit_price_minor, it->quantity, &it->line_total_minor) ||
            !money_add(subtotal, it->line_total_minor, &subtotal))
            overflow = true;
    }
    if (e->nviolations) {
        rc = order_fail(e, ORDER_EINVAL, "the order is invalid: see the field violations");
        goto done;
    }
    snprintf(o->currency, sizeof o->currency, "%s", currency ? currency : "");
    o->subtotal_minor = subtotal;
    if (overflow || !money_tax(subtotal, svc->cfg.tax_rate_bps, &o->tax_minor) ||
        !money_add(subtotal, o->tax_minor, &o->total_minor) ||
        o->total_minor > svc->cfg.max_total_minor) {
        order_violate(e, "items", "the order total exceeds the maximum of %lld minor units",
                      (long long)svc->cfg.max_total_minor);
        rc = order_fail(e, ORDER_EINVAL, "the order total is too large");
    }
done:
    free(ids);
    free(products);
    free(found);
    return rc;
}

/* Best-effort provider work inside a call that must still answer (closing a declined
 * intent; refunding a late payment reported by a webhook, which wants its 2xx quickly)
 * gets at most half of what is left of the call, and at most its own cap; with less than
 * SIDE_MIN_US left it is not tried. What it does not finish, the sweeper does. */
#define VOID_DECLINED_MAX_US  (2 * 1000000LL)
#define WEBHOOK_REFUND_MAX_US (3 * 1000000LL)
#define SIDE_MIN_US           (200 * 1000LL)

/* *out: ctx with its deadline cut to the side work's share; false: too little time left. */
static bool side_ctx(const order_ctx *ctx, int64_t max_us, order_ctx *out)
{
    *out = *ctx;
    int64_t left = order_ctx_remaining_us(ctx);
    if (left == INT64_MAX) /* no deadline: the provider's own timeouts bound it */
        return true;
    if (left / 2 < SIDE_MIN_US)
        return false;
    out->deadline_mono_us = ctx->deadline_mono_us - left + (left / 2 < max_us ? left / 2 : max_us);
    return true;
}

/* The reason a declined order keeps, and its prefix (a replay answers the same). */
#define DECLINED_PREFIX "payment declined"

/* detail: what the provider said, when it just said it (NULL on a replay). */
static int fail_declined(order_ctx *ctx, const order_t *o, const char *detail)
{
    order_error *e = ctx->err;
    e->current_status = o->status;
    snprintf(e->reason, sizeof e->reason, "PAYMENT_DECLINED");
    snprintf(e->precondition_type, sizeof e->precondition_type, "PAYMENT");
    snprintf(e->precondition_subject, sizeof e->precondition_subject, "%s", o->id);
    const char *code = strchr(o->cancel_reason, ':');
    code = code && code[1] == ' ' ? code + 2 : "declined";
    if (!e->nmeta)
        order_error_meta(e, "decline_code", "%s", code);
    if (detail && *detail)
        return order_fail(e, ORDER_EPRECONDITION,
                          "the payment was declined (%s); the order is %s: %s", code,
                          order_status_enum_name(o->status), detail);
    return order_fail(e, ORDER_EPRECONDITION, "the payment was declined (%s); the order is %s",
                      code, order_status_enum_name(o->status));
}

/* Replaces *o by `next` (which the caller gives up). */
static void order_replace(order_t *o, order_t *next)
{
    order_clear(o);
    *o = *next;
    memset(next, 0, sizeof *next);
}

/* A provider's refusal for good (a decline, a method or an amount it will not take, e.g.
 * KWD 10.835 on Stripe) is ORDER_EPRECONDITION: the order fails, and must not stay PENDING
 * holding stock. To the caller it is PAYMENT_DECLINED, the provider's reason as the
 * decline code. Keeps the error's metadata and message in *kept and clears the error. */
static bool take_refusal(order_ctx *ctx, int rc, order_error *kept)
{
    if (rc != ORDER_EPRECONDITION)
        return false;
    order_error *e = ctx->err;
    if (strcmp(e->reason, "PAYMENT_DECLINED") != 0) {
        char code[sizeof e->reason];
        size_t i = 0;
        for (; e->reason[i] && i + 1 < sizeof code; i++)
            code[i] = (char)tolower((unsigned char)e->reason[i]);
        code[i] = '\0';
        order_error_meta(e, "decline_code", "%s", *code ? code : "refused");
    }
    kept->nmeta = e->nmeta;
    memcpy(kept->meta_key, e->meta_key, sizeof kept->meta_key);
    memcpy(kept->meta_value, e->meta_value, sizeof kept->meta_value);
    snprintf(kept->message, sizeof kept->message, "%s", e->message);
    order_error_reset(e);
    return true;
}

/* Creates (or finds again) the payment of a freshly placed or replayed order and, with a
 * saved payment method, charges it at once: succeeded -> PAID, declined -> FAILED. */
static int pay_for_order(order_service *svc, order_ctx *ctx, const order_saved_method *saved,
                         order_t *o, order_payment_action *action)
{
    order_payments *pay = provider_of(svc, o->pay_provider);
    if (o->status != ORDER_STATUS_PENDING || !pay) {
        action->provider = o->pay_provider;
        snprintf(action->reference, sizeof action->reference, "%s", o->pay_reference);
        if (o->status == ORDER_STATUS_FAILED &&
            strncmp(o->cancel_reason, DECLINED_PREFIX, strlen(DECLINED_PREFIX)) == 0)
            return fail_declined(ctx, o, NULL);
        return ORDER_OK;
    }
    /* Create first, and keep its reference, before any money moves: a charge whose answer
     * is lost leaves an order whose payment a cancel or the sweeper can still void or
     * refund (the provider is asked), never one that owes money it does not know of. */
    order_payment_info paid = {0};
    order_error saved_meta = {0};
    int rc = pay->create(pay->self, ctx, o, saved, action, &paid);
    bool declined = take_refusal(ctx, rc, &saved_meta);
    if (rc != ORDER_OK && !declined)
        return rc;
    order_t next = {0};
    if (action->reference[0] && (strcmp(o->pay_reference, action->reference) != 0 ||
                                 o->pay_status == ORDER_PAY_UNSPECIFIED)) {
        order_amendment a = {
            .order_id = o->id,
            .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_UNSPECIFIED) | ORDER_PAY_BIT(ORDER_PAY_PENDING),
            .provider = action->provider ? action->provider : o->pay_provider,
            .reference = action->reference,
            .pay_status = ORDER_PAY_PENDING,
        };
        rc = svc->store.order_amend(svc->store.self, ctx, &a, &next);
        if (rc == ORDER_EPRECONDITION) { /* settled meanwhile: report the order as it is */
            order_error_reset(ctx->err);
            rc = ORDER_OK;
        }
        if (rc != ORDER_OK)
            return rc;
        order_replace(o, &next);
    }
    if (saved && !declined && o->status == ORDER_STATUS_PENDING &&
        o->pay_status == ORDER_PAY_PENDING && strcmp(o->pay_reference, action->reference) == 0) {
        if (!pay->charge)
            return order_fail(ctx->err, ORDER_EINVAL, "%s cannot charge a saved payment method",
                              order_provider_name(o->pay_provider));
        rc = pay->charge(pay->self, ctx, o, saved, &paid);
        declined = take_refusal(ctx, rc, &saved_meta);
        if (rc != ORDER_OK && !declined)
            return rc; /* the payment is on the order: a retry, a cancel or a webhook settles it */
    }
    if (!declined && paid.paid_at_us <= 0)
        return ORDER_OK; /* the payer pays later; ConfirmPayment or a webhook tells */

    char reason[ORDER_REASON_MAX + 1];
    const char *code = "";
    for (size_t i = 0; i < saved_meta.nmeta; i++)
        if (strcmp(saved_meta.meta_key[i], "decline_code") == 0)
            code = saved_meta.meta_value[i];
    snprintf(reason, sizeof reason, DECLINED_PREFIX ": %s", *code ? code : "declined");
    order_transition t = {
        .order_id = o->id,
        .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
        .to = declined ? ORDER_STATUS_FAILED : ORDER_STATUS_PAID,
        .expected_version = -1,
        .reason = declined ? reason : "paid with a saved payment method",
        .pay_status = declined ? ORDER_PAY_FAILED : ORDER_PAY_SUCCEEDED,
        .paid_at_us = declined ? 0 : paid.paid_at_us,
        .charge_id = declined ? NULL : paid.charge_id,
        .receipt_url = declined ? NULL : paid.receipt_url,
    };
    rc = svc->store.order_transition(svc->store.self, ctx, &t, &next);
    if (rc == ORDER_EPRECONDITION) {
        order_error_reset(ctx->err);
        rc = ORDER_OK; /* moved meanwhile (a webhook got there first): report it as it is */
    }
    if (rc != ORDER_OK)
        return rc;
    order_replace(o, &next);
    if (declined && o->status == ORDER_STATUS_FAILED && o->pay_reference[0]) {
        /* A declined intent stays open at the provider (Stripe: requires_payment_method);
         * close it, so nothing pays for a FAILED order later. Best effort, and within a
         * part of the caller's time, so that a slow provider costs the caller the void and
         * not the answer: a payment that lands anyway is refunded when it is reported
         * (refund_late). */
        order_ctx vctx;
        if (!side_ctx(ctx, VOID_DECLINED_MAX_US, &vctx) ||
            pay->cancel(pay->self, &vctx, o) != ORDER_OK)
            notice(svc, "the declined payment could not be voided; it stays open at the provider",
                   o, ctx->err);
        order_error_reset(ctx->err);
    }
    if (declined || o->status == ORDER_STATUS_FAILED) {
        ctx->err->nmeta = saved_meta.nmeta;
        memcpy(ctx->err->meta_key, saved_meta.meta_key, sizeof saved_meta.meta_key);
        memcpy(ctx->err->meta_value, saved_meta.meta_value, sizeof saved_meta.meta_value);
        if (o->status == ORDER_STATUS_FAILED)
            return fail_declined(ctx, o, saved_meta.message);
    }
    return ORDER_OK;
}

int order_place(order_service *svc, order_ctx *ctx, const order_place_cmd *cmd, order_t *out,
                order_payment_action *action, bool *replayed)
{
    order_error *e = ctx->err;
    const char *customer = "";
    *replayed = false;
    memset(action, 0, sizeof *action);

    /* A customer may only order for themselves: naming someone else is refused outright. */
    if (!order_caller_is_privileged(&ctx->caller) && cmd->customer_id && *cmd->customer_id &&
        strcmp(cmd->customer_id, ctx->caller.subject) != 0)
        return order_fail(e, ORDER_EPERM, "a customer may only place orders for themselves");

    validate_place(svc, ctx, cmd, &customer);
    /* Every violation at once: the catalogue checks (unknown or inactive products, mixed
     * currencies) join the field checks, as long as there is a sane list of lines to look
     * up and time to do it. Either way nothing is written. */
    bool invalid = e->nviolations != 0;
    if (invalid &&
        (cmd->nlines == 0 || cmd->nlines > ORDER_MAX_LINES || order_ctx_remaining_us(ctx) <= 0))
        return order_fail(e, ORDER_EINVAL, "the order is invalid: see the field violations");
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;

    order_t o = {0};
    int rc = price_lines(svc, ctx, cmd, &o);
    if (rc != ORDER_OK) {
        if (invalid) /* even if the catalogue could not be read, the request is invalid */
            rc = order_fail(e, ORDER_EINVAL, "the order is invalid: see the field violations");
        goto fail;
    }
    snprintf(o.customer_id, sizeof o.customer_id, "%s", customer);
    o.status = ORDER_STATUS_PENDING;
    o.pay_provider = cmd->provider;
    o.pay_status = ORDER_PAY_UNSPECIFIED;

    /* The fingerprint holds everything that decides the order; 100 lines fit easily. */
    size_t fpcap = 64 + ORDER_CUSTOMER_MAX + 2 * ORDER_PAYMENT_METHOD_MAX +
                   cmd->nlines * (ORDER_PRODUCT_ID_MAX + 16);
    char *fp = malloc(fpcap);
    if (!fp || !order_fingerprint(cmd, customer, fp, fpcap)) {
        free(fp);
        rc = order_fail(e, ORDER_EINTERNAL, "cannot build the request fingerprint");
        goto fail;
    }
    if (deadline_passed(ctx)) {
        free(fp);
        rc = ORDER_EDEADLINE;
        goto fail;
    }
    rc = svc->store.order_insert(svc->store.self, ctx, cmd->request_id, fp, &o, replayed);
    free(fp);
    if (rc == ORDER_EIDEMPOTENCY && !e->reason[0]) /* the contract's ErrorInfo reason */
        snprintf(e->reason, sizeof e->reason, "IDEMPOTENCY_KEY_REUSED");
    if (rc != ORDER_OK)
        goto fail;

    /* The order is committed. Create its payment (idempotent, keyed by the order), unless
     * it already moved on: a replay of a paid or cancelled order only reports it. */
    order_saved_method saved = {cmd->payment_method, cmd->payment_customer};
    rc = pay_for_order(svc, ctx, saved.method && *saved.method ? &saved : NULL, &o, action);
    if (rc != ORDER_OK)
        goto fail; /* the order stays PENDING (or FAILED on a decline); a retry completes it */
    *out = o;
    return ORDER_OK;
fail:
    order_clear(&o);
    return rc;
}

/* ---- get / list ---- */

int order_get(order_service *svc, order_ctx *ctx, const char *order_id, order_t *out)
{
    int rc = check_order_id(ctx, order_id);
    if (rc != ORDER_OK)
        return rc;
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;
    return load_visible(svc, ctx, order_id, out);
}

int order_list(order_service *svc, order_ctx *ctx, const order_list_cmd *cmd, order_t **out,
               size_t *n, bool *more)
{
    order_error *e = ctx->err;
    *out = NULL;
    *n = 0;
    *more = false;
    const char *cust = cmd->customer_id ? cmd->customer_id : "";
    if (!order_caller_is_privileged(&ctx->caller)) {
        if (*cust && strcmp(cust, ctx->caller.subject) != 0)
            return order_fail(e, ORDER_EPERM, "a customer may only list their own orders");
        cust = ctx->caller.subject;
    } else if (strlen(cust) > ORDER_CUSTOMER_MAX) {
        order_violate(e, "customer_id", "must be at most %d bytes of UTF-8", ORDER_CUSTOMER_MAX);
    }
    int32_t size = cmd->page_size;
    if (size < 0)
        order_violate(e, "page_size", "must not be negative");
    if (size == 0)
        size = ORDER_PAGE_SIZE_DEFAULT;
    if (size > ORDER_PAGE_SIZE_MAX)
        size = ORDER_PAGE_SIZE_MAX;
    unsigned set = 0;
    for (size_t i = 0; i < cmd->nstatuses; i++) {
        int s = cmd->statuses[i];
        if (s <= ORDER_STATUS_UNSPECIFIED || s > ORDER_STATUS_MAX) {
            char field[64];
            snprintf(field, sizeof field, "statuses[%zu]", i);
            order_violate(e, field, "unknown order status %d", s);
            continue;
        }
        set |= ORDER_STATUS_BIT(s);
    }
    if (cmd->has_cursor && !order_id_valid(cmd->cursor_id))
        order_violate(e, "page_token", "is not a page token of this query");
    if (e->nviolations)
        return order_fail(e, ORDER_EINVAL, "invalid list request: see the field violations");
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;

    order_list_query q = {
        .customer_id = *cust ? cust : NULL,
        .status_set = set,
        .limit = size + 1, /* one more tells whether another page follows */
        .has_cursor = cmd->has_cursor,
        .cursor_created_at_us = cmd->cursor_created_at_us,
    };
    if (cmd->has_cursor)
        snprintf(q.cursor_id, sizeof q.cursor_id, "%s", cmd->cursor_id);
    int rc = svc->store.order_list(svc->store.self, ctx, &q, out, n);
    if (rc != ORDER_OK)
        return rc;
    if (*n > (size_t)size) {
        *more = true;
        free((*out)[size].items);
        (*out)[size].items = NULL;
        *n = (size_t)size;
    }
    return ORDER_OK;
}

/* ---- cancel ---- */

/* Records a settled payment (VOIDED, or REFUNDED with its refund id) on an order that is
 * over. A void is recorded only over a payment still PENDING: if a confirmation recorded
 * the money meanwhile, it must stay SUCCEEDED so that it is refunded (now or by the
 * sweeper), never hidden under VOIDED. Someone else's record of it first is the answer. */
static int record_settled(order_service *svc, order_ctx *ctx, order_t *o, order_pay_status st,
                          const char *refund_id)
{
    order_amendment a = {.order_id = o->id, .pay_status = st};
    a.pay_from_set = st == ORDER_PAY_VOIDED
                         ? ORDER_PAY_BIT(ORDER_PAY_PENDING)
                         : ORDER_PAY_BIT(ORDER_PAY_PENDING) | ORDER_PAY_BIT(ORDER_PAY_SUCCEEDED);
    if (st == ORDER_PAY_REFUNDED) {
        a.refund_id = refund_id;
        a.refunded_at_us = now_us();
    }
    order_t updated = {0};
    int rc = svc->store.order_amend(svc->store.self, ctx, &a, &updated);
    if (rc == ORDER_EPRECONDITION)
        order_error_reset(ctx->err);
    else if (rc != ORDER_OK)
        return rc;
    order_replace(o, &updated);
    return ORDER_OK;
}

/* The provider's refusal to void because the payment succeeded (refund it instead). */
static bool already_succeeded(int rc, const order_error *e)
{
    return rc == ORDER_EPRECONDITION && strcmp(e->reason, "PAYMENT_ALREADY_SUCCEEDED") == 0;
}

/* Settles the payment of a cancelled, expired or failed order: refund what was paid, void
 * what was not. Idempotent (the provider calls are keyed by the order, the record is a
 * conditional update), so a retry, or order_settle_due, finishes what a failure left. */
static int settle_payment(order_service *svc, order_ctx *ctx, order_t *o)
{
    order_payments *pay = provider_of(svc, o->pay_provider);
    char refund_id[ORDER_REFERENCE_MAX + 1] = "";
    int rc;
    if (o->pay_status == ORDER_PAY_PENDING) {
        if (!pay)
            return ORDER_OK; /* nothing was taken; nothing to give back */
        rc = pay->cancel(pay->self, ctx, o);
        if (rc == ORDER_OK)
            return record_settled(svc, ctx, o, ORDER_PAY_VOIDED, NULL);
        if (rc == ORDER_EPRECONDITION && !already_succeeded(rc, ctx->err)) {
            /* Neither voidable nor refundable yet (Stripe: processing): it stays PENDING,
             * and order_settle_due tries again once the provider has decided. */
            notice(svc, "the payment is still being processed; it is settled later", o, ctx->err);
            order_error_reset(ctx->err);
            return ORDER_OK;
        }
        if (!already_succeeded(rc, ctx->err))
            return rc;
        /* The payment succeeded meanwhile (a confirmation raced the cancel): the order
         * stays as it is and the money goes back. */
        order_error_reset(ctx->err);
    } else if (o->pay_status != ORDER_PAY_SUCCEEDED) {
        return ORDER_OK; /* no payment, or already refunded / voided / failed */
    }
    if (!pay)
        return order_fail(ctx->err, ORDER_EUNAVAILABLE,
                          "the order's payment provider is not configured; cannot refund");
    rc = pay->refund(pay->self, ctx, o, refund_id);
    if (rc != ORDER_OK)
        return rc;
    return record_settled(svc, ctx, o, ORDER_PAY_REFUNDED, refund_id);
}

int order_cancel(order_service *svc, order_ctx *ctx, const char *order_id, const char *reason,
                 order_t *out)
{
    int rc = check_order_id(ctx, order_id);
    size_t rlen = reason ? strlen(reason) : 0;
    if (rlen > ORDER_REASON_MAX) {
        order_violate(ctx->err, "reason", "must be at most %d bytes of UTF-8 (got %zu)",
                      ORDER_REASON_MAX, rlen);
        rc = order_fail(ctx->err, ORDER_EINVAL, "invalid cancel request");
    }
    if (rc != ORDER_OK)
        return rc;
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;

    order_t cur = {0};
    rc = load_visible(svc, ctx, order_id, &cur);
    if (rc != ORDER_OK)
        return rc;
    if (cur.status == ORDER_STATUS_CANCELLED) {
        /* Already cancelled: a retry. Finish settling the payment if a failure left it. */
        rc = settle_payment(svc, ctx, &cur);
        if (rc != ORDER_OK) {
            order_clear(&cur);
            return rc;
        }
        *out = cur;
        return ORDER_OK;
    }
    if (!order_status_can_move(cur.status, ORDER_STATUS_CANCELLED)) {
        rc = fail_status(ctx, &cur, "cancel");
        order_clear(&cur);
        return rc;
    }
    order_clear(&cur);

    order_transition t = {
        .order_id = order_id,
        .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING) | ORDER_STATUS_BIT(ORDER_STATUS_PAID),
        .to = ORDER_STATUS_CANCELLED,
        .expected_version = -1,
        .reason = rlen ? reason : "cancelled",
    };
    order_t o = {0};
    rc = svc->store.order_transition(svc->store.self, ctx, &t, &o);
    if (rc == ORDER_EPRECONDITION) {
        /* Lost a race (shipped, or cancelled by someone else meanwhile). */
        if (o.status == ORDER_STATUS_CANCELLED) {
            order_error_reset(ctx->err);
            rc = settle_payment(svc, ctx, &o);
            if (rc == ORDER_OK) {
                *out = o;
                return ORDER_OK;
            }
        } else {
            rc = fail_status(ctx, &o, "cancel");
        }
        order_clear(&o);
        return rc;
    }
    if (rc != ORDER_OK)
        return rc;
    rc = settle_payment(svc, ctx, &o);
    if (rc != ORDER_OK) {
        order_clear(&o);
        return rc;
    }
    *out = o;
    return ORDER_OK;
}

/* ---- confirm payment ---- */

/*
 * A payment succeeded on an order that is CANCELLED, EXPIRED or FAILED: record the money
 * (payment SUCCEEDED, with the inbound event if any) and refund it at once. If the refund
 * fails now, order_settle_due finishes it: the order's payment stays SUCCEEDED until then.
 * Answers FAILED_PRECONDITION naming the order's status (the caller did not get a paid
 * order), or ORDER_EDUPLICATE for an event already applied.
 */
static int refund_late(order_service *svc, order_ctx *ctx, const order_t *cur,
                       const char *reference, const order_payment_info *info,
                       const order_inbound *in)
{
    order_amendment a = {
        .order_id = cur->id,
        .reference = cur->pay_reference[0] ? NULL : reference, /* the order may have missed it */
        .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_UNSPECIFIED) | ORDER_PAY_BIT(ORDER_PAY_PENDING) |
                        ORDER_PAY_BIT(ORDER_PAY_VOIDED) | ORDER_PAY_BIT(ORDER_PAY_FAILED),
        .pay_status = ORDER_PAY_SUCCEEDED,
        .paid_at_us = info->paid_at_us > 0 ? info->paid_at_us : now_us(),
        .charge_id = info->charge_id,
        .receipt_url = info->receipt_url,
        .inbound = in,
    };
    order_t o = {0};
    int rc = svc->store.order_amend(svc->store.self, ctx, &a, &o);
    if (rc == ORDER_EPRECONDITION) /* already recorded (refunded, or succeeded) */
        order_error_reset(ctx->err);
    else if (rc != ORDER_OK)
        return rc;
    /* A webhook's sender wants its answer quickly: the refund gets a share of the time,
     * the sweeper the rest. A caller of ConfirmPayment waits for it. */
    order_ctx sctx = *ctx;
    if ((in && !side_ctx(ctx, WEBHOOK_REFUND_MAX_US, &sctx)) ||
        settle_payment(svc, &sctx, &o) != ORDER_OK) {
        notice(svc, "refund of a late payment failed; it will be retried", &o, ctx->err);
        order_error_reset(ctx->err);
    }
    rc = fail_status(ctx, &o, "confirm the payment");
    snprintf(ctx->err->message, sizeof ctx->err->message,
             "the order is %s: the payment succeeded after it and is %s",
             order_status_enum_name(o.status),
             o.pay_status == ORDER_PAY_REFUNDED ? "refunded" : "being refunded");
    snprintf(ctx->err->reason, sizeof ctx->err->reason, "PAYMENT_REFUNDED");
    order_clear(&o);
    return rc;
}

int order_confirm_payment(order_service *svc, order_ctx *ctx, const char *order_id,
                          order_provider provider, const char *reference, order_t *out)
{
    order_error *e = ctx->err;
    check_order_id(ctx, order_id);
    if (provider == ORDER_PROVIDER_UNSPECIFIED || !order_provider_name(provider))
        order_violate(e, "provider", "must be LOCAL, STRIPE or PAYPAL");
    size_t rl = reference ? strlen(reference) : 0;
    if (rl == 0)
        order_violate(e, "payment_reference", "must not be empty");
    else if (rl > ORDER_REFERENCE_MAX)
        order_violate(e, "payment_reference", "must be at most %d bytes of UTF-8",
                      ORDER_REFERENCE_MAX);
    if (e->nviolations)
        return order_fail(e, ORDER_EINVAL, "invalid confirmation: see the field violations");
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;

    order_t cur = {0};
    int rc = load_visible(svc, ctx, order_id, &cur);
    if (rc != ORDER_OK)
        return rc;
    if (cur.pay_provider != provider) {
        snprintf(e->reason, sizeof e->reason, "PAYMENT_PROVIDER_MISMATCH");
        rc =
            order_fail(e, ORDER_EPRECONDITION, "the order is paid through %s, not %s",
                       order_provider_name(cur.pay_provider) ? order_provider_name(cur.pay_provider)
                                                             : "no provider",
                       order_provider_name(provider));
        order_clear(&cur);
        return rc;
    }
    /* Confirming twice is a no-op: the order already moved past PENDING with this payment. */
    if (cur.status == ORDER_STATUS_PAID || cur.status == ORDER_STATUS_SHIPPED ||
        cur.status == ORDER_STATUS_DELIVERED) {
        if (strcmp(cur.pay_reference, reference) == 0) {
            *out = cur;
            return ORDER_OK;
        }
        snprintf(e->reason, sizeof e->reason, "PAYMENT_REFERENCE_MISMATCH");
        rc = order_fail(e, ORDER_EPRECONDITION, "the order was paid with another payment");
        order_clear(&cur);
        return rc;
    }
    /* One payment per order, and orderd made it: a reference other than the order's own is
     * refused before the provider hears of it (for PayPal, asking means capturing, and a
     * caller must never capture another order's approved payment through this one). */
    if (cur.pay_reference[0] && strcmp(cur.pay_reference, reference) != 0) {
        snprintf(e->reason, sizeof e->reason, "PAYMENT_REFERENCE_MISMATCH");
        rc = order_fail(e, ORDER_EPRECONDITION,
                        "%s is not the payment of this order: confirm with the reference "
                        "PlaceOrder returned",
                        reference);
        order_clear(&cur);
        return rc;
    }
    /* A payment that succeeds on an order already cancelled, expired or failed (before its
     * payment was voided) is taken back: the order stays as it is. */
    bool late = is_terminal_unpaid(cur.status) && cur.pay_status == ORDER_PAY_PENDING;
    if (cur.status != ORDER_STATUS_PENDING && !late) {
        rc = fail_status(ctx, &cur, "confirm the payment");
        order_clear(&cur);
        return rc;
    }
    order_payments *pay = provider_of(svc, provider);
    if (!pay) {
        rc = order_fail(e, ORDER_EUNAVAILABLE, "%s payments are not available on this server",
                        order_provider_name(provider));
        order_clear(&cur);
        return rc;
    }
    if (late) {
        /* The order is over: nothing may be taken for it now, so the payment is voided
         * rather than verified (for PayPal, verifying is capturing: charging the payer).
         * Only a payment that already succeeded is verified below, recorded and refunded. */
        rc = pay->cancel(pay->self, ctx, &cur);
        if (rc == ORDER_OK)
            rc = record_settled(svc, ctx, &cur, ORDER_PAY_VOIDED, NULL);
        if (rc == ORDER_OK || (rc == ORDER_EPRECONDITION && !already_succeeded(rc, e))) {
            order_error_reset(e);
            rc = fail_status(ctx, &cur, "confirm the payment");
        }
        if (!already_succeeded(rc, e)) {
            order_clear(&cur);
            return rc;
        }
        order_error_reset(e);
    }
    /* Never trust the caller: the provider says whether this payment succeeded. */
    order_payment_info info = {0};
    rc = pay->verify(pay->self, ctx, &cur, reference, &info);
    if (rc != ORDER_OK) {
        if (late && rc == ORDER_EPRECONDITION) {
            order_error_reset(e);
            rc = fail_status(ctx, &cur, "confirm the payment");
        }
        order_clear(&cur);
        return rc;
    }
    order_t o = {0};
    if (late) {
        rc = refund_late(svc, ctx, &cur, reference, &info, NULL);
        order_clear(&cur);
        return rc;
    }
    order_transition t = {
        .order_id = order_id,
        .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
        .to = ORDER_STATUS_PAID,
        .expected_version = -1,
        .reason = "payment confirmed",
        .pay_status = ORDER_PAY_SUCCEEDED,
        .paid_at_us = info.paid_at_us > 0 ? info.paid_at_us : now_us(),
        .charge_id = info.charge_id,
        .receipt_url = info.receipt_url,
    };
    rc = svc->store.order_transition(svc->store.self, ctx, &t, &o);
    order_clear(&cur);
    if (rc == ORDER_EPRECONDITION && o.status == ORDER_STATUS_PAID &&
        strcmp(o.pay_reference, reference) == 0) {
        /* A concurrent confirmation of the same payment won: same outcome. */
        order_error_reset(e);
        rc = ORDER_OK;
    } else if (rc == ORDER_EPRECONDITION && is_terminal_unpaid(o.status)) {
        /* A concurrent cancel (or expiry) won: the money goes back. */
        order_error_reset(e);
        rc = refund_late(svc, ctx, &o, reference, &info, NULL);
        order_clear(&o);
        return rc;
    } else if (rc == ORDER_EPRECONDITION) {
        rc = fail_status(ctx, &o, "confirm the payment");
    }
    if (rc != ORDER_OK) {
        order_clear(&o);
        return rc;
    }
    *out = o;
    return ORDER_OK;
}

/* ---- status changes by services ---- */

int order_update_status(order_service *svc, order_ctx *ctx, const char *order_id, order_status to,
                        int64_t expected_version, order_t *out)
{
    order_error *e = ctx->err;
    check_order_id(ctx, order_id);
    order_status from;
    if (to == ORDER_STATUS_SHIPPED) {
        from = ORDER_STATUS_PAID;
    } else if (to == ORDER_STATUS_DELIVERED) {
        from = ORDER_STATUS_SHIPPED;
    } else {
        from = ORDER_STATUS_UNSPECIFIED;
        order_violate(e, "status", "must be ORDER_STATUS_SHIPPED or ORDER_STATUS_DELIVERED");
    }
    if (expected_version != -1 && expected_version < 1)
        order_violate(e, "expected_version", "must be at least 1");
    if (e->nviolations)
        return order_fail(e, ORDER_EINVAL, "invalid status change: see the field violations");
    if (!order_caller_is_privileged(&ctx->caller))
        return order_fail(e, ORDER_EPERM, "only services and admins change an order's status");
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;

    order_transition t = {
        .order_id = order_id,
        .from_set = ORDER_STATUS_BIT(from),
        .to = to,
        .expected_version = expected_version,
        .reason = to == ORDER_STATUS_SHIPPED ? "shipped" : "delivered",
    };
    order_t o = {0};
    int rc = svc->store.order_transition(svc->store.self, ctx, &t, &o);
    if (rc == ORDER_EPRECONDITION) {
        if (o.status == from && expected_version != -1) {
            e->current_status = o.status;
            snprintf(e->precondition_type, sizeof e->precondition_type, "ORDER_VERSION");
            snprintf(e->precondition_subject, sizeof e->precondition_subject, "%s", o.id);
            rc = order_fail(e, ORDER_EPRECONDITION, "the order is at version %lld, not %lld",
                            (long long)o.version, (long long)expected_version);
        } else {
            rc = fail_status(ctx, &o, to == ORDER_STATUS_SHIPPED ? "ship" : "deliver");
        }
        order_clear(&o);
        return rc;
    }
    if (rc != ORDER_OK)
        return rc;
    *out = o;
    return ORDER_OK;
}

/* ---- catalogue ---- */

static void check_product_id(order_error *e, const char *field, const char *id)
{
    size_t n = id ? strlen(id) : 0;
    if (n == 0) {
        order_violate(e, field, "must not be empty");
        return;
    }
    if (n > ORDER_PRODUCT_ID_MAX) {
        order_violate(e, field, "must be at most %d bytes of UTF-8", ORDER_PRODUCT_ID_MAX);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (!id_char_ok(id[i])) {
            order_violate(e, field, "may hold only letters, digits, '-', '_' and '.'");
            return;
        }
    }
}

int order_product_upsert(order_service *svc, order_ctx *ctx, const order_product *p,
                         order_product *out)
{
    order_error *e = ctx->err;
    check_product_id(e, "product.product_id", p->id);
    size_t nl = strlen(p->name);
    if (nl == 0)
        order_violate(e, "product.name", "must not be empty");
    else if (nl > ORDER_PRODUCT_NAME_MAX)
        order_violate(e, "product.name", "must be at most %d bytes of UTF-8",
                      ORDER_PRODUCT_NAME_MAX);
    if (p->unit_price_minor < 0)
        order_violate(e, "product.unit_price_minor", "must not be negative");
    else if (p->unit_price_minor > svc->cfg.max_total_minor)
        order_violate(e, "product.unit_price_minor", "must be at most %lld",
                      (long long)svc->cfg.max_total_minor);
    if (money_currency_exponent(p->currency) < 0)
        order_violate(e, "product.currency", "must be an ISO-4217 code in upper case, such as EUR");
    if (e->nviolations)
        return order_fail(e, ORDER_EINVAL, "invalid product: see the field violations");
    if (!(ctx->caller.roles & ORDER_ROLE_ADMIN))
        return order_fail(e, ORDER_EPERM, "only admins change the catalogue");
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;
    return svc->store.product_upsert(svc->store.self, ctx, p, out);
}

int order_product_get(order_service *svc, order_ctx *ctx, const char *product_id,
                      order_product *out)
{
    order_error *e = ctx->err;
    check_product_id(e, "product_id", product_id);
    if (e->nviolations)
        return order_fail(e, ORDER_EINVAL, "invalid product_id");
    if (deadline_passed(ctx))
        return ORDER_EDEADLINE;
    bool found = false;
    int rc = svc->store.products_get(svc->store.self, ctx, &product_id, 1, out, &found);
    if (rc != ORDER_OK)
        return rc;
    if (!found)
        return order_fail(e, ORDER_ENOTFOUND, "product %s not found", product_id);
    return ORDER_OK;
}

/* ---- inbound events ---- */

/* Finds the order a provider event is about: by our order id if it carries one, else by
 * the provider's reference or charge id. */
static int find_event_order(order_service *svc, order_ctx *ctx, const order_payment_event *ev,
                            order_t *out)
{
    int rc = ORDER_ENOTFOUND;
    if (ev->order_id[0] && order_id_valid(ev->order_id)) {
        rc = svc->store.order_get(svc->store.self, ctx, ev->order_id, out);
        if (rc != ORDER_ENOTFOUND)
            return rc;
        order_error_reset(ctx->err);
    }
    const char *refs[2] = {ev->reference, ev->charge_id};
    for (int i = 0; i < 2; i++) {
        if (!refs[i][0])
            continue;
        rc = svc->store.order_find_by_payment(svc->store.self, ctx, ev->provider, refs[i], out);
        if (rc != ORDER_ENOTFOUND)
            return rc;
        order_error_reset(ctx->err);
    }
    return order_fail(ctx->err, ORDER_ENOTFOUND, "event %s names no order of ours", ev->id);
}

static int event_succeeded(order_service *svc, order_ctx *ctx, const order_payment_event *ev,
                           const order_inbound *in, order_t *o)
{
    order_error *e = ctx->err;
    /* An amount the adapter could not read (no amount, a currency it does not know) is no
     * more a match than a wrong one: the order is never marked paid on trust. */
    if (ev->amount_minor < 0 || ev->amount_minor != o->total_minor ||
        strcmp(ev->currency, o->currency) != 0) {
        snprintf(e->reason, sizeof e->reason, "PAYMENT_MISMATCH");
        notice(svc, "a provider reported a payment that does not match the order", o, NULL);
        return order_fail(e, ORDER_EPRECONDITION,
                          "event %s pays %lld %s; the order is %lld %s: not marked paid", ev->id,
                          (long long)ev->amount_minor, ev->currency, (long long)o->total_minor,
                          o->currency);
    }
    order_payment_info info = {.paid_at_us =
                                   ev->occurred_at_us > 0 ? ev->occurred_at_us : now_us()};
    snprintf(info.charge_id, sizeof info.charge_id, "%s", ev->charge_id);
    snprintf(info.receipt_url, sizeof info.receipt_url, "%s", ev->receipt_url);
    for (int attempt = 0; attempt < 2; attempt++) {
        if (o->status == ORDER_STATUS_PENDING) {
            order_transition t = {
                .order_id = o->id,
                .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
                .to = ORDER_STATUS_PAID,
                .expected_version = -1,
                .reason = "payment succeeded (provider webhook)",
                .pay_status = ORDER_PAY_SUCCEEDED,
                .paid_at_us = info.paid_at_us,
                .charge_id = info.charge_id,
                .receipt_url = info.receipt_url,
                .reference = ev->reference,
                .inbound = in,
            };
            order_t next = {0};
            int rc = svc->store.order_transition(svc->store.self, ctx, &t, &next);
            if (rc == ORDER_EPRECONDITION) { /* moved meanwhile: decide again */
                order_error_reset(e);
                order_replace(o, &next);
                continue;
            }
            if (rc == ORDER_OK)
                order_replace(o, &next);
            else
                order_clear(&next);
            return rc;
        }
        if (is_terminal_unpaid(o->status) && o->pay_status != ORDER_PAY_SUCCEEDED &&
            o->pay_status != ORDER_PAY_REFUNDED) {
            int rc = refund_late(svc, ctx, o, ev->reference, &info, in);
            if (rc == ORDER_EPRECONDITION) { /* refund_late's answer to a caller; not ours */
                order_error_reset(e);
                rc = ORDER_OK;
            }
            return rc;
        }
        return ORDER_OK; /* already paid, or the money is already recorded */
    }
    return order_fail(e, ORDER_EABORTED, "order %s keeps changing; retry", o->id);
}

/*
 * The whole payment went back at the provider (a refund made in its dashboard, or a
 * refunded event overtaking its succeeded event). An order not yet shipped is cancelled
 * with it (it is no longer paid: stock goes back); a shipped one keeps its status. Either
 * way the payment is recorded REFUNDED, so a succeeded event arriving later changes
 * nothing.
 */
static int event_refunded(order_service *svc, order_ctx *ctx, const order_payment_event *ev,
                          const order_inbound *in, order_t *o)
{
    order_error *e = ctx->err;
    int64_t at = ev->occurred_at_us > 0 ? ev->occurred_at_us : now_us();
    order_t next = {0};
    int rc = ORDER_OK;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (o->status == ORDER_STATUS_PENDING || o->status == ORDER_STATUS_PAID) {
            order_transition t = {
                .order_id = o->id,
                .from_set =
                    ORDER_STATUS_BIT(ORDER_STATUS_PENDING) | ORDER_STATUS_BIT(ORDER_STATUS_PAID),
                .to = ORDER_STATUS_CANCELLED,
                .expected_version = -1,
                .reason = "refunded at the payment provider",
                .pay_status = ORDER_PAY_REFUNDED,
                .charge_id = ev->charge_id,
                .reference = ev->reference,
                .inbound = in,
            };
            rc = svc->store.order_transition(svc->store.self, ctx, &t, &next);
            if (rc == ORDER_EPRECONDITION) { /* moved meanwhile: decide again */
                order_error_reset(e);
                order_replace(o, &next);
                continue;
            }
            if (rc != ORDER_OK) {
                order_clear(&next);
                return rc;
            }
            order_replace(o, &next);
            in = NULL; /* recorded with the transition; the amendment below adds the refund */
        }
        order_amendment a = {
            .order_id = o->id,
            .pay_from_set = ORDER_PAY_BIT(ORDER_PAY_PENDING) | ORDER_PAY_BIT(ORDER_PAY_SUCCEEDED) |
                            ORDER_PAY_BIT(ORDER_PAY_VOIDED) | ORDER_PAY_BIT(ORDER_PAY_REFUNDED),
            .pay_status = ORDER_PAY_REFUNDED,
            .refund_id = ev->refund_id,
            .refunded_at_us = at,
            .inbound = in,
        };
        rc = svc->store.order_amend(svc->store.self, ctx, &a, &next);
        if (rc == ORDER_EPRECONDITION) { /* no payment to speak of: nothing to record */
            order_error_reset(e);
            rc = ORDER_OK;
        }
        if (rc == ORDER_OK)
            order_replace(o, &next);
        else
            order_clear(&next);
        return rc;
    }
    return order_fail(e, ORDER_EABORTED, "order %s keeps changing; retry", o->id);
}

int order_apply_payment_event(order_service *svc, order_ctx *ctx, const order_payment_event *ev,
                              order_t *out, bool *changed)
{
    order_error *e = ctx->err;
    if (changed)
        *changed = false;
    if (!ev->id[0])
        return order_fail(e, ORDER_EINVAL, "the event has no id");
    if (ev->kind == ORDER_PAY_EVENT_IGNORED)
        return ORDER_OK;
    order_t o = {0};
    int rc = find_event_order(svc, ctx, ev, &o);
    if (rc != ORDER_OK)
        return rc;
    if (o.pay_provider != ev->provider ||
        (ev->reference[0] && o.pay_reference[0] && strcmp(ev->reference, o.pay_reference) != 0)) {
        snprintf(e->reason, sizeof e->reason, "PAYMENT_REFERENCE_MISMATCH");
        rc = order_fail(e, ORDER_EPRECONDITION, "event %s is about another payment of order %s",
                        ev->id, o.id);
        order_clear(&o);
        return rc;
    }
    order_inbound in = {ORDER_INBOUND_PROVIDER, ev->id};
    bool seen = false;
    rc = svc->store.inbound_seen(svc->store.self, ctx, &in, &seen);
    if (rc == ORDER_OK && seen)
        rc = order_fail(e, ORDER_EDUPLICATE, "event %s was already applied", ev->id);
    if (rc != ORDER_OK) {
        order_clear(&o);
        return rc;
    }
    order_t next = {0};
    switch (ev->kind) {
    case ORDER_PAY_EVENT_SUCCEEDED:
        rc = event_succeeded(svc, ctx, ev, &in, &o);
        break;
    case ORDER_PAY_EVENT_DENIED:
    case ORDER_PAY_EVENT_CANCELED: {
        if (o.status != ORDER_STATUS_PENDING) {
            rc = ORDER_OK; /* it already ended another way (a cancel voids its own payment) */
            break;
        }
        char reason[ORDER_REASON_MAX + 1];
        if (ev->kind == ORDER_PAY_EVENT_DENIED)
            snprintf(reason, sizeof reason, DECLINED_PREFIX ": %s",
                     ev->failure_code[0] ? ev->failure_code : "denied");
        else
            snprintf(reason, sizeof reason, "payment canceled at the provider");
        order_transition t = {
            .order_id = o.id,
            .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
            .to = ORDER_STATUS_FAILED,
            .expected_version = -1,
            .reason = reason,
            .pay_status = ev->kind == ORDER_PAY_EVENT_DENIED ? ORDER_PAY_FAILED : ORDER_PAY_VOIDED,
            .inbound = &in,
        };
        rc = svc->store.order_transition(svc->store.self, ctx, &t, &next);
        if (rc == ORDER_EPRECONDITION) { /* it moved on meanwhile; the event no longer applies */
            order_error_reset(e);
            rc = ORDER_OK;
        }
        if (rc == ORDER_OK)
            order_replace(&o, &next);
        break;
    }
    case ORDER_PAY_EVENT_REFUNDED:
        if (!ev->full_refund || o.pay_status == ORDER_PAY_REFUNDED) {
            rc = ORDER_OK; /* partial refunds are the provider's business; recorded in logs */
            break;
        }
        rc = event_refunded(svc, ctx, ev, &in, &o);
        break;
    case ORDER_PAY_EVENT_FAILED:
    default:
        /* An attempt failed; the payer may try again. Expiry ends the order otherwise. */
        notice(svc, "a payment attempt failed at the provider", &o, NULL);
        rc = ORDER_OK;
        break;
    }
    order_clear(&next);
    if (rc == ORDER_OK && changed) {
        /* The event's id is recorded with its effect, and only when it had one. */
        bool applied = false;
        if (svc->store.inbound_seen(svc->store.self, ctx, &in, &applied) == ORDER_OK)
            *changed = applied;
        else
            order_error_reset(e); /* the effect is committed; only the count is unsure */
    }
    if (rc == ORDER_OK && out)
        *out = o;
    else
        order_clear(&o);
    return rc;
}

/* Drops an incomplete UTF-8 sequence that a byte-bounded cut (%.Ns) left at the end of s,
 * so that the text stays valid for PostgreSQL. s is valid UTF-8 up to the cut. */
static void utf8_trim_cut(char *s)
{
    size_t n = strlen(s), i = n, cont = 0;
    while (i > 0 && cont < 3 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) {
        i--;
        cont++;
    }
    if (i == 0)
        return;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t want = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    if (lead >= 0xC0 && cont < want)
        s[i - 1] = '\0';
}

int order_apply_stock_reply(order_service *svc, order_ctx *ctx, const order_stock_reply *r)
{
    order_error *e = ctx->err;
    size_t idl = r->id ? strlen(r->id) : 0;
    if (idl == 0 || idl > ORDER_REFERENCE_MAX)
        order_violate(e, "event_id", "must be 1 to %d characters", ORDER_REFERENCE_MAX);
    if (!r->order_id || !order_id_valid(r->order_id))
        order_violate(e, "order_id", "must be a UUID");
    if (e->nviolations)
        return order_fail(e, ORDER_EINVAL, "malformed inventory reply");
    order_inbound in = {ORDER_INBOUND_INVENTORY, r->id};
    order_t o = {0};
    bool seen = false;
    int rc = svc->store.inbound_seen(svc->store.self, ctx, &in, &seen);
    if (rc != ORDER_OK)
        return rc;
    if (seen)
        return order_fail(e, ORDER_EDUPLICATE, "reply %s was already applied", r->id);
    if (!r->rejected) {
        order_amendment a = {
            .order_id = r->order_id, .stock_reserved_at_us = now_us(), .inbound = &in};
        rc = svc->store.order_amend(svc->store.self, ctx, &a, &o);
        order_clear(&o);
        return rc;
    }
    char reason[ORDER_REASON_MAX + 1];
    snprintf(reason, sizeof reason, "stock rejected: %.470s",
             r->reason && *r->reason ? r->reason : "no reason given");
    utf8_trim_cut(reason);
    order_transition t = {
        .order_id = r->order_id,
        .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
        .to = ORDER_STATUS_FAILED,
        .expected_version = -1,
        .reason = reason,
        .inbound = &in,
    };
    rc = svc->store.order_transition(svc->store.self, ctx, &t, &o);
    if (rc == ORDER_EPRECONDITION && o.status == ORDER_STATUS_PAID && o.stock_reserved_at_us == 0) {
        /* Paid before the inventory answered, and there is no stock for it: the goods cannot
         * ship, so the order is cancelled and the money goes back (stock.restore follows,
         * which the inventory treats as a no-op for a rejected reservation). */
        order_error_reset(e);
        order_transition c = t;
        c.from_set = ORDER_STATUS_BIT(ORDER_STATUS_PAID);
        c.to = ORDER_STATUS_CANCELLED;
        order_t paid = o;
        memset(&o, 0, sizeof o);
        rc = svc->store.order_transition(svc->store.self, ctx, &c, &o);
        order_clear(&paid);
        if (rc == ORDER_OK) {
            notice(svc, "stock rejected for a paid order: cancelled, the payment is refunded", &o,
                   NULL);
            goto settle;
        }
    }
    if (rc == ORDER_EPRECONDITION) {
        /* Cancelled, expired, failed or shipped first, or its stock was confirmed before:
         * nothing to undo here. */
        if (o.status != ORDER_STATUS_FAILED && o.status != ORDER_STATUS_CANCELLED)
            notice(svc, "stock rejected for an order that can no longer change", &o, NULL);
        order_error_reset(e);
        order_clear(&o);
        return ORDER_OK;
    }
    if (rc != ORDER_OK) {
        order_clear(&o);
        return rc;
    }
settle:
    /* Committed: void (or refund) the payment now; order_settle_due finishes it if the
     * provider fails. */
    if (settle_payment(svc, ctx, &o) != ORDER_OK) {
        notice(svc, "settling the payment of an order without stock failed; it will be retried", &o,
               e);
        order_error_reset(e);
    }
    order_clear(&o);
    return ORDER_OK;
}

/* ---- background work ---- */

int order_expire_due(order_service *svc, order_ctx *ctx, int64_t pending_ttl_us, size_t max,
                     size_t *expired)
{
    *expired = 0;
    char reason[96];
    snprintf(reason, sizeof reason, "expired: unpaid for %lld s",
             (long long)(pending_ttl_us / 1000000));
    order_t *orders = NULL;
    size_t n = 0;
    int rc = svc->store.orders_expire_due(svc->store.self, ctx, now_us() - pending_ttl_us, reason,
                                          max, &orders, &n);
    if (rc != ORDER_OK)
        return rc;
    *expired = n;
    for (size_t i = 0; i < n; i++) {
        if (settle_payment(svc, ctx, &orders[i]) != ORDER_OK) {
            notice(svc, "voiding the payment of an expired order failed; it will be retried",
                   &orders[i], ctx->err);
            order_error_reset(ctx->err);
        }
    }
    order_list_free(orders, n);
    return ORDER_OK;
}

int order_settle_due(order_service *svc, order_ctx *ctx, int64_t min_age_us, size_t max,
                     size_t *settled)
{
    *settled = 0;
    order_t *orders = NULL;
    size_t n = 0;
    int rc =
        svc->store.orders_unsettled(svc->store.self, ctx, now_us() - min_age_us, max, &orders, &n);
    if (rc != ORDER_OK)
        return rc;
    for (size_t i = 0; i < n; i++) {
        if (settle_payment(svc, ctx, &orders[i]) == ORDER_OK) {
            (*settled)++;
        } else {
            notice(svc, "settling an order's payment failed; it will be retried", &orders[i],
                   ctx->err);
            order_error_reset(ctx->err);
        }
    }
    order_list_free(orders, n);
    return ORDER_OK;
}
