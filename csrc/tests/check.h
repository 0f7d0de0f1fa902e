// The CPU tests' check: CHECK(cond, fmt, ...) counts a check and, when cond is false, prints the
// file, line, condition and the formatted message, then counts a failure (more than 25 end the
// program). Each test returns twa_check::summary(name) from main.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace twa_check {

inline int failures = 0;
inline int checks = 0;

// "<name>: N checks, M failures"; the exit status of the test.
inline int summary(const char* name) {
  std::printf("%s: %d checks, %d failures\n", name, checks, failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace twa_check

#define CHECK(cond, ...)                                           \
  do {                                                             \
    ++::twa_check::checks;                                         \
    if (!(cond)) {                                                 \
      ++::twa_check::failures;                                     \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                    \
      std::printf("\n");                                           \
      if (::twa_check::failures > 25) std::exit(1);                \
    }                                                              \
  } while (0)
