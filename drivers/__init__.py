"""Runtime drivers: the code that runs a model, behind one small interface (drivers.base)."""
