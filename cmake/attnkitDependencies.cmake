# Finds attnkit's dependencies; used by the build and by the installed attnkitConfig.cmake alike.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
find_dependency(xsimd 8)
# Debian's xsimd 8.1 target names "xtl" as a link dependency without finding it. xsimd only needs
# xtl for its optional xtl-complex support, which attnkit does not use, so a missing xtl is replaced
# by an empty interface target instead of becoming "-lxtl" on the link line.
if(NOT TARGET xtl)
  find_package(xtl QUIET)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
if(ATTNKIT_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
endif()
