/* fixture.c — see fixture.h. */
#include "fixture.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "storage/pgtest.h"

void fx_place(order_store *p, order_t *o, const char *customer, int nitems)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, customer, 10 * 1000000);
    char key[64];
    pgt_name(key, sizeof key, "req");
    pgt_order(o, customer, nitems, 250);
    bool replayed = true;
    int rc = p->order_insert(p->self, &ctx, key, key, o, &replayed);
    if (rc != ORDER_OK)
        fail_msg("order_insert: %s: %s", order_code_name(rc), e.message);
    assert_false(replayed);
}

void fx_move(order_store *p, const char *order_id, order_status from, order_status to,
             const char *reason)
{
    order_error e;
    order_ctx ctx = pgt_ctx(&e, "fixture", 10 * 1000000);
    order_transition t = {.order_id = order_id,
                          .from_set = ORDER_STATUS_BIT(from),
                          .to = to,
                          .expected_version = -1,
                          .reason = reason};
    if (to == ORDER_STATUS_PAID) {
        t.pay_status = ORDER_PAY_SUCCEEDED;
        t.paid_at_us = 1700000000000000LL;
    }
    order_t out = {0};
    int rc = p->order_transition(p->self, &ctx, &t, &out);
    order_clear(&out);
    if (rc != ORDER_OK)
        fail_msg("order_transition to %s: %s: %s", order_status_name(to), order_code_name(rc),
                 e.message);
}

int64_t fx_unsent(void)
{
    return pgt_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL", NULL, NULL, NULL);
}

int64_t fx_rows(void)
{
    return pgt_scalar("SELECT count(*) FROM outbox", NULL, NULL, NULL);
}

void fx_reset(void)
{
    pgt_exec(pgt_conn(),
             "TRUNCATE orders, order_items, order_history, idempotency_keys, local_payments, "
             "outbox CASCADE");
}
