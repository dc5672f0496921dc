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

// " (did you mean 'all_reduce'?)" when `name` is close to one of `known` (another case or
// separator, or a third of its letters wrong), else "". Python's mdtrt.vocabulary.did_you_mean is
// this function, so that every refusal of a name suggests the same one.
std::string did_you_mean(const std::string& name, const std::vector<std::string>& known);

// The one refusal of a name outside a fixed vocabulary, in the words of Python's
// mdtrt.arguments.choice: "<what> is '<name>' (did you mean 'x'?); it must be one of: a, b, c".
// `what` names the argument ("op", "reduce", "replication", "dtype").
[[noreturn]] void throw_unknown_name(const std::string& what, const std::string& name,
                                     const std::vector<std::string>& known);

// Every name of the table, in its order.
template <typename E, size_t N>
std::vector<std::string> all_names(const NamedValue<E> (&table)[N]) {
  std::vector<std::string> out;
  for (const auto& entry : table) out.push_back(entry.name);
  return out;
}

// The value named `name` (exact match); throws kInvalidArgument through throw_unknown_name.
template <typename E, size_t N>
E value_from_name(const NamedValue<E> (&table)[N], const std::string& name, const char* what) {
  for (const auto& entry : table)
    if (name == entry.name) return entry.value;
  throw_unknown_name(what, name, all_names(table));
}

// The name of `value`; throws kInvalidArgument for a value outside the table (a bad cast).
template <typename E, size_t N>
const char* name_of(const NamedValue<E> (&table)[N], E value, const char* what) {
  for (const auto& entry : table)
    if (entry.value == value) return entry.name;
  throw_invalid_argument("unknown " + std::string(what) + " code " + std::to_string(static_cast<int>(value)));
}

}  // namespace mdtrt
