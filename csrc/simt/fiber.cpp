// smoe SIMT emulator: fiber stacks and context switches. See fiber.h.
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if defined(SMOE_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace smoe::simt::detail {

FiberStack allocate_stack(size_t bytes, bool guard) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  bytes = (bytes + page - 1) / page * page;
  FiberStack s;
  s.mapping_bytes = bytes + page;
  void* m = mmap(nullptr, s.mapping_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
  if (m == MAP_FAILED) {
    std::fprintf(stderr, "smoe-simt: cannot map a %zu-byte fiber stack\n", bytes);
    std::abort();
  }
  s.mapping = static_cast<char*>(m);
  // A guard page below the stack turns an overflow into a segmentation fault at the faulting
  // access instead of silent corruption of the neighbouring fiber (raise SMOE_SIMT_STACK_KB).
  if (guard) mprotect(s.mapping, page, PROT_NONE);
  s.lo = s.mapping + page;
  s.bytes = bytes;
  return s;
}

void free_stack(FiberStack& stack) {
  if (stack.mapping) munmap(stack.mapping, stack.mapping_bytes);
  stack = FiberStack{};
}

#if defined(SMOE_SIMT_ASAN)
static void start_switch(void** fake_save, const Context& to) {
  __sanitizer_start_switch_fiber(fake_save, to.stack_bottom, to.stack_size);
}
static void finish_switch(void* fake, Context& peer) {
  __sanitizer_finish_switch_fiber(fake, &peer.stack_bottom, &peer.stack_size);
}
#else
static void start_switch(void**, const Context&) {}
static void finish_switch(void*, Context&) {}
#endif

void fiber_started(Context& parent) { finish_switch(nullptr, parent); }

}  // namespace smoe::simt::detail

#if defined(SMOE_SIMT_USE_UCONTEXT)
// ------------------------------------------------------------------------------------ ucontext
namespace smoe::simt::detail {

static void ucontext_entry(unsigned lo, unsigned hi, unsigned elo, unsigned ehi) {
  auto* arg = reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo);
  auto entry = reinterpret_cast<void (*)(void*)>((static_cast<uintptr_t>(ehi) << 32) | elo);
  entry(arg);
  std::abort();
}

void make_context(Context& ctx, const FiberStack& stack, void (*entry)(void*), void* arg) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack.lo;
  ctx.uc.uc_stack.ss_size = stack.bytes;
  ctx.uc.uc_link = nullptr;
  const auto a = reinterpret_cast<uintptr_t>(arg);
  const auto e = reinterpret_cast<uintptr_t>(entry);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, static_cast<unsigned>(a),
              static_cast<unsigned>(a >> 32), static_cast<unsigned>(e), static_cast<unsigned>(e >> 32));
  ctx.stack_bottom = stack.lo;
  ctx.stack_size = stack.bytes;
}

void switch_context(Context& from, Context& to) {
  start_switch(&from.fake_stack, to);
  swapcontext(&from.uc, &to.uc);
  finish_switch(from.fake_stack, to);
}

void exit_to_context(Context& from, Context& to) {
  start_switch(nullptr, to);
  setcontext(&to.uc);
  (void)from;
  std::abort();
}

}  // namespace smoe::simt::detail

#else
// -------------------------------------------------------------------------- assembly switches
extern "C" void smoe_simt_switch_sp(void** save_sp, void* load_sp);
extern "C" void smoe_simt_fiber_trampoline();

#if defined(__x86_64__)
// Frame saved on the stack (from the saved sp upwards): mxcsr (4 bytes), x87 control word
// (2 bytes, padded to 8), r15, r14, r13, r12, rbx, rbp, return address. These are the registers
// the System V AMD64 ABI makes callee-saved, plus the two control words it requires preserved.
asm(R"(
  .text
  .p2align 4
  .globl smoe_simt_switch_sp
  .hidden smoe_simt_switch_sp
  .type smoe_simt_switch_sp,@function
smoe_simt_switch_sp:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw 12(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw 12(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size smoe_simt_switch_sp,.-smoe_simt_switch_sp

  .p2align 4
  .globl smoe_simt_fiber_trampoline
  .hidden smoe_simt_fiber_trampoline
  .type smoe_simt_fiber_trampoline,@function
smoe_simt_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r13, %rdi
  callq *%r12
  ud2
  .cfi_endproc
  .size smoe_simt_fiber_trampoline,.-smoe_simt_fiber_trampoline
)");

namespace smoe::simt::detail {
void make_context(Context& ctx, const FiberStack& stack, void (*entry)(void*), void* arg) {
  // After the switch pops the frame and `ret`s into the trampoline, rsp must be 16-byte aligned
  // so that the trampoline's call leaves the entry function with the ABI's alignment.
  auto top = reinterpret_cast<uintptr_t>(stack.lo + stack.bytes) & ~uintptr_t{15};
  top -= 16;
  auto* frame = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  frame[0] = 0;
  frame[1] = mxcsr | (static_cast<uint64_t>(fcw) << 32);
  frame[2] = 0;                                  // r15
  frame[3] = 0;                                  // r14
  frame[4] = reinterpret_cast<uint64_t>(arg);    // r13
  frame[5] = reinterpret_cast<uint64_t>(entry);  // r12
  frame[6] = 0;                                  // rbx
  frame[7] = 0;                                  // rbp
  frame[8] = reinterpret_cast<uint64_t>(&smoe_simt_fiber_trampoline);
  ctx.sp = frame;
  ctx.stack_bottom = stack.lo;
  ctx.stack_size = stack.bytes;
}
}  // namespace smoe::simt::detail

#elif defined(__aarch64__)
// Frame (176 bytes): x19..x30 (x29 frame pointer, x30 link register), d8..d15, fpcr. These are the
// callee-saved registers of the AAPCS64.
asm(R"(
  .text
  .p2align 4
  .globl smoe_simt_switch_sp
  .hidden smoe_simt_switch_sp
  .type smoe_simt_switch_sp,%function
smoe_simt_switch_sp:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mrs x9, fpcr
  str x9, [sp, #160]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  ldr x9, [sp, #160]
  msr fpcr, x9
  add sp, sp, #176
  ret
  .size smoe_simt_switch_sp,.-smoe_simt_switch_sp

  .p2align 4
  .globl smoe_simt_fiber_trampoline
  .hidden smoe_simt_fiber_trampoline
  .type smoe_simt_fiber_trampoline,%function
smoe_simt_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined x30
  mov x0, x20
  blr x19
  brk #0
  .cfi_endproc
  .size smoe_simt_fiber_trampoline,.-smoe_simt_fiber_trampoline
)");

namespace smoe::simt::detail {
void make_context(Context& ctx, const FiberStack& stack, void (*entry)(void*), void* arg) {
  auto top = reinterpret_cast<uintptr_t>(stack.lo + stack.bytes) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 176);
  for (int i = 0; i < 22; ++i) frame[i] = 0;
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  frame[0] = reinterpret_cast<uint64_t>(entry);                         // x19
  frame[1] = reinterpret_cast<uint64_t>(arg);                           // x20
  frame[11] = reinterpret_cast<uint64_t>(&smoe_simt_fiber_trampoline);  // x30
  frame[20] = fpcr;
  ctx.sp = frame;
  ctx.stack_bottom = stack.lo;
  ctx.stack_size = stack.bytes;
}
}  // namespace smoe::simt::detail
#endif

namespace smoe::simt::detail {
void switch_context(Context& from, Context& to) {
  start_switch(&from.fake_stack, to);
  smoe_simt_switch_sp(&from.sp, to.sp);
  finish_switch(from.fake_stack, to);
}

void exit_to_context(Context& from, Context& to) {
  start_switch(nullptr, to);
  void* discard;
  smoe_simt_switch_sp(&discard, to.sp);
  (void)from;
  __builtin_unreachable();
}
}  // namespace smoe::simt::detail
#endif
