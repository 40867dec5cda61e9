/* pagetoken.h — ListOrders page tokens: opaque, tamper-evident cursors.
 *
 * A token carries the position of the last order of a page, (created_at_us, order id),
 * and a MAC that binds it to the key and to a `scope`: a string the caller builds from
 * the query (customer filter and status filter, e.g. "c=alice;s=1,2"), so that a token
 * minted for one query is refused by another. Tokens do not expire: a cursor is only a
 * position, and it reveals nothing the caller could not already list.
 *
 * Format (version 1): base64url without padding of
 *   0x01 | created_at_us (8 bytes, big-endian) | order id (16 bytes, the UUID) |
 *   HMAC-SHA256(key, SHA-256(scope) | the 25 bytes before) truncated to 16 bytes
 * which is SRV_PAGETOKEN_LEN characters.
 */
#ifndef ORDERD_SERVER_PAGETOKEN_H
#define ORDERD_SERVER_PAGETOKEN_H

#include <stddef.h>
#include <stdint.h>

/** Length of a token in characters; a buffer for one needs SRV_PAGETOKEN_LEN + 1. */
#define SRV_PAGETOKEN_LEN 55

/**
 * Writes the token for position (created_at_us, order_id) in `scope` into out
 * (NUL-terminated). order_id is a UUID in text form (any case). Returns 0, or -1 if the
 * key is empty, the id is not a UUID, or cap < SRV_PAGETOKEN_LEN + 1.
 */
int srv_pagetoken_encode(const unsigned char *key, size_t keylen, const char *scope,
                         int64_t created_at_us, const char *order_id, char *out, size_t cap);

/**
 * Reads a token made by srv_pagetoken_encode with the same key and scope. Returns 0 and
 * the position (order_id in lower-case canonical form, NUL-terminated), or -1 for a token
 * that is malformed, truncated, too long, forged, or from another key or scope; the
 * outputs are then untouched. Safe on any NUL-terminated input.
 */
int srv_pagetoken_decode(const unsigned char *key, size_t keylen, const char *scope,
                         const char *token, int64_t *created_at_us, char order_id[37]);

#endif
