/* ds4 native engine: the public C interface.
 *
 * Every header included here is also read by cffi (ds4/_build.py) with its
 * preprocessor lines removed, so they hold only plain prototypes, enums and
 * opaque struct typedefs. Internal headers are not listed here. */
#ifndef DS4_H
#define DS4_H

#include <stddef.h>
#include <stdint.h>

#include "quants.h"
#include "gguf.h"
#include "model.h"
#include "sample.h"
#include "session.h"
#include "qat.h"

#endif
