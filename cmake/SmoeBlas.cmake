# Chooses the BLAS behind the CPU backend's expert GEMMs and exposes it as the target smoe_blas.
#
#   SMOE_BLAS=openblas        the system OpenBLAS (Debian: libopenblas-dev)
#   SMOE_BLAS=scipy-openblas  OpenBLAS from the PyPI wheel scipy-openblas32 (symbols prefixed scipy_)
#   SMOE_BLAS=none            smoe's own blocked GEMM only
#   SMOE_BLAS=auto            the first of those that is found
#
# smoe declares the few CBLAS prototypes it calls itself (csrc/cpu/blas.h), so no cblas.h is needed;
# the target carries SMOE_HAVE_BLAS=1 and SMOE_BLAS_PREFIX=<symbol prefix>.
add_library(smoe_blas INTERFACE)
set(_smoe_blas_found "")

if(SMOE_BLAS STREQUAL "auto" OR SMOE_BLAS STREQUAL "openblas")
  find_library(SMOE_OPENBLAS_LIB NAMES openblas openblas64 PATH_SUFFIXES openblas-pthread openblas-openmp)
  if(SMOE_OPENBLAS_LIB)
    target_link_libraries(smoe_blas INTERFACE ${SMOE_OPENBLAS_LIB})
    target_compile_definitions(smoe_blas INTERFACE SMOE_HAVE_BLAS=1 SMOE_BLAS_PREFIX=)
    set(_smoe_blas_found "openblas (${SMOE_OPENBLAS_LIB})")
  elseif(SMOE_BLAS STREQUAL "openblas")
    message(FATAL_ERROR "SMOE_BLAS=openblas but libopenblas was not found: apt-get install libopenblas-dev")
  endif()
endif()

if(NOT _smoe_blas_found AND (SMOE_BLAS STREQUAL "auto" OR SMOE_BLAS STREQUAL "scipy-openblas"))
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import scipy_openblas32 as m; print(m.get_lib_dir()); print(m.get_library())"
      OUTPUT_VARIABLE _sob OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _sob_rc ERROR_QUIET)
    if(_sob_rc EQUAL 0)
      string(REPLACE "\n" ";" _sob "${_sob}")
      list(GET _sob 0 _sob_dir)
      list(GET _sob 1 _sob_name)
      find_library(SMOE_SCIPY_OPENBLAS_LIB NAMES ${_sob_name} PATHS ${_sob_dir} NO_DEFAULT_PATH)
      if(SMOE_SCIPY_OPENBLAS_LIB)
        target_link_libraries(smoe_blas INTERFACE ${SMOE_SCIPY_OPENBLAS_LIB})
        target_compile_definitions(smoe_blas INTERFACE SMOE_HAVE_BLAS=1 SMOE_BLAS_PREFIX=scipy_)
        set(_smoe_blas_found "scipy-openblas32 (${SMOE_SCIPY_OPENBLAS_LIB})")
      endif()
    endif()
  endif()
  if(NOT _smoe_blas_found AND SMOE_BLAS STREQUAL "scipy-openblas")
    message(FATAL_ERROR "SMOE_BLAS=scipy-openblas but the wheel was not found: pip install scipy-openblas32")
  endif()
endif()

if(NOT _smoe_blas_found)
  target_compile_definitions(smoe_blas INTERFACE SMOE_HAVE_BLAS=0)
  set(_smoe_blas_found "none (smoe's own GEMM)")
endif()
message(STATUS "smoe: CPU BLAS = ${_smoe_blas_found}")
