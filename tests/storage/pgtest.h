/* pgtest.h — what the storage tests share: a schema of their own in the test database
 * (ORDERD_TEST_PG_DSN), a raw libpq connection to check rows behind the store's back, and
 * builders for contexts and orders. */
#ifndef ORDERD_TESTS_STORAGE_PGTEST_H
#define ORDERD_TESTS_STORAGE_PGTEST_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#include "orders/orders.h"
#include "storage/storage.h"

/**
 * Reads ORDERD_TEST_PG_DSN (prints why and returns -1 if unset: the tests must fail, not
 * pass, without a database), creates the empty schema t_<prog>_<pid> and points every
 * later connection of this process at it (PGOPTIONS search_path), sets PGAPPNAME to
 * pgt_appname(), and, if `migrate`, applies the migrations. Returns 0 or -1.
 */
int pgt_setup(const char *prog, bool migrate);
/** Drops the schema and closes the raw connection. */
void pgt_teardown(void);
const char *pgt_dsn(void);
const char *pgt_schema(void);
const char *pgt_appname(void);

/** The raw connection (opened on first use, in the test schema). */
PGconn *pgt_conn(void);
/** Runs a query with up to 3 text parameters and returns the integer in row 0, column 0
 *  (-1 on error or no row; fails the test on an SQL error). */
int64_t pgt_scalar(const char *sql, const char *p1, const char *p2, const char *p3);
/** Runs a statement on the raw connection; fails the test if it errors. */
void pgt_exec(PGconn *c, const char *sql);

/** A store on the test DSN with the given statement timeout; fails the test if NULL. */
struct store *pgt_store(int64_t statement_timeout_us);

/** A context for `subject` with roles service|admin; timeout_us 0 = no deadline. */
order_ctx pgt_ctx(order_error *e, const char *subject, int64_t timeout_us);

/** Fills *o (heap items) for `customer` with n items of unit_price * (i+1) quantity,
 *  subtotal their sum, tax 10% rounded down, total the sum; currency EUR. */
void pgt_order(order_t *o, const char *customer, int n, int64_t unit_price);

/** A fresh random-ish id suffix for keys and customers: "<prefix>-<counter>-<pid>". */
void pgt_name(char *buf, size_t cap, const char *prefix);

#endif
