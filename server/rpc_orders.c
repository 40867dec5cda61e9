/* rpc_orders.c — orders.v1.OrderService handlers: protobuf <-> domain.
 *
 * Each handler decodes its request (protobuf-c), maps it to a domain command, calls the
 * use case on the worker's order_service, and packs the answer. Protobuf-c types never
 * leave this file and the server's other files; the domain never sees them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/utf8.h"
#include "orders/v1/orders.pb-c.h"
#include "server/internal.h"
#include "server/pagetoken.h"

/* ---- domain -> protobuf ---- */

static void ts_from_us(Google__Protobuf__Timestamp *ts, int64_t us)
{
    google__protobuf__timestamp__init(ts);
    int64_t s = us / 1000000, rem = us % 1000000;
    if (rem < 0) {
        rem += 1000000;
        s -= 1;
    }
    ts->seconds = s;
    ts->nanos = (int32_t)(rem * 1000);
}

/* A protobuf view of an order: points into the order_t, which must outlive it. */
typedef struct pb_order {
    Orders__V1__Order msg;
    Orders__V1__Payment pay;
    Google__Protobuf__Timestamp created, updated, paid, refunded, reserved;
    Orders__V1__OrderItem *items;
    Orders__V1__OrderItem **item_ptrs;
} pb_order;

static bool pb_order_fill(pb_order *p, const order_t *o)
{
    memset(p, 0, sizeof *p);
    orders__v1__order__init(&p->msg);
    p->msg.order_id = (char *)o->id;
    p->msg.customer_id = (char *)o->customer_id;
    p->msg.status = (Orders__V1__OrderStatus)o->status;
    p->msg.currency = (char *)o->currency;
    p->msg.subtotal_minor = o->subtotal_minor;
    p->msg.tax_minor = o->tax_minor;
    p->msg.total_minor = o->total_minor;
    p->msg.cancel_reason = (char *)o->cancel_reason;
    p->msg.version = o->version;
    ts_from_us(&p->created, o->created_at_us);
    ts_from_us(&p->updated, o->updated_at_us);
    p->msg.created_at = &p->created;
    p->msg.updated_at = &p->updated;

    orders__v1__payment__init(&p->pay);
    p->pay.provider = (Orders__V1__PaymentProvider)o->pay_provider;
    p->pay.reference = (char *)o->pay_reference;
    p->pay.status = (Orders__V1__PaymentStatus)o->pay_status;
    if (o->paid_at_us) {
        ts_from_us(&p->paid, o->paid_at_us);
        p->pay.paid_at = &p->paid;
    }
    p->pay.charge_id = (char *)o->pay_charge_id;
    p->pay.receipt_url = (char *)o->pay_receipt_url;
    p->pay.refund_id = (char *)o->refund_id;
    if (o->refunded_at_us) {
        ts_from_us(&p->refunded, o->refunded_at_us);
        p->pay.refunded_at = &p->refunded;
    }
    p->msg.payment = &p->pay;
    if (o->stock_reserved_at_us) {
        ts_from_us(&p->reserved, o->stock_reserved_at_us);
        p->msg.stock_reserved_at = &p->reserved;
    }

    if (o->nitems) {
        p->items = calloc(o->nitems, sizeof *p->items);
        p->item_ptrs = calloc(o->nitems, sizeof *p->item_ptrs);
        if (!p->items || !p->item_ptrs)
            return false;
        for (size_t i = 0; i < o->nitems; i++) {
            Orders__V1__OrderItem *it = &p->items[i];
            orders__v1__order_item__init(it);
            it->product_id = (char *)o->items[i].product_id;
            it->name = (char *)o->items[i].name;
            it->quantity = o->items[i].quantity;
            it->unit_price_minor = o->items[i].unit_price_minor;
            it->line_total_minor = o->items[i].line_total_minor;
            p->item_ptrs[i] = it;
        }
        p->msg.n_items = o->nitems;
        p->msg.items = p->item_ptrs;
    }
    return true;
}

static void pb_order_dispose(pb_order *p)
{
    free(p->items);
    free(p->item_ptrs);
}

/* Replies with one order as the whole response (GetOrder, CancelOrder, ...). */
static void reply_order(srv_reply *r, const order_t *o)
{
    pb_order p;
    if (pb_order_fill(&p, o))
        r->body = srv_pack(&p.msg.base);
    else
        srv_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    pb_order_dispose(&p);
}

static void product_to_pb(Orders__V1__Product *m, const order_product *p)
{
    orders__v1__product__init(m);
    m->product_id = (char *)p->id;
    m->name = (char *)p->name;
    m->unit_price_minor = p->unit_price_minor;
    m->currency = (char *)p->currency;
    m->active = p->active;
}

/* ---- text fields: UTF-8 without NUL ----
 *
 * protobuf-c neither checks that a string field is UTF-8 nor keeps its length: a NUL cuts
 * the value short silently ("key\0a" and "key\0b" become the same request_id, "pm_x\0..."
 * charges pm_x), and bytes that are not UTF-8 reach PostgreSQL (an error without field
 * details) or come back in error messages no client can parse. So every string field of
 * the request, nested ones included, is checked on the wire before the request is used. */

static bool wire_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

/* Adds a violation for every string field of `d` in p[0..len) that is not UTF-8 or holds
 * a NUL. Malformed wire data is left to the unpacker, which has accepted it already. */
static void check_text_fields(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len,
                              const char *prefix, order_error *e, int depth)
{
    const uint8_t *end = p + len;
    unsigned seen[64] = {0}; /* occurrences per field index, for "items[3]" */
    while (p < end && depth < 8) {
        uint64_t tag, n;
        if (!wire_varint(&p, end, &tag))
            return;
        switch (tag & 7) {
        case 0:
            if (!wire_varint(&p, end, &n))
                return;
            continue;
        case 1:
            if (end - p < 8)
                return;
            p += 8;
            continue;
        case 5:
            if (end - p < 4)
                return;
            p += 4;
            continue;
        case 2:
            break;
        default:
            return;
        }
        if (!wire_varint(&p, end, &n) || n > (uint64_t)(end - p))
            return;
        const ProtobufCFieldDescriptor *f =
            tag >> 3 <= UINT32_MAX
                ? protobuf_c_message_descriptor_get_field(d, (unsigned)(tag >> 3))
                : NULL;
        if (f && (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_MESSAGE)) {
            size_t fi = (size_t)(f - d->fields);
            char path[160];
            if (f->label == PROTOBUF_C_LABEL_REPEATED)
                snprintf(path, sizeof path, "%s%s[%u]", prefix, f->name, fi < 64 ? seen[fi]++ : 0);
            else
                snprintf(path, sizeof path, "%s%s", prefix, f->name);
            if (f->type == PROTOBUF_C_TYPE_STRING) {
                if (!utf8_text_ok(p, (size_t)n))
                    order_violate(e, path, "must be UTF-8 text without NUL characters");
            } else {
                char sub[168];
                snprintf(sub, sizeof sub, "%s.", path);
                check_text_fields(f->descriptor, p, (size_t)n, sub, e, depth + 1);
            }
        }
        p += n;
    }
}

#define DECODE(type, fn, req, len, r, name)                                                        \
    type *m = fn(NULL, len, req);                                                                  \
    if (!m) {                                                                                      \
        srv_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT,                                           \
                        "the request is not a valid " name " message");                            \
        return;                                                                                    \
    }                                                                                              \
    check_text_fields(m->base.descriptor, req, len, "", c->err, 0);                                \
    if (c->err->nviolations) {                                                                     \
        order_fail(c->err, ORDER_EINVAL, "invalid text in the request: see the field violations"); \
        srv_reply_domain(r, c->err);                                                               \
        protobuf_c_message_free_unpacked(&m->base, NULL);                                          \
        return;                                                                                    \
    }

/* ---- handlers ---- */

void srv_rpc_place_order(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__PlaceOrderRequest, orders__v1__place_order_request__unpack, req, len, r,
           "orders.v1.PlaceOrderRequest");
    order_line_cmd *lines = NULL;
    if (m->n_items) {
        lines = calloc(m->n_items, sizeof *lines);
        if (!lines) {
            srv_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < m->n_items; i++) {
            lines[i].product_id = m->items[i]->product_id;
            lines[i].quantity = m->items[i]->quantity;
        }
    }
    order_place_cmd cmd = {
        .request_id = m->request_id,
        .customer_id = m->customer_id,
        .lines = lines,
        .nlines = m->n_items,
        .provider = (order_provider)m->payment_provider,
        .payment_method = m->payment_method,
        .payment_customer = m->payment_customer,
    };
    order_t o = {0};
    order_payment_action act;
    bool replayed = false;
    int rc = order_place(&c->w->d.svc, &c->ctx, &cmd, &o, &act, &replayed);
    if (rc != ORDER_OK) {
        srv_reply_domain(r, c->err);
        goto out;
    }
    pb_order p;
    Orders__V1__PaymentAction pa;
    orders__v1__payment_action__init(&pa);
    pa.provider = (Orders__V1__PaymentProvider)act.provider;
    pa.reference = act.reference;
    pa.client_secret = act.client_secret;
    pa.approval_url = act.approval_url;
    Orders__V1__PlaceOrderResponse resp;
    orders__v1__place_order_response__init(&resp);
    resp.payment = &pa;
    if (pb_order_fill(&p, &o)) {
        resp.order = &p.msg;
        r->body = srv_pack(&resp.base);
    } else {
        srv_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    pb_order_dispose(&p);
    order_clear(&o);
out:
    free(lines);
    orders__v1__place_order_request__free_unpacked(m, NULL);
}

void srv_rpc_get_order(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__GetOrderRequest, orders__v1__get_order_request__unpack, req, len, r,
           "orders.v1.GetOrderRequest");
    order_t o = {0};
    if (order_get(&c->w->d.svc, &c->ctx, m->order_id, &o) == ORDER_OK)
        reply_order(r, &o);
    else
        srv_reply_domain(r, c->err);
    order_clear(&o);
    orders__v1__get_order_request__free_unpacked(m, NULL);
}

/* The scope a page token is bound to: the same query, as the server sees it. */
static void list_scope(const srv_call *c, const Orders__V1__ListOrdersRequest *m, char *buf,
                       size_t cap)
{
    unsigned set = 0;
    for (size_t i = 0; i < m->n_statuses; i++)
        if (m->statuses[i] > 0 && m->statuses[i] <= ORDER_STATUS_MAX)
            set |= ORDER_STATUS_BIT(m->statuses[i]);
    const char *cust =
        order_caller_is_privileged(&c->ctx.caller) ? m->customer_id : c->ctx.caller.subject;
    snprintf(buf, cap, "orders.list|c=%s|s=%u", cust, set);
}

void srv_rpc_list_orders(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__ListOrdersRequest, orders__v1__list_orders_request__unpack, req, len, r,
           "orders.v1.ListOrdersRequest");
    const srv_config *cfg = c->w->srv->cfg;
    char scope[256];
    list_scope(c, m, scope, sizeof scope);
    int *statuses = NULL;
    order_t *orders = NULL;
    size_t n = 0;
    bool more = false;
    order_list_cmd cmd = {
        .page_size = m->page_size,
        .customer_id = m->customer_id,
        .nstatuses = m->n_statuses,
    };
    char cursor_id[ORDER_ID_LEN + 1] = "";
    if (m->page_token[0]) {
        if (srv_pagetoken_decode(cfg->page_token_secret, cfg->page_token_secret_len, scope,
                                 m->page_token, &cmd.cursor_created_at_us, cursor_id) != 0) {
            order_violate(c->err, "page_token",
                          "is not a page token of this query: pass next_page_token unchanged, "
                          "with the same filters");
            order_fail(c->err, ORDER_EINVAL, "invalid page_token");
            srv_reply_domain(r, c->err);
            goto out;
        }
        cmd.has_cursor = true;
        cmd.cursor_id = cursor_id;
    }
    if (m->n_statuses) {
        statuses = calloc(m->n_statuses, sizeof *statuses);
        if (!statuses) {
            srv_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < m->n_statuses; i++)
            statuses[i] = (int)m->statuses[i];
        cmd.statuses = statuses;
    }
    if (order_list(&c->w->d.svc, &c->ctx, &cmd, &orders, &n, &more) != ORDER_OK) {
        srv_reply_domain(r, c->err);
        goto out;
    }
    Orders__V1__ListOrdersResponse resp;
    orders__v1__list_orders_response__init(&resp);
    pb_order *pbs = n ? calloc(n, sizeof *pbs) : NULL;
    Orders__V1__Order **ptrs = n ? calloc(n, sizeof *ptrs) : NULL;
    char token[256] = "";
    bool ok = !n || (pbs && ptrs);
    for (size_t i = 0; ok && i < n; i++) {
        ok = pb_order_fill(&pbs[i], &orders[i]);
        ptrs[i] = &pbs[i].msg;
    }
    if (ok && more) {
        const order_t *last = &orders[n - 1];
        ok = srv_pagetoken_encode(cfg->page_token_secret, cfg->page_token_secret_len, scope,
                                  last->created_at_us, last->id, token, sizeof token) == 0;
    }
    if (ok) {
        resp.n_orders = n;
        resp.orders = ptrs;
        resp.next_page_token = token;
        r->body = srv_pack(&resp.base);
    } else {
        srv_reply_error(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    for (size_t i = 0; pbs && i < n; i++)
        pb_order_dispose(&pbs[i]);
    free(pbs);
    free(ptrs);
out:
    order_list_free(orders, n);
    free(statuses);
    orders__v1__list_orders_request__free_unpacked(m, NULL);
}

void srv_rpc_cancel_order(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__CancelOrderRequest, orders__v1__cancel_order_request__unpack, req, len, r,
           "orders.v1.CancelOrderRequest");
    order_t o = {0};
    if (order_cancel(&c->w->d.svc, &c->ctx, m->order_id, m->reason, &o) == ORDER_OK)
        reply_order(r, &o);
    else
        srv_reply_domain(r, c->err);
    order_clear(&o);
    orders__v1__cancel_order_request__free_unpacked(m, NULL);
}

void srv_rpc_confirm_payment(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__ConfirmPaymentRequest, orders__v1__confirm_payment_request__unpack, req, len,
           r, "orders.v1.ConfirmPaymentRequest");
    order_t o = {0};
    if (order_confirm_payment(&c->w->d.svc, &c->ctx, m->order_id, (order_provider)m->provider,
                              m->payment_reference, &o) == ORDER_OK)
        reply_order(r, &o);
    else
        srv_reply_domain(r, c->err);
    order_clear(&o);
    orders__v1__confirm_payment_request__free_unpacked(m, NULL);
}

void srv_rpc_update_order_status(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__UpdateOrderStatusRequest, orders__v1__update_order_status_request__unpack,
           req, len, r, "orders.v1.UpdateOrderStatusRequest");
    order_t o = {0};
    int64_t expected = m->expected_version ? m->expected_version->value : -1;
    if (m->expected_version && expected == -1)
        expected = 0; /* -1 means "any" to the domain; a caller's -1 is just invalid */
    if (order_update_status(&c->w->d.svc, &c->ctx, m->order_id, (order_status)m->status, expected,
                            &o) == ORDER_OK)
        reply_order(r, &o);
    else
        srv_reply_domain(r, c->err);
    order_clear(&o);
    orders__v1__update_order_status_request__free_unpacked(m, NULL);
}

void srv_rpc_upsert_product(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__UpsertProductRequest, orders__v1__upsert_product_request__unpack, req, len,
           r, "orders.v1.UpsertProductRequest");
    if (!m->product) {
        order_violate(c->err, "product", "must be set");
        order_fail(c->err, ORDER_EINVAL, "invalid product");
        srv_reply_domain(r, c->err);
        orders__v1__upsert_product_request__free_unpacked(m, NULL);
        return;
    }
    order_product p = {0}, out = {0};
    /* Oversized fields are truncated here only after the domain has seen their length. */
    if (strlen(m->product->product_id) > ORDER_PRODUCT_ID_MAX)
        order_violate(c->err, "product.product_id", "must be at most %d characters",
                      ORDER_PRODUCT_ID_MAX);
    if (strlen(m->product->name) > ORDER_PRODUCT_NAME_MAX)
        order_violate(c->err, "product.name", "must be at most %d characters",
                      ORDER_PRODUCT_NAME_MAX);
    snprintf(p.id, sizeof p.id, "%s", m->product->product_id);
    snprintf(p.name, sizeof p.name, "%s", m->product->name);
    /* An over-long currency becomes "", which the domain reports as not ISO-4217. */
    snprintf(p.currency, sizeof p.currency, "%s",
             strlen(m->product->currency) > 3 ? "" : m->product->currency);
    p.unit_price_minor = m->product->unit_price_minor;
    p.active = m->product->active;
    if (order_product_upsert(&c->w->d.svc, &c->ctx, &p, &out) == ORDER_OK) {
        Orders__V1__Product pm;
        product_to_pb(&pm, &out);
        r->body = srv_pack(&pm.base);
    } else {
        srv_reply_domain(r, c->err);
    }
    orders__v1__upsert_product_request__free_unpacked(m, NULL);
}

void srv_rpc_get_product(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    DECODE(Orders__V1__GetProductRequest, orders__v1__get_product_request__unpack, req, len, r,
           "orders.v1.GetProductRequest");
    order_product out = {0};
    if (order_product_get(&c->w->d.svc, &c->ctx, m->product_id, &out) == ORDER_OK) {
        Orders__V1__Product pm;
        product_to_pb(&pm, &out);
        r->body = srv_pack(&pm.base);
    } else {
        srv_reply_domain(r, c->err);
    }
    orders__v1__get_product_request__free_unpacked(m, NULL);
}

/* ---- the cache's codec: orders as orders.v1.Order bytes ---- */

uint8_t *srv_order_encode(const order_t *o, size_t *len)
{
    pb_order p;
    uint8_t *buf = NULL;
    if (pb_order_fill(&p, o)) {
        *len = orders__v1__order__get_packed_size(&p.msg);
        buf = malloc(*len ? *len : 1);
        if (buf)
            orders__v1__order__pack(&p.msg, buf);
    }
    pb_order_dispose(&p);
    return buf;
}

static int64_t ts_to_us(const Google__Protobuf__Timestamp *ts)
{
    return ts ? ts->seconds * 1000000 + ts->nanos / 1000 : 0;
}

/* Copies a protobuf string into a fixed field; false if it does not fit. */
static bool copy_str(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap)
        return false;
    memcpy(dst, src, n + 1);
    return true;
}

bool srv_order_decode(const uint8_t *bytes, size_t len, order_t *out)
{
    Orders__V1__Order *m = orders__v1__order__unpack(NULL, len, bytes);
    if (!m)
        return false;
    bool ok = copy_str(out->id, sizeof out->id, m->order_id) &&
              copy_str(out->customer_id, sizeof out->customer_id, m->customer_id) &&
              copy_str(out->currency, sizeof out->currency, m->currency) &&
              copy_str(out->cancel_reason, sizeof out->cancel_reason, m->cancel_reason);
    out->status = (order_status)m->status;
    out->subtotal_minor = m->subtotal_minor;
    out->tax_minor = m->tax_minor;
    out->total_minor = m->total_minor;
    out->created_at_us = ts_to_us(m->created_at);
    out->updated_at_us = ts_to_us(m->updated_at);
    out->version = m->version;
    out->stock_reserved_at_us = m->stock_reserved_at ? ts_to_us(m->stock_reserved_at) : 0;
    if (ok && m->payment) {
        out->pay_provider = (order_provider)m->payment->provider;
        out->pay_status = (order_pay_status)m->payment->status;
        out->paid_at_us = ts_to_us(m->payment->paid_at);
        out->refunded_at_us = m->payment->refunded_at ? ts_to_us(m->payment->refunded_at) : 0;
        ok = copy_str(out->pay_reference, sizeof out->pay_reference, m->payment->reference) &&
             copy_str(out->pay_charge_id, sizeof out->pay_charge_id, m->payment->charge_id) &&
             copy_str(out->pay_receipt_url, sizeof out->pay_receipt_url, m->payment->receipt_url) &&
             copy_str(out->refund_id, sizeof out->refund_id, m->payment->refund_id);
    }
    if (ok && m->n_items) {
        out->items = calloc(m->n_items, sizeof *out->items);
        ok = out->items != NULL;
        for (size_t i = 0; ok && i < m->n_items; i++) {
            order_item *it = &out->items[i];
            ok = copy_str(it->product_id, sizeof it->product_id, m->items[i]->product_id) &&
                 copy_str(it->name, sizeof it->name, m->items[i]->name);
            it->quantity = m->items[i]->quantity;
            it->unit_price_minor = m->items[i]->unit_price_minor;
            it->line_total_minor = m->items[i]->line_total_minor;
            out->nitems = i + 1;
        }
    }
    orders__v1__order__free_unpacked(m, NULL);
    if (!ok)
        order_clear(out);
    return ok;
}

bool srv_get_order_peek_id(const uint8_t *req, size_t len, char id[ORDER_ID_LEN + 1])
{
    Orders__V1__GetOrderRequest *m = orders__v1__get_order_request__unpack(NULL, len, req);
    if (!m)
        return false;
    bool ok = order_id_valid(m->order_id);
    if (ok)
        memcpy(id, m->order_id, ORDER_ID_LEN + 1);
    orders__v1__get_order_request__free_unpacked(m, NULL);
    return ok;
}
