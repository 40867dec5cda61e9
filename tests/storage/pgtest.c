/* pgtest.c — shared set-up of the storage tests; see pgtest.h. */
#include "pgtest.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"

static char dsn[1024];
static char schema[64];
static char appname[64];
static PGconn *raw;

const char *pgt_dsn(void)
{
    return dsn;
}
const char *pgt_schema(void)
{
    return schema;
}
const char *pgt_appname(void)
{
    return appname;
}

int pgt_setup(const char *prog, bool migrate)
{
    const char *env = getenv("ORDERD_TEST_PG_DSN");
    if (!env || !*env) {
        fprintf(
            stderr,
            "FAIL: ORDERD_TEST_PG_DSN is not set. The storage tests run against a real "
            "PostgreSQL; set it to a libpq DSN, e.g.\n"
            "  ORDERD_TEST_PG_DSN='host=127.0.0.1 port=55490 user=orderd dbname=orderd_test'\n");
        return -1;
    }
    snprintf(dsn, sizeof dsn, "%s", env);
    snprintf(schema, sizeof schema, "t_%s_%d", prog, (int)getpid());
    snprintf(appname, sizeof appname, "orderd-test-%s-%d", prog, (int)getpid());
    char opts[128];
    snprintf(opts, sizeof opts, "-c search_path=%s", schema);
    setenv("PGOPTIONS", opts, 1);
    setenv("PGAPPNAME", appname, 1);

    PGconn *c = PQconnectdb(dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "FAIL: cannot connect to ORDERD_TEST_PG_DSN: %s", PQerrorMessage(c));
        PQfinish(c);
        return -1;
    }
    char sql[256];
    snprintf(sql, sizeof sql,
             "SET client_min_messages = warning; DROP SCHEMA IF EXISTS %s CASCADE; "
             "CREATE SCHEMA %s",
             schema, schema);
    PGresult *r = PQexec(c, sql);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok)
        fprintf(stderr, "FAIL: creating schema %s: %s", schema, PQresultErrorMessage(r));
    PQclear(r);
    PQfinish(c);
    if (!ok)
        return -1;
    if (migrate) {
        char err[512];
        if (store_migrate(dsn, err, sizeof err) != 0) {
            fprintf(stderr, "FAIL: store_migrate: %s\n", err);
            return -1;
        }
    }
    return 0;
}

void pgt_teardown(void)
{
    if (raw) {
        PQfinish(raw);
        raw = NULL;
    }
    PGconn *c = PQconnectdb(dsn);
    if (PQstatus(c) == CONNECTION_OK) {
        char sql[128];
        snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE", schema);
        PQclear(PQexec(c, "SET client_min_messages = warning"));
        PQclear(PQexec(c, sql));
    }
    PQfinish(c);
}

PGconn *pgt_conn(void)
{
    if (!raw || PQstatus(raw) != CONNECTION_OK) {
        PQfinish(raw);
        raw = PQconnectdb(dsn);
        if (PQstatus(raw) != CONNECTION_OK)
            fail_msg("raw connection: %s", PQerrorMessage(raw));
    }
    return raw;
}

int64_t pgt_scalar(const char *sql, const char *p1, const char *p2, const char *p3)
{
    const char *params[3] = {p1, p2, p3};
    int n = p3 ? 3 : p2 ? 2 : p1 ? 1 : 0;
    PGresult *r = PQexecParams(pgt_conn(), sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
        PQclear(r);
        fail_msg("query failed: %s: %s", sql, msg);
    }
    int64_t v = -1;
    if (PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
        v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    return v;
}

void pgt_exec(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
        PQclear(r);
        fail_msg("statement failed: %s: %s", sql, msg);
    }
    PQclear(r);
}

struct store *pgt_store(int64_t statement_timeout_us)
{
    char err[256] = "";
    struct store *s = store_open(dsn, statement_timeout_us, err, sizeof err);
    if (!s)
        fail_msg("store_open: %s", err);
    return s;
}

order_ctx pgt_ctx(order_error *e, const char *subject, int64_t timeout_us)
{
    memset(e, 0, sizeof *e);
    order_ctx ctx = {.deadline_mono_us = INT64_MAX, .err = e};
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "%s", subject);
    ctx.caller.roles = ORDER_ROLE_SERVICE | ORDER_ROLE_ADMIN;
    if (timeout_us)
        ctx.deadline_mono_us = clock_mono_us() + timeout_us;
    return ctx;
}

void pgt_order(order_t *o, const char *customer, int n, int64_t unit_price)
{
    memset(o, 0, sizeof *o);
    snprintf(o->customer_id, sizeof o->customer_id, "%s", customer);
    snprintf(o->currency, sizeof o->currency, "EUR");
    o->status = ORDER_STATUS_PENDING;
    o->pay_provider = ORDER_PROVIDER_LOCAL;
    o->items = calloc((size_t)n, sizeof *o->items);
    assert_non_null(o->items);
    o->nitems = (size_t)n;
    int64_t sub = 0;
    for (int i = 0; i < n; i++) {
        order_item *it = &o->items[i];
        snprintf(it->product_id, sizeof it->product_id, "sku-%d", i + 1);
        snprintf(it->name, sizeof it->name, "Item \"%d\" {x,y} \\ é", i + 1);
        it->quantity = i + 1;
        it->unit_price_minor = unit_price;
        it->line_total_minor = unit_price * (i + 1);
        sub += it->line_total_minor;
    }
    o->subtotal_minor = sub;
    o->tax_minor = sub / 10;
    o->total_minor = sub + sub / 10;
}

void pgt_name(char *buf, size_t cap, const char *prefix)
{
    static int counter;
    snprintf(buf, cap, "%s-%d-%d", prefix, ++counter, (int)getpid());
}
