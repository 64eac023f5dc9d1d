/* The shared library is loaded with ctypes (nemoh/kernels/cpu_library.py); this module init only lets
   setuptools build it as an extension and `import nemoh.kernels._cpu` name it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu",
                                    "nemoh's native CPU kernels (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
