/* fixture.h — orders for the amqp tests, written through the real store port so that the
 * orders trigger writes their events to the outbox, and reads of the outbox behind the
 * relay's back. Works in the schema pgt_setup() made (tests/storage/pgtest.h). */
#ifndef ORDERD_TESTS_AMQP_FIXTURE_H
#define ORDERD_TESTS_AMQP_FIXTURE_H

#include <stdint.h>

#include "orders/orders.h"

/** Places an order of `nitems` lines for `customer`; o->id is its id. Fails the test if the
 *  store refuses. */
void fx_place(order_store *p, order_t *o, const char *customer, int nitems);
/** Moves an order from `from` to `to` (with `reason`, kept for cancellations). */
void fx_move(order_store *p, const char *order_id, order_status from, order_status to,
             const char *reason);
/** Unpublished outbox rows. */
int64_t fx_unsent(void);
/** All outbox rows. */
int64_t fx_rows(void);
/** Empties orders (and their outbox rows) so a test starts from nothing. */
void fx_reset(void);

#endif
