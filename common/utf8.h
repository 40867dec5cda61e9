/* utf8.h — well-formed UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above
 * U+10FFFF. For the places where bytes from outside meet text: requests, logs. */
#ifndef ORDERD_COMMON_UTF8_H
#define ORDERD_COMMON_UTF8_H
#include <stdbool.h>
#include <stddef.h>

/** Length (1..4) of the well-formed sequence at p, of which at most `avail` bytes may be
 *  read; 0 if it is not one (or is cut off). A NUL is a sequence of 1. Reads no further
 *  than the first byte that does not fit, so a NUL-terminated string may pass 4. */
size_t utf8_seq_len(const unsigned char *p, size_t avail);

/** true if s[0..n) is well-formed UTF-8 without a NUL. */
bool utf8_text_ok(const unsigned char *s, size_t n);

#endif
