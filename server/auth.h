/* auth.h — bearer tokens: verifying the JWTs callers present, minting HS256 tokens for
 * admins (`orderd token`), and the role names.
 *
 * The algorithm is pinned by configuration, never chosen by the token: "HS256" is
 * verified with the HS256 secret and "RS256" with the RS256 public key, each only if
 * that key is configured; every other "alg" (none, HS384, ES256, ...) is refused.
 * Claims: exp required (no leeway: a token is dead from its exp second on); nbf and iat
 * honoured when present, with SRV_AUTH_CLOCK_SKEW_S of tolerance for an issuer whose
 * clock runs ahead; iss and aud checked when configured; sub required (1..128 bytes, no
 * control characters); roles required, an array of strings of which at least one is
 * customer, service or admin (other strings are ignored).
 */
#ifndef ORDERD_SERVER_AUTH_H
#define ORDERD_SERVER_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "orders/orders.h"
#include "server/config.h"

/** Largest token accepted, after "Bearer ". */
#define SRV_AUTH_MAX_TOKEN 8192
/** How far in the future nbf may lie, and iat, before a token is refused (seconds). */
#define SRV_AUTH_CLOCK_SKEW_S 30

/** Keys and expectations for verifying tokens. Immutable once created. */
typedef struct srv_auth srv_auth;

/**
 * Builds a verifier from the configuration: copies the HS256 secret, parses the RS256
 * public key (an RSA key of at least 2048 bits in PEM), copies issuer and audience.
 * Returns NULL with a reason in err if neither key is configured or the PEM is bad.
 * The caller frees it with srv_auth_destroy; cfg may be disposed afterwards.
 */
srv_auth *srv_auth_create(const srv_config *cfg, char *err, size_t errlen);

/** Frees the verifier, wiping the secret. NULL does nothing. */
void srv_auth_destroy(srv_auth *a);

/**
 * Verifies an `authorization` header value of `len` bytes (need not be NUL-terminated):
 * exactly "Bearer <token>", scheme case-insensitive, one space. On success fills *out
 * (subject, ORDER_ROLE_* bits) and returns 0. Otherwise returns -1 and writes a short
 * reason for logs into why ("token expired", "bad signature", "unsupported alg"...); the
 * reason never contains the token or any part of it.
 * Thread-safe: `a` is only read, and every call uses its own OpenSSL contexts.
 */
int srv_auth_verify(const srv_auth *a, const char *authorization_header_value, size_t len,
                    int64_t now_unix_s, order_caller *out, char *why, size_t whylen);

/**
 * Mints an HS256 token with the configured secret: sub, roles (names), iat = now,
 * exp = now + ttl_s, iss and aud when configured, and a random jti. `roles` is a
 * non-empty set of ORDER_ROLE_* bits. Returns 0 and a malloc'd NUL-terminated token in
 * *out_token (the caller frees it), or -1 with a reason in err.
 */
int srv_auth_mint(const srv_config *cfg, const char *subject, unsigned roles, int64_t ttl_s,
                  int64_t now_unix_s, char **out_token, char *err, size_t errlen);

/** Parses "admin" or "customer,service" (spaces around names allowed) into ORDER_ROLE_*
 *  bits. Returns 0 if the list is empty, NULL, or names an unknown role. */
unsigned srv_roles_parse(const char *comma_separated);

/** "customer", "service" or "admin" for one ORDER_ROLE_* bit; NULL for anything else. */
const char *srv_role_name(unsigned bit);

/* ---- internal to server/: base64url without padding (RFC 4648 section 5) ---- */

/** Encodes n bytes into out as NUL-terminated text. Returns the text's length, or 0 if
 *  cap is too small (out is then ""). */
size_t srv__b64url_encode(const unsigned char *in, size_t n, char *out, size_t cap);

/** Decodes inlen characters strictly: only A-Z a-z 0-9 - _, no padding, no whitespace,
 *  unused trailing bits zero (one text per byte string). Returns the decoded length, or
 *  -1 if malformed or longer than cap. */
long srv__b64url_decode(const char *in, size_t inlen, unsigned char *out, size_t cap);

#endif
