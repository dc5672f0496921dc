#include "common/name_table.h"

#include <algorithm>
#include <cctype>

namespace mdtrt {
namespace {

// The spelling a name is compared by: lower case, without '_', '-' or ' ' ("All-Reduce" and
// "allreduce" are both "allreduce"), so that a wrong case or separator is matched exactly.
std::string comparison_key(const std::string& name) {
  std::string key;
  for (unsigned char c : name)
    if (c != '_' && c != '-' && c != ' ') key += static_cast<char>(std::tolower(c));
  return key;
}

// Levenshtein distance: the fewest insertions, deletions and substitutions from a to b.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string did_you_mean(const std::string& name, const std::vector<std::string>& known) {
  const std::string key = comparison_key(name);
  if (key.empty()) return "";
  const std::string* best = nullptr;
  size_t best_distance = 0;
  for (const auto& candidate : known) {
    const std::string candidate_key = comparison_key(candidate);
    const size_t distance = edit_distance(key, candidate_key);
    // A third of the longer spelling may differ: "all_reduse" and "rings" get a suggestion,
    // "fast" (two of four letters from "host") does not.
    if (3 * distance > std::max(key.size(), candidate_key.size())) continue;
    if (best == nullptr || distance < best_distance) {
      best = &candidate;
      best_distance = distance;
    }
  }
  if (best == nullptr || *best == name) return "";
  return " (did you mean '" + *best + "'?)";
}

void throw_unknown_name(const std::string& what, const std::string& name, const std::vector<std::string>& known) {
  std::string listed;
  for (const auto& entry : known) listed += (listed.empty() ? "" : ", ") + entry;
  throw_invalid_argument(what + " is '" + name + "'" + did_you_mean(name, known) + "; it must be one of: " + listed);
}

}  // namespace mdtrt
