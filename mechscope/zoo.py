"""The shipped model organisms: ``mechscope.zoo.load("induction")``, ``mechscope.zoo.explain(...)``."""

from mechscope.toys.zoo import explain, load, load_any, load_run, shipped

__all__ = ["explain", "load", "load_any", "load_run", "shipped"]
