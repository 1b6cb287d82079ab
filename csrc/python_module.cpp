// An empty Python module. Importing `dgl_fast._C` loads this shared library, whose
// static initialisers register the dgl_fast operators with the PyTorch dispatcher.
// No op goes through pybind11: they are all reached as torch.ops.dgl_fast.<name>.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "dgl_fast native library: registers torch.ops.dgl_fast.*",
      -1,  // size of per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
