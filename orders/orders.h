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
#define ORDER_ID_LEN             36 /* UUID text form */
#define ORDER_CUSTOMER_MAX       128
#define ORDER_REQUEST_ID_MAX     128
#define ORDER_PRODUCT_ID_MAX     64
#define ORDER_PRODUCT_NAME_MAX   200
#define ORDER_REFERENCE_MAX      255
#define ORDER_REASON_MAX         500
#define ORDER_MAX_LINES          100
#define ORDER_MIN_QUANTITY       1
#define ORDER_MAX_QUANTITY       10000
#define ORDER_PAGE_SIZE_DEFAULT  50
#define ORDER_PAGE_SIZE_MAX      500
#define ORDER_MAX_VIOLATIONS     128
#define ORDER_URL_MAX            511
#define ORDER_PAYMENT_METHOD_MAX 255
#define ORDER_ERROR_META_MAX     4

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
    ORDER_EDUPLICATE = -10,   /* an inbound event (webhook, inventory reply) already applied;
                                 nothing was written */
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
    /* ErrorInfo.metadata: e.g. provider_status, decline_code. Never secrets. */
    size_t nmeta;
    char meta_key[ORDER_ERROR_META_MAX][32];
    char meta_value[ORDER_ERROR_META_MAX][128];
} order_error;

/** Sets code and a printf-style message; returns code so callers can `return order_fail(...)`. */
int order_fail(order_error *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/** Appends a field violation (dropped, with violations_truncated set, past the cap). */
void order_violate(order_error *e, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/** Adds an ErrorInfo metadata entry (dropped past ORDER_ERROR_META_MAX; a key already present
 *  is overwritten). */
void order_error_meta(order_error *e, const char *key, const char *fmt, ...)
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
    int64_t paid_at_us;                          /* Unix microseconds; 0 = not paid */
    char pay_charge_id[ORDER_REFERENCE_MAX + 1]; /* Stripe charge / PayPal capture id; "" */
    char pay_receipt_url[ORDER_URL_MAX + 1];     /* "" if the provider gave none */
    char refund_id[ORDER_REFERENCE_MAX + 1];     /* the provider's refund id; "" = none */
    int64_t refunded_at_us;                      /* 0 = not refunded */
    int64_t stock_reserved_at_us;                /* inventory said stock.reserved; 0 = not yet */
    char cancel_reason[ORDER_REASON_MAX + 1];    /* why it was cancelled, expired or failed */
    int64_t created_at_us;                       /* Unix microseconds, set by the store */
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
    char approval_url[ORDER_URL_MAX + 1];
} order_payment_action;

/** What a provider says about a succeeded payment. */
typedef struct order_payment_info {
    int64_t paid_at_us;                      /* when it succeeded (Unix µs); 0 = not paid */
    char charge_id[ORDER_REFERENCE_MAX + 1]; /* Stripe latest_charge / PayPal capture id */
    char receipt_url[ORDER_URL_MAX + 1];     /* "" if none */
    char provider_status[64];                /* the provider's own word ("succeeded") */
} order_payment_info;

/** What a verified provider webhook means for an order (payments/ parses, the domain acts). */
typedef enum order_pay_event_kind {
    ORDER_PAY_EVENT_IGNORED = 0,   /* an event type orderd does not act on */
    ORDER_PAY_EVENT_SUCCEEDED = 1, /* payment_intent.succeeded, PAYMENT.CAPTURE.COMPLETED */
    ORDER_PAY_EVENT_FAILED = 2,    /* an attempt failed; the payer may try again (Stripe) */
    ORDER_PAY_EVENT_DENIED = 3,    /* failed for good: PAYMENT.CAPTURE.DENIED */
    ORDER_PAY_EVENT_CANCELED = 4,  /* payment_intent.canceled */
    ORDER_PAY_EVENT_REFUNDED = 5,  /* charge.refunded (in full), PAYMENT.CAPTURE.REFUNDED */
} order_pay_event_kind;

typedef struct order_payment_event {
    char id[ORDER_REFERENCE_MAX + 1]; /* the provider's event id: the dedupe key */
    order_provider provider;
    order_pay_event_kind kind;
    char type[64];                           /* the provider's event type, for logs */
    char order_id[ORDER_ID_LEN + 1];         /* metadata[order_id] / custom_id; "" if absent */
    char reference[ORDER_REFERENCE_MAX + 1]; /* PaymentIntent id / PayPal order id; "" */
    char charge_id[ORDER_REFERENCE_MAX + 1]; /* charge / capture id; "" */
    char refund_id[ORDER_REFERENCE_MAX + 1]; /* for REFUNDED; "" */
    char receipt_url[ORDER_URL_MAX + 1];
    int64_t amount_minor; /* in ISO-4217 minor units of `currency`; -1 if not given */
    char currency[4];     /* upper case; "" if not given */
    bool full_refund;     /* REFUNDED: the whole amount went back */
    int64_t occurred_at_us;
    char failure_code[64]; /* decline code for FAILED / DENIED; "" */
    char failure_message[256];
} order_payment_event;

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
    const char *charge_id;       /* NULL = unchanged */
    const char *receipt_url;     /* NULL = unchanged */
    const char *reference;       /* payment reference, set only if the order has none; NULL */
    const struct order_inbound *inbound; /* NULL, or an inbound event recorded with it */
} order_transition;

/** An inbound event (provider webhook, inventory reply), recorded in the same transaction
 *  as its effect under a unique id: applying it twice is ORDER_EDUPLICATE. */
typedef enum order_inbound_kind {
    ORDER_INBOUND_PROVIDER = 1,  /* processed_provider_events */
    ORDER_INBOUND_INVENTORY = 2, /* processed_inventory_replies */
} order_inbound_kind;
typedef struct order_inbound {
    order_inbound_kind kind;
    const char *id;
} order_inbound;

/** A change of an order's payment facts or stock reservation, without a status change:
 *  one conditional UPDATE that bumps version. Fields left NULL / 0 / UNSPECIFIED stay. */
typedef struct order_amendment {
    const char *order_id;
    unsigned pay_from_set;   /* allowed current payment statuses (1u << order_pay_status,
                                UNSPECIFIED = no payment yet); 0 = any */
    order_provider provider; /* UNSPECIFIED = unchanged */
    const char *reference;
    order_pay_status pay_status;
    int64_t paid_at_us;
    const char *charge_id;
    const char *receipt_url;
    const char *refund_id;
    int64_t refunded_at_us;
    int64_t stock_reserved_at_us;
    const order_inbound *inbound;
} order_amendment;
#define ORDER_PAY_BIT(s) (1u << (unsigned)(s))

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
     * Applies an amendment (see order_amendment). ORDER_EPRECONDITION with *out the current
     * order if its payment status is not in pay_from_set; ORDER_EDUPLICATE if the inbound
     * event was already recorded; ORDER_ENOTFOUND if absent. order_transition reports
     * ORDER_EDUPLICATE the same way.
     */
    int (*order_amend)(void *self, order_ctx *ctx, const order_amendment *a, order_t *out);
    /** Whether an inbound event was already applied (recorded with its effect). */
    int (*inbound_seen)(void *self, order_ctx *ctx, const order_inbound *in, bool *seen);
    /** The order whose payment reference or charge id is `ref` with provider p;
     *  ORDER_ENOTFOUND if none. */
    int (*order_find_by_payment)(void *self, order_ctx *ctx, order_provider p, const char *ref,
                                 order_t *out);
    /**
     * Moves up to `max` PENDING orders created before created_before_us (oldest first) to
     * EXPIRED in one transaction, claiming them with FOR UPDATE SKIP LOCKED so that replicas
     * share the work; each gets a history row (actor = ctx->caller.subject, `reason`).
     * *out is a heap array of the expired orders (free with order_list_free).
     */
    int (*orders_expire_due)(void *self, order_ctx *ctx, int64_t created_before_us,
                             const char *reason, size_t max, order_t **out, size_t *n);
    /**
     * Orders owed a payment settlement: CANCELLED, EXPIRED or FAILED with a payment still
     * PENDING or SUCCEEDED, last changed before changed_before_us; at most `max`, claimed
     * with SKIP LOCKED. *out as for order_list.
     */
    int (*orders_unsettled)(void *self, order_ctx *ctx, int64_t changed_before_us, size_t max,
                            order_t **out, size_t *n);
} order_store;

/** Frees an array returned by order_store.order_list. */
void order_list_free(order_t *orders, size_t n);

/** A saved payment method to charge at once, off-session (Stripe only). */
typedef struct order_saved_method {
    const char *method;   /* pm_...: the payment method */
    const char *customer; /* NULL or "": none; cus_...: the provider's customer it is saved
                             to (Stripe refuses a saved method without it) */
} order_saved_method;

/**
 * A payment provider. Every function writes ctx->err on failure and returns its code.
 */
typedef struct order_payments {
    void *self;
    /**
     * Creates the payment for an order, keyed by the order id: calling it again for the
     * same order returns the same payment. Fills *out. It never moves money.
     * saved (NULL = none): the saved payment method (and customer) the payment is for,
     * charged afterwards by charge() (Stripe only; others return ORDER_EINVAL). A refusal
     * for good (the provider refuses the method itself: unknown, saved to another
     * customer; or an amount it cannot take) is ORDER_EPRECONDITION with metadata
     * decline_code (reason "PAYMENT_DECLINED", or the refusal's own reason).
     */
    int (*create)(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                  order_payment_action *out, order_payment_info *paid);
    /**
     * Charges the order's created payment (o->pay_reference) with the saved method, at
     * once and off-session, keyed by the order: a repeat is the same charge. Succeeded:
     * ORDER_OK, paid->paid_at_us > 0 and *paid describing it. Still processing: ORDER_OK
     * with paid->paid_at_us == 0 (a webhook will tell). Declined: ORDER_EPRECONDITION with
     * reason "PAYMENT_DECLINED" and metadata decline_code / provider_status. NULL for a
     * provider without saved methods.
     */
    int (*charge)(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                  order_payment_info *paid);
    /**
     * Asks the provider whether `reference` is a succeeded payment of this order (PayPal:
     * captures it first), for its total, currency and order id. ORDER_OK with *info filled
     * if so; ORDER_EPRECONDITION with reason PAYMENT_NOT_SUCCEEDED or PAYMENT_MISMATCH and
     * metadata provider_status otherwise.
     */
    int (*verify)(void *self, order_ctx *ctx, const order_t *o, const char *reference,
                  order_payment_info *info);
    /** Refunds the order's payment in full, under an idempotency key of its own (one refund
     *  per order, however often it is called). refund_id gets the provider's id. */
    int (*refund)(void *self, order_ctx *ctx, const order_t *o,
                  char refund_id[ORDER_REFERENCE_MAX + 1]);
    /** Voids (cancels) the order's unpaid payment. Idempotent. ORDER_EPRECONDITION (reason
     *  PAYMENT_ALREADY_SUCCEEDED) if the payment succeeded meanwhile: refund it instead. */
    int (*cancel)(void *self, order_ctx *ctx, const order_t *o);
} order_payments;

/* ---- the service (use cases) ---- */

typedef struct order_config {
    int32_t tax_rate_bps;    /* 0..10000 */
    int64_t max_total_minor; /* totals above this are refused (provider limit) */
} order_config;

/** Something the domain did or could not do in the background of a call (a refund left for
 *  later, an event that no longer applies), for the operator's log. `what` is a short
 *  constant phrase; e may be NULL. */
typedef void (*order_notice_fn)(const char *what, const order_t *o, const order_error *e);

typedef struct order_service {
    order_config cfg;
    order_store store;
    order_payments *providers[ORDER_PROVIDER_MAX + 1]; /* NULL = not configured */
    order_notice_fn notice;                            /* NULL = silent */
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
    const char *payment_method;   /* NULL or "" = none; a saved Stripe payment method to
                                     charge at once (off-session) */
    const char *payment_customer; /* NULL or "" = none; the Stripe customer it is saved to */
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

/* ---- inbound events and background work ---- */

/**
 * Applies a verified payment-provider event (a webhook), through the same state machine
 * and conditional updates as the RPCs, recording ev->id in the same transaction:
 * - SUCCEEDED on a PENDING order whose amount, currency and order id match: PAID (with
 *   the charge id, time and receipt). On a CANCELLED / EXPIRED / FAILED order whose payment
 *   was not settled yet: the payment is recorded SUCCEEDED and refunded at once (or by
 *   order_settle_due if the provider fails now); the order's status stays.
 * - DENIED or CANCELED on a PENDING order: FAILED, payment FAILED / VOIDED.
 * - FAILED: recorded in the log only; the payer may try again, expiry ends it otherwise.
 * - REFUNDED in full: the payment is recorded REFUNDED (with the refund id); an order not
 *   shipped yet (PENDING or PAID) is CANCELLED with it, since it is no longer paid; a
 *   shipped or delivered one keeps its status.
 * ORDER_EDUPLICATE when the event was already applied; ORDER_ENOTFOUND when it names no
 * order of ours (the webhook should still be acknowledged). *out may be NULL. On
 * ORDER_OK, *changed (may be NULL) says whether the event changed the order (false: it
 * was already reflected, or no longer applies).
 */
int order_apply_payment_event(order_service *svc, order_ctx *ctx, const order_payment_event *ev,
                              order_t *out, bool *changed);

/** An inventory reply (docs/events.md). */
typedef struct order_stock_reply {
    const char *id;       /* message_id = event_id: the dedupe key */
    bool rejected;        /* stock.rejected; false = stock.reserved */
    const char *order_id; /* must be a UUID */
    const char *reason;   /* for rejections; may be NULL */
} order_stock_reply;

/**
 * Applies an inventory reply: stock.rejected moves a PENDING order to FAILED (the reason
 * kept), then voids its payment (order_settle_due finishes it if the provider fails);
 * stock.reserved records the time on the order. A rejection of an order no longer PENDING
 * changes nothing (ORDER_OK). ORDER_EDUPLICATE if already applied; ORDER_EINVAL for a reply
 * that can never apply (bad id); ORDER_ENOTFOUND for an unknown order.
 */
int order_apply_stock_reply(order_service *svc, order_ctx *ctx, const order_stock_reply *r);

/** Expires up to `max` PENDING orders older than pending_ttl_us and voids their payments.
 *  *expired = how many moved. */
int order_expire_due(order_service *svc, order_ctx *ctx, int64_t pending_ttl_us, size_t max,
                     size_t *expired);

/** Settles (voids or refunds) the payments of up to `max` cancelled, expired or failed orders
 *  whose payment a failure left unsettled, changed more than min_age_us ago. */
int order_settle_due(order_service *svc, order_ctx *ctx, int64_t min_age_us, size_t max,
                     size_t *settled);

/** True if s is a UUID in canonical text form (8-4-4-4-12 hex). */
bool order_id_valid(const char *s);
/** Builds the request fingerprint used for idempotency (a canonical text of everything in
 *  the request that decides the order). Writes at most cap bytes; false if truncated. */
bool order_fingerprint(const order_place_cmd *cmd, const char *customer_id, char *buf, size_t cap);

#endif
