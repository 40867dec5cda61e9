/* test_migrate.c — store_migrate on an empty schema: concurrent migrators, idempotence,
 * the recorded versions; and store_open's refusal of a malformed DSN. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "pgtest.h"
#include "storage/migrations.h"

struct migrator {
    pthread_barrier_t *go;
    int rc;
    char err[512];
};

static void *run_migrate(void *arg)
{
    struct migrator *m = arg;
    pthread_barrier_wait(m->go);
    m->rc = store_migrate(pgt_dsn(), m->err, sizeof m->err);
    return NULL;
}

static void test_concurrent_migrators_then_idempotent(void **state)
{
    assert_true(store_migrations_count >= 1);
    int last = store_migrations[store_migrations_count - 1].version;
    /* The schema is empty: nothing is migrated yet. */
    assert_int_equal(pgt_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1",
                                pgt_schema(), NULL, NULL),
                     0);

    enum { N = 2 };
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, N);
    pthread_t th[N];
    struct migrator m[N];
    for (int i = 0; i < N; i++) {
        m[i] = (struct migrator){.go = &go};
        pthread_create(&th[i], NULL, run_migrate, &m[i]);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        if (m[i].rc != 0)
            fail_msg("migrator %d: %s", i, m[i].err);
    }
    pthread_barrier_destroy(&go);

    assert_int_equal(pgt_scalar("SELECT count(*) FROM schema_migrations", NULL, NULL, NULL),
                     (int64_t)store_migrations_count);
    assert_int_equal(pgt_scalar("SELECT max(version) FROM schema_migrations", NULL, NULL, NULL),
                     last);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM schema_migrations WHERE version = 1 AND "
                                "name = '0001_init.sql'",
                                NULL, NULL, NULL),
                     1);
    const char *tables[] = {"products",
                            "orders",
                            "order_items",
                            "idempotency_keys",
                            "order_history",
                            "local_payments",
                            "outbox",
                            "processed_provider_events",
                            "processed_inventory_replies"};
    for (size_t i = 0; i < sizeof tables / sizeof *tables; i++)
        assert_int_equal(pgt_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND "
                                    "tablename = $2",
                                    pgt_schema(), tables[i], NULL),
                         1);

    /* Again: applies nothing, changes nothing. */
    int64_t applied_at =
        pgt_scalar("SELECT (extract(epoch FROM max(applied_at)) * 1000000)::bigint "
                   "FROM schema_migrations",
                   NULL, NULL, NULL);
    char err[512];
    assert_int_equal(store_migrate(pgt_dsn(), err, sizeof err), 0);
    assert_int_equal(pgt_scalar("SELECT count(*) FROM schema_migrations", NULL, NULL, NULL),
                     (int64_t)store_migrations_count);
    assert_int_equal(pgt_scalar("SELECT (extract(epoch FROM max(applied_at)) * 1000000)::bigint "
                                "FROM schema_migrations",
                                NULL, NULL, NULL),
                     applied_at);

    struct store *s = pgt_store(0);
    assert_int_equal(store_schema_version(s), last);
    assert_true(store_ping(s));
    store_close(s);
}

static void test_schema_checks_money_and_names(void **state)
{
    /* The CHECKs hold even for writers that bypass the store. */
    PGconn *c = pgt_conn();
    const char *bad[] = {
        "INSERT INTO orders (customer_id, status, currency, subtotal_minor, tax_minor, "
        "total_minor) VALUES ('c', 'pending', 'EUR', 100, 10, 111)",
        "INSERT INTO orders (customer_id, status, currency, subtotal_minor, tax_minor, "
        "total_minor) VALUES ('c', 'PENDING', 'EUR', 100, 10, 110)",
        "INSERT INTO orders (customer_id, status, currency, subtotal_minor, tax_minor, "
        "total_minor) VALUES ('c', 'pending', 'eur', 100, 10, 110)",
        "INSERT INTO orders (customer_id, status, currency, subtotal_minor, tax_minor, "
        "total_minor) VALUES ('c', 'pending', 'EUR', -1, 1, 0)",
        "INSERT INTO products (id, name, unit_price_minor, currency) VALUES ('p', 'n', -5, 'EUR')",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        PGresult *r = PQexec(c, bad[i]);
        assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
        assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "23514");
        PQclear(r);
    }
    pgt_exec(c, "INSERT INTO orders (customer_id, status, currency, subtotal_minor, tax_minor, "
                "total_minor) VALUES ('c', 'pending', 'EUR', 100, 10, 110)");
}

static void test_open_rejects_malformed_dsn(void **state)
{
    char err[256] = "";
    assert_null(store_open("host=127.0.0.1 password=s3cret =oops", 0, err, sizeof err));
    assert_true(strlen(err) > 0);
    assert_null(strstr(err, "s3cret")); /* never echoes the DSN */
    assert_null(store_open("postgresql://[bad", 0, err, sizeof err));

    /* store_migrate against nothing fails with a message, not a hang. */
    assert_int_equal(store_migrate("host=127.0.0.1 port=1 dbname=x user=x", err, sizeof err), -1);
    assert_non_null(strstr(err, "cannot connect"));
}

int main(void)
{
    if (pgt_setup("migrate", false) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_migrators_then_idempotent),
        cmocka_unit_test(test_schema_checks_money_and_names),
        cmocka_unit_test(test_open_rejects_malformed_dsn),
    };
    int failed = cmocka_run_group_tests_name("storage_migrate", tests, NULL, NULL);
    if (failed == 0)
        pgt_teardown();
    return failed ? 1 : 0;
}
