# csrc/cuda/gemm_cublas.cmake: find cuBLAS for the cuBLAS grouped-GEMM baseline (gemm_cublas.cu).
#
# include()d by csrc/cuda/CMakeLists.txt after the smoe_cuda target exists (nvcc build only). Looks in
# the CUDA toolkit first (CUDA::cublas from find_package(CUDAToolkit)), then in the PyPI wheel
# nvidia-cublas (CUDA 13: site-packages/nvidia/cu13/{include,lib}; CUDA 12 wheels used
# site-packages/nvidia/cublas/{include,lib}), then in SMOE_CUBLAS_ROOT. Found: smoe_cuda gets
# SMOE_HAVE_CUBLAS=1 (PUBLIC) and links cuBLAS. Not found: a status message, and gemm_cublas.cu
# compiles to an empty translation unit (it tests SMOE_HAVE_CUBLAS).
option(SMOE_ENABLE_CUBLAS "Build the cuBLAS grouped-GEMM baseline (csrc/cuda/gemm_cublas.cu)" ON)
set(SMOE_CUBLAS_ROOT "" CACHE PATH
    "Directory holding include/cublas_v2.h and lib/libcublas.so* (e.g. <site-packages>/nvidia/cu13)")

if(SMOE_ENABLE_CUBLAS AND TARGET smoe_cuda)
  set(smoe_cublas_found FALSE)
  if(TARGET CUDA::cublas)
    target_link_libraries(smoe_cuda PUBLIC CUDA::cublas)
    set(smoe_cublas_found TRUE)
    set(smoe_cublas_where "the CUDA toolkit")
  else()
    # Candidate wheel directories from the Python that builds smoe.
    set(smoe_cublas_hints ${SMOE_CUBLAS_ROOT})
    find_package(Python3 COMPONENTS Interpreter QUIET)
    if(Python3_Interpreter_FOUND)
      execute_process(
        COMMAND ${Python3_EXECUTABLE} -c
                "import site, sys; print(';'.join(site.getsitepackages() + [site.getusersitepackages()]))"
        OUTPUT_VARIABLE smoe_site_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
      foreach(d IN LISTS smoe_site_dirs)
        list(APPEND smoe_cublas_hints ${d}/nvidia/cu13 ${d}/nvidia/cublas)
      endforeach()
    endif()
    find_path(SMOE_CUBLAS_INCLUDE_DIR cublas_v2.h HINTS ${smoe_cublas_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
    # The wheel ships only the versioned name (libcublas.so.13); NAMES accepts full file names.
    find_library(SMOE_CUBLAS_LIBRARY NAMES cublas libcublas.so.13 libcublas.so.12
                 HINTS ${smoe_cublas_hints} PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
    if(SMOE_CUBLAS_INCLUDE_DIR AND SMOE_CUBLAS_LIBRARY)
      target_include_directories(smoe_cuda SYSTEM PUBLIC ${SMOE_CUBLAS_INCLUDE_DIR})
      get_filename_component(smoe_cublas_libdir ${SMOE_CUBLAS_LIBRARY} DIRECTORY)
      # libcublas needs libcublasLt from the same directory at link and run time.
      target_link_libraries(smoe_cuda PUBLIC ${SMOE_CUBLAS_LIBRARY} "-Wl,-rpath,${smoe_cublas_libdir}")
      set(smoe_cublas_found TRUE)
      set(smoe_cublas_where "${smoe_cublas_libdir}")
    endif()
  endif()
  if(smoe_cublas_found)
    target_compile_definitions(smoe_cuda PUBLIC SMOE_HAVE_CUBLAS=1)
    message(STATUS "smoe: cuBLAS grouped-GEMM baseline enabled (cuBLAS from ${smoe_cublas_where})")
  else()
    message(STATUS "smoe: cuBLAS not found (toolkit, pip wheel nvidia-cublas, SMOE_CUBLAS_ROOT); "
                   "csrc/cuda/gemm_cublas.cu is skipped. pip install 'nvidia-cublas==13.*' to enable it")
  endif()
endif()
