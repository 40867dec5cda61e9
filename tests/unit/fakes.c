/* fakes.c — in-memory order_store and order_payments for the unit tests (see fakes.h). */
#include "unit/fakes.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

/* Grows a heap array to hold one more element; aborts the test if memory runs out. */
#define PUSH(arr, n, cap)                                                                          \
    do {                                                                                           \
        if ((n) == (cap)) {                                                                        \
            size_t ncap_ = (cap) ? (cap)*2 : 8;                                                    \
            void *p_ = realloc((arr), ncap_ * sizeof *(arr));                                      \
            assert_non_null(p_);                                                                   \
            (arr) = p_;                                                                            \
            (cap) = ncap_;                                                                         \
        }                                                                                          \
        memset(&(arr)[(n)], 0, sizeof *(arr));                                                     \
        (n)++;                                                                                     \
    } while (0)

static void copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

static void copy_order(order_t *dst, const order_t *src)
{
    assert_int_equal(order_copy(dst, src), ORDER_OK);
}

/* ---- the store ---- */

/* Common entry of every port function: count, then refuse as the real store would. */
static int store_enter(fake_store *fs, order_ctx *ctx, enum fake_store_op op)
{
    fs->calls[op]++;
    if (fs->hook && fs->hook_op == op) {
        void (*hook)(void *) = fs->hook;
        fs->hook = NULL; /* one-shot, and the hook may call back into the store */
        hook(fs->hook_arg);
    }
    if (fs->down)
        return order_fail(ctx->err, ORDER_EUNAVAILABLE, "database unreachable (fake store down)");
    if (fs->fail[op] > 0) {
        fs->fail[op]--;
        return order_fail(ctx->err, fs->fail_code, "injected store failure");
    }
    if (order_ctx_remaining_us(ctx) <= 0)
        return order_fail(ctx->err, ORDER_EDEADLINE, "deadline exceeded in the store");
    return ORDER_OK;
}

static int64_t store_tick(fake_store *fs)
{
    fs->now_us += fs->step_us;
    return fs->now_us;
}

static order_t *find_order(const fake_store *fs, const char *id)
{
    for (size_t i = 0; i < fs->norders; i++)
        if (strcmp(fs->orders[i].id, id) == 0)
            return &fs->orders[i];
    return NULL;
}

static order_product *find_product(const fake_store *fs, const char *id)
{
    for (size_t i = 0; i < fs->nproducts; i++)
        if (strcmp(fs->products[i].id, id) == 0)
            return &fs->products[i];
    return NULL;
}

static void add_history(fake_store *fs, const char *order_id, const char *actor, order_status from,
                        order_status to, const char *reason, int64_t at)
{
    PUSH(fs->history, fs->nhistory, fs->cap_history);
    fake_history *h = &fs->history[fs->nhistory - 1];
    copy_str(h->order_id, sizeof h->order_id, order_id);
    copy_str(h->actor, sizeof h->actor, actor);
    h->from = from;
    h->to = to;
    copy_str(h->reason, sizeof h->reason, reason);
    h->at_us = at;
}

static int fs_products_get(void *self, order_ctx *ctx, const char *const *ids, size_t n,
                           order_product *out, bool *found)
{
    fake_store *fs = self;
    int rc = store_enter(fs, ctx, FAKE_PRODUCTS_GET);
    if (rc != ORDER_OK)
        return rc;
    for (size_t i = 0; i < n; i++) {
        assert_non_null(ids[i]); /* the port takes strings, never NULL */
        const order_product *p = find_product(fs, ids[i]);
        found[i] = p != NULL;
        if (p)
            out[i] = *p;
    }
    return ORDER_OK;
}

static int fs_product_upsert(void *self, order_ctx *ctx, const order_product *p, order_product *out)
{
    fake_store *fs = self;
    int rc = store_enter(fs, ctx, FAKE_PRODUCT_UPSERT);
    if (rc != ORDER_OK)
        return rc;
    fake_store_put_product(fs, p->id, p->name, p->unit_price_minor, p->currency, p->active);
    *out = *find_product(fs, p->id);
    return ORDER_OK;
}

static void assign_id(fake_store *fs, order_t *o)
{
    fs->next_id++;
    /* Fixed-width hex: ids sort in creation order, which the tie-break tests rely on. */
    snprintf(o->id, sizeof o->id, "%08x-0000-4000-8000-%012x", fs->next_id, fs->next_id);
}

static int fs_order_insert(void *self, order_ctx *ctx, const char *request_id,
                           const char *fingerprint, order_t *o, bool *replayed)
{
    fake_store *fs = self;
    *replayed = false;
    int rc = store_enter(fs, ctx, FAKE_ORDER_INSERT);
    if (rc != ORDER_OK)
        return rc;
    for (size_t i = 0; i < fs->nkeys; i++) {
        fake_idem_key *k = &fs->keys[i];
        if (strcmp(k->subject, ctx->caller.subject) != 0 || strcmp(k->request_id, request_id) != 0)
            continue;
        if (strcmp(k->fingerprint, fingerprint) != 0)
            /* Code and words only: the ErrorInfo reason is the domain's to set. */
            return order_fail(ctx->err, ORDER_EIDEMPOTENCY,
                              "request_id %s was already used with another request", request_id);
        order_clear(o);
        copy_order(o, find_order(fs, k->order_id));
        *replayed = true;
        return ORDER_OK;
    }

    int64_t now = store_tick(fs);
    assign_id(fs, o);
    o->status = ORDER_STATUS_PENDING;
    o->version = 1;
    o->created_at_us = now;
    o->updated_at_us = now;
    PUSH(fs->orders, fs->norders, fs->cap_orders);
    copy_order(&fs->orders[fs->norders - 1], o);

    PUSH(fs->keys, fs->nkeys, fs->cap_keys);
    fake_idem_key *k = &fs->keys[fs->nkeys - 1];
    copy_str(k->subject, sizeof k->subject, ctx->caller.subject);
    copy_str(k->request_id, sizeof k->request_id, request_id);
    k->fingerprint = strdup(fingerprint);
    assert_non_null(k->fingerprint);
    copy_str(k->order_id, sizeof k->order_id, o->id);

    add_history(fs, o->id, ctx->caller.subject, ORDER_STATUS_UNSPECIFIED, ORDER_STATUS_PENDING,
                "placed", now);
    return ORDER_OK;
}

/* The store's own words for a missing order, deliberately unlike the domain's, so that the
 * tests see whether the domain answers "missing" and "not yours" alike by itself. */
static int not_found(order_ctx *ctx, const char *id)
{
    return order_fail(ctx->err, ORDER_ENOTFOUND, "no row in orders for id=%s", id);
}

static int fs_order_get(void *self, order_ctx *ctx, const char *order_id, order_t *out)
{
    fake_store *fs = self;
    int rc = store_enter(fs, ctx, FAKE_ORDER_GET);
    if (rc != ORDER_OK)
        return rc;
    assert_null(out->items); /* "*out must be empty" */
    const order_t *o = find_order(fs, order_id);
    if (!o)
        return not_found(ctx, order_id);
    copy_order(out, o);
    return ORDER_OK;
}

/* (created_at DESC, id DESC): negative if a comes first. */
static int list_cmp(const order_t *a, const order_t *b)
{
    if (a->created_at_us != b->created_at_us)
        return a->created_at_us > b->created_at_us ? -1 : 1;
    return -strcmp(a->id, b->id);
}

static int list_qsort_cmp(const void *a, const void *b)
{
    return list_cmp(*(const order_t *const *)a, *(const order_t *const *)b);
}

static int fs_order_list(void *self, order_ctx *ctx, const order_list_query *q, order_t **out,
                         size_t *n)
{
    fake_store *fs = self;
    *out = NULL;
    *n = 0;
    fs->last_list = *q;
    copy_str(fs->last_list_customer, sizeof fs->last_list_customer, q->customer_id);
    fs->last_list.customer_id = q->customer_id ? fs->last_list_customer : NULL;
    int rc = store_enter(fs, ctx, FAKE_ORDER_LIST);
    if (rc != ORDER_OK)
        return rc;
    assert_in_range(q->limit, 1, ORDER_PAGE_SIZE_MAX + 1);

    const order_t **match = calloc(fs->norders + 1, sizeof *match);
    assert_non_null(match);
    size_t m = 0;
    order_t cursor = {0};
    cursor.created_at_us = q->cursor_created_at_us;
    copy_str(cursor.id, sizeof cursor.id, q->cursor_id);
    for (size_t i = 0; i < fs->norders; i++) {
        const order_t *o = &fs->orders[i];
        if (q->customer_id && strcmp(o->customer_id, q->customer_id) != 0)
            continue;
        if (q->status_set && !(q->status_set & ORDER_STATUS_BIT(o->status)))
            continue;
        if (q->has_cursor && list_cmp(o, &cursor) <= 0)
            continue; /* strictly after the cursor */
        match[m++] = o;
    }
    qsort(match, m, sizeof *match, list_qsort_cmp);
    if (m > (size_t)q->limit)
        m = (size_t)q->limit;
    if (m) {
        *out = calloc(m, sizeof **out);
        assert_non_null(*out);
        for (size_t i = 0; i < m; i++)
            copy_order(&(*out)[i], match[i]);
    }
    *n = m;
    free(match);
    return ORDER_OK;
}

/* The real store refuses a malformed inbound event as a bug (ORDER_EINTERNAL); here the
 * domain must never send one. */
static void check_inbound(const order_inbound *in)
{
    if (!in)
        return;
    assert_true(in->kind == ORDER_INBOUND_PROVIDER || in->kind == ORDER_INBOUND_INVENTORY);
    assert_non_null(in->id);
    assert_true(in->id[0] != '\0');
}

bool fake_store_seen(const fake_store *fs, order_inbound_kind kind, const char *id)
{
    for (size_t i = 0; i < fs->nseen; i++)
        if (fs->seen[i].kind == kind && strcmp(fs->seen[i].id, id) == 0)
            return true;
    return false;
}

static bool inbound_seen(const fake_store *fs, const order_inbound *in)
{
    return in && fake_store_seen(fs, in->kind, in->id);
}

static void record_inbound(fake_store *fs, const order_inbound *in)
{
    if (!in)
        return;
    PUSH(fs->seen, fs->nseen, fs->cap_seen);
    fs->seen[fs->nseen - 1].kind = in->kind;
    copy_str(fs->seen[fs->nseen - 1].id, sizeof fs->seen[0].id, in->id);
}

static int duplicate(order_ctx *ctx, const order_inbound *in)
{
    return order_fail(ctx->err, ORDER_EDUPLICATE, "event %s was already applied", in->id);
}

/* Sets dst to src unless src is NULL or "" (the real store's NULL-keeps). */
static void set_opt(char *dst, size_t cap, const char *src)
{
    if (src && *src)
        copy_str(dst, cap, src);
}

static int fs_order_transition(void *self, order_ctx *ctx, const order_transition *t, order_t *out)
{
    fake_store *fs = self;
    int rc = store_enter(fs, ctx, FAKE_ORDER_TRANSITION);
    if (rc != ORDER_OK)
        return rc;
    /* The domain must only ever ask for moves the state machine allows. */
    assert_int_not_equal(t->from_set, 0);
    for (int s = 0; s <= ORDER_STATUS_MAX; s++)
        if (t->from_set & ORDER_STATUS_BIT(s))
            assert_true(order_status_can_move((order_status)s, t->to));
    check_inbound(t->inbound);

    order_t *o = find_order(fs, t->order_id);
    if (!o)
        return not_found(ctx, t->order_id);
    if (inbound_seen(fs, t->inbound)) {
        copy_order(out, o);
        return duplicate(ctx, t->inbound);
    }
    if (!(t->from_set & ORDER_STATUS_BIT(o->status)) ||
        (t->expected_version != -1 && t->expected_version != o->version)) {
        copy_order(out, o);
        ctx->err->current_status = o->status;
        snprintf(ctx->err->precondition_subject, sizeof ctx->err->precondition_subject, "%s",
                 o->id);
        snprintf(ctx->err->precondition_type, sizeof ctx->err->precondition_type, "%s",
                 (t->from_set & ORDER_STATUS_BIT(o->status)) ? "ORDER_VERSION" : "ORDER_STATUS");
        return order_fail(ctx->err, ORDER_EPRECONDITION,
                          "conditional update matched no row (status %s, version %lld)",
                          order_status_name(o->status), (long long)o->version);
    }
    int64_t now = store_tick(fs);
    order_status from = o->status;
    o->status = t->to;
    o->version++;
    o->updated_at_us = now;
    /* As the real store: the reason is kept on the order when it ends without being paid. */
    if ((t->to == ORDER_STATUS_CANCELLED || t->to == ORDER_STATUS_EXPIRED ||
         t->to == ORDER_STATUS_FAILED) &&
        t->reason)
        copy_str(o->cancel_reason, sizeof o->cancel_reason, t->reason);
    if (t->pay_status != ORDER_PAY_UNSPECIFIED)
        o->pay_status = t->pay_status;
    if (t->paid_at_us > 0)
        o->paid_at_us = t->paid_at_us;
    set_opt(o->pay_charge_id, sizeof o->pay_charge_id, t->charge_id);
    if (!o->pay_reference[0])
        set_opt(o->pay_reference, sizeof o->pay_reference, t->reference);
    set_opt(o->pay_receipt_url, sizeof o->pay_receipt_url, t->receipt_url);
    add_history(fs, o->id, ctx->caller.subject, from, t->to, t->reason, now);
    record_inbound(fs, t->inbound);
    copy_order(out, o);
    return ORDER_OK;
}

static int fs_inbound_seen(void *self, order_ctx *ctx, const order_inbound *in, bool *seen)
{
    fake_store *fs = self;
    *seen = false;
    int rc = store_enter(fs, ctx, FAKE_INBOUND_SEEN);
    if (rc != ORDER_OK)
        return rc;
    check_inbound(in);
    *seen = inbound_seen(fs, in);
    return ORDER_OK;
}

static int fs_order_amend(void *self, order_ctx *ctx, const order_amendment *a, order_t *out)
{
    fake_store *fs = self;
    int rc = store_enter(fs, ctx, FAKE_ORDER_AMEND);
    if (rc != ORDER_OK)
        return rc;
    check_inbound(a->inbound);
    order_t *o = find_order(fs, a->order_id);
    if (!o)
        return not_found(ctx, a->order_id);
    if (inbound_seen(fs, a->inbound)) {
        copy_order(out, o);
        return duplicate(ctx, a->inbound);
    }
    if (a->pay_from_set && !(a->pay_from_set & ORDER_PAY_BIT(o->pay_status))) {
        copy_order(out, o);
        order_error *e = ctx->err;
        e->current_status = o->status;
        snprintf(e->precondition_type, sizeof e->precondition_type, "PAYMENT_STATUS");
        snprintf(e->precondition_subject, sizeof e->precondition_subject, "%s", o->id);
        const char *ps = order_pay_status_name(o->pay_status);
        return order_fail(e, ORDER_EPRECONDITION, "the order's payment is %s",
                          ps ? ps : "not set up");
    }
    if (a->provider != ORDER_PROVIDER_UNSPECIFIED)
        o->pay_provider = a->provider;
    set_opt(o->pay_reference, sizeof o->pay_reference, a->reference);
    if (a->pay_status != ORDER_PAY_UNSPECIFIED)
        o->pay_status = a->pay_status;
    if (a->paid_at_us > 0)
        o->paid_at_us = a->paid_at_us;
    set_opt(o->pay_charge_id, sizeof o->pay_charge_id, a->charge_id);
    set_opt(o->pay_receipt_url, sizeof o->pay_receipt_url, a->receipt_url);
    set_opt(o->refund_id, sizeof o->refund_id, a->refund_id);
    if (a->refunded_at_us > 0)
        o->refunded_at_us = a->refunded_at_us;
    if (a->stock_reserved_at_us > 0)
        o->stock_reserved_at_us = a->stock_reserved_at_us;
    o->version++;
    o->updated_at_us = store_tick(fs);
    record_inbound(fs, a->inbound);
    copy_order(out, o);
    return ORDER_OK;
}

static int fs_order_find_by_payment(void *self, order_ctx *ctx, order_provider p, const char *ref,
                                    order_t *out)
{
    fake_store *fs = self;
    int rc = store_enter(fs, ctx, FAKE_ORDER_FIND_BY_PAYMENT);
    if (rc != ORDER_OK)
        return rc;
    const order_t *best = NULL;
    for (size_t i = 0; ref && *ref && i < fs->norders; i++) {
        const order_t *o = &fs->orders[i];
        if (o->pay_provider != p ||
            (strcmp(o->pay_reference, ref) != 0 && strcmp(o->pay_charge_id, ref) != 0))
            continue;
        if (!best || o->created_at_us < best->created_at_us) /* the oldest, as the real one */
            best = o;
    }
    if (!best)
        return order_fail(ctx->err, ORDER_ENOTFOUND, "no %s payment %s",
                          order_provider_name(p) ? order_provider_name(p) : "?", ref ? ref : "");
    copy_order(out, best);
    return ORDER_OK;
}

/* The sort keys of pick_orders. */
static int64_t key_created(const order_t *o)
{
    return o->created_at_us;
}
static int64_t key_updated(const order_t *o)
{
    return o->updated_at_us;
}

/* Indexes of the orders matching `want`, oldest `key` first (ties: insertion order), at
 * most max (0 counts as 1, as in the real store). *n gets how many. */
static size_t *pick_orders(const fake_store *fs, bool (*want)(const order_t *, int64_t),
                           int64_t arg, int64_t (*key)(const order_t *), size_t max, size_t *n)
{
    size_t *idx = calloc(fs->norders + 1, sizeof *idx);
    assert_non_null(idx);
    size_t m = 0;
    for (size_t i = 0; i < fs->norders; i++)
        if (want(&fs->orders[i], arg))
            idx[m++] = i;
    for (size_t i = 1; i < m; i++) /* insertion sort: stable */
        for (size_t j = i; j > 0 && key(&fs->orders[idx[j]]) < key(&fs->orders[idx[j - 1]]); j--) {
            size_t t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
    if (max == 0)
        max = 1;
    *n = m < max ? m : max;
    return idx;
}

static bool want_expiring(const order_t *o, int64_t created_before_us)
{
    return o->status == ORDER_STATUS_PENDING && o->created_at_us < created_before_us;
}

static bool want_unsettled(const order_t *o, int64_t changed_before_us)
{
    return (o->status == ORDER_STATUS_CANCELLED || o->status == ORDER_STATUS_EXPIRED ||
            o->status == ORDER_STATUS_FAILED) &&
           (o->pay_status == ORDER_PAY_PENDING || o->pay_status == ORDER_PAY_SUCCEEDED) &&
           o->updated_at_us < changed_before_us;
}

static int fs_orders_expire_due(void *self, order_ctx *ctx, int64_t created_before_us,
                                const char *reason, size_t max, order_t **out, size_t *n)
{
    fake_store *fs = self;
    *out = NULL;
    *n = 0;
    int rc = store_enter(fs, ctx, FAKE_ORDERS_EXPIRE_DUE);
    if (rc != ORDER_OK)
        return rc;
    size_t m;
    size_t *idx = pick_orders(fs, want_expiring, created_before_us, key_created, max, &m);
    if (m) {
        *out = calloc(m, sizeof **out);
        assert_non_null(*out);
    }
    for (size_t i = 0; i < m; i++) {
        order_t *o = &fs->orders[idx[i]];
        int64_t now = store_tick(fs);
        o->status = ORDER_STATUS_EXPIRED;
        o->version++;
        o->updated_at_us = now;
        copy_str(o->cancel_reason, sizeof o->cancel_reason, reason);
        add_history(fs, o->id, ctx->caller.subject, ORDER_STATUS_PENDING, ORDER_STATUS_EXPIRED,
                    reason, now);
        copy_order(&(*out)[i], o);
    }
    *n = m;
    free(idx);
    return ORDER_OK;
}

static int fs_orders_unsettled(void *self, order_ctx *ctx, int64_t changed_before_us, size_t max,
                               order_t **out, size_t *n)
{
    fake_store *fs = self;
    *out = NULL;
    *n = 0;
    int rc = store_enter(fs, ctx, FAKE_ORDERS_UNSETTLED);
    if (rc != ORDER_OK)
        return rc;
    size_t m;
    size_t *idx = pick_orders(fs, want_unsettled, changed_before_us, key_updated, max, &m);
    if (m) {
        *out = calloc(m, sizeof **out);
        assert_non_null(*out);
    }
    for (size_t i = 0; i < m; i++)
        copy_order(&(*out)[i], &fs->orders[idx[i]]);
    *n = m;
    free(idx);
    return ORDER_OK;
}

fake_store *fake_store_create(void)
{
    fake_store *fs = calloc(1, sizeof *fs);
    if (!fs)
        return NULL;
    fs->fail_code = ORDER_EUNAVAILABLE;
    fs->now_us = 1700000000000000LL; /* 2023-11-14, any fixed instant will do */
    fs->step_us = 1000;
    return fs;
}

void fake_store_destroy(fake_store *fs)
{
    if (!fs)
        return;
    for (size_t i = 0; i < fs->norders; i++)
        order_clear(&fs->orders[i]);
    for (size_t i = 0; i < fs->nkeys; i++)
        free(fs->keys[i].fingerprint);
    free(fs->orders);
    free(fs->keys);
    free(fs->products);
    free(fs->history);
    free(fs->seen);
    free(fs);
}

order_store fake_store_port(fake_store *fs)
{
    return (order_store){
        .self = fs,
        .products_get = fs_products_get,
        .product_upsert = fs_product_upsert,
        .order_insert = fs_order_insert,
        .order_get = fs_order_get,
        .order_list = fs_order_list,
        .order_transition = fs_order_transition,
        .order_amend = fs_order_amend,
        .inbound_seen = fs_inbound_seen,
        .order_find_by_payment = fs_order_find_by_payment,
        .orders_expire_due = fs_orders_expire_due,
        .orders_unsettled = fs_orders_unsettled,
    };
}

void fake_store_put_product(fake_store *fs, const char *id, const char *name, int64_t price,
                            const char *currency, bool active)
{
    order_product *p = find_product(fs, id);
    if (!p) {
        PUSH(fs->products, fs->nproducts, fs->cap_products);
        p = &fs->products[fs->nproducts - 1];
    }
    copy_str(p->id, sizeof p->id, id);
    copy_str(p->name, sizeof p->name, name);
    p->unit_price_minor = price;
    copy_str(p->currency, sizeof p->currency, currency);
    p->active = active;
}

const order_t *fake_store_seed(fake_store *fs, const order_t *o)
{
    PUSH(fs->orders, fs->norders, fs->cap_orders);
    order_t *s = &fs->orders[fs->norders - 1];
    copy_order(s, o);
    if (!s->id[0])
        assign_id(fs, s);
    if (!s->created_at_us)
        s->created_at_us = store_tick(fs);
    if (!s->updated_at_us)
        s->updated_at_us = s->created_at_us;
    if (!s->version)
        s->version = 1;
    return s;
}

const order_t *fake_store_order(const fake_store *fs, const char *id)
{
    return find_order(fs, id);
}

size_t fake_store_history_count(const fake_store *fs, const char *order_id)
{
    size_t n = 0;
    for (size_t i = 0; i < fs->nhistory; i++)
        if (strcmp(fs->history[i].order_id, order_id) == 0)
            n++;
    return n;
}

const fake_history *fake_store_history_last(const fake_store *fs, const char *order_id)
{
    for (size_t i = fs->nhistory; i-- > 0;)
        if (strcmp(fs->history[i].order_id, order_id) == 0)
            return &fs->history[i];
    return NULL;
}

int fake_store_writes(const fake_store *fs)
{
    return fs->calls[FAKE_ORDER_INSERT] + fs->calls[FAKE_PRODUCT_UPSERT] +
           fs->calls[FAKE_ORDER_TRANSITION] + fs->calls[FAKE_ORDER_AMEND] +
           fs->calls[FAKE_ORDERS_EXPIRE_DUE];
}

/* ---- the payment provider ---- */

static int pay_enter(fake_payments *fp, order_ctx *ctx, enum fake_pay_op op)
{
    fp->calls[op]++;
    fp->remaining_us[op] = order_ctx_remaining_us(ctx);
    if (fp->hook && fp->hook_op == op) {
        void (*hook)(void *) = fp->hook;
        fp->hook = NULL; /* one-shot, and the hook may call back into the provider */
        hook(fp->hook_arg);
    }
    if (fp->fail[op] > 0) {
        fp->fail[op]--;
        return order_fail(ctx->err, fp->fail_code, "injected provider failure");
    }
    return ORDER_OK;
}

static fake_payment *find_pay(const fake_payments *fp, const char *order_id)
{
    for (size_t i = 0; i < fp->npays; i++)
        if (strcmp(fp->pays[i].order_id, order_id) == 0)
            return &fp->pays[i];
    return NULL;
}

static int pay_refuse(order_ctx *ctx, const char *reason, const char *msg)
{
    snprintf(ctx->err->reason, sizeof ctx->err->reason, "%s", reason);
    return order_fail(ctx->err, ORDER_EPRECONDITION, "%s", msg);
}

/* The payment succeeds at the provider: a time, a charge id and a receipt. */
static void pay_succeed(fake_payments *fp, fake_payment *p)
{
    p->status = ORDER_PAY_SUCCEEDED;
    fp->now_us += 1000;
    p->paid_at_us = fp->now_us;
    snprintf(p->charge_id, sizeof p->charge_id, "ch_%.200s", p->reference);
    snprintf(p->receipt_url, sizeof p->receipt_url, "https://pay.example/receipts/%s",
             p->reference);
}

static void pay_info(const fake_payment *p, order_payment_info *info)
{
    memset(info, 0, sizeof *info);
    info->paid_at_us = p->paid_at_us;
    copy_str(info->charge_id, sizeof info->charge_id, p->charge_id);
    copy_str(info->receipt_url, sizeof info->receipt_url, p->receipt_url);
    copy_str(info->provider_status, sizeof info->provider_status, "succeeded");
}

static const char *ref_prefix(order_provider p)
{
    return p == ORDER_PROVIDER_STRIPE ? "pi" : p == ORDER_PROVIDER_PAYPAL ? "pp" : "lp";
}

#define DECLINED_PM "pm_declined"

static int fp_create(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                     order_payment_action *out, order_payment_info *paid)
{
    fake_payments *fp = self;
    memset(out, 0, sizeof *out);
    memset(paid, 0, sizeof *paid);
    int rc = pay_enter(fp, ctx, FAKE_PAY_CREATE);
    if (rc != ORDER_OK)
        return rc;
    assert_true(order_id_valid(o->id)); /* keyed by the order: it must be stored first */
    fake_payment *p = find_pay(fp, o->id);
    if (!p) {
        PUSH(fp->pays, fp->npays, fp->cap_pays);
        p = &fp->pays[fp->npays - 1];
        copy_str(p->order_id, sizeof p->order_id, o->id);
        snprintf(p->reference, sizeof p->reference, "%s_%04d_%.8s", ref_prefix(fp->provider),
                 fp->created + 1, o->id);
        p->status = ORDER_PAY_PENDING;
        p->amount_minor = o->total_minor;
        copy_str(p->currency, sizeof p->currency, o->currency);
        fp->created++;
    }
    out->provider = fp->provider;
    copy_str(out->reference, sizeof out->reference, p->reference);
    if (saved)
        copy_str(fp->last_customer, sizeof fp->last_customer,
                 saved->customer ? saved->customer : "");
    return ORDER_OK;
}

/* A saved payment method, charged at once (off-session): "pm_declined[:code]" is declined,
 * "pm_processing" stays processing, "pm_lost" is charged but the answer is lost
 * (ORDER_EUNAVAILABLE), anything else succeeds. */
static int fp_charge(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                     order_payment_info *paid)
{
    fake_payments *fp = self;
    memset(paid, 0, sizeof *paid);
    int rc = pay_enter(fp, ctx, FAKE_PAY_CHARGE);
    if (rc != ORDER_OK)
        return rc;
    fake_payment *p = find_pay(fp, o->id);
    assert_non_null(p);                                  /* created first */
    assert_string_equal(o->pay_reference, p->reference); /* and kept by the order */
    const char *payment_method = saved->method;
    copy_str(fp->last_customer, sizeof fp->last_customer, saved->customer ? saved->customer : "");
    if (strncmp(payment_method, DECLINED_PM, strlen(DECLINED_PM)) == 0) {
        if (p->status == ORDER_PAY_PENDING) {
            p->charges++;
            p->status = ORDER_PAY_FAILED;
        }
        if (p->status == ORDER_PAY_FAILED) {
            const char *code = payment_method + strlen(DECLINED_PM);
            code = *code == ':' ? code + 1 : "card_declined";
            snprintf(ctx->err->reason, sizeof ctx->err->reason, "PAYMENT_DECLINED");
            order_error_meta(ctx->err, "decline_code", "%s", code);
            order_error_meta(ctx->err, "provider_status", "requires_payment_method");
            return order_fail(ctx->err, ORDER_EPRECONDITION, "the card was declined (%s)", code);
        }
    } else if (strcmp(payment_method, "pm_processing") == 0) {
        copy_str(paid->provider_status, sizeof paid->provider_status, "processing");
        return ORDER_OK;
    } else if (p->status == ORDER_PAY_PENDING) {
        p->charges++;
        pay_succeed(fp, p);
        if (strcmp(payment_method, "pm_lost") == 0)
            return order_fail(ctx->err, ORDER_EUNAVAILABLE, "the charge's answer was lost");
    }
    if (p->status == ORDER_PAY_SUCCEEDED || p->status == ORDER_PAY_REFUNDED)
        pay_info(p, paid);
    return ORDER_OK;
}

/* LOCAL: a confirmation that names this order's payment, for its amount, is the payment. */
static int fp_verify(void *self, order_ctx *ctx, const order_t *o, const char *reference,
                     order_payment_info *info)
{
    fake_payments *fp = self;
    int rc = pay_enter(fp, ctx, FAKE_PAY_VERIFY);
    if (rc != ORDER_OK)
        return rc;
    fake_payment *p = find_pay(fp, o->id);
    if (!p)
        return pay_refuse(ctx, "PAYMENT_NOT_FOUND", "no payment for this order");
    if (strcmp(p->reference, reference) != 0)
        return pay_refuse(ctx, "PAYMENT_REFERENCE_MISMATCH", "not this order's payment");
    if (p->amount_minor != o->total_minor || strcmp(p->currency, o->currency) != 0)
        return pay_refuse(ctx, "PAYMENT_MISMATCH", "paid amount differs from the total");
    if (p->status == ORDER_PAY_PENDING)
        pay_succeed(fp, p);
    else if (p->status != ORDER_PAY_SUCCEEDED)
        return pay_refuse(ctx, "PAYMENT_NOT_SUCCEEDED", "the payment was refunded or voided");
    pay_info(p, info);
    return ORDER_OK;
}

static int fp_refund(void *self, order_ctx *ctx, const order_t *o,
                     char refund_id[ORDER_REFERENCE_MAX + 1])
{
    fake_payments *fp = self;
    int rc = pay_enter(fp, ctx, FAKE_PAY_REFUND);
    if (rc != ORDER_OK)
        return rc;
    fake_payment *p = find_pay(fp, o->id);
    if (!p)
        return pay_refuse(ctx, "PAYMENT_NOT_FOUND", "no payment for this order");
    if (p->status == ORDER_PAY_SUCCEEDED) {
        p->status = ORDER_PAY_REFUNDED;
        p->refunds++;
        fp->refunded++;
        snprintf(p->refund_id, sizeof p->refund_id, "re_%.200s", p->reference);
    } else if (p->status != ORDER_PAY_REFUNDED) {
        return pay_refuse(ctx, "PAYMENT_NOT_SUCCEEDED", "only a succeeded payment is refunded");
    }
    /* Idempotent: the same refund, however often it is asked for. */
    snprintf(refund_id, ORDER_REFERENCE_MAX + 1, "%s", p->refund_id);
    return ORDER_OK;
}

static int fp_cancel(void *self, order_ctx *ctx, const order_t *o)
{
    fake_payments *fp = self;
    int rc = pay_enter(fp, ctx, FAKE_PAY_CANCEL);
    if (rc != ORDER_OK)
        return rc;
    fake_payment *p = find_pay(fp, o->id);
    if (!p || p->status == ORDER_PAY_VOIDED || p->status == ORDER_PAY_FAILED)
        return ORDER_OK; /* nothing to void, or nothing taken */
    if (p->status != ORDER_PAY_PENDING)
        return pay_refuse(ctx, "PAYMENT_ALREADY_SUCCEEDED", "the payment already succeeded");
    p->status = ORDER_PAY_VOIDED;
    fp->voided++;
    return ORDER_OK;
}

fake_payments *fake_payments_create(order_provider provider)
{
    fake_payments *fp = calloc(1, sizeof *fp);
    if (!fp)
        return NULL;
    fp->port = (order_payments){
        .self = fp,
        .create = fp_create,
        .charge = fp_charge,
        .verify = fp_verify,
        .refund = fp_refund,
        .cancel = fp_cancel,
    };
    fp->provider = provider;
    fp->fail_code = ORDER_EUNAVAILABLE;
    fp->now_us = 1700000500000000LL;
    return fp;
}

void fake_payments_destroy(fake_payments *fp)
{
    if (!fp)
        return;
    free(fp->pays);
    free(fp);
}

const fake_payment *fake_payments_find(const fake_payments *fp, const char *order_id)
{
    return find_pay(fp, order_id);
}

void fake_payments_mark_paid(fake_payments *fp, const char *order_id)
{
    fake_payment *p = find_pay(fp, order_id);
    assert_non_null(p);
    assert_int_equal(p->status, ORDER_PAY_PENDING);
    pay_succeed(fp, p);
}

int fake_payments_refunds(const fake_payments *fp, const char *order_id)
{
    const fake_payment *p = find_pay(fp, order_id);
    return p ? p->refunds : 0;
}

/* ---- the fixture ---- */

fake_env *fake_env_create(void)
{
    fake_env *env = calloc(1, sizeof *env);
    assert_non_null(env);
    env->store = fake_store_create();
    env->local = fake_payments_create(ORDER_PROVIDER_LOCAL);
    assert_non_null(env->store);
    assert_non_null(env->local);
    env->svc.cfg.tax_rate_bps = FAKE_TAX_BPS;
    env->svc.cfg.max_total_minor = FAKE_MAX_TOTAL;
    env->svc.store = fake_store_port(env->store);
    env->svc.providers[ORDER_PROVIDER_LOCAL] = &env->local->port;
    env->ctx.err = &env->err;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    return env;
}

void fake_env_destroy(fake_env *env)
{
    if (!env)
        return;
    fake_store_destroy(env->store);
    fake_payments_destroy(env->local);
    fake_payments_destroy(env->stripe);
    free(env);
}

fake_payments *fake_env_stripe(fake_env *env)
{
    if (!env->stripe) {
        env->stripe = fake_payments_create(ORDER_PROVIDER_STRIPE);
        assert_non_null(env->stripe);
        env->svc.providers[ORDER_PROVIDER_STRIPE] = &env->stripe->port;
    }
    return env->stripe;
}

order_ctx *fake_env_as(fake_env *env, const char *subject, unsigned roles)
{
    copy_str(env->ctx.caller.subject, sizeof env->ctx.caller.subject, subject);
    env->ctx.caller.roles = roles;
    return fake_env_again(env);
}

order_ctx *fake_env_again(fake_env *env)
{
    env->ctx.deadline_mono_us = INT64_MAX;
    env->ctx.err = &env->err;
    order_error_reset(&env->err);
    return &env->ctx;
}
