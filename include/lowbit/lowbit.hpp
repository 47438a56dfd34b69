// lowbit: 2/3/4-bit weight quantization for LLMs, header-only. Include this one file.
#pragma once

#include "lowbit/version.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/core/spec.hpp"
#include "lowbit/core/isa.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/affine.hpp"
#include "lowbit/core/tensor.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/pack/pack.hpp"
#include "lowbit/pack/hqq_layout.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "lowbit/quantizers/hqq.hpp"
