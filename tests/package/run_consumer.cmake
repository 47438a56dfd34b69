# Builds and runs tests/package/consumer in a fresh directory.
# -DMODE=find_package|add_subdirectory|fetchcontent -DSOURCE=<lowbit source>
# -DBUILD=<lowbit build tree, for find_package> -DWORK=<scratch dir> -DGENERATOR=<gen>
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "failed (${status}): ${ARGV}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

set(extra "")
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} --install ${BUILD} --prefix ${WORK}/prefix)
  set(extra -DCMAKE_PREFIX_PATH=${WORK}/prefix)
endif()
run(${CMAKE_COMMAND} -S ${SOURCE}/tests/package/consumer -B ${WORK}/build -G ${GENERATOR}
    -DCMAKE_BUILD_TYPE=Release -DLOWBIT_CONSUME=${MODE} -DLOWBIT_SOURCE_DIR=${SOURCE} ${extra})
run(${CMAKE_COMMAND} --build ${WORK}/build)
run(${WORK}/build/consumer)
