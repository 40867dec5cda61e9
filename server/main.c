/* main.c — the orderd command: serve, migrate, token, version.
 *
 *   orderd [serve] [--config FILE]          run the gRPC server (default command)
 *   orderd migrate [--config FILE]          apply the database migrations
 *   orderd token --subject S --role R[,R] [--ttl 15m] [--config FILE]
 *                                           print a bearer token signed with the HS256 key
 *   orderd version
 *
 * --config defaults to $ORDERD_CONFIG, else ./config.yaml.
 */
#include <grpc/grpc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "server/auth.h"
#include "server/config.h"
#include "server/server.h"
#include "storage/storage.h"

static void usage(FILE *to)
{
    fputs("usage:\n"
          "  orderd [serve] [--config FILE]\n"
          "  orderd migrate [--config FILE]\n"
          "  orderd token --subject SUBJECT --role ROLE[,ROLE] [--ttl 15m] [--config FILE]\n"
          "  orderd version\n"
          "Roles: customer, service, admin. --config defaults to $ORDERD_CONFIG, else "
          "./config.yaml.\n"
          "Every config.yaml setting can be overridden by ORDERD_<SECTION>_<KEY>.\n",
          to);
}

typedef struct args {
    const char *cmd;
    const char *config;
    const char *subject;
    const char *role;
    const char *ttl;
} args;

static int parse_args(int argc, char **argv, args *a)
{
    memset(a, 0, sizeof *a);
    a->cmd = "serve";
    a->config = getenv("ORDERD_CONFIG");
    if (!a->config || !*a->config)
        a->config = "config.yaml";
    int i = 1;
    if (i < argc && argv[i][0] != '-')
        a->cmd = argv[i++];
    for (; i < argc; i++) {
        const char *opt = argv[i];
        const char **dst = NULL;
        if (strcmp(opt, "--config") == 0 || strcmp(opt, "-c") == 0)
            dst = &a->config;
        else if (strcmp(opt, "--subject") == 0)
            dst = &a->subject;
        else if (strcmp(opt, "--role") == 0 || strcmp(opt, "--roles") == 0)
            dst = &a->role;
        else if (strcmp(opt, "--ttl") == 0)
            dst = &a->ttl;
        else if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
            usage(stdout);
            exit(0);
        } else {
            fprintf(stderr, "orderd: unknown option %s\n", opt);
            return -1;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "orderd: %s needs a value\n", opt);
            return -1;
        }
        *dst = argv[++i];
    }
    return 0;
}

static int cmd_migrate(const args *a)
{
    srv_config cfg;
    char err[512];
    if (srv_config_load(a->config, 0, &cfg, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "cannot load the configuration", LOG_F_STR, "error", err, LOG_F_END);
        return 2;
    }
    log_set_level(cfg.log_level);
    int rc = store_migrate(cfg.pg_dsn, err, sizeof err);
    if (rc != 0)
        log_kv(LOG_ERROR, "migration failed", LOG_F_STR, "error", err, LOG_F_END);
    else
        log_msgf(LOG_INFO, "database schema is up to date");
    srv_config_dispose(&cfg);
    return rc == 0 ? 0 : 1;
}

static int cmd_token(const args *a)
{
    if (!a->subject || !*a->subject || !a->role) {
        fprintf(stderr, "orderd token: --subject and --role are required\n");
        usage(stderr);
        return 2;
    }
    unsigned roles = srv_roles_parse(a->role);
    if (!roles) {
        fprintf(stderr, "orderd token: unknown role '%s' (customer, service, admin)\n", a->role);
        return 2;
    }
    srv_config cfg;
    char err[512];
    if (srv_config_load(a->config, 0, &cfg, err, sizeof err) != 0) {
        fprintf(stderr, "orderd token: %s\n", err);
        return 2;
    }
    int64_t ttl_us = cfg.token_ttl_us;
    if (a->ttl && clock_parse_duration(a->ttl, &ttl_us) != 0) {
        fprintf(stderr, "orderd token: --ttl takes a duration such as 30s, 15m or 1h\n");
        srv_config_dispose(&cfg);
        return 2;
    }
    if (ttl_us < 1000000) {
        fprintf(stderr, "orderd token: --ttl must be at least 1s\n");
        srv_config_dispose(&cfg);
        return 2;
    }
    char *token = NULL;
    int rc = srv_auth_mint(&cfg, a->subject, roles, ttl_us / 1000000, clock_wall_us() / 1000000,
                           &token, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "orderd token: %s\n", err);
    } else {
        printf("%s\n", token);
        free(token);
    }
    srv_config_dispose(&cfg);
    return rc == 0 ? 0 : 1;
}

static int cmd_serve(const args *a)
{
    srv_config cfg;
    char err[512];
    if (srv_config_load(a->config, SRV_CONFIG_NEED_SECRETS, &cfg, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "cannot load the configuration", LOG_F_STR, "error", err, LOG_F_END);
        return 2;
    }
    log_set_level(cfg.log_level);
    srv_config_log(&cfg);

    /* Signals go to sigwait() in srv_server_run only: block them before grpc_init starts
     * any thread, so every thread inherits the mask (grpc notes, #3). SIGPIPE is ignored:
     * a vanished peer must not kill the process. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    grpc_init();
    int rc = srv_server_run(&cfg, &set);
    grpc_shutdown();
    srv_config_dispose(&cfg);
    return rc;
}

int main(int argc, char **argv)
{
    args a;
    if (parse_args(argc, argv, &a) != 0) {
        usage(stderr);
        return 2;
    }
    if (strcmp(a.cmd, "serve") == 0)
        return cmd_serve(&a);
    if (strcmp(a.cmd, "migrate") == 0)
        return cmd_migrate(&a);
    if (strcmp(a.cmd, "token") == 0)
        return cmd_token(&a);
    if (strcmp(a.cmd, "version") == 0) {
        printf("orderd %s (gRPC core %s)\n", ORDERD_VERSION, grpc_version_string());
        return 0;
    }
    fprintf(stderr, "orderd: unknown command '%s'\n", a.cmd);
    usage(stderr);
    return 2;
}
