/* migrate.c — applies the SQL migrations embedded in the binary (storage/migrations/).
 *
 * DESIGN
 * Each migration runs in its own transaction together with the row that records it in
 * schema_migrations, so a migration is either applied and recorded or neither. Replicas
 * that start together all call store_migrate(): a session-level advisory lock makes them
 * take turns, and each applies only what the one before it left undone. Migration files
 * must not contain transaction control (BEGIN/COMMIT) or statements that cannot run in a
 * transaction (CREATE INDEX CONCURRENTLY).
 */
#include "storage/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "storage/migrations.h"

#define MIGRATE_CONNECT_BOUND_US (10 * 1000000LL)
/* The advisory lock key that serializes migrators: "orderd" in ASCII, then 1. */
#define MIGRATE_LOCK_KEY "8030591472428646401" /* 0x6f72646572640001 */

/* Runs a statement that returns no rows we need; false (with err) if it failed. */
static bool exec_ok(PGconn *c, const char *sql, const char *what, char *err, size_t errlen)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (!ok) {
        const char *m = PQresultErrorMessage(r);
        snprintf(err, errlen, "%s: %s", what, *m ? m : PQerrorMessage(c));
        err[strcspn(err, "\n")] = '\0';
        log_kv(LOG_ERROR, "migration step failed", LOG_F_STR, "step", what, LOG_F_STR, "error", err,
               LOG_F_END);
    }
    PQclear(r);
    return ok;
}

static bool applied_has(const int *v, int n, int version)
{
    for (int i = 0; i < n; i++)
        if (v[i] == version)
            return true;
    return false;
}

/* Applies one migration and records it, in one transaction. */
static bool apply_one(PGconn *c, const struct store_migration *m, char *err, size_t errlen)
{
    char what[160];
    snprintf(what, sizeof what, "migration %s", m->name);
    if (!exec_ok(c, "BEGIN", what, err, errlen))
        return false;
    if (!exec_ok(c, m->sql, what, err, errlen))
        goto rollback;
    store_num v;
    const char *params[2] = {store__num(&v, m->version), m->name};
    PGresult *r = PQexecParams(c, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               2, NULL, params, NULL, NULL, 0);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok) {
        snprintf(err, errlen, "%s: recording it failed: %s", what, PQresultErrorMessage(r));
        err[strcspn(err, "\n")] = '\0';
    }
    PQclear(r);
    if (!ok)
        goto rollback;
    if (!exec_ok(c, "COMMIT", what, err, errlen))
        return false; /* a failed COMMIT has already ended the transaction */
    log_kv(LOG_INFO, "migration applied", LOG_F_STR, "name", m->name, LOG_F_INT, "version",
           (int64_t)m->version, LOG_F_END);
    return true;
rollback:;
    char ignored[8];
    exec_ok(c, "ROLLBACK", "rollback", ignored, sizeof ignored);
    return false;
}

int store_migrate(const char *dsn, char *err, size_t errlen)
{
    /* The embedded list must be in strictly increasing version order. */
    for (size_t i = 0; i < store_migrations_count; i++) {
        if (store_migrations[i].version <= 0 ||
            (i > 0 && store_migrations[i].version <= store_migrations[i - 1].version)) {
            snprintf(err, errlen, "embedded migration %s: versions must be positive and unique",
                     store_migrations[i].name);
            return -1;
        }
    }

    char msg[512];
    bool timed_out;
    PGconn *c = store__connect(dsn, clock_mono_us() + MIGRATE_CONNECT_BOUND_US, &timed_out, msg,
                               sizeof msg);
    if (!c) {
        snprintf(err, errlen, "cannot connect to PostgreSQL: %s", msg);
        log_kv(LOG_ERROR, "migration: cannot connect", LOG_F_STR, "error", msg, LOG_F_END);
        return -1;
    }
    int rc = -1;
    int *applied = NULL;
    int napplied = 0;
    /* Held for the whole run; released explicitly below, or by the server if we die. */
    if (!exec_ok(c, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")", "advisory lock", err, errlen))
        goto done;
    if (!exec_ok(c,
                 "CREATE TABLE IF NOT EXISTS schema_migrations ("
                 " version int PRIMARY KEY,"
                 " name text NOT NULL,"
                 " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())",
                 "create schema_migrations", err, errlen))
        goto unlock;

    PGresult *r = PQexec(c, "SELECT version FROM schema_migrations ORDER BY version");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "reading schema_migrations: %s", PQresultErrorMessage(r));
        err[strcspn(err, "\n")] = '\0';
        PQclear(r);
        goto unlock;
    }
    napplied = PQntuples(r);
    applied = calloc((size_t)napplied + 1, sizeof *applied);
    if (!applied) {
        PQclear(r);
        snprintf(err, errlen, "out of memory");
        goto unlock;
    }
    for (int i = 0; i < napplied; i++)
        applied[i] = (int)store__int(r, i, 0);
    PQclear(r);
    if (napplied > 0 && store_migrations_count > 0 &&
        applied[napplied - 1] > store_migrations[store_migrations_count - 1].version)
        log_kv(LOG_WARN, "the database has migrations this binary does not know", LOG_F_INT,
               "database_version", (int64_t)applied[napplied - 1], LOG_F_INT, "binary_version",
               (int64_t)store_migrations[store_migrations_count - 1].version, LOG_F_END);

    for (size_t i = 0; i < store_migrations_count; i++) {
        if (applied_has(applied, napplied, store_migrations[i].version))
            continue;
        if (!apply_one(c, &store_migrations[i], err, errlen))
            goto unlock;
    }
    rc = 0;
unlock:;
    char ignored[8];
    exec_ok(c, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")", "advisory unlock", ignored,
            sizeof ignored);
done:
    free(applied);
    PQfinish(c);
    return rc;
}
