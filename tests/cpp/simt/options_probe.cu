// Prints the emulator options read from the environment (SMOE_SIMT_SM90A, SMOE_SIMT_SMS) and the
// multiprocessor count the emulated device reports; tests/cpp/simt/CMakeLists.txt runs it with good
// and bad values and matches the output (a bad value is reported on stderr and the default kept).
#include <cstdio>

#include "smoe/simt/launch.h"

int main() {
  const smoe::simt::Options o = smoe::simt::options();
  int sms = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  std::printf("sm90a=%d sm_count=%d multiprocessors=%d (%s)\n", o.sm90a ? 1 : 0, o.sm_count, sms, cudaGetErrorName(e));
  return e == cudaSuccess ? 0 : 1;
}
