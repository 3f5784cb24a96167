// <immintrin.h> for the CPU kernels: include this first in a source file, before torch's headers include it.
#pragma once
// GCC 12's AVX-512 headers initialize their "undefined" vectors with themselves (__m512 __Y = __Y), which its own
// -Wuninitialized then reports at every inlined use: a thousand warnings per build from the header alone (GCC 13
// does not). The pragmas cover the header's lines only; the kernels' own code keeps both warnings.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
