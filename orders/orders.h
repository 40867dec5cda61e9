/* orders.h — the domain core of orderd: orders, money and tax, the status state
 * machine, and the use cases (place, get, list, cancel, confirm payment, change status,
 * catalogue upkeep).
 *
 * DESIGN
 * Pure C: no sockets, no libpq, no hiredis, no gRPC. The domain reaches the world only
 * through the ports declared here (structs of function pointers with a `self`), which
 * the adapters in storage/ and payments/ fill and which tests fill with in-memory fakes.
 * Every use case takes an order_ctx: who calls, until when (deadline), and where a
 * failure is described (order_error). Only server/ turns order_error into gRPC statuses.
 *
 * Ownership: order_t holds its items in a heap array; order_clear() frees it and
 * leaves the struct empty. Everything else is fixed-size and caller-allocated.
 */
#ifndef ORDERD_ORDERS_H
#define ORDERD_ORDERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- limits (the contract's, see proto/orders/v1/orders.proto) ---- */
#define ORDER_ID_LEN            36 /* UUID text form */
#define ORDER_CUSTOMER_MAX      128
#define ORDER_REQUEST_ID_MAX    128
#define ORDER_PRODUCT_ID_MAX    64
#define ORDER_PRODUCT_NAME_MAX  200
#define ORDER_REFERENCE_MAX     255
#define ORDER_REASON_MAX        500
#define ORDER_MAX_LINES         100
#define ORDER_MIN_QUANTITY      1
#define ORDER_MAX_QUANTITY      10000
#define ORDER_PAGE_SIZE_DEFAULT 50
#define ORDER_PAGE_SIZE_MAX     500
#define ORDER_MAX_VIOLATIONS    128

/* ---- errors ---- */

/** Domain result codes: 0 for success, negative for failure. */
typedef enum order_code {
    ORDER_OK = 0,
    ORDER_EINVAL = -1,        /* bad input; field violations in order_error */
    ORDER_ENOTFOUND = -2,     /* no such thing, or not the caller's to see */
    ORDER_EPERM = -3,         /* the caller may not do this */
    ORDER_EPRECONDITION = -4, /* not in a state that allows it; current status in error */
    ORDER_EIDEMPOTENCY = -5,  /* request_id reused with a different request */
    ORDER_EUNAVAILABLE = -6,  /* a dependency (database, provider) is unreachable */
    ORDER_EDEADLINE = -7,     /* the caller's deadline passed; nothing was written */
    ORDER_EABORTED = -8,      /* a concurrent change won; retrying may succeed */
    ORDER_EINTERNAL = -9,     /* a bug or an impossible state */
} order_code;

typedef struct order_violation {
    char field[64]; /* e.g. "items[1].quantity" */
    char description[192];
} order_violation;

/** What went wrong, filled by the domain and the adapters; read by server/. */
typedef struct order_error {
    int code;                   /* order_code */
    char message[256];          /* for humans; never holds secrets */
    char reason[48];            /* machine-readable (google.rpc.ErrorInfo.reason), or "" */
    int current_status;         /* order_status, for ORDER_EPRECONDITION; 0 if n/a */
    char precondition_type[32]; /* PreconditionFailure.violations[0].type, or "" */
    char precondition_subject[64];
    size_t nviolations;
    bool violations_truncated;
    order_violation violations[ORDER_MAX_VIOLATIONS];
} order_error;

/** Sets code and a printf-style message; returns code so callers can `return order_fail(...)`. */
int order_fail(order_error *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/** Appends a field violation (dropped, with violations_truncated set, past the cap). */
void order_violate(order_error *e, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/** Resets to ORDER_OK with nothing recorded. */
void order_error_reset(order_error *e);
/** A stable upper-case name for a code ("INVALID_ARGUMENT"-like), for logs. */
const char *order_code_name(int code);

/* ---- values ---- */

/** Same numbers as orders.v1.OrderStatus. */
typedef enum order_status {
    ORDER_STATUS_UNSPECIFIED = 0,
    ORDER_STATUS_PENDING = 1,
    ORDER_STATUS_PAID = 2,
    ORDER_STATUS_SHIPPED = 3,
    ORDER_STATUS_DELIVERED = 4,
    ORDER_STATUS_CANCELLED = 5,
    ORDER_STATUS_EXPIRED = 6,
    ORDER_STATUS_FAILED = 7,
} order_status;
#define ORDER_STATUS_MAX 7
/** Bit for a status in a status set: ORDER_STATUS_BIT(ORDER_STATUS_PAID). */
#define ORDER_STATUS_BIT(s) (1u << (unsigned)(s))

/** Same numbers as orders.v1.PaymentProvider. */
typedef enum order_provider {
    ORDER_PROVIDER_UNSPECIFIED = 0,
    ORDER_PROVIDER_LOCAL = 1,
    ORDER_PROVIDER_STRIPE = 2,
    ORDER_PROVIDER_PAYPAL = 3,
} order_provider;
#define ORDER_PROVIDER_MAX 3

/** Same numbers as orders.v1.PaymentStatus. */
typedef enum order_pay_status {
    ORDER_PAY_UNSPECIFIED = 0,
    ORDER_PAY_PENDING = 1,
    ORDER_PAY_SUCCEEDED = 2,
    ORDER_PAY_REFUNDED = 3,
    ORDER_PAY_VOIDED = 4,
    ORDER_PAY_FAILED = 5,
} order_pay_status;

/** Lower-case names as stored in PostgreSQL ("pending", "paid", ...). NULL if unknown. */
const char *order_status_name(order_status s);
const char *order_provider_name(order_provider p);
const char *order_pay_status_name(order_pay_status s);
/** The contract's name of a status ("ORDER_STATUS_PAID"), for messages to callers;
 *  "ORDER_STATUS_UNSPECIFIED" for anything unknown. */
const char *order_status_enum_name(int s);
/** Inverse of the above; 0 (UNSPECIFIED) if the name is unknown. */
order_status order_status_parse(const char *name);
order_provider order_provider_parse(const char *name);
order_pay_status order_pay_status_parse(const char *name);

/** Whether the state machine allows from -> to (see ARCHITECTURE.md, Statuses). */
bool order_status_can_move(order_status from, order_status to);

/** Roles, as a bit set. */
enum { ORDER_ROLE_CUSTOMER = 1u, ORDER_ROLE_SERVICE = 2u, ORDER_ROLE_ADMIN = 4u };

typedef struct order_caller {
    char subject[ORDER_CUSTOMER_MAX + 1]; /* JWT sub */
    unsigned roles;                       /* ORDER_ROLE_* bits */
} order_caller;

/** True if the caller acts for any customer (service or admin). */
bool order_caller_is_privileged(const order_caller *c);

typedef struct order_product {
    char id[ORDER_PRODUCT_ID_MAX + 1];
    char name[ORDER_PRODUCT_NAME_MAX + 1];
    int64_t unit_price_minor;
    char currency[4];
    bool active;
} order_product;

typedef struct order_item {
    char product_id[ORDER_PRODUCT_ID_MAX + 1];
    char name[ORDER_PRODUCT_NAME_MAX + 1];
    int32_t quantity;
    int64_t unit_price_minor;
    int64_t line_total_minor;
} order_item;

typedef struct order_t {
    char id[ORDER_ID_LEN + 1];
    char customer_id[ORDER_CUSTOMER_MAX + 1];
    order_status status;
    char currency[4];
    int64_t subtotal_minor;
    int64_t tax_minor;
    int64_t total_minor;
    order_provider pay_provider;
    char pay_reference[ORDER_REFERENCE_MAX + 1];
    order_pay_status pay_status;
    int64_t paid_at_us; /* Unix microseconds; 0 = not paid */
    char cancel_reason[ORDER_REASON_MAX + 1];
    int64_t created_at_us; /* Unix microseconds, set by the store */
    int64_t updated_at_us;
    int64_t version; /* 1 when placed, +1 with every change */
    size_t nitems;
    order_item *items; /* heap, owned; order_clear() frees */
} order_t;

/** Frees the items and zeroes the order. Safe on a zeroed order. */
void order_clear(order_t *o);
/** Deep copy; returns ORDER_OK or ORDER_EINTERNAL on allocation failure. */
int order_copy(order_t *dst, const order_t *src);

/** What the client needs to pay. */
typedef struct order_payment_action {
    order_provider provider;
    char reference[ORDER_REFERENCE_MAX + 1];
    char client_secret[256];
    char approval_url[512];
} order_payment_action;

/* ---- money ---- */

/** Minor-unit exponent of an ISO-4217 code (2 for EUR, 0 for JPY, 3 for KWD); -1 if not a known
 * code. */
int money_currency_exponent(const char *code);
/** a*b into *out; false on overflow. */
bool money_mul(int64_t a, int64_t b, int64_t *out);
/** a+b into *out; false on overflow. */
bool money_add(int64_t a, int64_t b, int64_t *out);
/** Tax on a non-negative subtotal at rate_bps basis points, rounded half up:
 *  floor((subtotal * rate_bps + 5000) / 10000). false on overflow or bad input. */
bool money_tax(int64_t subtotal, int32_t rate_bps, int64_t *out);

/* ---- context ---- */

/** Per-call context: who calls and until when. Not shared between threads. */
typedef struct order_ctx {
    order_caller caller;
    int64_t deadline_mono_us; /* CLOCK_MONOTONIC microseconds; INT64_MAX = none */
    order_error *err;         /* where failures are described; never NULL */
} order_ctx;

/** Microseconds left before the deadline (INT64_MAX if none, <= 0 if past). */
int64_t order_ctx_remaining_us(const order_ctx *ctx);

/* ---- ports ---- */

/** Query for order_store.list. */
typedef struct order_list_query {
    const char *customer_id;      /* NULL = any customer */
    unsigned status_set;          /* ORDER_STATUS_BIT()s; 0 = any status */
    int limit;                    /* rows to return, 1..ORDER_PAGE_SIZE_MAX+1 */
    bool has_cursor;              /* return only orders strictly after this position */
    int64_t cursor_created_at_us; /* ...in the order (created_at DESC, id DESC) */
    char cursor_id[ORDER_ID_LEN + 1];
} order_list_query;

/** A status change, applied by one conditional UPDATE with a history row. */
typedef struct order_transition {
    const char *order_id;
    unsigned from_set; /* allowed current statuses (ORDER_STATUS_BIT()s) */
    order_status to;
    int64_t expected_version;    /* -1 = any */
    const char *reason;          /* history "why", and cancel_reason when to == CANCELLED */
    order_pay_status pay_status; /* new payment status; ORDER_PAY_UNSPECIFIED = unchanged */
    int64_t paid_at_us;          /* set with pay_status SUCCEEDED; 0 = unchanged */
} order_transition;

/**
 * The persistence port. Every function writes ctx->err on failure and returns its code:
 * ORDER_EUNAVAILABLE when the database cannot be reached, ORDER_EDEADLINE when the
 * context's deadline passes first (the transaction is rolled back: nothing is written).
 */
typedef struct order_store {
    void *self;

    /** Looks up products by id. found[i] tells whether ids[i] exists; out[i] is filled if so. */
    int (*products_get)(void *self, order_ctx *ctx, const char *const *ids, size_t n,
                        order_product *out, bool *found);
    /** Creates or replaces a product; *out is the stored row. */
    int (*product_upsert)(void *self, order_ctx *ctx, const order_product *p, order_product *out);

    /**
     * Stores a new order (status PENDING, version 1, items, a history row) under the
     * idempotency key (caller subject, request_id) in one transaction. o->id and the
     * timestamps are assigned by the store and written back into *o.
     * If the key exists with the same fingerprint, *o is replaced by the stored order
     * and *replayed set; with another fingerprint: ORDER_EIDEMPOTENCY. Concurrent
     * callers with the same key never create two orders.
     */
    int (*order_insert)(void *self, order_ctx *ctx, const char *request_id, const char *fingerprint,
                        order_t *o, bool *replayed);
    /** Reads one order with its items; ORDER_ENOTFOUND if absent. *out must be empty. */
    int (*order_get)(void *self, order_ctx *ctx, const char *order_id, order_t *out);
    /**
     * Lists orders (created_at DESC, id DESC) with items. *out is a heap array of *n
     * orders that the caller frees with order_list_free.
     */
    int (*order_list)(void *self, order_ctx *ctx, const order_list_query *q, order_t **out,
                      size_t *n);
    /**
     * Applies a transition with one conditional UPDATE (status in from_set, and version
     * if given), bumps version and updated_at, and writes a history row (actor =
     * ctx->caller.subject), in one transaction. On success *out is the new order.
     * If the order exists but the condition fails: ORDER_EPRECONDITION with
     * err->current_status set, and *out is the current order. ORDER_ENOTFOUND if absent.
     */
    int (*order_transition)(void *self, order_ctx *ctx, const order_transition *t, order_t *out);
    /**
     * Records the payment of an order (provider, reference, payment status) without a
     * status change; bumps version. *out is the new order. ORDER_ENOTFOUND if absent.
     */
    int (*order_set_payment)(void *self, order_ctx *ctx, const char *order_id,
                             order_provider provider, const char *reference,
                             order_pay_status pay_status, order_t *out);
} order_store;

/** Frees an array returned by order_store.order_list. */
void order_list_free(order_t *orders, size_t n);

/**
 * A payment provider. Every function writes ctx->err on failure and returns its code.
 */
typedef struct order_payments {
    void *self;
    /** Creates the payment for an order, keyed by the order id: calling it again for the
     *  same order returns the same payment. Fills *out. */
    int (*create)(void *self, order_ctx *ctx, const order_t *o, order_payment_action *out);
    /** Checks with the provider that `reference` is a succeeded payment of this order, for
     *  its total and currency. ORDER_OK with *paid_at_us set if so; ORDER_EPRECONDITION
     *  (reason and message say why) if not. */
    int (*verify)(void *self, order_ctx *ctx, const order_t *o, const char *reference,
                  int64_t *paid_at_us);
    /** Refunds the order's payment in full. Idempotent. */
    int (*refund)(void *self, order_ctx *ctx, const order_t *o);
    /** Voids (cancels) the order's unpaid payment. Idempotent. */
    int (*cancel)(void *self, order_ctx *ctx, const order_t *o);
} order_payments;

/* ---- the service (use cases) ---- */

typedef struct order_config {
    int32_t tax_rate_bps;    /* 0..10000 */
    int64_t max_total_minor; /* totals above this are refused (provider limit) */
} order_config;

typedef struct order_service {
    order_config cfg;
    order_store store;
    order_payments *providers[ORDER_PROVIDER_MAX + 1]; /* NULL = not configured */
} order_service;

typedef struct order_line_cmd {
    const char *product_id;
    int32_t quantity;
} order_line_cmd;

typedef struct order_place_cmd {
    const char *request_id;
    const char *customer_id; /* "" = the caller */
    const order_line_cmd *lines;
    size_t nlines;
    order_provider provider;
} order_place_cmd;

/** Places an order (see the contract). On success *out and *action are filled. */
int order_place(order_service *svc, order_ctx *ctx, const order_place_cmd *cmd, order_t *out,
                order_payment_action *action, bool *replayed);
/** Reads an order the caller may see; ORDER_ENOTFOUND otherwise. */
int order_get(order_service *svc, order_ctx *ctx, const char *order_id, order_t *out);

typedef struct order_list_cmd {
    int32_t page_size;       /* 0 = default */
    const char *customer_id; /* "" = any (privileged) or self (customer) */
    const int *statuses;     /* filter */
    size_t nstatuses;
    bool has_cursor; /* decoded page token */
    int64_t cursor_created_at_us;
    const char *cursor_id;
} order_list_cmd;

/** Lists a page of orders. *more tells whether another page follows; the cursor of the
 *  next page is the last order's (created_at_us, id). Free *out with order_list_free. */
int order_list(order_service *svc, order_ctx *ctx, const order_list_cmd *cmd, order_t **out,
               size_t *n, bool *more);
/** Cancels a PENDING or PAID order; voids or refunds its payment. Cancelling a cancelled
 *  order returns it unchanged. */
int order_cancel(order_service *svc, order_ctx *ctx, const char *order_id, const char *reason,
                 order_t *out);
/** Confirms a payment after the provider verified it. A PAID order is returned unchanged. */
int order_confirm_payment(order_service *svc, order_ctx *ctx, const char *order_id,
                          order_provider provider, const char *reference, order_t *out);
/** PAID -> SHIPPED or SHIPPED -> DELIVERED; expected_version -1 = any. */
int order_update_status(order_service *svc, order_ctx *ctx, const char *order_id, order_status to,
                        int64_t expected_version, order_t *out);
int order_product_upsert(order_service *svc, order_ctx *ctx, const order_product *p,
                         order_product *out);
int order_product_get(order_service *svc, order_ctx *ctx, const char *product_id,
                      order_product *out);

/** True if s is a UUID in canonical text form (8-4-4-4-12 hex). */
bool order_id_valid(const char *s);
/** Builds the request fingerprint used for idempotency (a canonical text of everything in
 *  the request that decides the order). Writes at most cap bytes; false if truncated. */
bool order_fingerprint(const order_place_cmd *cmd, const char *customer_id, char *buf, size_t cap);

#endif
