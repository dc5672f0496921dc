// One table per named concept (dtypes, collective ops, reduce ops, replication modes): the enum
// value and the name Python, NCCL and TensorRT users spell it with. Lookups go through these
// helpers, so that no table is indexed by a cast enum or walked with a hard-coded count, and the
// tables are what _core exports for Python to derive its lists from.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "common/error.h"

namespace mdtrt {

template <typename E>
struct NamedValue {
  E value;
  const char* name;
};

// "a, b, c": every name of the table, in its order (for error messages).
template <typename E, size_t N>
std::string known_names(const NamedValue<E> (&table)[N]) {
  std::string known;
  for (const auto& entry : table) {
    known += known.empty() ? "" : ", ";
    known += entry.name;
  }
  return known;
}

// The value named `name`; throws kInvalidArgument "unknown <what> '<name>' (known: ...)".
template <typename E, size_t N>
E value_from_name(const NamedValue<E> (&table)[N], const std::string& name, const char* what) {
  for (const auto& entry : table)
    if (name == entry.name) return entry.value;
  throw_invalid_argument("unknown " + std::string(what) + " '" + name + "' (known: " + known_names(table) + ")");
}

// The name of `value`; throws kInvalidArgument for a value outside the table (a bad cast).
template <typename E, size_t N>
const char* name_of(const NamedValue<E> (&table)[N], E value, const char* what) {
  for (const auto& entry : table)
    if (entry.value == value) return entry.name;
  throw_invalid_argument("unknown " + std::string(what) + " code " + std::to_string(static_cast<int>(value)));
}

// Every name of the table, in its order.
template <typename E, size_t N>
std::vector<std::string> all_names(const NamedValue<E> (&table)[N]) {
  std::vector<std::string> out;
  for (const auto& entry : table) out.push_back(entry.name);
  return out;
}

}  // namespace mdtrt
