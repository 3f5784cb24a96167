// TQ_CHECK: TORCH_CHECK with a message built without iostreams.
// c10::str formats through std::ostringstream; on the GPU machine (torch 2.11.0+cu130 with many other C++
// libraries loaded by the test process) every error whose message streamed an integer or a shape crashed the
// process (SIGSEGV) instead of raising, while messages without numbers raised normally. Formatting numbers with
// std::to_string / snprintf needs no stream or locale, so an error always reaches Python as a RuntimeError.
#pragma once
#include <cstdio>
#include <string>
#include <type_traits>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace torchquant::detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>,
                                    int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s += buf;
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) {
  s += c10::DeviceTypeName(v.type(), /*lower_case=*/true);
  if (v.has_index()) s += ":" + std::to_string(v.index());
}

template <class... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace torchquant::detail

#define TQ_CHECK(cond, ...) TORCH_CHECK((cond), ::torchquant::detail::message(__VA_ARGS__))
