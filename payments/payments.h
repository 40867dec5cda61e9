/* payments.h — the payment provider adapters. Each fills the domain's order_payments port
 * (orders.h); server/ builds the ones the configuration enables and hands them to the
 * domain. One instance per worker thread: an instance is not shared between threads. */
#ifndef ORDERD_PAYMENTS_PAYMENTS_H
#define ORDERD_PAYMENTS_PAYMENTS_H

#include <stddef.h>

#include "orders/orders.h"

struct store;

/**
 * The LOCAL provider, for development: it keeps its payments in PostgreSQL through `store`
 * (borrowed; it must outlive the provider and belong to the same thread). A payment is
 * created PENDING with a reference "lp_" + 24 hex digits, one per order; confirming with
 * that reference marks it succeeded, with any other reference is FAILED_PRECONDITION
 * (reason PAYMENT_NOT_FOUND) and changes nothing.
 * Refuses to load (NULL, with a message in err) when `environment` is "production".
 * Free with pay_local_destroy().
 */
order_payments *pay_local_create(struct store *store, const char *environment, char *err,
                                 size_t errlen);

/** Frees a provider made by pay_local_create(). NULL is a no-op. */
void pay_local_destroy(order_payments *p);

#endif
