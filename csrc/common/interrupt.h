// Ctrl-C for blocking waits. The layers below the bindings know nothing of Python or of signal
// handlers: whoever embeds them (the Python bindings, a program's main) installs one check, "should
// the wait in progress stop?", and every long wait polls it a few times per second on the thread
// that waits for the others (never on rank threads). A wait that sees it aborts what it waited
// for and throws Error(kInterrupted).
#pragma once

#include <chrono>
#include <functional>
#include <string>

namespace mdtrt {

// How often a blocking wait asks: often enough that Ctrl-C answers well within a second.
constexpr std::chrono::milliseconds kInterruptPollInterval{100};

// Installs the process-wide check (an empty function removes it). The check may be called from
// any thread that waits; it must be cheap and must not throw.
void set_interrupt_check(std::function<bool()> check);

// True when the installed check says to stop; false when none is installed.
bool interrupt_requested();

// Throws Error(kInterrupted) saying which wait was interrupted (`what`, e.g. "read NCCL id").
[[noreturn]] void throw_interrupted(const std::string& what, int rank = -1);

}  // namespace mdtrt
