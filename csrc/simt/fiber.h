// smoe SIMT emulator: fiber stacks and context switches (internal to the runtime).
//
// x86-64 and aarch64 switch with a few lines of assembly that save the callee-saved registers and
// the floating-point control word, then swap stack pointers: no system call, unlike ucontext's
// swapcontext (which saves and restores the signal mask). Other architectures, or builds with
// SMOE_SIMT_USE_UCONTEXT defined, fall back to ucontext. Under AddressSanitizer every switch is
// announced with __sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber.
#pragma once

#include <cstddef>

#if !defined(SMOE_SIMT_USE_UCONTEXT) && !defined(__x86_64__) && !defined(__aarch64__)
#define SMOE_SIMT_USE_UCONTEXT 1
#endif
#if defined(SMOE_SIMT_USE_UCONTEXT)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SMOE_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SMOE_SIMT_ASAN 1
#endif
#endif

namespace smoe::simt::detail {

struct FiberStack {
  char* mapping = nullptr;  // includes the guard page at the low end
  size_t mapping_bytes = 0;
  char* lo = nullptr;  // usable stack [lo, lo + bytes)
  size_t bytes = 0;
};

// With `guard`, a PROT_NONE page below the stack turns an overflow into a segmentation fault.
// Each guard splits the mapping in two (kernel VMAs are limited by vm.max_map_count, 65530 by
// default), so callers skip guards when they need very many stacks at once.
FiberStack allocate_stack(size_t bytes, bool guard);
void free_stack(FiberStack& stack);

struct Context {
#if defined(SMOE_SIMT_USE_UCONTEXT)
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
  // AddressSanitizer bookkeeping: the stack this context runs on, and its fake-stack handle.
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
  void* fake_stack = nullptr;
};

// Prepares `ctx` so that the first switch to it calls entry(arg) on `stack`. entry never returns.
void make_context(Context& ctx, const FiberStack& stack, void (*entry)(void*), void* arg);
// Saves the running context into `from` and resumes `to`; returns when someone switches back.
void switch_context(Context& from, Context& to);
// Leaves `from` for good (its stack may be reused at once).
[[noreturn]] void exit_to_context(Context& from, Context& to);
// First statement of a fiber's entry function: completes the sanitizer's switch bookkeeping and
// records the stack of the context that started it (`parent`).
void fiber_started(Context& parent);

}  // namespace smoe::simt::detail
