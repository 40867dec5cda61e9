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

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ---- */

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
        order_violate(e, "request_id", "must be at most %d characters (got %zu)",
                      ORDER_REQUEST_ID_MAX, len);

    const char *cust = cmd->customer_id ? cmd->customer_id : "";
    if (order_caller_is_privileged(&ctx->caller)) {
        size_t cl = strlen(cust);
        if (cl == 0)
            order_violate(e, "customer_id", "must be set when a service or admin places an order");
        else if (cl > ORDER_CUSTOMER_MAX)
            order_violate(e, "customer_id", "must be at most %d characters", ORDER_CUSTOMER_MAX);
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
            order_violate(e, field, "must be at most %d characters", ORDER_PRODUCT_ID_MAX);
        }
        int32_t q = cmd->lines[i].quantity;
        if (q < ORDER_MIN_QUANTITY || q > ORDER_MAX_QUANTITY) {
            snprintf(field, sizeof field, "items[%zu].quantity", i);
            order_violate(e, field, "must be between %d and %d (got %d)", ORDER_MIN_QUANTITY,
                          ORDER_MAX_QUANTITY, (int)q);
        }
    }

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
    size_t fpcap = 64 + ORDER_CUSTOMER_MAX + cmd->nlines * (ORDER_PRODUCT_ID_MAX + 16);
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
    order_payments *pay = provider_of(svc, o.pay_provider);
    if (o.status == ORDER_STATUS_PENDING && pay) {
        rc = pay->create(pay->self, ctx, &o, action);
        if (rc != ORDER_OK)
            goto fail; /* the order stays PENDING; the same request retried completes it */
        if (strcmp(o.pay_reference, action->reference) != 0 ||
            o.pay_status == ORDER_PAY_UNSPECIFIED) {
            order_t updated = {0};
            rc = svc->store.order_set_payment(svc->store.self, ctx, o.id, action->provider,
                                              action->reference, ORDER_PAY_PENDING, &updated);
            if (rc != ORDER_OK)
                goto fail;
            order_clear(&o);
            o = updated;
        }
    } else {
        action->provider = o.pay_provider;
        snprintf(action->reference, sizeof action->reference, "%s", o.pay_reference);
    }
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
        order_violate(e, "customer_id", "must be at most %d characters", ORDER_CUSTOMER_MAX);
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

/* Settles the payment of a cancelled order: refund what was paid, void what was not.
 * Idempotent, so a CancelOrder retried after a provider failure finishes the job. */
static int settle_cancelled(order_service *svc, order_ctx *ctx, order_t *o)
{
    order_payments *pay = provider_of(svc, o->pay_provider);
    order_pay_status to;
    int rc;
    if (o->pay_status == ORDER_PAY_SUCCEEDED) {
        if (!pay)
            return order_fail(ctx->err, ORDER_EUNAVAILABLE,
                              "the order's payment provider is not configured; cannot refund");
        rc = pay->refund(pay->self, ctx, o);
        to = ORDER_PAY_REFUNDED;
    } else if (o->pay_status == ORDER_PAY_PENDING) {
        if (!pay)
            return ORDER_OK; /* nothing was taken; nothing to give back */
        rc = pay->cancel(pay->self, ctx, o);
        to = ORDER_PAY_VOIDED;
        if (rc == ORDER_EPRECONDITION) {
            /* The payment succeeded meanwhile (a confirmation raced the cancel): the
             * order stays cancelled and the money goes back. */
            order_error_reset(ctx->err);
            rc = pay->refund(pay->self, ctx, o);
            to = ORDER_PAY_REFUNDED;
        }
    } else {
        return ORDER_OK; /* no payment, or already refunded / voided */
    }
    if (rc != ORDER_OK)
        return rc;
    order_t updated = {0};
    rc = svc->store.order_set_payment(svc->store.self, ctx, o->id, o->pay_provider,
                                      o->pay_reference, to, &updated);
    if (rc != ORDER_OK)
        return rc;
    order_clear(o);
    *o = updated;
    return ORDER_OK;
}

int order_cancel(order_service *svc, order_ctx *ctx, const char *order_id, const char *reason,
                 order_t *out)
{
    int rc = check_order_id(ctx, order_id);
    size_t rlen = reason ? strlen(reason) : 0;
    if (rlen > ORDER_REASON_MAX) {
        order_violate(ctx->err, "reason", "must be at most %d characters (got %zu)",
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
        rc = settle_cancelled(svc, ctx, &cur);
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
            rc = settle_cancelled(svc, ctx, &o);
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
    rc = settle_cancelled(svc, ctx, &o);
    if (rc != ORDER_OK) {
        order_clear(&o);
        return rc;
    }
    *out = o;
    return ORDER_OK;
}

/* ---- confirm payment ---- */

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
        order_violate(e, "payment_reference", "must be at most %d characters", ORDER_REFERENCE_MAX);
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
    if (cur.status != ORDER_STATUS_PENDING) {
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
    /* Never trust the caller: the provider says whether this payment succeeded. */
    int64_t paid_at = 0;
    rc = pay->verify(pay->self, ctx, &cur, reference, &paid_at);
    if (rc != ORDER_OK) {
        order_clear(&cur);
        return rc;
    }
    order_t o = {0};
    order_transition t = {
        .order_id = order_id,
        .from_set = ORDER_STATUS_BIT(ORDER_STATUS_PENDING),
        .to = ORDER_STATUS_PAID,
        .expected_version = -1,
        .reason = "payment confirmed",
        .pay_status = ORDER_PAY_SUCCEEDED,
        .paid_at_us = paid_at,
    };
    rc = svc->store.order_transition(svc->store.self, ctx, &t, &o);
    if (rc == ORDER_EPRECONDITION && o.status == ORDER_STATUS_PAID &&
        strcmp(o.pay_reference, reference) == 0) {
        /* A concurrent confirmation of the same payment won: same outcome. */
        order_error_reset(e);
        rc = ORDER_OK;
    } else if (rc == ORDER_EPRECONDITION) {
        rc = fail_status(ctx, &o, "confirm the payment");
    }
    /* The payment succeeded but a concurrent cancel won: the order stays cancelled and the
     * money goes back (settle_cancelled does the same from the cancel side; both are
     * idempotent). The caller still hears FAILED_PRECONDITION: the order is cancelled. */
    if (rc == ORDER_EPRECONDITION && o.status == ORDER_STATUS_CANCELLED) {
        order_error *saved = malloc(sizeof *saved);
        if (saved) {
            *saved = *e;
            order_error_reset(e);
            if (settle_cancelled(svc, ctx, &o) != ORDER_OK)
                order_error_reset(e);
            *e = *saved;
            free(saved);
        }
    }
    order_clear(&cur);
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
        order_violate(e, field, "must be at most %d characters", ORDER_PRODUCT_ID_MAX);
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
        order_violate(e, "product.name", "must be at most %d characters", ORDER_PRODUCT_NAME_MAX);
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
