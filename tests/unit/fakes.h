/* fakes.h — in-memory fakes of the domain's ports (order_store, order_payments) and a
 * small fixture that wires them into an order_service, for the cmocka unit tests.
 *
 * DESIGN
 * The fakes keep the semantics orders.h documents for each port, so a test that passes
 * here says something about the domain and not about the fake: conditional transitions
 * (from_set, expected_version) answer ORDER_EPRECONDITION with current_status and the
 * current order; idempotency keys are (caller subject, request_id) with a fingerprint;
 * lists come newest first, (created_at DESC, id DESC), after an optional cursor.
 * Every port function counts its calls before doing anything else, so "the store saw no
 * insert" is a counter that stays 0 even when the fake would have refused the call.
 * Failures are injected per operation (fail the next N calls with a code) or for the
 * whole store (`down`: every call answers ORDER_EUNAVAILABLE); races are staged with a
 * one-shot hook that runs another use case inside a port call.
 * Inbound events (order_inbound: webhooks, inventory replies) are deduplicated as the real
 * store does: the id is recorded only together with a change that happened, and a change
 * carrying an id already recorded answers ORDER_EDUPLICATE (with the current order in
 * *out) and writes nothing.
 * The fake store also checks one domain invariant on every transition it is asked for:
 * each status in from_set may move to `to` under the state machine. A violation fails
 * the running test.
 *
 * Ownership: everything is owned by the fake; pointers returned by the find helpers stay
 * valid until the next write to the same fake. x_destroy(NULL) does nothing.
 */
#ifndef ORDERD_TESTS_UNIT_FAKES_H
#define ORDERD_TESTS_UNIT_FAKES_H

#include "orders/orders.h"

/* ---- the store ---- */

enum fake_store_op {
    FAKE_PRODUCTS_GET,
    FAKE_PRODUCT_UPSERT,
    FAKE_ORDER_INSERT,
    FAKE_ORDER_GET,
    FAKE_ORDER_LIST,
    FAKE_ORDER_TRANSITION,
    FAKE_ORDER_AMEND,
    FAKE_ORDER_FIND_BY_PAYMENT,
    FAKE_ORDERS_EXPIRE_DUE,
    FAKE_ORDERS_UNSETTLED,
    FAKE_INBOUND_SEEN,
    FAKE_STORE_NOPS
};

/** One row of the order history table. */
typedef struct fake_history {
    char order_id[ORDER_ID_LEN + 1];
    char actor[ORDER_CUSTOMER_MAX + 1];
    order_status from; /* UNSPECIFIED for the row written when the order is placed */
    order_status to;
    char reason[ORDER_REASON_MAX + 1];
    int64_t at_us;
} fake_history;

typedef struct fake_idem_key {
    char subject[ORDER_CUSTOMER_MAX + 1];
    char request_id[ORDER_REQUEST_ID_MAX + 1];
    char *fingerprint; /* heap, owned */
    char order_id[ORDER_ID_LEN + 1];
} fake_idem_key;

/** An inbound event id recorded with the change it made (processed_provider_events /
 *  processed_inventory_replies). */
typedef struct fake_inbound_seen {
    order_inbound_kind kind;
    char id[ORDER_REFERENCE_MAX + 1];
} fake_inbound_seen;

typedef struct fake_store {
    order_product *products;
    size_t nproducts, cap_products;
    order_t *orders; /* insertion order; items owned */
    size_t norders, cap_orders;
    fake_idem_key *keys;
    size_t nkeys, cap_keys;
    fake_history *history;
    size_t nhistory, cap_history;
    fake_inbound_seen *seen; /* recorded only when the change was made */
    size_t nseen, cap_seen;

    bool down;                 /* every call: ORDER_EUNAVAILABLE */
    int fail[FAKE_STORE_NOPS]; /* fail the next N calls of an op with fail_code */
    int fail_code;             /* default ORDER_EUNAVAILABLE */
    int calls[FAKE_STORE_NOPS];
    /* Runs once, at the next call of hook_op and before the fake looks at anything: a
     * concurrent writer getting in between the domain's read and its write. */
    void (*hook)(void *arg);
    void *hook_arg;
    enum fake_store_op hook_op;

    int64_t now_us;  /* wall clock of the store: created_at / updated_at */
    int64_t step_us; /* the clock advances by this much on every write (0 = frozen) */
    unsigned next_id;

    order_list_query last_list; /* the last order_list query, customer_id copied below */
    char last_list_customer[ORDER_CUSTOMER_MAX + 1];
} fake_store;

/** A new empty store; NULL on allocation failure. Free with fake_store_destroy. */
fake_store *fake_store_create(void);
void fake_store_destroy(fake_store *fs);
/** The port, for order_service.store. */
order_store fake_store_port(fake_store *fs);

/** Adds or replaces a catalogue row directly (not through the domain). */
void fake_store_put_product(fake_store *fs, const char *id, const char *name, int64_t price,
                            const char *currency, bool active);
/** Stores a copy of o as if it had been placed: an empty id is assigned, created_at 0 takes
 *  the store's clock, version 0 becomes 1. Returns the stored order. */
const order_t *fake_store_seed(fake_store *fs, const order_t *o);
/** The stored order with this id, or NULL. */
const order_t *fake_store_order(const fake_store *fs, const char *id);
/** Number of history rows of one order. */
size_t fake_store_history_count(const fake_store *fs, const char *order_id);
/** The last history row of one order, or NULL. */
const fake_history *fake_store_history_last(const fake_store *fs, const char *order_id);
/** Total calls to every write operation (insert, upsert, transition, amend,
 *  expire_due). */
int fake_store_writes(const fake_store *fs);
/** Whether an inbound event id of this kind was recorded. */
bool fake_store_seen(const fake_store *fs, order_inbound_kind kind, const char *id);

/* ---- a payment provider, behaving like the LOCAL one ---- */

enum fake_pay_op {
    FAKE_PAY_CREATE,
    FAKE_PAY_VERIFY,
    FAKE_PAY_REFUND,
    FAKE_PAY_CANCEL,
    FAKE_PAY_CHARGE,
    FAKE_PAY_NOPS
};

typedef struct fake_payment {
    char order_id[ORDER_ID_LEN + 1];
    char reference[ORDER_REFERENCE_MAX + 1];
    order_pay_status status; /* PENDING, SUCCEEDED, REFUNDED, VOIDED, or FAILED (declined) */
    int64_t amount_minor;    /* the order's total when the payment was created */
    char currency[4];
    int64_t paid_at_us;
    char charge_id[ORDER_REFERENCE_MAX + 1]; /* set when it succeeded */
    char receipt_url[ORDER_URL_MAX + 1];
    char refund_id[ORDER_REFERENCE_MAX + 1]; /* set when it was refunded */
    int refunds;                             /* real refunds of this payment (must stay <= 1) */
    int charges;                             /* saved payment methods charged (<= 1) */
} fake_payment;

typedef struct fake_payments {
    order_payments port; /* first: &fp->port goes into order_service.providers[] */
    order_provider provider;
    fake_payment *pays;
    size_t npays, cap_pays;

    int fail[FAKE_PAY_NOPS]; /* fail the next N calls of an op with fail_code */
    int fail_code;           /* default ORDER_EUNAVAILABLE */
    int calls[FAKE_PAY_NOPS];
    int64_t remaining_us[FAKE_PAY_NOPS]; /* time the caller's context had left, last call */
    /* Runs once, at the next call of hook_op, before the provider looks at anything. */
    void (*hook)(void *arg);
    void *hook_arg;
    enum fake_pay_op hook_op;
    int created;            /* payments really created (one per order, however often create runs) */
    int refunded;           /* payments really moved to REFUNDED */
    int voided;             /* payments really moved to VOIDED */
    char last_customer[64]; /* the customer the last saved method was charged with ("" none) */
    int64_t now_us;
} fake_payments;

/**
 * A provider answering as `provider`; NULL on allocation failure. It behaves like LOCAL
 * (verify with the payment's own reference is the payment) and, like Stripe, charges a
 * saved payment method at once in create(): "pm_ok..." succeeds, "pm_declined:<code>" is
 * declined (ORDER_EPRECONDITION, reason PAYMENT_DECLINED, metadata decline_code and
 * provider_status; the payment is FAILED), "pm_processing" is still processing (paid_at 0).
 * A succeeded payment gets charge id "ch_<reference>" and a receipt URL; a refund gets
 * refund id "re_<reference>" (the same one however often refund() is called).
 */
fake_payments *fake_payments_create(order_provider provider);
void fake_payments_destroy(fake_payments *fp);
/** The provider's payment for an order, or NULL. */
const fake_payment *fake_payments_find(const fake_payments *fp, const char *order_id);
/** Marks an order's pending payment succeeded on the provider's side only (as if the
 *  customer paid and the confirmation has not reached orderd yet). */
void fake_payments_mark_paid(fake_payments *fp, const char *order_id);
/** Real refunds of an order's payment (0 if it has none). */
int fake_payments_refunds(const fake_payments *fp, const char *order_id);

/* ---- the fixture: a service over a fake store and a fake LOCAL provider ---- */

#define FAKE_TAX_BPS   825         /* 8.25 % */
#define FAKE_MAX_TOTAL 100000000LL /* 1,000,000.00 in a 2-decimal currency */

typedef struct fake_env {
    fake_store *store;
    fake_payments *local;
    fake_payments *stripe; /* NULL until fake_env_stripe() */
    order_service svc;
    order_error err;
    order_ctx ctx;
} fake_env;

/** A service with tax FAKE_TAX_BPS, max total FAKE_MAX_TOTAL, LOCAL configured and acting
 *  as customer "alice". Aborts the test on allocation failure. */
fake_env *fake_env_create(void);
void fake_env_destroy(fake_env *env);
/** Configures a fake STRIPE provider too (once; owned by env) and returns it. */
fake_payments *fake_env_stripe(fake_env *env);
/** Acts as another caller from now on, with no deadline and a reset error. */
order_ctx *fake_env_as(fake_env *env, const char *subject, unsigned roles);
/** Resets the error (keeps the caller): call between two use cases. */
order_ctx *fake_env_again(fake_env *env);

#endif
