// A Python interpreter for running the emulated kernels under a sanitizer
// (CMakeLists.txt's tdpo_sanitized_python): built with -fsanitize, so that the sanitizer's
// runtime is loaded first, as it must be; the python3 binary cannot preload ThreadSanitizer.
// Takes the arguments of python3.
#include <Python.h>

int main(int argc, char** argv) { return Py_BytesMain(argc, argv); }
