// A Python interpreter for running the emulated kernels under a sanitizer
// (CMakeLists.txt's tdpo_sanitized_python): built with -fsanitize, so that the sanitizer's
// runtime is loaded first, as it must be (the python3 binary cannot preload
// ThreadSanitizer's). Takes the arguments of python3, and finds its standard library and
// packages as TDPO_PYTHON_EXECUTABLE, the interpreter CMake was configured with, does.
#include <Python.h>

int main(int argc, char** argv) {
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  PyStatus status = PyConfig_SetBytesString(&config, &config.program_name,
                                            TDPO_PYTHON_EXECUTABLE);
  if (!PyStatus_Exception(status)) status = PyConfig_SetBytesArgv(&config, argc, argv);
  if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(status)) Py_ExitStatusException(status);
  return Py_RunMain();
}
