/* migrations.h — the SQL migrations embedded into the binary (generated migrations.c
 * from storage/migrations/NNNN_name.sql, applied in version order by store_migrate). */
#ifndef ORDERD_STORAGE_MIGRATIONS_H
#define ORDERD_STORAGE_MIGRATIONS_H
#include <stddef.h>

struct store_migration {
    int version;      /* the number the file name starts with */
    const char *name; /* the file name */
    const char *sql;  /* the whole file, run in one transaction */
};

extern const struct store_migration store_migrations[];
extern const size_t store_migrations_count;

#endif
